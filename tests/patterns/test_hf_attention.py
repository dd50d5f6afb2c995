"""HF transformers GPT-2, Llama (grouped-query: 2 KV heads for 4 query heads), Falcon
(multi-query; and with ALiBi), MPT (masked_fill with finfo.min) and T5 built offline from tiny
configs, with attn_implementation "eager" and "sdpa": each layer's attention is fused and the
model equals eager in logits and parameter gradients (fp32), with and without left padding."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from .checks import OPTIONS, assert_as_close_to_float64_as_eager, assert_fused, assert_matches_eager, assert_near_miss  # noqa: E402,E501

VOCAB, T = 64, 8


def _gpt2(impl):
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=16, vocab_size=VOCAB,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation=impl)


def _llama(impl):
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=16, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=impl)


def _ids_and_padding(padded, low=1):
    """The model's inputs, without or with left padding (batch 0's first 3 tokens), and the loss
    mask a real loss would use (None without padding)."""
    ids = torch.randint(low, VOCAB, (2, T))
    if not padded:
        return (ids,), None
    am = torch.ones(2, T, dtype=torch.long)
    am[0, :3] = 0
    return (ids, am), am[..., None].float()


class Logits(torch.nn.Module):
    """The LM's logits as a plain tensor (HF returns a ModelOutput)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, attention_mask=None):
        return self.lm(ids, attention_mask=attention_mask).logits


# (arch, impl, padded) -> the rule that fuses. Without padding HF's eager mask is a constant causal
# triangle (built from aranges) and becomes causal=True; with padding it is a float mask. Llama
# repeats K/V by hand (eager, and sdpa with a mask); its sdpa path passes enable_gqa without one.
RULES = {("gpt2", "eager", False): "attention.dot_causal", ("gpt2", "eager", True): "attention.dot",
         ("gpt2", "sdpa", False): "attention.sdpa", ("gpt2", "sdpa", True): "attention.sdpa",
         ("llama", "eager", False): "attention.dot_repeat_kv_causal",
         ("llama", "eager", True): "attention.dot_repeat_kv",
         ("llama", "sdpa", False): "attention.sdpa", ("llama", "sdpa", True): "attention.sdpa_repeat_kv"}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("padded", [False, True])
def test_hf_attention(arch, impl, padded):
    torch.manual_seed(0)
    model = Logits((_gpt2 if arch == "gpt2" else _llama)(impl)).train()
    ids = torch.randint(0, VOCAB, (2, T))
    args, loss_mask = (ids,), None
    if padded:
        # left padding: batch 0's first 3 tokens are padding; a real loss ignores their positions
        am = torch.ones(2, T, dtype=torch.long)
        am[0, :3] = 0
        args = (ids, am)
        loss_mask = am[..., None].float()
    assert_fused(model, *args, variant="dot", rule=RULES[(arch, impl, padded)], count=1)
    assert_matches_eager(model, *args, grad_inputs=False, loss_mask=loss_mask, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("arch, impl, rule", [("gpt2", "eager", "attention.dot"),
                                              ("llama", "sdpa", "attention.sdpa_repeat_kv")])
def test_hf_gradient_checkpointing(arch, impl, rule):
    """gradient_checkpointing_enable() runs every layer under torch.utils.checkpoint; the layer's
    attention fuses inside it (the causal mask, computed outside the checkpoint, reaches the body
    as a float mask input), and training equals eager."""
    torch.manual_seed(0)
    lm = (_gpt2 if arch == "gpt2" else _llama)(impl)
    lm.gradient_checkpointing_enable()
    model = Logits(lm).train()
    ids = torch.randint(0, VOCAB, (2, T))
    assert_fused(model, ids, variant="dot", rule=rule, count=1)
    assert_matches_eager(model, ids, grad_inputs=False, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_attention_inference(arch):
    torch.manual_seed(0)
    model = Logits((_gpt2 if arch == "gpt2" else _llama)("eager")).eval()
    ids = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_fused(model, ids, variant="dot", rule=RULES[(arch, "eager", False)])
        out = torch.compile(model, backend="truthfuse", options=OPTIONS)(ids)
        torch.testing.assert_close(out, model(ids), atol=2e-5, rtol=2e-4)


def _falcon(impl):
    # multi-query: one K/V head that the 4 query heads share by broadcasting (eager: scores scaled
    # by `/=`; sdpa: the single head passed to SDPA, which broadcasts it)
    cfg = transformers.FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, multi_query=True,
                                    alibi=False, vocab_size=VOCAB, attention_dropout=0.0, hidden_dropout=0.0,
                                    bos_token_id=0, eos_token_id=0)
    return transformers.FalconForCausalLM._from_config(cfg, attn_implementation=impl)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_falcon_multi_query_attention(impl):
    torch.manual_seed(0)
    model = Logits(_falcon(impl)).train()
    ids = torch.randint(0, VOCAB, (2, T))
    am = torch.ones(2, T, dtype=torch.long)
    am[0, :3] = 0
    rule = "attention.dot" if impl == "eager" else "attention.sdpa"
    assert_fused(model, ids, am, variant="dot", rule=rule, count=1)
    assert_matches_eager(model, ids, am, grad_inputs=False, loss_mask=am[..., None].float(), atol=2e-5, rtol=2e-4)


def test_hf_falcon_alibi_attention():
    """Falcon with ALiBi: (q.k + alibi) * inv_norm + mask, its scores and probabilities viewed to
    the shapes they have; the term before the scale joins the mask."""
    torch.manual_seed(0)
    cfg = transformers.FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, multi_query=False,
                                    alibi=True, vocab_size=VOCAB, attention_dropout=0.0, hidden_dropout=0.0,
                                    bos_token_id=0, eos_token_id=0)
    model = Logits(transformers.FalconForCausalLM._from_config(cfg, attn_implementation="eager")).train()
    ids = torch.randint(0, VOCAB, (2, T))
    am = torch.ones(2, T, dtype=torch.long)
    am[0, :3] = 0
    assert_fused(model, ids, am, variant="dot", rule="attention.dot", count=1)
    assert_matches_eager(model, ids, am, grad_inputs=False, loss_mask=am[..., None].float(), atol=2e-5, rtol=2e-4)


