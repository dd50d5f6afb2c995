"""Whole-model training steps on the GPU: eager vs Inductor vs truthfuse, with compile times.

    TRITON_INTERPRET=0 python bench/models_gpu.py [--models gpt2-eager,gpt2-sdpa,truthgpt-l2] [--quick]

Models (bf16, AdamW step included, as in shared/bench/anchors_gpu.py):
    gpt2-eager   HF GPT-2 small (12 layers, 768 wide), B=8, T=1024, attn_implementation="eager"
    gpt2-sdpa    the same with attn_implementation="sdpa"
    truthgpt-l2  examples/truthgpt.py with L2 attention, B=8, T=4096
    truthgpt-l1  the same with L1 attention
    bloom-eager  HF BLOOM with bloom-560m's layer shapes (hidden 1024, 16 heads), 4 layers, a 32000
                 vocabulary, B=4, T=2048 (ALiBi by baddbmm, heads folded into the batch)
    sam-vit-b    HF SAM vision encoder with SAM ViT-B's layer shapes, 4 layers (the last global), B=2,
                 1024x1024 images (64x64 tokens; relative positions added `.reshape_as(scores)`)
    gemma2-eager HF Gemma 2 with Gemma-2-2B's layer shapes (hidden 2304, 8 heads, 4 K/V heads, head
                 dim 256, MLP 9216, attention cap 50, final cap 30), 4 layers, a 32000 vocabulary,
                 B=4, T=2048, attn_implementation="eager" (soft-capped attention)

Per model and mode: a correctness check first (eval-mode logits/loss against eager on the same
weights and inputs; NaN fails), then median step time (triton.testing.do_bench) and peak extra
memory, cold compile time (first step, tuning included, empty truthfuse cache) and warm compile
time (after torch._dynamo.reset(), truthfuse cache hit). Writes $OUT/models.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("TRUTHFUSE_CACHE_DIR", tempfile.mkdtemp(prefix="truthfuse-bench-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fusion_backend  # noqa: E402
from triton.testing import do_bench  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = "--small" in sys.argv  # a CPU dry run of the script itself, tiny sizes
torch._dynamo.config.recompile_limit = 64
torch._dynamo.config.accumulated_recompile_limit = 4096


class LogitsOnly(nn.Module):
    """HF models return an output object; the step wants the logits tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx):
        return self.model(idx).logits


def _lm_step(lm, vocab, batch, seq):
    """An HF causal LM in the bench's dtype, random tokens and targets, and its cross-entropy loss."""
    model = LogitsOnly(lm).to(DEV, torch.float32 if SMALL else torch.bfloat16)
    idx = torch.randint(0, vocab, (batch, seq), device=DEV)
    tgt = torch.randint(0, vocab, (batch, seq), device=DEV)
    return model, idx, tgt, lambda m, i, t: F.cross_entropy(m(i).float().flatten(0, 1), t.flatten())


def gpt2(impl: str, batch=8, seq=1024):
    from transformers import GPT2Config, GPT2LMHeadModel

    if SMALL:
        batch, seq = 2, 16
    cfg = GPT2Config(n_layer=2 if SMALL else 12, n_embd=64 if SMALL else 768, n_head=4 if SMALL else 12,
                     n_positions=seq, vocab_size=1000 if SMALL else 50257)
    return _lm_step(GPT2LMHeadModel._from_config(cfg, attn_implementation=impl), cfg.vocab_size, batch, seq)


def truthgpt(metric="l2", batch=8, seq=4096):
    from examples.truthgpt import build

    batch, seq = SIZE_OVERRIDE.get("batch", batch), SIZE_OVERRIDE.get("seq", seq)
    if SMALL:
        batch, seq = 2, 16
    model, (idx, tgt) = build(metric=metric, batch=batch, seq=seq, device=DEV)
    model = model.to(torch.float32 if SMALL else torch.bfloat16)
    return model, idx, tgt, lambda m, i, t: m(i, t)


