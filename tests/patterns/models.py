"""Small attention modules written the ways users write attention, for the pattern tests.

Each module takes q, k, v (and sometimes a mask) directly, so a test controls shapes, layouts and
gradients; learnable pieces (temperatures, logit scales, position biases) are parameters.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_LEN = 16


class DotAttention(nn.Module):
    """Hand-written softmax(q k^T * scale [+ masks]) v, in every spelling issue 4 lists.

    scale: "mul_float" (* 1/sqrt(d) as a Python float), "div_sqrt" (/ math.sqrt(d)), "pow"
        (* d ** -0.5), "size" (/ k.size(-1) ** 0.5), "tensor" (/ a 0-d buffer), "none".
    causal: None, "tril" (masked_fill with a registered tril buffer sliced to T), "where"
        (torch.where(tril, s, -inf)), "additive" (+ a -inf upper triangle), "finfo"
        (masked_fill with finfo.min).
    pad: add a float padding mask passed to forward (B, 1, 1, Nk).
    upcast: softmax over s.float(), cast back to q's dtype.
    dropout: None, "functional" or "module".
    layout: "4d" (q @ k.transpose), "bmm" (3-D, heads folded into batch), "einsum".
    """

    def __init__(self, scale="mul_float", causal=None, pad=False, upcast=False, dropout=None, p=0.0,
                 layout="4d", d=8):
        super().__init__()
        self.scale, self.causal, self.pad, self.upcast = scale, causal, pad, upcast
        self.dropout, self.p, self.layout, self.d = dropout, p, layout, d
        self.drop = nn.Dropout(p)
        self.register_buffer("tril", torch.tril(torch.ones(MAX_LEN, MAX_LEN)).view(1, 1, MAX_LEN, MAX_LEN))
        self.register_buffer("sqrt_d", torch.tensor(math.sqrt(d)))

    def _scores(self, q, k):
        if self.layout == "bmm":
            return torch.bmm(q, k.transpose(1, 2))
        if self.layout == "einsum":
            return torch.einsum("bhqd,bhkd->bhqk", q, k)
        return q @ k.transpose(-2, -1)

    def _out(self, a, v):
        if self.layout == "bmm":
            return torch.bmm(a, v)
        if self.layout == "einsum":
            return torch.einsum("bhqk,bhkd->bhqd", a, v)
        return a @ v

    def forward(self, q, k, v, pad_mask=None):
        s = self._scores(q, k)
        d = self.d
        if self.scale == "mul_float":
            s = s * (1.0 / math.sqrt(d))
        elif self.scale == "div_sqrt":
            s = s / math.sqrt(d)
        elif self.scale == "pow":
            s = s * d ** -0.5
        elif self.scale == "size":
            s = s / k.size(-1) ** 0.5
        elif self.scale == "tensor":
            s = s / self.sqrt_d
        T, S = q.size(-2), k.size(-2)
        tril = self.tril[:, :, :T, :S] if s.dim() == 4 else self.tril[0, :, :T, :S]
        if self.causal == "tril":
            s = s.masked_fill(tril == 0, float("-inf"))
        elif self.causal == "where":
            keep = self.tril[0, 0, :T, :S].bool()
            s = torch.where(keep, s, float("-inf"))
        elif self.causal == "additive":
            s = s + torch.full((T, S), float("-inf"), device=q.device).triu(1)
        elif self.causal == "finfo":
            s = s.masked_fill(tril == 0, torch.finfo(s.dtype).min)
        if self.pad:
            s = s + pad_mask
        if self.upcast:
            a = F.softmax(s.float(), dim=-1).type_as(q)
        else:
            a = F.softmax(s, dim=-1)
        if self.dropout == "functional":
            a = F.dropout(a, self.p, self.training)
        elif self.dropout == "module":
            a = self.drop(a)
        return self._out(a, v)


class SDPA(nn.Module):
    """F.scaled_dot_product_attention with the keyword arguments given at construction.
    `gqa`: None, "native" (enable_gqa=True), "repeat_interleave" or "expand" (K/V repeated by hand
    to q's head count, as HF's repeat_kv does)."""

    def __init__(self, is_causal=False, p=0.0, scale=None, gqa=None):
        super().__init__()
        self.is_causal, self.p, self.scale, self.gqa = is_causal, p, scale, gqa

    def forward(self, q, k, v, mask=None):
        kwargs = {}
        if self.scale is not None:
            kwargs["scale"] = self.scale
        if self.gqa == "native":
            kwargs["enable_gqa"] = True
        elif self.gqa == "repeat_interleave":
            rep = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        elif self.gqa == "expand":
            b, h, s, d = k.shape
            rep = q.size(1) // h
            k = k[:, :, None, :, :].expand(b, h, rep, s, d).reshape(b, h * rep, s, d)
            v = v[:, :, None, :, :].expand(b, h, rep, s, d).reshape(b, h * rep, s, d)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              dropout_p=self.p if self.training else 0.0,
                                              is_causal=self.is_causal, **kwargs)


class MHA(nn.Module):
    """nn.MultiheadAttention self-attention; returns the output, and the weights when asked."""

    def __init__(self, d=16, heads=2, batch_first=True, need_weights=False, causal=False, p=0.0):
        super().__init__()
        self.mha = nn.MultiheadAttention(d, heads, dropout=p, batch_first=batch_first)
        self.need_weights, self.causal = need_weights, causal

    def forward(self, x):
        mask = None
        if self.causal:
            T = x.size(1) if self.mha.batch_first else x.size(0)
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)  # True = masked out
        out, w = self.mha(x, x, x, need_weights=self.need_weights, attn_mask=mask)
        return (out, w) if self.need_weights else out


class L2Attention(nn.Module):
    """softmax(-lam * |q - k|^2) v, the squared distance written three ways.
    form: "cdist" (cdist ** 2), "broadcast" (((q_i - k_j) ** 2).sum(-1)), "expanded"
    (|q|^2 - 2 q.k + |k|^2). lam: "scalar" parameter or "per_head" parameter (H, 1, 1)."""

    def __init__(self, form="cdist", lam="scalar", heads=2, causal=False):
        super().__init__()
        self.form, self.causal = form, causal
        shape = (heads, 1, 1) if lam == "per_head" else ()
        self.lam = nn.Parameter(torch.full(shape, 0.3) + 0.05 * torch.rand(shape))

    def forward(self, q, k, v):
        if self.form == "cdist":
            d2 = torch.cdist(q, k) ** 2
        elif self.form == "broadcast":
            d2 = ((q[..., :, None, :] - k[..., None, :, :]) ** 2).sum(-1)
        else:
            d2 = (q * q).sum(-1, keepdim=True) - 2 * (q @ k.transpose(-2, -1)) + (k * k).sum(-1, keepdim=True).transpose(-2, -1)
        s = -self.lam * d2
        if self.causal:
            T, S = q.size(-2), k.size(-2)
            s = s.masked_fill(torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        return torch.softmax(s, dim=-1) @ v


class L1Attention(nn.Module):
    """softmax(-lam * sum|q - k|) v: "cdist" (cdist p=1) or "broadcast" (abs of the difference)."""

    def __init__(self, form="cdist", lam="scalar", heads=2):
        super().__init__()
        self.form = form
        shape = (heads, 1, 1) if lam == "per_head" else ()
        self.lam = nn.Parameter(torch.full(shape, 0.4) + 0.05 * torch.rand(shape))

    def forward(self, q, k, v):
        if self.form == "cdist":
            d1 = torch.cdist(q, k, p=1)
        else:
            d1 = (q.unsqueeze(-2) - k.unsqueeze(-3)).abs().sum(dim=-1)
        return F.softmax(-d1 * self.lam, dim=-1) @ v


class CosineAttention(nn.Module):
    """Cosine attention. swin=False: F.normalize(q) @ F.normalize(k)^T * tau (a learnable scalar or
    per-head scale). swin=True: Swin-V2, logit_scale.clamp(max=log 100).exp() per head, then a
    learnable relative-position bias (H, N, N) added."""

    def __init__(self, heads=2, n=8, swin=False, lam="scalar"):
        super().__init__()
        self.swin = swin
        if swin:
            self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(heads, 1, 1)) + 0.1 * torch.rand(heads, 1, 1))
            self.rel_bias = nn.Parameter(0.1 * torch.randn(heads, n, n))
        else:
            shape = (heads, 1, 1) if lam == "per_head" else ()
            self.tau = nn.Parameter(torch.full(shape, 5.0) + torch.rand(shape))

    def forward(self, q, k, v):
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        if self.swin:
            attn = attn * torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
            attn = attn + self.rel_bias.unsqueeze(0)
        else:
            attn = attn * self.tau
        return attn.softmax(dim=-1) @ v


# -- near-misses: look like attention, mean something else ---------------------------------------

class SoftmaxOverQueries(nn.Module):
    """softmax over dim=-2: not attention over keys."""

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-2) @ v


class NonScalarScale(nn.Module):
    """A scale that varies per key position: not a temperature."""

    def __init__(self, n=8):
        super().__init__()
        self.w = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, q, k, v):
        return torch.softmax((q @ k.transpose(-2, -1)) * self.w, dim=-1) @ v


class ReturnsWeights(nn.Module):
    """The attention probabilities are returned to the caller."""

    def forward(self, q, k, v):
        a = torch.softmax(q @ k.transpose(-2, -1) * 0.35, dim=-1)
        return a @ v, a


class MaskedFill(nn.Module):
    """masked_fill with a given mask and fill (for masks that do not broadcast, or finite fills)."""

    def __init__(self, fill=float("-inf")):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, mask):
        s = (q @ k.transpose(-2, -1)) * 0.35
        return torch.softmax(s.masked_fill(mask, self.fill), dim=-1) @ v


class MaskedFillRepeatKV(MaskedFill):
    """MaskedFill with grouped K/V heads repeated to q's heads (Llama's repeat_kv)."""

    def forward(self, q, k, v, mask):
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return super().forward(q, k, v, mask)


class MaskedFillThenAdd(MaskedFill):
    """masked_fill with a given mask and fill, then an additive mask."""

    def forward(self, q, k, v, mask, bias):
        s = (q @ k.transpose(-2, -1)) * 0.35
        return torch.softmax(s.masked_fill(mask, self.fill) + bias, dim=-1) @ v
