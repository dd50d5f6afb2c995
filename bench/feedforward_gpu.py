"""Feed-forward kernels on the GPU: correctness against float64, then speed and memory in bf16
against eager and Inductor of the same module, measured in the same run.

    TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 python bench/feedforward_gpu.py [--quick] [--no-max-autotune]

(1) Correctness: fresh random inputs, fwd + bwd, fp32/fp16/bf16, plain and gated, every
    activation, dropout, residual, odd shapes, both impls; ||out - ref|| / ||ref|| against
    `feedforward_reference` in float64 with the same seed (same Philox masks). The caching
    allocator is primed with NaN so unwritten outputs show. Eager PyTorch's error in the same dtype
    is printed beside ours as the yardstick.
(2) Speed: median ms (triton.testing.do_bench, return_mode="median") and peak extra memory
    (max_memory_allocated - base) for eager, Inductor (and max-autotune-no-cudagraphs) of the
    baseline FFN module from shared/bench/baseline_gpu.py, and for our op with impl="triton" and
    impl="cublas". Writes $OUT/feedforward_gpu.json and prints a table.
"""
import argparse
import gc
import importlib
import json
import math
import os
import re
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "0")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import warnings  # noqa: E402

from fusion_backend.kernels import feedforward as K  # noqa: E402
from fusion_backend.ops.fallback import FusionFallbackWarning  # noqa: E402
from fusion_backend.ops.feedforward import (  # noqa: E402
    feedforward,
    default_feedforward_config,
    feedforward_config_space,
    feedforward_reference,
)

torch.backends.cuda.matmul.allow_tf32 = True
dev = "cuda"
OUT = os.environ.get("OUT", "/tmp")
T0 = time.time()
results = {"correctness": [], "bench": []}


def save():
    results["versions"] = dict(torch=torch.__version__, triton=triton.__version__, card=torch.cuda.get_device_name(),
                               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(T0)))
    json.dump(results, open(os.path.join(OUT, "feedforward_gpu.json"), "w"), indent=1)


# ---------------------------------------------------------------------------------------------
# (1) correctness
# ---------------------------------------------------------------------------------------------