def gemma2(batch=4, seq=2048):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    batch, seq = SIZE_OVERRIDE.get("batch", batch), SIZE_OVERRIDE.get("seq", seq)
    if SMALL:
        batch, seq = 2, 16
    cfg = Gemma2Config(hidden_size=64 if SMALL else 2304, intermediate_size=128 if SMALL else 9216,
                       num_hidden_layers=2 if SMALL else 4, num_attention_heads=4 if SMALL else 8,
                       num_key_value_heads=2 if SMALL else 4, head_dim=16 if SMALL else 256,
                       vocab_size=1000 if SMALL else 32000, max_position_embeddings=seq, sliding_window=4096,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0, attention_dropout=0.0,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _lm_step(Gemma2ForCausalLM._from_config(cfg, attn_implementation="eager"), cfg.vocab_size, batch, seq)


def bloom(batch=4, seq=2048):
    """BLOOM with bloom-560m's layer shapes (hidden 1024, 16 heads of 64), 4 layers, a 32000
    vocabulary: ALiBi added by baddbmm, the heads folded into the batch."""
    from transformers import BloomConfig, BloomForCausalLM

    batch, seq = SIZE_OVERRIDE.get("batch", batch), SIZE_OVERRIDE.get("seq", seq)
    if SMALL:
        batch, seq = 2, 16
    cfg = BloomConfig(hidden_size=64 if SMALL else 1024, n_layer=2 if SMALL else 4, n_head=4 if SMALL else 16,
                      vocab_size=1000 if SMALL else 32000, attention_dropout=0.0, hidden_dropout=0.0,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _lm_step(BloomForCausalLM._from_config(cfg, attn_implementation="eager"), cfg.vocab_size, batch, seq)


def sam(batch=2):
    """SAM's vision encoder with SAM ViT-B's layer shapes (hidden 768, 12 heads, MLP 3072, 1024x1024
    images in 16x16 patches: 64x64 tokens, windows of 14), 4 layers, the last one global; the loss
    is the mean square of the image embedding."""
    from transformers import SamVisionConfig, SamVisionModel

    batch = SIZE_OVERRIDE.get("batch", batch)
    size = 64 if SMALL else 1024
    cfg = SamVisionConfig(hidden_size=64 if SMALL else 768, num_hidden_layers=2 if SMALL else 4,
                          num_attention_heads=4 if SMALL else 12, image_size=size, patch_size=8 if SMALL else 16,
                          window_size=4 if SMALL else 14, global_attn_indexes=[1] if SMALL else [3],
                          mlp_dim=128 if SMALL else 3072, output_channels=32 if SMALL else 256, use_rel_pos=True)

    class Embedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.sam = SamVisionModel._from_config(cfg, attn_implementation="eager")

        def forward(self, pixels):
            return self.sam(pixels).last_hidden_state

    model = Embedding().to(DEV, torch.float32 if SMALL else torch.bfloat16)
    pixels = torch.randn(batch, 3, size, size, device=DEV, dtype=torch.float32 if SMALL else torch.bfloat16)
    return model, pixels, None, lambda m, i, t: m(i).float().square().mean()


MODELS = {
    "gpt2-eager": lambda: gpt2("eager"),
    "gpt2-sdpa": lambda: gpt2("sdpa"),
    "truthgpt-l2": lambda: truthgpt("l2"),
    "truthgpt-l1": lambda: truthgpt("l1"),  # cdist(p=1): eager's backward fails at this size (issue 3)
    "gemma2-eager": lambda: gemma2(),
    "bloom-eager": lambda: bloom(),
    "sam-vit-b": lambda: sam(),
}


def compiled_for(model, mode):
    """The model compiled for `mode`, and the truthfuse backend object (None otherwise), whose
    records say what was fused and how the tuner decided."""
    if mode == "eager":
        return model, None
    parts = mode.split(":")  # inductor[:MODE] or truthfuse:STRATEGY[:MODE], MODE e.g. reduce-overhead
    if parts[0] == "inductor":
        return torch.compile(model, mode=parts[1] if len(parts) > 1 else None), None
    extra = {"mode": parts[2]} if len(parts) > 2 else {}
    backend = fusion_backend.backend(strategy=parts[1], tuning_seconds=TUNING_SECONDS, **extra)
    return torch.compile(model, backend=backend), backend


TUNING_SECONDS = 90.0
SIZE_OVERRIDE = {}  # --batch / --seq for TruthGPT and Gemma 2


def summary(backend):
    sites = [s for r in backend.records for s in r.sites]
    return dict(
        fused=sorted({f"{s.kind}:{s.variant}:{s.rule}:{s.config}" for s in sites if s.decision == "fused"}),
        n_fused=sum(s.decision == "fused" for s in sites),
        kept=sorted({f"{s.kind}:{s.rule}:{s.reason[:90]}" for s in sites if s.decision == "kept"}),
        cache_hit=all(r.cache_hit for r in backend.records if r.plan),
        measurements=sum(r.measurements for r in backend.records),
        tuning_s=sum(r.tuning_seconds for r in backend.records),
        plans=[(r.plan_ms, r.baseline_ms, r.tuning_reason) for r in backend.records if r.plan],
    )


def step_fn(model, runner, loss_fn, idx, tgt):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA-graph trees (reduce-overhead)
        loss = loss_fn(runner, idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def measure(step, warmup, rep):
    if DEV == "cpu":
        t0 = time.perf_counter()
        step()
        return (time.perf_counter() - t0) * 1e3, float("nan")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = do_bench(step, warmup=warmup, rep=rep, return_mode="median")
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def compile_and_step(model, mode, loss_fn, idx, tgt):
    """Compile for `mode` and run one training step; the step, its wall time (compile included),
    the truthfuse backend object (or None) and the compiled model."""
    runner, backend = compiled_for(model, mode)
    step = step_fn(model, runner, loss_fn, idx, tgt)
    t0 = time.perf_counter()
    step()
    _sync()
    return step, time.perf_counter() - t0, backend, runner


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def check(model, runner, loss_fn, idx, tgt):
    """Eval-mode loss of the compiled model against eager on the same weights and inputs."""
    model.eval()
    with torch.no_grad():
        ref = loss_fn(model, idx, tgt).float().item()
        got = loss_fn(runner, idx, tgt).float().item()
    model.train()
    ok = got == got and abs(got - ref) <= 2e-2 * abs(ref)
    return ok, ref, got


def write_profile(step, path, title, steps=5):
    """Append the GPU kernels that take the most time over `steps` training steps to `path`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        _sync()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=90)
    with open(path, "a") as f:
        f.write(f"=== {title}: {steps} steps ===\n{table}\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gpt2-eager,gpt2-sdpa,truthgpt-l2")
    ap.add_argument("--modes", default="eager,inductor,truthfuse:moderate,truthfuse:aggressive")
    ap.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    ap.add_argument("--small", action="store_true", help="tiny models on CPU: checks the script runs")
    ap.add_argument("--tag", default="models", help="results go to $OUT/<tag>.json")
    ap.add_argument("--batch", type=int, help="TruthGPT / Gemma 2 / BLOOM batch size (default 8 / 4 / 4)")
    ap.add_argument("--seq", type=int, help="TruthGPT / Gemma 2 / BLOOM sequence length (default 4096 / 2048 / 2048)")
    ap.add_argument("--profile", action="store_true",
                    help="after timing, profile 5 steps and write the top GPU kernels to $OUT/<tag>-profile.txt")
    ap.add_argument("--stack-dump", type=float, metavar="S",
                    help="print every thread's Python stack every S seconds (finds where a run hangs)")
    args = ap.parse_args()
    SIZE_OVERRIDE.update({k: v for k, v in (("batch", args.batch), ("seq", args.seq)) if v})
    if args.stack_dump:
        import faulthandler
        faulthandler.dump_traceback_later(args.stack_dump, repeat=True)
    warmup, rep = (10, 40) if args.quick else (25, 100)
    out_dir = os.environ.get("OUT", "/tmp")
    results = []
    import triton
    print(torch.__version__, triton.__version__,
          torch.cuda.get_device_name() if DEV == "cuda" else "cpu", flush=True)
    for name in args.models.split(","):
        for mode in args.modes.split(","):
            torch.manual_seed(0)
            model, idx, tgt, loss_fn = MODELS[name]()
            row = dict(model=name, mode=mode)
            try:
                step, seconds, backend, runner = compile_and_step(model, mode, loss_fn, idx, tgt)
                row["first_step_s"] = seconds
                if backend is not None:
                    row["cold"] = summary(backend)
                if mode != "eager":
                    try:
                        ok, ref, got = check(model, runner, loss_fn, idx, tgt)
                        row.update(check_ok=ok, eager_loss=ref, loss=got)
                    except Exception as exc:  # noqa: BLE001 -- eager itself may fail (cdist in bf16)
                        row["check_error"] = f"eager reference failed: {type(exc).__name__}: {str(exc)[:200]}"
                    # warm: a fresh Dynamo, the same process's caches (Inductor's, truthfuse's)
                    torch._dynamo.reset()
                    step, seconds, backend, runner = compile_and_step(model, mode, loss_fn, idx, tgt)
                    row["warm_first_step_s"] = seconds
                    if backend is not None:
                        row["warm"] = summary(backend)
                ms, mb = measure(step, warmup, rep)
                row.update(ms=ms, peak_mb=mb)
                if args.profile and DEV == "cuda":
                    write_profile(step, os.path.join(out_dir, f"{args.tag}-profile.txt"), f"{name} {mode}")
            except Exception as exc:  # noqa: BLE001 -- a row that fails is reported, not fatal
                row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            results.append(row)
            print(json.dumps(row), flush=True)
            with open(os.path.join(out_dir, f"{args.tag}.json"), "w") as f:
                json.dump(results, f, indent=1)  # after every row: a timeout keeps what was done
            del model
            torch._dynamo.reset()
            if DEV == "cuda":
                torch.cuda.empty_cache()
    with open(os.path.join(out_dir, f"{args.tag}.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\nmodel         mode                   ms      peak MB   first-step s  warm s  check")
    for r in results:
        print(f"{r['model']:13s} {r['mode']:20s} {r.get('ms', float('nan')):8.3f} {r.get('peak_mb', float('nan')):10.1f}"
              f" {r.get('first_step_s', float('nan')):10.1f} {r.get('warm_first_step_s', float('nan')):8.1f}"
              f"  {r.get('check_ok', '-')} {r.get('error', '')[:60]}")


if __name__ == "__main__":
    main()