class LastHidden(torch.nn.Module):
    """An encoder's last hidden state as a plain tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        return self.model(*inputs).last_hidden_state


class Seq2SeqLogits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, attention_mask, decoder_ids):
        return self.model(input_ids=ids, attention_mask=attention_mask, decoder_input_ids=decoder_ids).logits


def test_hf_t5_position_bias_and_padding():
    """T5 adds a learned position bias and then the padding (or causal) mask to unscaled scores:
    every attention of encoder and decoder fuses, and the bias gets its gradient."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
                                relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                dropout_rate=0.0, vocab_size=VOCAB, pad_token_id=0, eos_token_id=1,
                                decoder_start_token_id=0)
    model = Seq2SeqLogits(transformers.T5ForConditionalGeneration._from_config(cfg, attn_implementation="eager"))
    model.train()
    ids, decoder_ids = torch.randint(2, VOCAB, (2, T)), torch.randint(2, VOCAB, (2, 5))
    am = torch.ones(2, T, dtype=torch.long)
    am[0, :3] = 0
    assert_fused(model, ids, am, decoder_ids, variant="dot", count=3)
    assert_matches_eager(model, ids, am, decoder_ids, grad_inputs=False, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("padded", [False, True])
def test_hf_gemma2_soft_capped_attention(padded):
    """Gemma 2 soft-caps its scores (tanh(s / 50) * 50) and repeats K/V for its grouped heads; its
    layers alternate sliding-window and global attention. Each attention site fuses with the cap."""
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, sliding_window=4,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=None,
                                    max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = Logits(transformers.Gemma2ForCausalLM._from_config(cfg, attn_implementation="eager")).train()
    args, loss_mask = _ids_and_padding(padded)
    sites = assert_fused(model, *args, variant="dot", count=2)
    assert all(s.rule.startswith("attention.softcap") for s in sites if s.kind == "attention")
    assert_matches_eager(model, *args, grad_inputs=False, loss_mask=loss_mask, atol=2e-5, rtol=2e-4)


def test_hf_mistral_sliding_window_skips_blocks(monkeypatch):
    """Mistral's sliding window reaches the op as an additive float mask (finfo.min outside the
    window); with block skipping on for masks this small, the kernels visit only the blocks inside
    the window, and the model still equals eager, with left padding too."""
    from fusion_backend.kernels import attention as tc

    monkeypatch.setattr(tc, "_RANGES_MIN_ENTRIES", 0)
    widths = []
    compute = tc.MaskRanges.compute.__func__

    def spy(cls, mask4, B, H, Nq, Nk, out=None):
        r = compute(cls, mask4, B, H, Nq, Nk, out)
        widths.append(int((r.t[1] - r.t[0]).min()))
        return r
    monkeypatch.setattr(tc.MaskRanges, "compute", classmethod(spy))
    torch.manual_seed(0)
    n = 160
    cfg = transformers.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=VOCAB, sliding_window=40,
                                     max_position_embeddings=n, bos_token_id=0, eos_token_id=0)
    model = Logits(transformers.MistralForCausalLM._from_config(cfg, attn_implementation="eager")).train()
    ids = torch.randint(0, VOCAB, (2, n))
    am = torch.ones(2, n, dtype=torch.long)
    am[0, :30] = 0
    assert_fused(model, ids, am, variant="dot", count=1)
    assert_matches_eager(model, ids, am, grad_inputs=False, loss_mask=am[..., None].float(), atol=2e-5, rtol=2e-4)
    assert widths and min(widths) <= n - 64  # rows whose kept range leaves out a whole 64-key tile


