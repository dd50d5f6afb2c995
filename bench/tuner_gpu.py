"""The tuner against exhaustive and random search (issue 6), on the GPU.

    TRITON_INTERPRET=0 python bench/tuner_gpu.py [--part ops,model] [--quick]

Part "ops": for each attention metric at N=8192 (B=4, H=8, D=64, bf16, forward+backward), every
launch config in the op's declared space is timed once (exhaustive: the ground truth). MCTS and
random search then run with a budget of 20% of the space, pricing plans from those same
measurements, so the three searches are compared on identical costs; random search is averaged
over 20 seeds.

Part "model": GPT-2 small (B=8, T=1024, bf16, training) compiled by truthfuse with
configs="search". The backend's own decision space and plan timer (site timings) are captured;
MCTS (plain, and seeded as the backend runs it with the plan the per-site timings say is best)
and random search with the default budget of 30 plans are compared against the best plan of the
additive site-cost model (every site's fastest option, found by timing every option once).

Writes $OUT/tuner.json and prints a table. `--small` runs tiny shapes on CPU to check the script.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("TRUTHFUSE_CACHE_DIR", tempfile.mkdtemp(prefix="truthfuse-tuner-bench-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fusion_backend  # noqa: E402
from fusion_backend.ops.attention import attention, attention_config_space, config_key  # noqa: E402
from fusion_backend.tune import (DecisionSpace, Option, SiteChoices, exhaustive_search, greedy_plan,  # noqa: E402
                                 mcts_search, random_search)

SMALL = "--small" in sys.argv
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def time_ms(fn, warmup=5, rep=20):
    if DEV == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def compare(space, cost, budget, seeds=20):
    """Exhaustive, MCTS and random search over `space`, all pricing plans with `cost`."""
    truth = exhaustive_search(space, cost)
    found = mcts_search(space, cost, simulations=budget, seed=0)
    rand = [random_search(space, cost, budget=budget, seed=s).best_cost for s in range(seeds)]
    return dict(space=space.size(), budget=budget, exhaustive_ms=truth.best_cost,
                exhaustive_plan=dict(truth.best_plan), mcts_ms=found.best_cost,
                mcts_gap=found.best_cost / truth.best_cost - 1, mcts_measured=found.measurements,
                random_ms_mean=statistics.mean(rand), random_gap_mean=statistics.mean(rand) / truth.best_cost - 1)


def _configs(metric, D, dtype):
    configs = [config_key(c) for c in attention_config_space(metric, D, dtype, DEV)]
    return configs[:3] if SMALL else configs


def precompile(metric, part, parts, D=64, N=1024):
    """Compile every `parts`-th config of the metric's space (starting at `part`) by running it
    once at a small N that every tile divides, as the timed N does, so the kernels' specializations
    match: several processes fill Triton's on-disk cache in parallel before the timing process
    runs, which then only loads them."""
    dtype = torch.float32 if SMALL else torch.bfloat16
    q, k, v = (torch.randn(1, 2, N, D, device=DEV, dtype=dtype, requires_grad=True) for _ in range(3))
    scale = torch.tensor(0.125 if metric == "dot" else 0.05, device=DEV, requires_grad=metric != "dot")
    for i, cfg in enumerate(_configs(metric, D, dtype)):
        if i % parts == part:
            try:
                out = attention(q, k, v, metric=metric, scale=scale, causal=False, config=cfg)
                out.backward(torch.ones_like(out))
            except Exception as exc:  # noqa: BLE001 -- the timing process reports failures
                print(f"  precompile {metric} {cfg}: {type(exc).__name__}", flush=True)


def part_ops(quick, workers=0, metrics=("dot", "l2", "cosine", "l1")):
    B, H, N, D = (1, 2, 64, 16) if SMALL else (4, 8, 8192, 64)
    dtype = torch.float32 if SMALL else torch.bfloat16
    rows = []
    for metric in metrics:
        configs = _configs(metric, D, dtype)
        if workers > 1:
            import subprocess
            t0 = time.perf_counter()
            procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--precompile", metric,
                                       f"{i}/{workers}"] + (["--small"] if SMALL else []))
                     for i in range(workers)]
            for pr in procs:
                pr.wait()
            print(f"  {metric}: {len(configs)} configs precompiled by {workers} processes in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        q, k, v = (torch.randn(B, H, N, D, device=DEV, dtype=dtype, requires_grad=True) for _ in range(3))
        scale = torch.tensor(0.125 if metric == "dot" else 0.05, device=DEV, requires_grad=metric != "dot")
        measured = {}
        for cfg in configs:
            def run(cfg=cfg):
                out = attention(q, k, v, metric=metric, scale=scale, causal=False, config=cfg)
                out.backward(torch.ones_like(out))
            try:
                measured[cfg] = time_ms(run, *((2, 5) if quick else (5, 20)))
            except Exception as exc:  # noqa: BLE001 -- a config that fails costs inf
                measured[cfg] = math.inf
                print(f"  {metric} {cfg}: failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        space = DecisionSpace([SiteChoices("site", "attention", [Option(c, metric, c, True) for c in configs])])
        result = compare(space, lambda plan: measured[plan["site"]], budget=max(1, round(0.2 * len(configs))))
        result.update(part="ops", metric=metric, N=N, configs=measured)
        rows.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "configs"}), flush=True)
    return rows


def part_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    batch, seq = (2, 16) if SMALL else (8, 1024)
    cfg = GPT2Config(n_layer=2 if SMALL else 12, n_embd=64 if SMALL else 768, n_head=4 if SMALL else 12,
                     n_positions=seq, vocab_size=1000 if SMALL else 50257)
    model = GPT2LMHeadModel._from_config(cfg, attn_implementation="eager").to(
        DEV, torch.float32 if SMALL else torch.bfloat16)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq), device=DEV)
    captured = []
    backend = fusion_backend.backend(configs="search", cache=False)
    backend.tuning_observer = lambda space, timer, opts: captured.append((space, timer))
    t0 = time.perf_counter()
    torch.compile(lambda i: model(i).logits, backend=backend)(idx).float().sum().backward()
    compile_s = time.perf_counter() - t0
    rows = []
    for space, timer in captured:
        by_id = {s.id: s for s in timer.sites}

        def cost(plan):
            # every search prices plans from the same first-round site measurements
            return sum(timer.site_cost(by_id[sid], plan.get(sid, "keep"), 0) for sid in by_id)

        # the additive model's optimum: each site's fastest option; of a conflicting pair (two
        # rules at one anchor) the slower one keeps
        site_best = {site.site_id: min(timer.site_cost(by_id[site.site_id], o.name, 0) for o in site.options)
                     for site in space.sites}
        keep_only = {}
        for a, b in space.conflicts:
            loser = a if site_best[a] > site_best[b] else b
            keep_only[loser] = timer.site_cost(by_id[loser], "keep", 0)
        best = sum(keep_only.get(sid, c) for sid, c in site_best.items())
        conflicted = {a for a, b in space.conflicts} | {b for a, b in space.conflicts}
        found = mcts_search(space, cost, simulations=30, seed=0)
        # what the backend runs: the search seeded with the plan the per-site timings say is best
        seed_plan = greedy_plan(space, lambda sid, option: timer.site_cost(by_id[sid], option, 0))
        seeded = mcts_search(space, cost, simulations=30, seed=0, seeds=(seed_plan,))
        rand = [random_search(space, cost, budget=30, seed=s).best_cost for s in range(10)]
        row = dict(part="model", model="gpt2-small-eager-attn", sites=len(space.sites), conflicts=len(conflicted),
                   space=space.size(), oracle_ms=best, mcts_ms=found.best_cost,
                   mcts_gap=found.best_cost / best - 1, seeded_mcts_ms=seeded.best_cost,
                   seeded_mcts_gap=seeded.best_cost / best - 1, random_ms_mean=statistics.mean(rand),
                   random_gap_mean=statistics.mean(rand) / best - 1, site_measurements=timer.measurements,
                   compile_with_search_s=compile_s)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="ops,model")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--small", action="store_true", help="tiny shapes on CPU: checks the script runs")
    ap.add_argument("--workers", type=int, default=0, help="processes that compile the ops part's configs first")
    ap.add_argument("--metrics", default="dot,l2,cosine,l1", help="the ops part's metrics")
    ap.add_argument("--precompile", nargs=2, metavar=("METRIC", "I/N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.precompile:
        i, n = (int(x) for x in args.precompile[1].split("/"))
        precompile(args.precompile[0], i, n, D=16 if SMALL else 64, N=64 if SMALL else 1024)
        return
    import triton
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name() if DEV == "cuda" else "cpu", flush=True)
    rows = []
    out = os.path.join(os.environ.get("OUT", "/tmp"), "tuner.json")
    for part in args.part.split(","):
        rows += part_ops(args.quick, args.workers, args.metrics.split(",")) if part == "ops" else part_model()
        with open(out, "w") as f:
            json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