TOL = {torch.float32: 3e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # tf32 / fp16 / bf16 operands


def poison():
    """Fill the allocator's free blocks with NaN so an output nobody wrote shows up as NaN."""
    junk = torch.full((1 << 27,), float("nan"), device=dev)
    del junk


def rel(a, b):
    a = a.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(*case, **kw):
    """`check_once` twice, on two draws of fresh inputs of the same shapes (the second call also
    finds its kernels compiled, as every step of a training loop after the first does)."""
    return all([check_once(*case, repeat=r, **kw) for r in range(2)])


def check_once(dtype, T, d, h, act, gated, p_h, p_o, residual, bias, impl, repeat=0, config=None):
    g = torch.Generator(device=dev).manual_seed(hash((dtype, T, d, h, act, gated, repeat)) % 2**31)
    rnd = lambda *s, sc=1.0: (torch.randn(*s, device=dev, generator=g) * sc)  # noqa: E731
    x = rnd(T, d)
    ts = dict(x=x, w_in=rnd(h, d, sc=d**-0.5), b_in=rnd(h, sc=0.5) if bias else None,
              w_out=rnd(d, h, sc=h**-0.5), b_out=rnd(d, sc=0.5) if bias else None,
              w_gate=rnd(h, d, sc=d**-0.5) if gated else None, b_gate=rnd(h, sc=0.5) if (gated and bias) else None,
              residual=rnd(T, d) if residual else None)
    names = [k for k, v in ts.items() if v is not None]
    gout = rnd(T, d)

    def run(tdict, fn, **extra):
        kw = dict(activation=act, w_gate=tdict["w_gate"], b_gate=tdict["b_gate"], hidden_dropout_p=p_h,
                  output_dropout_p=p_o, residual=tdict["residual"], **extra)
        torch.manual_seed(1234)
        y = fn(tdict["x"], tdict["w_in"], tdict["b_in"], tdict["w_out"], tdict["b_out"], **kw)
        grads = torch.autograd.grad(y, [tdict[n] for n in names], gout.to(y.dtype))
        return y, grads

    mk = lambda dt: {k: (v.to(dt).requires_grad_() if v is not None else None) for k, v in ts.items()}  # noqa: E731
    y64, g64 = run(mk(torch.float64), feedforward_reference)
    poison()
    y, gr = run(mk(dtype), feedforward, impl=impl, config=config)
    torch.cuda.synchronize()
    ye, ge = run(mk(dtype), feedforward_reference)  # eager PyTorch in the same dtype: the yardstick
    errs = [rel(y, y64)] + [rel(a, b) for a, b in zip(gr, g64)]
    eerrs = [rel(ye, y64)] + [rel(a, b) for a, b in zip(ge, g64)]
    if p_h == 0 and p_o == 0:  # inference takes other paths (nothing saved, activations in place)
        poison()
        with torch.no_grad():
            td = mk(dtype)
            yi = feedforward(td["x"], td["w_in"], td["b_in"], td["w_out"], td["b_out"], activation=act,
                             w_gate=td["w_gate"], b_gate=td["b_gate"], residual=td["residual"], impl=impl,
                             config=config)
        errs.append(rel(yi, y64))
        eerrs.append(eerrs[0])
    worst = max(errs)
    ok = worst <= max(TOL[dtype], 2 * max(eerrs))
    row = dict(dtype=str(dtype).split(".")[-1], T=T, d=d, h=h, act=act, gated=gated, p_h=p_h, p_o=p_o,
               residual=residual, bias=bias, impl=impl, config=config,
               err=dict(zip(["out"] + names + ["inference out"], errs)),
               eager_err=dict(zip(["out"] + names + ["inference out"], eerrs)), ok=ok,
               backward_rows=FF._backward_rows, saved_pre_activation=FF.SAVE_PRE_ACTIVATION, repeat=repeat)
    results["correctness"].append(row)
    print(f"{'PASS' if ok else 'FAIL'} {row['dtype']:8s} T={T:5d} d={d:4d} h={h:5d} {act:9s} gated={gated!s:5s} "
          f"p=({p_h},{p_o}) res={residual!s:5s} bias={bias!s:5s} {impl:6s} config={config} rep={repeat} "
          f"worst {worst:.1e} (eager {max(eerrs):.1e})", flush=True)
    return ok


CASES = [
    (torch.float32, 123, 40, 72, "gelu", False, 0.1, 0.1, True, True),
    (torch.float16, 123, 40, 72, "gelu", False, 0.1, 0.1, True, True),
    (torch.bfloat16, 123, 40, 72, "gelu", False, 0.1, 0.1, True, True),
    (torch.bfloat16, 6, 24, 72, "gelu_tanh", False, 0.0, 0.0, False, False),
    (torch.bfloat16, 42, 40, 72, "relu", False, 0.0, 0.2, True, True),
    (torch.bfloat16, 300, 256, 1024, "silu", True, 0.1, 0.0, False, False),
    (torch.float32, 300, 256, 1024, "gelu", True, 0.0, 0.0, True, True),
    (torch.float16, 777, 512, 2048, "silu", True, 0.2, 0.1, True, True),
    (torch.bfloat16, 4096, 1024, 4096, "gelu", False, 0.1, 0.1, True, True),
    # no hidden dropout: impl "cublas" takes ReLU / tanh GELU from the first product's epilogue
    (torch.float16, 333, 64, 130, "gelu_tanh", False, 0.0, 0.1, True, True),
    (torch.float32, 123, 40, 72, "relu", False, 0.0, 0.0, True, False),
    (torch.bfloat16, 4096, 1024, 4096, "gelu_tanh", False, 0.0, 0.1, True, True),
    # no hidden dropout, no epilogue for the activation: a forward that saves nothing applies
    # ATen's in-place activation to the first product
    (torch.bfloat16, 333, 64, 130, "gelu", False, 0.0, 0.1, True, True),
    (torch.float16, 300, 256, 1024, "silu", False, 0.0, 0.0, True, False),
    # CLIP's quick_gelu: in the epilogues, and (no dropout) our epilogue kernel in place in inference
    (torch.bfloat16, 300, 256, 1024, "quick_gelu", False, 0.1, 0.1, True, True),
    (torch.float16, 333, 64, 130, "quick_gelu", False, 0.0, 0.0, True, True),
    (torch.float32, 123, 40, 72, "quick_gelu", True, 0.0, 0.1, True, False),
    # Nemotron's squared ReLU: the same paths as quick_gelu
    (torch.bfloat16, 300, 256, 1024, "relu2", False, 0.1, 0.1, True, True),
    (torch.float16, 333, 64, 130, "relu2", False, 0.0, 0.0, True, True),
    (torch.bfloat16, 777, 512, 2048, "relu2", True, 0.0, 0.1, False, False),
]


def correctness(cases, compile_check=True):
    # A fallback to the PyTorch reference would pass the numerics while hiding a broken kernel.
    warnings.simplefilter("error", FusionFallbackWarning)
    ok = True
    for c in cases:
        for impl in ("triton", "cublas"):
            try:
                ok &= check(*c, impl)
            except Exception as e:  # keep going: report every failure
                ok = False
                print("FAIL", c, impl, type(e).__name__, str(e)[:300], flush=True)
    # Backward in ragged row blocks (100 rows) with the pre-activation saved and recomputed.
    for save_pre in (True, False):
        FF._backward_rows, FF.SAVE_PRE_ACTIVATION = 100, save_pre
        for c in [c for c in cases if c[1] > 100]:
            for impl in ("triton", "cublas"):
                try:
                    print(f"  row blocks of 100, pre-activation {'saved' if save_pre else 'recomputed'}:", flush=True)
                    ok &= check(*c, impl)
                except Exception as e:
                    ok = False
                    print("FAIL", c, impl, type(e).__name__, str(e)[:300], flush=True)
    FF._backward_rows, FF.SAVE_PRE_ACTIVATION = None, _SCHEME_DEFAULTS["SAVE_PRE_ACTIVATION"]
    if not compile_check:
        results["correctness_all_ok"] = bool(ok)
        save()
        return ok
    # torch.compile with Inductor over the op: same result as the op called eagerly (no dropout).
    m = FusedFFN(256, 1024, 0.0, "cublas").to(dev, torch.bfloat16)
    x = torch.randn(300, 256, device=dev, dtype=torch.bfloat16)
    cm = torch.compile(m, fullgraph=True, dynamic=True)
    e = rel(cm(x), m(x).double())
    print(f"{'PASS' if e < 1e-2 else 'FAIL'} inductor(compile of op) vs op: {e:.1e}", flush=True)
    ok &= e < 1e-2
    results["correctness_all_ok"] = bool(ok)
    save()
    return ok


# ---------------------------------------------------------------------------------------------
# (2) benchmark: the baseline module and measure() as in shared/bench/baseline_gpu.py
# ---------------------------------------------------------------------------------------------


def measure(name, fn, args, bwd=False, fresh_grads=False):
    """Median ms and peak extra MiB of fn(*args) (with backward when bwd), as the anchors measure
    them (shared/bench/baseline_gpu.py: gradients accumulate over the steps). fresh_grads: every
    step starts from None gradients instead, as a training loop with zero_grad(set_to_none=True)
    does; CUDA-graph replays (mode="reduce-overhead") need it, since a replay overwrites the memory
    of the previous step's gradients. Those new gradients then count in the peak."""
    torch.cuda.synchronize(); gc.collect(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        if bwd:
            def run():
                if fresh_grads:
                    fn.zero_grad(set_to_none=True)
                    for a in args:
                        a.grad = None
                torch.compiler.cudagraph_mark_step_begin()  # a new step, for CUDA-graph trees
                out = fn(*args)
                out.backward(torch.ones_like(out))
        else:
            def run():
                torch.compiler.cudagraph_mark_step_begin()
                with torch.no_grad():
                    fn(*args)
        ms = do_bench(run, warmup=50, rep=200, return_mode="median")
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return ms, peak
    except torch.OutOfMemoryError:
        return float("nan"), float("nan")
    except Exception as e:
        print("ERR", name, type(e).__name__, str(e)[:200], flush=True)
        return float("nan"), float("nan")


ACT_FNS = {"gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "relu": F.relu, "silu": F.silu,
           "quick_gelu": lambda z: z * torch.sigmoid(1.702 * z), "relu2": lambda z: F.relu(z) ** 2}


class FFN(torch.nn.Module):
    """The anchors' block (shared/bench/baseline_gpu.py), with the activation a choice (--activation)."""

    def __init__(s, d, h, p, act="gelu"):
        super().__init__(); s.l1 = torch.nn.Linear(d, h); s.l2 = torch.nn.Linear(h, d); s.p = p; s.act = act

    def forward(s, x):
        return x + F.dropout(s.l2(F.dropout(ACT_FNS[s.act](s.l1(x)), s.p, s.training)), s.p, s.training)


FF = importlib.import_module("fusion_backend.ops.feedforward")  # the module (ops re-exports the function)
# How backward keeps memory down: keep the pre-activation and walk 4 row blocks, or recompute it
# in 2 blocks. A variant sets these in its forward; its backward runs before the next variant's.
MEMORY_SCHEMES = {
    "saved-4": dict(SAVE_PRE_ACTIVATION=True, BACKWARD_ROW_BLOCKS=4),
    "saved-2": dict(SAVE_PRE_ACTIVATION=True, BACKWARD_ROW_BLOCKS=2),
    "saved-1": dict(SAVE_PRE_ACTIVATION=True, BACKWARD_ROW_BLOCKS=1),
    "recompute-2": dict(SAVE_PRE_ACTIVATION=False, RECOMPUTE_ROW_BLOCKS=2),
}
_SCHEME_DEFAULTS = {k: getattr(FF, k) for k in ("SAVE_PRE_ACTIVATION", "BACKWARD_ROW_BLOCKS", "RECOMPUTE_ROW_BLOCKS")}


class FusedFFN(FFN):
    """The same module through `feedforward` (same parameters, same math)."""

    def __init__(s, d, h, p, impl, config=None, scheme=None, act="gelu"):
        super().__init__(d, h, p, act); s.impl = impl; s.config = config; s.scheme = scheme

    def forward(s, x):
        for k, v in {**_SCHEME_DEFAULTS, **MEMORY_SCHEMES.get(s.scheme, {})}.items():
            setattr(FF, k, v)
        p = s.p if s.training else 0.0
        return feedforward(x, s.l1.weight, s.l1.bias, s.l2.weight, s.l2.bias, activation=s.act,
                           hidden_dropout_p=p, output_dropout_p=p, residual=x, impl=s.impl, config=s.config)


def _compiled(base, backend, mode):
    """torch.compile of `base` by Inductor or truthfuse (every valid match fused, so the fused op
    is what is timed), in Inductor's `mode` ("default" or "reduce-overhead": CUDA graphs)."""
    if backend == "inductor":
        return torch.compile(base, mode=None if mode == "default" else mode)
    import fusion_backend  # the backend object: this copy may not be pip-installed (no entry point)

    return torch.compile(base, backend=fusion_backend.backend(strategy="aggressive", mode=mode, cache=False))


def _graph_skips():
    return {k: v for k, v in torch._dynamo.utils.counters["inductor"].items() if "cudagraph" in k}


def _graph_launches(step):
    """cudaGraphLaunch calls in one run of `step` (the evidence that it replays CUDA graphs)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if "cudaGraphLaunch" in e.name)


def check_graphs():
    """truthfuse under mode="reduce-overhead": the whole step becomes CUDA graphs (no skips) with
    the fused op inside, the numbers match float64 without dropout, and with dropout each replay
    draws a fresh mask (the seed is drawn on the device inside the graph)."""
    ok = True
    T, d, h = 1024, 256, 1024
    torch.manual_seed(0)
    for p in (0.0, 0.1):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        base = FFN(d, h, p).to(dev, torch.bfloat16)
        ref = FFN(d, h, p).to(dev, torch.float64)
        ref.load_state_dict(base.state_dict())
        cm = _compiled(base, "truthfuse", "reduce-overhead")
        outs = []
        for step in range(4):
            x = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
            xg = x.clone().requires_grad_()
            base.zero_grad(set_to_none=True)  # replays overwrite the last step's gradients
            torch.compiler.cudagraph_mark_step_begin()
            out = cm(xg)
            out.backward(torch.ones_like(out))
            outs.append((x, out.detach().clone(), xg.grad.clone()))
        skips = _graph_skips()
        launches = _graph_launches(lambda: (base.zero_grad(set_to_none=True),
                                            torch.compiler.cudagraph_mark_step_begin(),
                                            cm(outs[0][0].clone().requires_grad_()).sum().backward()))
        graphed = launches >= 2 and not any("skip" in k for k in skips)  # forward and backward graphs
        print(f"{'PASS' if graphed else 'FAIL'} reduce-overhead p={p}: {launches} cudaGraphLaunch calls in a step, "
              f"counters {skips}", flush=True)
        ok &= graphed
        if p == 0.0:
            x, out, gx = outs[-1]
            x64 = x.double().requires_grad_()
            o64 = ref(x64)
            o64.backward(torch.ones_like(o64))
            e_out, e_gx = rel(out, o64.detach()), rel(gx, x64.grad)
            good = e_out < 1e-2 and e_gx < 3e-2
            print(f"{'PASS' if good else 'FAIL'} reduce-overhead p=0 vs float64: out {e_out:.1e} dx {e_gx:.1e}",
                  flush=True)
            ok &= good
        else:
            # out = x + dropout(y): a dropped element of y leaves out == x exactly.
            rates = [(o == x).float().mean().item() for x, o, _ in outs]
            fresh = all(not torch.equal(outs[i][1] - outs[i][0], outs[i + 1][1] - outs[i + 1][0]) for i in range(3))
            x0 = outs[0][0]
            same_in = []
            for _ in range(2):
                base.zero_grad(set_to_none=True)
                torch.compiler.cudagraph_mark_step_begin()
                o = cm(x0.clone().requires_grad_())
                o.backward(torch.ones_like(o))
                same_in.append(o.detach().clone())
            fresh &= not torch.equal(same_in[0], same_in[1])
            good = fresh and all(0.08 < r < 0.12 for r in rates)
            print(f"{'PASS' if good else 'FAIL'} reduce-overhead p=0.1: drop rates {[round(r, 4) for r in rates]}, "
                  f"fresh mask every replay: {fresh}", flush=True)
            ok &= good
        results.setdefault("graphs", []).append(dict(p=p, counters=skips, ok=bool(ok)))
    torch._dynamo.reset()
    save()
    return ok


def bench_epilogue():
    """The elementwise epilogue alone against PyTorch's gelu / dropout on (8192, 4096) bf16."""
    z = torch.randn(8192, 4096, device=dev, dtype=torch.bfloat16)
    nbytes = 2 * z.numel() * z.element_size()
    g = torch.randn_like(z)
    seed = torch.tensor(7, device=dev)  # on the device, as the op passes it (an int is copied there per call)
    cases = [
        ("torch gelu", lambda: F.gelu(z)),
        ("torch gelu+dropout", lambda: F.dropout(F.gelu(z), 0.1, True)),
    ]
    for cfg in feedforward_config_space("cublas"):
        cases += [
            (f"hidden_epilogue gelu {cfg['key']}", lambda c=cfg: K.hidden_epilogue(z, act=1, config=c)),
            (f"hidden_epilogue gelu+dropout {cfg['key']}",
             lambda c=cfg: K.hidden_epilogue(z, act=1, seed=seed, p=0.1, config=c)),
            # backward reads z and g and writes dz: 1.5x the bytes of the forward rows
            (f"hidden_epilogue backward+dropout+bias {cfg['key']}",
             lambda c=cfg: K.hidden_epilogue(z, act=1, grad=g, seed=seed, p=0.1, bias_grad=True, config=c)),
        ]
    for name, fn in cases:
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        results.setdefault("epilogue", []).append(dict(name=name, ms=ms, gbps=nbytes / ms / 1e6))
        print(f"epilogue {name:30s} {ms * 1000:8.1f} us  {nbytes / ms / 1e6:7.0f} GB/s", flush=True)
    save()


def bench(args):
    shapes = [(8192, 1024, 4096, False), (8192, 1024, 4096, True), (16384, 4096, 16384, True)]
    if not args.quick:
        shapes.insert(2, (16384, 4096, 16384, False))
    if args.inference_only:
        shapes = [s for s in shapes if not s[3]]
    act = args.activation
    for (T, d, h, train) in shapes:
        torch.manual_seed(0)
        base = FFN(d, h, 0.1, act).to(dev, torch.bfloat16).train(train)
        x = torch.randn(T, d, device=dev, dtype=torch.bfloat16, requires_grad=train)
        variants = [("eager", base), ("inductor", torch.compile(base))]
        if args.max_autotune and T == 8192:
            variants.append(("max-autotune", torch.compile(base, mode="max-autotune-no-cudagraphs")))
        if args.graphs and T == 8192:
            # Compiled by truthfuse and Inductor, with and without CUDA graphs. The CUDA-graph rows
            # run with fresh gradients every step (see `measure`), so they are compared with eager
            # measured the same way ("eager, fresh grads").
            variants += [("truthfuse", _compiled(base, "truthfuse", "default")),
                         ("eager, fresh grads", base),
                         ("inductor-reduce-overhead", _compiled(base, "inductor", "reduce-overhead")),
                         ("truthfuse-reduce-overhead", _compiled(base, "truthfuse", "reduce-overhead"))]
            if train:  # backward row blocks under CUDA graphs
                variants += [(f"truthfuse-reduce-overhead, {b} row blocks",
                              _compiled(base, "truthfuse", "reduce-overhead")) for b in args.graph_blocks]
        for impl in ("cublas", "triton") if args.triton_impl else ("cublas",):
            m = FusedFFN(d, h, 0.1, impl, act=act).to(dev, torch.bfloat16).train(train)
            m.load_state_dict(base.state_dict())
            variants.append((f"ours-{impl}", m))
        if train and args.schemes:  # the other memory scheme, and other elementwise tiles
            for scheme in MEMORY_SCHEMES:
                for key in ([None] + args.ew_configs) if scheme == "saved-4" else [None]:
                    m = FusedFFN(d, h, 0.1, "cublas", key, scheme, act).to(dev, torch.bfloat16).train(train)
                    m.load_state_dict(base.state_dict())
                    variants.append((f"ours-cublas-{scheme}" + (f"-{key}" if key else ""), m))
        if T == 8192 and not train:  # two other GEMM tiles for the fused inference path
            for key in ("triton:m128n128k64g8w8s4", "triton:m128n128k64g8w4s4"):
                m = FusedFFN(d, h, 0.1, "triton", key, act=act).to(dev, torch.bfloat16).train(train)
                m.load_state_dict(base.state_dict())
                variants.append((f"ours-{key}", m))
        if T == 8192 and not args.quick:  # a few other configs, for the tuner's sake
            for key in ("triton:m128n128k64g8w8s4", "triton:m128n128k64g8w4s4", "triton:m64n256k64g8w4s4"):
                m = FusedFFN(d, h, 0.1, "triton", key, act=act).to(dev, torch.bfloat16).train(train)
                m.load_state_dict(base.state_dict())
                variants.append((f"ours-{key}", m))
            for key in ("cublas:m32n128w4", "cublas:m8n512w4"):
                m = FusedFFN(d, h, 0.1, "cublas", key, act=act).to(dev, torch.bfloat16).train(train)
                m.load_state_dict(base.state_dict())
                variants.append((f"ours-{key}", m))
        eager_ms = eager_mb = fresh_ms = fresh_mb = None
        for name, fn in variants:
            if time.time() - T0 > args.budget_s:
                print("time budget reached, skipping", name, T, train, flush=True)
                continue
            fresh = "reduce-overhead" in name or "fresh grads" in name
            blocks = re.search(r"(\d+) row blocks", name)
            FF.BACKWARD_ROW_BLOCKS = int(blocks.group(1)) if blocks else _SCHEME_DEFAULTS["BACKWARD_ROW_BLOCKS"]
            ms, mb = measure(name, fn, (x,), train, fresh_grads=fresh and train)
            FF.BACKWARD_ROW_BLOCKS = _SCHEME_DEFAULTS["BACKWARD_ROW_BLOCKS"]
            fl = 2 * 2 * T * d * h * (3 if train else 1)
            if name == "eager":
                eager_ms, eager_mb = ms, mb
            if name == "eager, fresh grads":
                fresh_ms, fresh_mb = ms, mb
            ref_ms, ref_mb = (fresh_ms, fresh_mb) if (fresh and train) else (eager_ms, eager_mb)
            row = dict(T=T, d=d, h=h, act=act, train=train, mode=name, ms=ms, peak_mb=mb, tflops=fl / ms / 1e9,
                       fresh_grads=fresh and train, speedup_vs_eager=ref_ms / ms if ref_ms else None,
                       mem_vs_eager=mb / ref_mb if ref_mb else None)
            if args.graphs:
                row["cudagraph_counters"] = _graph_skips()
            results["bench"].append(row)
            print(f"ffn {act} T={T} d={d} h={h} train={train!s:5s} {name:34s} {ms:8.3f} ms {fl / ms / 1e9:6.1f} TFLOP/s "
                  f"{mb:8.1f} MB  x{row['speedup_vs_eager'] or 0:.3f} speed  x{row['mem_vs_eager'] or 0:.3f} mem", flush=True)
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            save()
        del base, x, variants
        torch.cuda.empty_cache()


def profile_training(T=8192, d=1024, h=4096, steps=20):
    """The GPU kernels (and the host time around them) of training steps: eager against ours,
    with each memory scheme."""
    from host_timing import cprofile_text, host_and_wall_ms
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    base = FFN(d, h, 0.1).to(dev, torch.bfloat16)
    variants = [("eager", base)]
    for name, scheme in (("ours-cublas", None), ("ours-cublas-saved-4", "saved-4"), ("ours-cublas-saved-2", "saved-2"),
                         ("ours-cublas-saved-1", "saved-1"), ("ours-cublas-recompute-2", "recompute-2")):
        m = FusedFFN(d, h, 0.1, "cublas", scheme=scheme).to(dev, torch.bfloat16)
        m.load_state_dict(base.state_dict())
        variants.append((name, m))
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    path = os.path.join(OUT, "feedforward-profile.txt")
    for name, fn in variants:
        def step():
            out = fn(x)
            out.backward(torch.ones_like(out))
        host_ms, wall_ms = host_and_wall_ms(step, steps)
        results.setdefault("profile", []).append(dict(variant=name, T=T, d=d, h=h, host_ms=host_ms, wall_ms=wall_ms))
        print(f"profile {name}: host issue {host_ms:.3f} ms/step, wall {wall_ms:.3f} ms/step", flush=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        averages = prof.key_averages()
        # the GPU time of a step: what it would take with no host in the way (CUDA graphs)
        gpu_ms = sum(e.self_device_time_total for e in averages) / steps / 1e3
        results["profile"][-1]["gpu_ms"] = gpu_ms
        print(f"profile {name}: GPU time {gpu_ms:.3f} ms/step (sum of kernel times)", flush=True)
        table = averages.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=80)
        with open(path, "a") as f:
            f.write(f"=== {name}: host issue {host_ms:.3f} ms/step, wall {wall_ms:.3f} ms/step, GPU {gpu_ms:.3f} "
                    f"ms/step, {steps} steps ===\n{table}\n")
        if name in ("eager", "ours-cublas"):
            # where the host time goes, by Python function
            with open(os.path.join(OUT, "feedforward-cprofile.txt"), "a") as f:
                f.write(f"=== {name}: {steps} steps ===\n{cprofile_text(step, steps, orders=('tottime', 'cumtime'))}\n")
    save()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the config sweep and 16384 inference")
    ap.add_argument("--no-max-autotune", dest="max_autotune", action="store_false")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--cases", default="", help="comma-separated indices into CASES (default: all)")
    ap.add_argument("--no-compile-check", dest="compile_check", action="store_false")
    ap.add_argument("--profile", action="store_true",
                    help="only profile training at T=8192 (eager and ours-cublas) into $OUT/feedforward-profile.txt")
    ap.add_argument("--schemes", action="store_true",
                    help="also time training with each memory scheme (MEMORY_SCHEMES) and --ew-configs")
    ap.add_argument("--ew-configs", default="cublas:m32n128w4,cublas:m32n256w8,cublas:m8n512w4",
                    type=lambda v: [k for k in v.split(",") if k], help="elementwise tiles tried with --schemes")
    ap.add_argument("--no-triton-impl", dest="triton_impl", action="store_false",
                    help="leave out the impl='triton' rows")
    ap.add_argument("--graph-blocks", type=lambda v: [int(b) for b in v.split(",") if b], default=[],
                    help="with --graphs: also time truthfuse under CUDA graphs with these backward row blocks")
    ap.add_argument("--graphs", action="store_true",
                    help="also time torch.compile by truthfuse and Inductor, with mode='reduce-overhead' (CUDA graphs)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop timing new variants after this many seconds")
    ap.add_argument("--activation", default="gelu", choices=tuple(ACT_FNS),
                    help="the block's activation in the timings (the anchors' is gelu)")
    ap.add_argument("--inference-only", action="store_true", help="time the inference rows only")
    args = ap.parse_args()
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    if args.profile:
        profile_training()
        return
    if not args.skip_correctness:
        cases = [CASES[int(i)] for i in args.cases.split(",")] if args.cases else CASES
        ok = correctness(cases, args.compile_check)
        print(f"correctness: {'all passed' if ok else 'FAILURES'} ({time.time() - T0:.0f} s)", flush=True)
    if args.graphs:
        check_graphs()
    bench_epilogue()
    bench(args)
    save()
    print("\nsummary (median ms, peak extra MB; ratios vs eager of the same run)")
    for r in results["bench"]:
        print(f"T={r['T']:5d} d={r['d']:4d} h={r['h']:5d} {r.get('act', 'gelu'):9s} {'train' if r['train'] else 'infer'} {r['mode']:34s} "
              f"{r['ms']:8.3f} {r['peak_mb']:8.1f}  x{r['speedup_vs_eager'] or 0:.3f}  mem x{r['mem_vs_eager'] or 0:.3f}")
    print(f"total {time.time() - T0:.0f} s; {torch.__version__} {triton.__version__} {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