def test_hf_mpt_masked_fill_rows_padded_whole():
    """MPT masks with scores.masked_fill(mask, finfo.min) (ALiBi added before). With left padding,
    batch 0's first query rows see no key: eager fills every score of those rows, so they are
    uniform and send q and k no gradient. The loss here reads every position, padded ones too."""
    torch.manual_seed(0)
    cfg = transformers.MptConfig(d_model=32, n_heads=4, n_layers=1, expansion_ratio=2, max_seq_len=16,
                                 vocab_size=VOCAB, attn_config={"attn_pdrop": 0, "alibi": True},
                                 resid_pdrop=0, emb_pdrop=0)
    model = Logits(transformers.MptForCausalLM._from_config(cfg, attn_implementation="eager")).train()
    ids = torch.randint(0, VOCAB, (2, T))
    am = torch.ones(2, T, dtype=torch.long)
    am[0, :3] = 0
    assert_fused(model, ids, am, variant="dot", count=1)
    assert_matches_eager(model, ids, am, grad_inputs=False, atol=2e-5, rtol=2e-4)


def test_hf_xlm_padding_mask_expanded_as_the_scores():
    """XLM (and FlauBERT) scales q, expands its padding mask with `.expand_as(scores)` and fills
    the scores in place with finfo.min. expand_as reads only the scores' shape: each attention
    fuses (it was kept as if the scores were used elsewhere), with batch 0 wholly padding (rows
    masked whole) and the loss reading every position."""
    torch.manual_seed(0)
    cfg = transformers.XLMConfig(vocab_size=VOCAB, emb_dim=32, n_layers=2, n_heads=4, max_position_embeddings=16,
                                 dropout=0.0, attention_dropout=0.0, causal=False, pad_index=0)
    model = LastHidden(transformers.XLMModel._from_config(cfg, attn_implementation="eager")).train()
    ids = torch.randint(1, VOCAB, (2, T))
    am = torch.ones(2, T, dtype=torch.long)
    am[0] = 0
    am[1, -3:] = 0
    assert_fused(model, ids, am, variant="dot", rule="attention.dot", count=2)
    assert_matches_eager(model, ids, am, grad_inputs=False, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("padded", [False, True])
def test_hf_gpt_neox_japanese_scores_by_baddbmm_on_folded_heads(padded):
    """GPT-NeoX-Japanese scores with baddbmm(zeros, q, kT, beta=1, alpha=1/norm) on q and k with
    the heads folded into the batch, views the scores to 4-d for the mask and the softmax, and
    multiplies the 4-d probabilities by a 4-d v: each attention is unfolded, fused (it was not
    found at all) and equals eager."""
    torch.manual_seed(0)
    cfg = transformers.GPTNeoXJapaneseConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, intermediate_multiple_size=2,
                                             max_position_embeddings=16, rotary_pct=0.5, attention_dropout=0.0,
                                             hidden_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = Logits(transformers.GPTNeoXJapaneseForCausalLM._from_config(cfg, attn_implementation="eager")).train()
    args, loss_mask = _ids_and_padding(padded)
    rule = "attention.dot" if padded else "attention.dot_causal"
    assert_fused(model, *args, variant="dot", rule=rule, count=1)
    assert_matches_eager(model, *args, grad_inputs=False, loss_mask=loss_mask, atol=2e-5, rtol=2e-4)


def test_hf_squeezebert_keys_viewed_as_transposed():
    """SqueezeBERT projects channels-first and views its keys to (B, H, D, N), so its scores are
    matmul(q, k) with no transpose: each attention fuses (it was not found at all) and equals
    eager."""
    torch.manual_seed(0)
    cfg = transformers.SqueezeBertConfig(vocab_size=VOCAB, hidden_size=32, embedding_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=16,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    model = LastHidden(transformers.SqueezeBertModel._from_config(cfg)).train()
    (ids, am), _ = _ids_and_padding(True)
    assert_fused(model, ids, am, variant="dot", rule="attention.dot", count=2)
    assert_matches_eager(model, ids, am, grad_inputs=False, atol=2e-5, rtol=2e-4)


def test_hf_deberta_v2_relative_positions_are_found_and_kept_with_the_reason():
    """DeBERTa v2 adds its relative-position terms (gathered products of q and k with the position
    embeddings) to folded-head (B*H, N, S) scores before the view to 4-d: the attention is
    unfolded and found (it was not found at all), and kept, naming the computed term that a finite
    fill after it may combine with to mask whole rows. The model equals eager."""
    torch.manual_seed(0)
    cfg = transformers.DebertaV2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0, relative_attention=True,
                                       pos_att_type=["c2p", "p2c"], max_relative_positions=8, position_buckets=4,
                                       pad_token_id=0)
    model = LastHidden(transformers.DebertaV2Model._from_config(cfg, attn_implementation="eager")).train()
    (ids, am), _ = _ids_and_padding(True)
    sites = assert_near_miss(model, ids, am, reason="added to the scores and not a constant")
    assert sum(s.kind == "attention" for s in sites) == 1, sites
    assert_matches_eager(model, ids, am, grad_inputs=False, atol=2e-5, rtol=2e-4)


def test_hf_xglm_clamped_scores_are_reported_kept():
    """XGLM clamps its masked scores with torch.max(scores, finfo.min) before the softmax, which
    changes what a row masked whole gives: no rule takes it, and explain() listed no attention
    site at all. Each attention is listed as kept, naming the clamp; with left padding (rows
    masked whole) the model equals eager."""
    torch.manual_seed(0)
    cfg = transformers.XGLMConfig(vocab_size=VOCAB, d_model=32, num_layers=2, attention_heads=4, ffn_dim=64,
                                  max_position_embeddings=16, dropout=0.0, attention_dropout=0.0,
                                  activation_dropout=0.0, layerdrop=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    model = LastHidden(transformers.XGLMModel._from_config(cfg, attn_implementation="eager")).train()
    (ids, am), loss_mask = _ids_and_padding(True, low=3)
    sites = assert_near_miss(model, ids, am, reason="the scores are clamped with torch.max")
    assert sum(s.kind == "attention" for s in sites) == 2, sites  # one per layer
    assert_matches_eager(model, ids, am, grad_inputs=False, loss_mask=loss_mask, atol=2e-5, rtol=2e-4)


def test_hf_deberta_scores_cut_by_a_graph_break_are_reported_kept():
    """DeBERTa (v1) with relative attention reads its attention span with .item(), a graph break
    between the scores and the softmax: explain() listed no attention site at all; it lists the
    softmax's graph's attention as kept, saying a graph break cut it."""
    torch.manual_seed(0)
    cfg = transformers.DebertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, relative_attention=True,
                                     pos_att_type=["c2p", "p2c"], max_relative_positions=8, pad_token_id=0)
    model = LastHidden(transformers.DebertaModel._from_config(cfg, attn_implementation="eager")).train()
    (ids, am), _ = _ids_and_padding(True)
    sites = assert_near_miss(model, ids, am, reason="a graph break cut the attention")
    assert sum(s.kind == "attention" for s in sites) == 1, sites


def test_hf_gpt_neo_is_reported_kept():
    """GPT-Neo fills non-causal scores with torch.where(causal, s, tensor(finfo.min)) from a buffer
    (not a constant: it could hide whole rows) and then adds the padding mask: each attention is
    found and kept with the reason, not silently missed."""
    cfg = transformers.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                                    window_size=4, vocab_size=VOCAB, max_position_embeddings=16, embed_dropout=0,
                                    attention_dropout=0, resid_dropout=0, bos_token_id=0, eos_token_id=0)
    model = Logits(transformers.GPTNeoForCausalLM._from_config(cfg, attn_implementation="eager")).train()
    sites = assert_near_miss(model, torch.randint(0, VOCAB, (2, T)), reason="may mask whole rows")
    assert sum(s.rule == "attention.dot" for s in sites) == 2  # one per layer


