"""Cold compile time of one training step, with Triton's and Inductor's on-disk caches empty.

    TRITON_INTERPRET=0 python bench/compile_time_gpu.py MODE [--model gpt2-eager] [--profile] [--small]
        [--batch B] [--seq T]

MODE is a `bench/models_gpu.py` mode: inductor, truthfuse:moderate, ... Run one process per mode:
the caches are fresh directories made here before torch compiles anything, and a second mode in the
same process would find the first one's compiled kernels. Prints the first step's time (compile,
tuning and the step itself) and the second step's; with TRUTHFUSE_LOG=info truthfuse also logs each
tuning measurement. --profile writes a cProfile of the first step to $OUT/compile.prof.
TRUTHFUSE_COMPILE_WORKERS=0 turns off compiling the fused options' Triton kernels on worker
processes (`fusion_backend/kernels/compile_ahead.py`), for an A/B of that.
"""
import argparse
import cProfile
import os
import sys
import tempfile
import time

for var in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
    os.environ[var] = tempfile.mkdtemp(prefix=var.lower() + "-")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import models_gpu  # noqa: E402


def _count_kernel_compiles() -> dict:
    """Counts, through Triton's compilation listener, truthfuse's kernels that this process
    compiled or found in Triton's on-disk cache (Inductor's own kernels are not counted)."""
    import triton

    counts = {"compiled": 0, "seconds": 0.0, "from_cache": 0}

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        if not getattr(getattr(src, "fn", None), "module", "").startswith("fusion_backend"):
            return
        if cache_hit:
            counts["from_cache"] += 1
        else:
            counts["compiled"] += 1
            counts["seconds"] += times.total / 1e6

    triton.knobs.compilation.listener = listener
    return counts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("--model", default="gpt2-eager", choices=sorted(models_gpu.MODELS))
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--small", action="store_true", help="a tiny model on CPU (read by models_gpu at import)")
    ap.add_argument("--batch", type=int, help="TruthGPT / Gemma 2 batch size (models_gpu's default otherwise)")
    ap.add_argument("--seq", type=int, help="TruthGPT / Gemma 2 sequence length")
    ap.add_argument("--kernel-log", action="store_true",
                    help="count truthfuse's Triton kernels compiled in this process (and how long) or "
                         "loaded from Triton's cache")
    args = ap.parse_args()
    compiles = _count_kernel_compiles() if args.kernel_log else None
    models_gpu.SIZE_OVERRIDE.update({k: v for k, v in (("batch", args.batch), ("seq", args.seq)) if v})
    torch.manual_seed(0)
    model, idx, tgt, loss_fn = models_gpu.MODELS[args.model]()
    runner, backend = models_gpu.compiled_for(model, args.mode)
    step = models_gpu.step_fn(model, runner, loss_fn, idx, tgt)
    profiler = cProfile.Profile() if args.profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    step()
    models_gpu._sync()
    if profiler:
        profiler.disable()
        profiler.dump_stats(os.path.join(os.environ.get("OUT", "/tmp"), "compile.prof"))
    print(f"{args.model} {args.mode}: first step {time.perf_counter() - start:.1f} s"
          f"{' (profiled)' if profiler else ''}", flush=True)
    if backend is not None:
        print(models_gpu.summary(backend), flush=True)
    if compiles is not None:
        print(f"truthfuse kernels in this process: {compiles['compiled']} compiled "
              f"({compiles['seconds']:.1f} s), {compiles['from_cache']} loaded from Triton's cache", flush=True)
    start = time.perf_counter()
    step()
    models_gpu._sync()
    print(f"second step {time.perf_counter() - start:.3f} s", flush=True)


if __name__ == "__main__":
    main()
