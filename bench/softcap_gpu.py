"""Soft-capped attention (Gemma 2) on the GPU: speed against eager, Inductor and FlexAttention, and
HF Gemma 2 trained through truthfuse against float64.

1. Benchmark, bf16, causal, cap 50, scale D**-0.5, grouped K/V (H=8 query heads, 4 K/V heads),
   B=2, D in (128, 256), N in (2048, 8192): forward and forward+backward, median ms and extra
   memory. Rows: Gemma 2's eager code (repeat_kv, scores, tanh cap, additive causal mask, fp32
   softmax), the same compiled by Inductor, FlexAttention with the cap as its score_mod and a
   causal block mask, `ops.attention` with softcap, and `ops.attention` without the cap (what the
   cap costs in the kernels).
2. HF Gemma 2 (transformers, eager attention, 2 layers, sliding window on the first) trained one
   step in bf16 through truthfuse (strategy "aggressive"), with right padding: which sites fused,
   loss and worst parameter-gradient error against the same model in float64, next to eager bf16's.

Usage:  TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 python bench/softcap_gpu.py   (writes $OUT/softcap_gpu.json)
Env: SKIP_BENCH=1, SKIP_MODEL=1, SIZES=2048, DIMS=256 to shorten a run.
"""
import copy
import json
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from attention_gpu import bench  # noqa: E402  (median ms and extra MB of forward or forward+backward)
import fusion_backend  # noqa: E402
from fusion_backend.ops.attention import attention  # noqa: E402

dev = "cuda"
OUT = os.environ.get("OUT", "/tmp")
RES = {"env": dict(torch=torch.__version__, triton=triton.__version__, card=torch.cuda.get_device_name(),
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())), "bench": [], "model": []}
CAP = 50.0


def save():
    json.dump(RES, open(os.path.join(OUT, "softcap_gpu.json"), "w"), indent=1)


def gemma_eager(q, k, v, scale, mask):
    """Gemma 2's eager attention: K/V repeated per query head, scores capped by tanh, mask added."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.matmul(q, k.transpose(2, 3)) * scale
    s = torch.tanh(s / CAP) * CAP
    s = s + mask
    return torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


def run_bench():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    torch._dynamo.config.recompile_limit = 256
    flex = torch.compile(flex_attention, dynamic=False)
    inductor = torch.compile(gemma_eager, dynamic=False)
    B, H, Hkv = 2, 8, 4
    sizes = [int(n) for n in os.environ.get("SIZES", "2048,8192").split(",")]
    for D in (int(d) for d in os.environ.get("DIMS", "128,256").split(",")):
        scale = D ** -0.5
        for N in sizes:
            mask = torch.zeros(N, N, device=dev, dtype=torch.bfloat16).masked_fill(
                ~torch.ones(N, N, device=dev, dtype=torch.bool).tril(), float("-inf"))
            block = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, N, N, device=dev)

            def capped(score, b, h, qi, ki):
                return torch.tanh(score / CAP) * CAP
            for bwd in (False, True):
                q = torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, requires_grad=bwd)
                k, v = (torch.randn(B, Hkv, N, D, device=dev, dtype=torch.bfloat16, requires_grad=bwd)
                        for _ in range(2))
                cases = [
                    ("ours, softcap", lambda: attention(q, k, v, scale=scale, causal=True, enable_gqa=True,
                                                        softcap=CAP)),
                    ("ours, no cap", lambda: attention(q, k, v, scale=scale, causal=True, enable_gqa=True)),
                    ("flex, softcap", lambda: flex(q, k, v, score_mod=capped, block_mask=block, scale=scale,
                                                   enable_gqa=True)),
                    ("inductor, Gemma 2 eager form", lambda: inductor(q, k, v, scale, mask)),
                    ("eager, Gemma 2 form", lambda: gemma_eager(q, k, v, scale, mask)),
                ]
                for name, fn in cases:
                    ms, mb = bench(fn, bwd)
                    RES["bench"].append(dict(variant=name, D=D, N=N, bwd=bwd, ms=ms, extra_mb=mb))
                    print(f"{name:30s} D={D:3d} N={N:5d} {'fwd+bwd' if bwd else 'fwd    '} {ms:9.3f} ms {mb:9.1f} MB",
                          flush=True)
                    save()
                del q, k, v


def run_model():
    import transformers
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                    num_attention_heads=8, num_key_value_heads=4, head_dim=64, vocab_size=1000,
                                    sliding_window=128, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                    max_position_embeddings=512, attention_dropout=0.0, pad_token_id=0,
                                    bos_token_id=1, eos_token_id=2)
    base = transformers.Gemma2ForCausalLM._from_config(cfg, attn_implementation="eager").to(dev)
    B, T = 4, 256
    for draw in range(2):
        ids = torch.randint(3, 1000, (B, T), device=dev)
        am = torch.ones(B, T, dtype=torch.long, device=dev)
        # right padding on two rows (with left padding a padded query row sees only padded keys, a
        # fully masked row, which the float64 reference turns into NaN through finfo.min + finfo.min)
        am[:2, -40:] = 0
        labels = ids.masked_fill(am == 0, -100)

        def grads(model, compiled=None):
            model.zero_grad(set_to_none=True)
            loss = (model if compiled is None else compiled)(input_ids=ids, attention_mask=am, labels=labels).loss
            loss.backward()
            return loss.item(), {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}

        m64 = copy.deepcopy(base).double().train()
        loss64, g64 = grads(m64)
        mbf = copy.deepcopy(base).bfloat16().train()
        loss_eager, g_eager = grads(mbf)
        report = fusion_backend.explain(mbf, input_ids=ids, attention_mask=am, labels=labels,
                                        options=dict(strategy="aggressive"))
        fused = [(s.rule, s.decision) for s in report.sites]
        torch._dynamo.reset()
        compiled = torch.compile(mbf, backend=fusion_backend.backend(strategy="aggressive"))
        loss_tf, g_tf = grads(mbf, compiled)

        def worst(g):
            return max(((g[n] - g64[n]).norm() / g64[n].norm().clamp_min(1e-30)).item() for n in g64)
        finite = all(torch.isfinite(g).all().item() for g in g_tf.values())
        rec = dict(draw=draw, sites=fused, loss64=loss64, loss_eager_bf16=loss_eager, loss_truthfuse=loss_tf,
                   worst_grad_err_eager=worst(g_eager), worst_grad_err_truthfuse=worst(g_tf), finite=finite)
        RES["model"].append(rec)
        print(f"Gemma 2 draw {draw}: sites {fused}", flush=True)
        print(f"  loss float64 {loss64:.6f} eager bf16 {loss_eager:.6f} truthfuse {loss_tf:.6f}; worst grad err "
              f"eager {rec['worst_grad_err_eager']:.2e} truthfuse {rec['worst_grad_err_truthfuse']:.2e} "
              f"finite={finite}", flush=True)
        save()
        torch._dynamo.reset()


if __name__ == "__main__":
    if os.environ.get("SKIP_MODEL") != "1":
        run_model()
    if os.environ.get("SKIP_BENCH") != "1":
        run_bench()
    save()