@pytest.mark.parametrize("padded", [False, True])
def test_hf_bloom_heads_folded_into_the_batch(padded):
    """BLOOM scores with alibi.baddbmm(q, kT, beta=1, alpha=1/sqrt(d)) on (B*H, N, D) tensors,
    views the scores to (B, H, N, S) for the mask and the softmax and back for bmm with v: the
    attention is unfolded to 4-d, fused, and equals eager."""
    torch.manual_seed(0)
    cfg = transformers.BloomConfig(hidden_size=32, n_layer=1, n_head=4, vocab_size=VOCAB, attention_dropout=0.0,
                                   hidden_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = Logits(transformers.BloomForCausalLM._from_config(cfg, attn_implementation="eager")).train()
    args, loss_mask = _ids_and_padding(padded)
    assert_fused(model, *args, variant="dot", rule="attention.dot" if padded else "attention.dot_causal", count=1)
    assert_matches_eager(model, *args, grad_inputs=False, loss_mask=loss_mask, atol=2e-5, rtol=2e-4)


class LogitsAndAttentions(torch.nn.Module):
    """The logits and a loss-like sum of the attention probabilities, with output_attentions=True."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        out = self.lm(ids, output_attentions=True)
        return out.logits + sum(a.square().sum() for a in out.attentions)


def test_hf_bloom_attention_probabilities_returned_are_reported_kept():
    """With output_attentions=True BLOOM returns its (B, H, N, S) probabilities, which the graph here
    also reads (a loss on them): each attention is still unfolded to 4-d, found, and kept with the
    reason, where explain() said no attention site was found. The model equals eager."""
    torch.manual_seed(0)
    cfg = transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB, attention_dropout=0.0,
                                   hidden_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LogitsAndAttentions(transformers.BloomForCausalLM._from_config(cfg, attn_implementation="eager")).train()
    ids = torch.randint(0, VOCAB, (2, T))
    sites = assert_near_miss(model, ids, reason="is also used outside the pattern")
    assert sum(s.kind == "attention" and s.rule == "attention.dot_causal" for s in sites) == 2, sites  # one per layer
    assert_matches_eager(model, ids, grad_inputs=False, atol=2e-5, rtol=2e-4)


def test_hf_speecht5_probabilities_viewed_there_and_back_are_reported_kept():
    """SpeechT5's encoder (as BART-era attentions written with bmm) views its (B*H, N, S)
    probabilities to (B, H, N, S) to return them with output_attentions=True and back for bmm with
    v: each attention is found and kept with the reason, where explain() listed no attention site.
    Without output_attentions it fuses. The model equals eager."""
    from transformers.models.speecht5.modeling_speecht5 import SpeechT5EncoderWithTextPrenet

    torch.manual_seed(0)
    cfg = transformers.SpeechT5Config(vocab_size=VOCAB, hidden_size=32, encoder_layers=2, encoder_attention_heads=4,
                                      encoder_ffn_dim=64, hidden_dropout=0.0, attention_dropout=0.0,
                                      activation_dropout=0.0, positional_dropout=0.0, encoder_layerdrop=0.0,
                                      max_text_positions=32, encoder_max_relative_position=4, pad_token_id=1)

    class Encoder(torch.nn.Module):
        def __init__(self, attentions):
            super().__init__()
            self.encoder, self.attentions = SpeechT5EncoderWithTextPrenet(cfg), attentions

        def forward(self, ids, am):
            out = self.encoder(input_values=ids, attention_mask=am, output_attentions=self.attentions)
            return out.last_hidden_state + (sum(a.square().sum() for a in out.attentions) if self.attentions else 0)

    ids = torch.randint(3, VOCAB, (2, T))
    am = torch.ones(2, T, dtype=torch.long)
    am[0, 6:] = 0
    model = Encoder(attentions=True).train()
    sites = assert_near_miss(model, ids, am, reason="is also used outside the pattern")
    assert sum(s.kind == "attention" for s in sites) == 2, sites  # one per layer
    assert_matches_eager(model, ids, am, grad_inputs=False, loss_mask=am[..., None].float(), atol=2e-5, rtol=2e-4)
    model.attentions = False
    assert_fused(model, ids, am, variant="dot", rule="attention.dot", count=2)


def test_hf_swinv2_shifted_window_blocks():
    """Swin V2's shifted-window block adds its window mask through a 5-d view of the (B*nW, H, N, N)
    scores, twice: both blocks of the stage fuse as cosine attention, and the model is as close to
    float64 as eager (its logit scale of 10 leaves eager's own gradients 1e-5 off in places)."""
    torch.manual_seed(0)
    cfg = transformers.Swinv2Config(image_size=16, patch_size=2, num_channels=3, embed_dim=16, depths=[2], num_heads=[2],
                                    window_size=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                    drop_path_rate=0.0)

    model = LastHidden(transformers.Swinv2Model._from_config(cfg)).train()
    pixels = torch.randn(2, 3, 16, 16)
    assert_fused(model, pixels, variant="cosine", rule="attention.cosine", count=2)
    assert_as_close_to_float64_as_eager(model, pixels)


def test_hf_sam_vision_relative_positions_reshaped_as_the_scores():
    """SAM's vision encoder adds decomposed relative positions `.reshape_as(scores)`: canonicalization
    reads that as a reshape to the scores' sizes, so the scores' only use is the attention and both
    the windowed and the global block fuse; as close to float64 as eager."""
    torch.manual_seed(0)
    cfg = transformers.SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                                       patch_size=8, output_channels=16, window_size=4, global_attn_indexes=[1],
                                       mlp_dim=64, use_rel_pos=True)

    model = LastHidden(transformers.SamVisionModel._from_config(cfg, attn_implementation="eager")).train()
    with torch.no_grad():  # initialised to zero: make the relative positions matter
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.05)
    pixels = torch.randn(1, 3, 64, 64)
    assert_fused(model, pixels, variant="dot", rule="attention.dot", count=2)
    assert_as_close_to_float64_as_eager(model, pixels)


