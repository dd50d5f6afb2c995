"""Training with activation checkpointing (HF's gradient_checkpointing_enable()): a Llama-style
model whose every layer runs under torch.utils.checkpoint, eager against Inductor and truthfuse,
speed and memory in one process.

    TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 python bench/checkpoint_gpu.py [--layers 2] [--seq 2048]

Llama (HF transformers, attn_implementation="eager": the attention written out, as truthfuse
matches it; and "sdpa"), hidden 1024, 8 heads of 128, 2 KV heads, SwiGLU of 2816, bf16 weights,
batch 4, train mode, every layer checkpointed. One step = forward, loss (sum of logits times a
fixed random weight), backward. Median ms of `triton.testing.do_bench` and peak memory above the
model's (MiB), for eager, Inductor (torch.compile default) and truthfuse with the "moderate"
(default) and "aggressive" strategies; truthfuse's explain() says what fused. Before timing, each
compiled model's first step is compared with eager's: logits and gradients within 3x eager's
error against an fp32 copy plus 1e-2 (bf16). Writes $OUT/checkpoint_gpu.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "0")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import fusion_backend  # noqa: E402

DEV = "cuda"


def build(impl, layers, seq):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=2, vocab_size=4096,
                                   max_position_embeddings=seq, bos_token_id=0, eos_token_id=0)
    lm = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=impl)
    lm.gradient_checkpointing_enable()
    return lm.train()


class Logits(torch.nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(ids).logits


def step_fn(model, ids, weight):
    def step():
        out = model(ids)
        (out.float() * weight).sum().backward()
        return out
    return step


def grads_after_step(model, ids, weight):
    model.zero_grad(set_to_none=True)
    out = step_fn(model, ids, weight)()
    grads = {n.removeprefix("_orig_mod."): p.grad.float().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {"logits": out.detach().float(), **grads}


def rel_errors(got, ref):
    return {n: float((got[n] - r).abs().max() / r.abs().max().clamp_min(1e-30)) for n, r in ref.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    results = []
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)
        base = Logits(build(impl, args.layers, args.seq))
        ids = torch.randint(0, 4096, (args.batch, args.seq), device=DEV)
        weight = torch.randn(args.batch, args.seq, 4096, device=DEV) / args.seq
        ref = grads_after_step(copy.deepcopy(base).to(DEV, torch.float32), ids, weight)
        model = base.to(DEV, torch.bfloat16)
        eager_err = rel_errors(grads_after_step(model, ids, weight), ref)
        variants = [("eager", model, None)]
        variants.append(("inductor", torch.compile(model), None))
        for strategy in ("moderate", "aggressive"):
            backend = fusion_backend.backend(strategy=strategy, cache=False)
            variants.append((f"truthfuse {strategy}", torch.compile(model, backend=backend), backend))
        for name, fn, backend in variants:
            torch.cuda.synchronize()
            errs = rel_errors(grads_after_step(fn, ids, weight), ref)  # also compiles
            bad = [n for n in errs if not errs[n] <= 3 * eager_err[n] + 1e-2]
            fused = None
            if backend is not None:
                fused = [f"{s.rule}: {s.decision}" for r in backend.records for s in r.sites]
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
            ms = do_bench(step_fn(fn, ids, weight), warmup=50, rep=300, return_mode="median",
                          grad_to_none=list(model.parameters()))
            peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
            row = dict(impl=impl, variant=name, ms=ms, peak_mib=peak, ok=not bad, worst=max(errs, key=errs.get),
                       worst_err=max(errs.values()), eager_worst_err=max(eager_err.values()), sites=fused)
            results.append(row)
            print(f"{impl:5s} {name:20s} {ms:8.2f} ms {peak:8.0f} MiB  {'ok' if not bad else 'BAD ' + str(bad[:3])}"
                  f"  sites {fused}", flush=True)
            torch.compiler.reset()
        del model, variants
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), "checkpoint_gpu.json"), "w") as f:
        json.dump({"env": dict(torch=torch.__version__, device=torch.cuda.get_device_name()), "rows": results}, f,
                  indent=1)
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
