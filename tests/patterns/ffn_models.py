"""Small feed-forward modules written the ways models write them, for the feed-forward rule tests.

Weights are scaled so activations stay O(1): the comparisons against eager then test the fusion,
not the conditioning of a random network.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def gelu_new(x):
    """HF's NewGELUActivation (GPT-2's gelu_new), written out with tanh and pow."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gelu_fast(x):
    """HF's FastGELUActivation ("gelu_fast"): the tanh GELU with sqrt(2/pi) * (x + 0.044715 x^3)
    factored as x * 0.7978845608 * (1 + 0.044715 x^2)."""
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def gelu_megatron(x):
    """Megatron-LM's bias_gelu (without the bias): the same factoring, sqrt(2/pi) as 0.79788456."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": gelu_new,
    "gelu_fast": gelu_fast,
    "gelu_megatron": gelu_megatron,
    "relu": torch.relu,
    "silu": F.silu,
    "silu_written": lambda x: x * torch.sigmoid(x),  # hand-written SwiGLU MLPs
    "silu_method": lambda x: x.sigmoid() * x,
    "gelu_erf": lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))),  # HF's gelu_python
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # CLIP's
    "relu2": lambda x: torch.square(F.relu(x)),  # HF's ReLUSquaredActivation (Nemotron)
    "relu_pow": lambda x: torch.relu(x) ** 2,
}
# What explain() calls each activation (gelu_new, written out with tanh, is the tanh approximation).
VARIANTS = {"gelu": "gelu", "gelu_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
            "gelu_megatron": "gelu_tanh", "relu": "relu", "silu": "silu",
            "silu_written": "silu", "silu_method": "silu", "gelu_erf": "gelu", "quick_gelu": "quick_gelu",
            "relu2": "relu2", "relu_pow": "relu2"}
GATED_VARIANTS = {"gelu": "geglu", "gelu_tanh": "geglu", "gelu_new": "geglu", "gelu_fast": "geglu",
                  "gelu_megatron": "geglu", "relu": "reglu", "silu": "swiglu",
                  "silu_written": "swiglu", "silu_method": "swiglu", "gelu_erf": "geglu", "quick_gelu": "quick_geglu",
                  "relu2": "relu2_glu", "relu_pow": "relu2_glu"}


def _param(*shape, fan_in):
    return nn.Parameter(torch.randn(*shape) * fan_in ** -0.5)


class MLP(nn.Module):
    """Linear -> act -> [dropout] -> Linear -> [dropout] [+ x], the Linears spelled as `linear`:

    "module": nn.Linear;  "functional": F.linear;  "matmul": x @ W (+ b), W stored (d, h);
    "mm": torch.mm on 2-D x (+ b);  "addmm": torch.addmm(b, x2d, W) as HF's Conv1D does it,
    flattening x to 2-D and restoring its shape afterwards;  "matmul_T": x @ W.T (+ b), W stored
    (h, d), as HF's FalconLinear does it.
    """

    def __init__(self, d=8, h=24, act="gelu", bias=True, p_hidden=0.0, p_out=0.0, residual=False,
                 linear="module", d_out=None):
        super().__init__()
        d_out = d_out or d
        self.act, self.linear, self.residual = ACTIVATIONS[act], linear, residual
        self.p_hidden, self.p_out = p_hidden, p_out
        if linear in ("module", "functional", "matmul_T"):
            self.fc1, self.fc2 = nn.Linear(d, h, bias=bias), nn.Linear(h, d_out, bias=bias)
        else:  # weights in (in, out) layout, as x @ W and Conv1D keep them
            self.w1, self.w2 = _param(d, h, fan_in=d), _param(h, d_out, fan_in=h)
            self.b1 = nn.Parameter(torch.randn(h) * 0.1) if bias else None
            self.b2 = nn.Parameter(torch.randn(d_out) * 0.1) if bias else None

    def _lin(self, x, i):
        if self.linear == "module":
            return (self.fc1 if i == 1 else self.fc2)(x)
        if self.linear in ("functional", "matmul_T"):
            m = self.fc1 if i == 1 else self.fc2
            if self.linear == "matmul_T":
                y = x @ m.weight.T
                return y + m.bias if m.bias is not None else y
            return F.linear(x, m.weight, m.bias)
        w, b = (self.w1, self.b1) if i == 1 else (self.w2, self.b2)
        if self.linear == "matmul":
            y = x @ w
        elif self.linear == "mm":
            y = torch.mm(x, w)
        else:  # addmm, HF Conv1D
            size_out = x.size()[:-1] + (w.size(-1),)
            y = torch.addmm(b, x.view(-1, x.size(-1)), w).view(size_out)
            return y
        return y + b if b is not None else y

    def forward(self, x):
        h = F.dropout(self.act(self._lin(x, 1)), self.p_hidden, self.training)
        y = F.dropout(self._lin(h, 2), self.p_out, self.training)
        return x + y if self.residual else y


class GatedMLP(nn.Module):
    """act(x W_gate) * (x W_up) -> W_down: two projections (Llama's MLP) or one projection
    chunked in two ("chunk", or split by size: "split", "split_sections"); `gate_first` says
    which half of the chunk is the gate."""

    def __init__(self, d=8, h=16, act="silu", bias=False, layout="two", gate_first=True,
                 p_hidden=0.0, residual=False):
        super().__init__()
        self.act, self.layout, self.gate_first = ACTIVATIONS[act], layout, gate_first
        self.p_hidden, self.residual = p_hidden, residual
        if layout == "two":
            self.gate_proj, self.up_proj = nn.Linear(d, h, bias=bias), nn.Linear(d, h, bias=bias)
        else:
            self.proj = nn.Linear(d, 2 * h, bias=bias)
        self.down_proj = nn.Linear(h, d, bias=bias)

    def forward(self, x):
        if self.layout == "two":
            hidden = self.act(self.gate_proj(x)) * self.up_proj(x)
        else:
            z = self.proj(x)
            if self.layout == "split":  # the halves by size: split(h) or split([h, h])
                a, b = z.split(z.shape[-1] // 2, dim=-1)
            elif self.layout == "split_sections":
                a, b = torch.split(z, [z.shape[-1] // 2] * 2, -1)
            else:
                a, b = z.chunk(2, dim=-1)
            gate, up = (a, b) if self.gate_first else (b, a)
            hidden = up * self.act(gate)
        y = self.down_proj(F.dropout(hidden, self.p_hidden, self.training))
        return x + y if self.residual else y


class BroadcastResidual(nn.Module):
    """An MLP whose output is added to a (T, d) table that broadcasts over the batch: not a
    residual of the block's shape, so the add stays outside the site."""

    def __init__(self, d=8, h=16, T=3):
        super().__init__()
        self.mlp = MLP(d, h, "gelu")
        self.pos = nn.Parameter(torch.randn(T, d))

    def forward(self, x):
        return self.mlp(x) + self.pos


class EscapingHidden(nn.Module):
    """Returns the hidden activation too: fusing could not drop it, so the site is a near-miss."""

    def __init__(self, d=8, h=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        hidden = F.gelu(self.fc1(x))
        return self.fc2(hidden), hidden


class MismatchedGate(nn.Module):
    """A gate of width h times an up projection of width 1 (broadcast): the op's gated form
    needs two (h, d) weights, so this is a near-miss."""

    def __init__(self, d=8, h=16):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, h), nn.Linear(d, 1), nn.Linear(h, d)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def tiny_gpt2_mlp(d=8, h=32, p=0.0):
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    cfg = GPT2Config(n_embd=d, n_layer=1, n_head=2, resid_pdrop=p, activation_function="gelu_new")
    return GPT2MLP(h, cfg)


def tiny_llama_mlp(d=8, h=16):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = LlamaConfig(hidden_size=d, intermediate_size=h, num_attention_heads=2, num_key_value_heads=2)
    return LlamaMLP(cfg)


class BertFeedForward(nn.Module):
    """BERT's feed-forward half: BertIntermediate (dense -> gelu) then BertOutput (dense ->
    dropout -> LayerNorm(. + input)), two HF modules."""

    def __init__(self, d=8, h=16, p=0.0):
        super().__init__()
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput

        cfg = BertConfig(hidden_size=d, intermediate_size=h, num_attention_heads=2, hidden_dropout_prob=p)
        self.intermediate, self.output = BertIntermediate(cfg), BertOutput(cfg)

    def forward(self, x):
        return self.output(self.intermediate(x), x)


def tiny_hf_model(name, layers=2):
    """A tiny randomly initialised HF model (`_from_config`, no download) with dropout off."""
    import transformers as tf

    common = dict(vocab_size=50, max_position_embeddings=16, num_hidden_layers=layers)
    if name == "gpt2":
        cfg = tf.GPT2Config(n_embd=16, n_layer=layers, n_head=2, n_positions=16, vocab_size=50,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return tf.GPT2Model._from_config(cfg)
    if name == "llama":
        cfg = tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                             num_key_value_heads=2, **common)
        return tf.LlamaModel._from_config(cfg)
    if name == "clip":  # the text tower: quick_gelu MLPs
        cfg = tf.CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, hidden_act="quick_gelu",
                                **common)
        return tf.CLIPTextModel._from_config(cfg)
    if name == "nemotron":  # squared-ReLU MLPs, no gate
        cfg = tf.NemotronConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2,
                                **common)
        return tf.NemotronModel._from_config(cfg)
    cfg = tf.BertConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
    return tf.BertModel._from_config(cfg)