@pytest.mark.parametrize("padded", [False, True])
def test_hf_gpt_oss_attention_sinks(padded):
    """GPT-OSS adds a learnable sink logit per head as one more softmax column and drops it; its
    layers alternate a sliding window and full attention over grouped K/V. Each attention site
    fuses with the sinks, and the model (the sinks' gradients included) equals eager."""
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
                                    vocab_size=VOCAB, max_position_embeddings=16, sliding_window=4,
                                    layer_types=["sliding_attention", "full_attention"], rope_parameters=None,
                                    bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = Logits(transformers.GptOssForCausalLM._from_config(cfg, attn_implementation="eager")).train()
    with torch.no_grad():
        for layer in model.lm.model.layers:
            layer.self_attn.sinks.normal_()
    args, loss_mask = _ids_and_padding(padded)
    sites = assert_fused(model, *args, variant="dot", count=2)
    # without padding, the full-attention layer's mask is HF's constant causal triangle: causal=True
    want = {"attention.sinks_repeat_kv"} | ({"attention.sinks_repeat_kv_causal"} if not padded else set())
    assert {s.rule for s in sites if s.kind == "attention" and s.decision == "fused"} == want
    assert_matches_eager(model, *args, grad_inputs=False, loss_mask=loss_mask, atol=2e-5, rtol=2e-4)


def test_sinks_with_a_learnable_scale_are_a_near_miss():
    """The op takes no scale gradient with sinks: such a site is kept, with the reason."""
    class SinkAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sinks = torch.nn.Parameter(torch.randn(4))
            self.scale = torch.nn.Parameter(torch.tensor(0.3))

        def forward(self, q, k, v):
            s = q @ k.transpose(-1, -2) * self.scale
            c = torch.cat([s, self.sinks.reshape(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[2], -1)], dim=-1)
            return torch.softmax(c, dim=-1)[..., :-1] @ v

    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    assert_near_miss(SinkAttention(), q, k, v, reason="needs a gradient")


@pytest.mark.parametrize("where", ["around the call", "in the model"])
def test_sinks_under_autocast_fuse(where):
    """Sinks under torch.autocast fuse, whether autocast is entered around the compiled call or
    inside the model: fp32 q, k, v go to the op, which computes in fp32 where eager's two products
    run in bf16, and the result is at least as close to float64 as eager's. Session 22 kept such
    sites after GPT-OSS under CUDA autocast was 0.67 off float64 on an H200 (bench/model_checks_gpu.py);
    that 0.67 is one token's top-1 expert, whose two router logits are equal in bf16, and plain eager
    under CPU autocast is as far off (the bench's case now sends every token to both experts)."""
    class SinkAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sinks = torch.nn.Parameter(torch.randn(4))

        def forward(self, q, k, v):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=where == "in the model"):
                s = q @ k.transpose(-1, -2) * 0.3
                c = torch.cat([s, self.sinks.reshape(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[2], -1)], dim=-1)
                return torch.softmax(c, dim=-1)[..., :-1] @ v

    torch.manual_seed(0)
    model = SinkAttention()
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=where == "around the call"):
        assert_fused(model, q, k, v, variant="dot", rule="attention.sinks")
        assert_as_close_to_float64_as_eager(model, q, k, v, factor=1.0, floor=1e-3)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("padded", [False, True])
def test_hf_deepseek_v3_keys_assembled_in_place(impl, padded):
    """DeepSeek-V3 (multi-head latent attention) assembles its keys by copying two pieces into
    slices of a `new_empty` tensor; canonicalization reads that as their concatenation, so the
    attention (query/key head dim 24, value head dim 16) fuses and the model equals eager."""
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                                        num_hidden_layers=1, first_k_dense_replace=1, num_attention_heads=4,
                                        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16,
                                        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, vocab_size=VOCAB,
                                        max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = Logits(transformers.DeepseekV3ForCausalLM._from_config(cfg, attn_implementation=impl)).train()
    args, loss_mask = _ids_and_padding(padded)
    assert_fused(model, *args, variant="dot", count=1)
    assert_matches_eager(model, *args, grad_inputs=False, loss_mask=loss_mask, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("arch, impl, cache", [("llama", "eager", None), ("llama", "sdpa", None),
                                               ("llama", "sdpa", "static"), ("llama", "eager", "static"),
                                               ("gpt2", "eager", "static"), ("gpt_oss", "eager", None)])
def test_hf_greedy_generation_with_a_cache_runs_the_split_forward(arch, impl, cache, monkeypatch):
    """Greedy generate() with a KV cache, the forward compiled: every decoding step's attention
    (one query row per head against the cache) goes through the split forward, and the tokens and
    scores equal eager's. Llama with left padding (a float mask per step) and grouped K/V, eager
    and sdpa (whose cached K and V lengths Dynamo traces as separate symbols from the second step
    on), and with a static cache (buffers written in place before attention reads them, eager and
    sdpa; GPT-2 too); GPT-OSS with sinks and a sliding-window layer."""
    from fusion_backend.kernels import attention as kernels

    torch.manual_seed(0)
    if arch == "llama":
        lm = _llama(impl).eval()
    elif arch == "gpt2":
        lm = _gpt2(impl).eval()
    else:
        cfg = transformers.GptOssConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                                        num_experts_per_tok=1, vocab_size=VOCAB, max_position_embeddings=32,
                                        sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                                        rope_parameters=None, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        lm = transformers.GptOssForCausalLM._from_config(cfg, attn_implementation="eager").eval()
        with torch.no_grad():
            for layer in lm.model.layers:
                layer.self_attn.sinks.normal_()
    (ids, am), _ = _ids_and_padding(True, low=1)
    kw = dict(attention_mask=am, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True,
              pad_token_id=0, cache_implementation=cache)
    with torch.no_grad():
        want = lm.generate(ids, **kw)
        splits = []
        real = kernels._split_forward
        monkeypatch.setattr(kernels, "_split_forward", lambda *a, **k: splits.append(a[0].shape) or real(*a, **k))
        lm.forward = torch.compile(lm.forward, backend="truthfuse", options=OPTIONS)
        got = lm.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4)
    decode_calls = [s for s in splits if s[2] == 1]
    assert len(decode_calls) >= 3 * lm.config.num_hidden_layers, splits
