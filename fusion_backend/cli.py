"""The `truthfuse` command: explain a model, benchmark against eager and Inductor, manage the cache.

    truthfuse explain examples.truthgpt:build --arg metric=cosine
    truthfuse bench --device cuda --json bench.json --plot speedup.png
    truthfuse cache show | clear | export PATH | import PATH

Errors a user can fix (a MODULE:FACTORY that does not import or return (model, inputs), no CUDA
device, a bad option value) print one line naming the problem and exit with status 2; there is no
traceback for them.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import statistics
import sys
import textwrap
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

EXIT_USAGE = 2
METRICS = ("dot", "l2", "l1", "cosine")
STRATEGIES = ("conservative", "moderate", "aggressive")
INNERS = ("inductor", "eager", "aot_eager")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # as in options.py
DTYPES = ("fp32", "bf16", "fp16")
# The built-in attention sizes: (batch, heads, head dim, sequence lengths). The CPU row is small
# because truthfuse's kernels run there only in Triton's interpreter.
SIZES = {
    "cuda": (4, 8, 64, (512, 1024, 2048, 4096)),
    "cpu": (1, 2, 32, (32, 64)),
}
# The TruthGPT training-step benchmark: (batch, sequence length).
MODEL_SIZES = {"cuda": (8, 1024), "cpu": (2, 32)}


class CLIError(Exception):
    """A problem the user can fix; reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and the status is still 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------------------------
# Small parsers
# ------------------------------------------------------------------------------------------------

def _choices_list(text: str, valid: Sequence[str], what: str) -> List[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in valid]
    if bad or not items:
        raise CLIError(f"{what}: {', '.join(bad) if bad else 'empty list'} not valid; choose from {', '.join(valid)}")
    return items


def _int_list(text: str, what: str) -> List[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"{what}: {text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise CLIError(f"{what}: give positive integers, e.g. 128,256,512")
    return values


def _key_values(pairs: Optional[List[str]], what: str) -> Dict[str, Any]:
    """`name=value` pairs; values are Python literals when they parse as one, else strings."""
    out: Dict[str, Any] = {}
    for pair in pairs or []:
        name, sep, raw = pair.partition("=")
        if not sep or not name.strip().isidentifier():
            raise CLIError(f"{what} {pair!r} is not NAME=VALUE")
        try:
            value: Any = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out[name.strip()] = value
    return out


def _check_device(device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CLIError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False); "
                           "use --device cpu")


# ------------------------------------------------------------------------------------------------
# explain
# ------------------------------------------------------------------------------------------------

def load_factory(spec: str) -> Callable[..., Any]:
    """The callable named by MODULE:FACTORY (FACTORY may be dotted), importing MODULE with the
    current directory on sys.path."""
    module_name, sep, attr = spec.partition(":")
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        # a file path fails to import with "No module named 'examples/truthgpt'", which does not
        # say that a dotted module name was wanted
        path = module_name[:-3] if module_name.endswith(".py") else module_name
        folder = ""
        if os.path.isabs(path):
            folder, path = os.path.split(path)
        dotted = path.replace(os.sep, ".").replace("/", ".").strip(".")
        where = folder or f"the folder that holds {dotted.split('.')[0]}"
        raise CLIError(f"MODULE is a module name, not a file path: write {dotted}:{attr or 'FACTORY'} "
                       f"and run from {where}")
    if not sep or not module_name or not attr:
        raise CLIError(f"{spec!r} is not MODULE:FACTORY (for example examples.truthgpt:build)")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = f" ({exc.name} is missing)" if exc.name and exc.name != module_name else ""
        top = module_name.split(".")[0]
        # README's `truthfuse explain examples.truthgpt:build` from another folder: say where from
        where = (f"; MODULE is imported from the current directory ({cwd}) and sys.path: run from the folder "
                 f"that holds {top}" + (" (the repository's root)" if top == "examples" else "")
                 if exc.name == top else "")
        raise CLIError(f"cannot import module {module_name!r}{missing}: {exc}{where}") from None
    except Exception as exc:  # noqa: BLE001 -- the user's module failed while importing
        raise CLIError(f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"{spec} is a {type(obj).__name__}, not a callable factory")
    return obj


def call_factory(spec: str, factory: Callable[..., Any], kwargs: Dict[str, Any]) -> Tuple[Any, tuple, dict]:
    """(model, args, kwargs) from a factory that returns (model, example_inputs); the inputs may be
    a tuple/list of positional arguments, a dict of keyword arguments, or a single tensor."""
    import torch

    try:
        result = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 -- report the user's error in one line
        raise CLIError(f"{spec}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) raised "
                       f"{type(exc).__name__}: {exc}") from None
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise CLIError(f"{spec} must return (model, example_inputs); it returned {type(result).__name__}"
                       + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""))
    model, inputs = result
    if not callable(model):
        raise CLIError(f"{spec} returned a {type(model).__name__} as the model; expected an nn.Module or callable")
    if isinstance(inputs, torch.Tensor):
        return model, (inputs,), {}
    if isinstance(inputs, dict):
        return model, (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return model, tuple(inputs), {}
    raise CLIError(f"{spec} returned example_inputs of type {type(inputs).__name__}; expected a tuple of "
                   "arguments, a dict of keyword arguments or a tensor")


def cmd_explain(args: argparse.Namespace) -> int:
    from . import explain
    from .options import OptionError

    factory = load_factory(args.target)
    model, pos, kw = call_factory(args.target, factory, _key_values(args.arg, "--arg"))
    options = {"strategy": args.strategy, "inner": args.inner, "cache": not args.no_cache}
    try:
        report = explain(model, *pos, options=options, **kw)
    except OptionError as exc:
        raise CLIError(str(exc)) from None
    print(report)
    return 0


# ------------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------------

def _attention_fn(metric: str):
    """Attention as a user writes it for each metric, with a per-head temperature and a causal
    mask: the form the benchmark compiles three ways."""
    import torch
    import torch.nn.functional as F

    def attention(q, k, v, lam, future):
        if metric == "dot":
            scores = (q @ k.transpose(-2, -1)) * lam
        elif metric == "l2":
            scores = -lam * torch.cdist(q, k) ** 2
        elif metric == "l1":
            scores = -lam * torch.cdist(q, k, p=1)
        else:
            scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * lam
        scores = scores.masked_fill(future, float("-inf"))
        return scores.softmax(dim=-1) @ v

    attention.__name__ = f"{metric}_attention"
    return attention


def _timer(device: str, reps: int) -> Callable[[Callable[[], Any]], float]:
    """Median milliseconds of fn(): triton.testing.do_bench on CUDA, wall clock on CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def wall(fn):
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return wall


def _fused_count(backend) -> int:
    return sum(1 for r in backend.records for s in r.sites if s.decision == "fused")


def _bench_case(make_fn, inputs: tuple, device: str, strategy: str, inner: str, timer,
                backward: bool, mode: str = "default", params: Sequence[Any] = ()) -> Dict[str, Any]:
    """Time eager, Inductor and truthfuse (both compiled in `mode`) on one function and one set of
    inputs; on CUDA also the memory each allocates beyond what was live before one call
    (`<variant>_peak_mb`). params: the weights behind the function, whose gradients a step fills."""
    import torch

    import fusion_backend

    row: Dict[str, Any] = {}
    backend = fusion_backend.backend(strategy=strategy, inner=inner, mode=mode)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad] + list(params)
    variants = {"eager": make_fn(), "inductor": torch.compile(make_fn(), mode=None if mode == "default" else mode),
                "truthfuse": torch.compile(make_fn(), backend=backend)}
    for name, fn in variants.items():
        if backward:
            def run(fn=fn):
                # Each step as a training loop runs it: gradients from None, which CUDA graphs
                # (reduce-overhead) need, since a replay reuses the last step's gradient memory.
                for t in leaves:
                    t.grad = None
                torch.compiler.cudagraph_mark_step_begin()
                out = fn(*inputs)
                out.float().sum().backward()
        else:
            def run(fn=fn):
                torch.compiler.cudagraph_mark_step_begin()
                with torch.no_grad():
                    return fn(*inputs)
        try:
            run()  # compile (and tune) outside the timing
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                run()
                torch.cuda.synchronize()
                row[f"{name}_peak_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
            row[f"{name}_ms"] = timer(run)
        except Exception as exc:  # noqa: BLE001 -- one variant failing must not hide the others
            # torch.cdist has no bf16 kernel for p=1 on CUDA (none at all on CPU): eager and
            # Inductor fail on the L1 rows at bench's default dtype on CUDA, where truthfuse runs,
            # and the whole command ended in that traceback. The row says which failed and why.
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            row[f"{name}_error"] = f"{type(exc).__name__}: {message}"
            row[f"{name}_ms"] = None
            if device == "cuda":
                row[f"{name}_peak_mb"] = None
    row["fused_sites"] = _fused_count(backend)
    for other in ("eager", "inductor"):
        ok = row[f"{other}_ms"] is not None and row["truthfuse_ms"] is not None
        row[f"speedup_vs_{other}"] = row[f"{other}_ms"] / row["truthfuse_ms"] if ok else None
    return row


def _check_plot_support(path: Optional[str]) -> None:
    if not path:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CLIError("--plot needs matplotlib, which is not installed (it is optional): "
                       "pip install matplotlib") from None


def _plot(results: List[Dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, key, label in ((axes[0], "speedup_vs_inductor", "truthfuse speedup over Inductor"),
                           (axes[1], "speedup_vs_eager", "truthfuse speedup over eager")):
        for name in dict.fromkeys(r["name"] for r in results):
            # a row where a variant failed has no speedup to draw
            rows = sorted((r for r in results if r["name"] == name and r[key] is not None), key=lambda r: r["seq"])
            ax.plot([r["seq"] for r in rows], [r[key] for r in rows], marker="o", label=name)
        ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("speedup (x)")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def run_bench(device: str, metrics: Sequence[str], seqs: Sequence[int], *, batch: int, heads: int, head_dim: int,
              dtype: str, strategy: str, backward: bool, model: bool, reps: int, inner: str = "inductor",
              mode: str = "default", progress: Callable[[str], None] = lambda line: None) -> Dict[str, Any]:
    """Every (metric, seq) attention case, then the TruthGPT training step per metric; returns
    {"env": ..., "config": ..., "results": [row, ...]}."""
    import torch

    import fusion_backend

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    timer = _timer(device, reps)
    results: List[Dict[str, Any]] = []
    for metric in metrics:
        for seq in seqs:
            torch._dynamo.reset()
            gen = torch.Generator(device="cpu").manual_seed(0)
            shape = (batch, heads, seq, head_dim)
            q, k, v = (torch.randn(shape, generator=gen).to(device=device, dtype=torch_dtype).requires_grad_(backward)
                       for _ in range(3))
            lam = torch.full((heads, 1, 1), 0.1, device=device, dtype=torch_dtype, requires_grad=backward)
            future = torch.ones(seq, seq, dtype=torch.bool, device=device).triu(1)
            row = {"name": f"attention-{metric}", "metric": metric, "seq": seq, "batch": batch, "heads": heads,
                   "head_dim": head_dim, "dtype": dtype, "backward": backward}
            row.update(_bench_case(lambda m=metric: _attention_fn(m), (q, k, v, lam, future), device, strategy,
                                   inner, timer, backward, mode))
            results.append(row)
            progress(_format_row(row))
    truthgpt = _import_example() if model else None
    if truthgpt is not None:
        mbatch, mseq = MODEL_SIZES[device]
        for metric in metrics:
            torch._dynamo.reset()
            net, (tokens, targets) = truthgpt.build(metric, batch=mbatch, seq=mseq, device=device, dtype=dtype,
                                                    dropout=0.0)
            row = {"name": f"truthgpt-{metric}", "metric": metric, "seq": mseq, "batch": mbatch,
                   "heads": truthgpt.HEADS, "head_dim": truthgpt.HIDDEN // truthgpt.HEADS, "dtype": dtype, "backward": True}
            row.update(_bench_case(lambda n=net: _LossStep(n), (tokens, targets), device, strategy, inner,
                                   timer, True, mode, params=list(net.parameters())))
            results.append(row)
            progress(_format_row(row))
    env = {"torch": torch.__version__, "device": device,
           "card": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
           "truthfuse": fusion_backend.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    config = {"metrics": list(metrics), "seqs": list(seqs), "batch": batch, "heads": heads, "head_dim": head_dim,
              "dtype": dtype, "strategy": strategy, "inner": inner, "mode": mode, "backward": backward,
              "model": model,
              "timer": "triton.testing.do_bench median" if device == "cuda" else f"wall clock median of {reps}"}
    return {"env": env, "config": config, "results": results}


def _import_example():
    """examples/truthgpt.py, importable when truthfuse runs from the repository root."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        from examples import truthgpt
    except ImportError:
        print("note: examples.truthgpt is not importable from here (run from the repository root); "
              "skipping the TruthGPT rows", file=sys.stderr)
        return None
    return truthgpt


class _LossStep:
    """The model's loss as a plain callable, so each variant compiles its own wrapper around the
    same module (and the same weights)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, tokens, targets):
        return self.model(tokens, targets)


_VARIANTS = ("eager", "inductor", "truthfuse")


def _format_row(r: Dict[str, Any]) -> str:
    def number(value, spec, missing):  # a variant that failed has None (see `_bench_case`)
        return missing if value is None else format(value, spec)

    times = "  ".join(f"{name} {number(r[f'{name}_ms'], '9.3f', '   failed')}{'' if r[f'{name}_ms'] is None else ' ms'}"
                      for name in _VARIANTS)
    peaks = "/".join(number(r[f"{name}_peak_mb"], ".0f", "-") for name in _VARIANTS) if "eager_peak_mb" in r else ""
    failures = [f"{name} failed: {r[f'{name}_error']}" for name in _VARIANTS if r.get(f"{name}_error")]
    return (f"{r['name']:<18} T={r['seq']:<6} {times}  "
            f"x{number(r['speedup_vs_inductor'], '.2f', '-')} vs inductor  "
            f"x{number(r['speedup_vs_eager'], '.2f', '-')} vs eager  fused {r['fused_sites']}"
            + (f"  peak MB {peaks}" if peaks else "")
            + "".join(f"\n    {line}" for line in failures))


# What printing and plotting an earlier run read from its --json file.
_BENCH_FIELDS = {"env": ("card", "torch"), "config": ("dtype", "backward", "timer", "batch", "heads", "head_dim")}
_ROW_NUMBERS = ("seq", "eager_ms", "inductor_ms", "truthfuse_ms", "speedup_vs_inductor", "speedup_vs_eager",
                "fused_sites")
_ROW_PEAKS = ("eager_peak_mb", "inductor_peak_mb", "truthfuse_peak_mb")


def _load_bench_json(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise CLIError(f"--from-json {path}: not a file written by `truthfuse bench --json` ({exc})") from None
    problems = _bench_json_problems(data)
    if problems:
        shown = ", ".join(problems[:6]) + (f" and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise CLIError(f"--from-json {path}: not a file written by `truthfuse bench --json`: {shown}")
    return data


def _bench_json_problems(data: Any) -> List[str]:
    """What is missing or mistyped in a --from-json file, as "missing env.card" and the like."""
    if not isinstance(data, dict):
        return [f"the top level is a {type(data).__name__}, not an object"]
    problems = []
    for section, fields in _BENCH_FIELDS.items():
        value = data.get(section)
        if not isinstance(value, dict):
            problems.append(f"missing {section}" if value is None else f"{section} is not an object")
            continue
        problems += [f"missing {section}.{name}" for name in fields if name not in value]
    rows = data.get("results")
    if not isinstance(rows, list):
        return problems + ["missing results" if rows is None else "results is not a list"]

    def is_number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            problems.append(f"results[{i}] is not an object")
            continue
        if not isinstance(row.get("name"), str):
            problems.append(f"{'missing' if 'name' not in row else 'non-text'} results[{i}].name")
        numbers = _ROW_NUMBERS + (_ROW_PEAKS if any(k in row for k in _ROW_PEAKS) else ())
        failed = [v for v in _VARIANTS if isinstance(row.get(f"{v}_error"), str)]
        for name in numbers:
            # a variant that failed has no time or peak, and its speedups none
            may_be_none = any(name.startswith(f"{v}_") for v in failed) or (failed and name.startswith("speedup_"))
            if not is_number(row.get(name)) and not (may_be_none and name in row and row[name] is None):
                problems.append(f"{'missing' if name not in row else 'non-numeric'} results[{i}].{name}")
    return problems


def cmd_bench(args: argparse.Namespace) -> int:
    _check_plot_support(args.plot)
    if args.from_json:  # results measured elsewhere (a GPU machine), printed and plotted here
        data = _load_bench_json(args.from_json)
        args.dtype, args.backward = data["config"]["dtype"], data["config"]["backward"]
        for row in data["results"]:
            print(_format_row(row))
    else:
        _check_device(args.device)
        args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
        metrics = _choices_list(args.metrics, METRICS, "--metrics")
        batch, heads, head_dim, default_seqs = SIZES[args.device]
        seqs = _int_list(args.seqs, "--seqs") if args.seqs else list(default_seqs)
        if args.device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            print("note: on CPU truthfuse's Triton kernels run only in Triton's interpreter; without "
                  "TRITON_INTERPRET=1 every site is kept and 'truthfuse' times Inductor's code", file=sys.stderr)
        data = run_bench(args.device, metrics, seqs, batch=args.batch or batch, heads=args.heads or heads,
                         head_dim=args.head_dim or head_dim, dtype=args.dtype, strategy=args.strategy,
                         backward=args.backward, model=not args.no_model, reps=args.reps, inner=args.inner,
                         mode=args.mode, progress=lambda line: print(line, flush=True))
    env = data["env"]
    print(f"\n{env['card']}, torch {env['torch']}, triton {env.get('triton', '-')}, {args.dtype}, "
          f"{'forward+backward' if args.backward else 'forward'} (model rows: training step); "
          f"{data['config']['timer']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        attention_rows = [r for r in data["results"] if r["name"].startswith("attention-")]
        _plot(attention_rows, args.plot,
              f"{env['card']}: B={data['config']['batch']} H={data['config']['heads']} "
              f"D={data['config']['head_dim']} {args.dtype}, causal, "
              f"{'fwd+bwd' if args.backward else 'fwd'}")
        print(f"wrote {args.plot}")
    return 0


# ------------------------------------------------------------------------------------------------
# cache
# ------------------------------------------------------------------------------------------------

def _cache(args: argparse.Namespace):
    from .tune.cache import TuningCache

    return TuningCache(args.dir) if args.dir else TuningCache()


def cmd_cache(args: argparse.Namespace) -> int:
    import warnings

    from .tune.cache import TuningStateError, load_state, save_state
    from .tune.mcts import TuningDecision

    cache = _cache(args)
    if args.action != "import" and cache.directory.exists() and not cache.directory.is_dir():
        # a file (an exported state, say) read as an empty cache: "0 entries", "removed 0 entries"
        # and an export of nothing, each with status 0
        raise CLIError(f"the cache directory {cache.directory} is a file, not a directory"
                       + (" (a state written by export is read with `truthfuse cache import`)"
                          if cache.directory.suffix == ".json" else ""))
    if args.action == "show":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            entries = cache.entries()
        print(f"tuning cache: {cache.directory} ({len(entries)} entr{'y' if len(entries) == 1 else 'ies'})")
        for key, record in sorted(entries.items()):
            try:
                # the backend reads records through from_record, so a record it rejects is unusable here too
                decision = TuningDecision.from_record(record)
            except ValueError as exc:
                print(f"  {key[:16]}  unusable (a compile retunes and overwrites it): {exc}")
                continue
            plan = decision.plan
            fused = sum(1 for v in plan.values() if v != "keep")
            cost, base = decision.cost_ms, decision.baseline_ms
            timing = f" {cost:.3f} ms vs keep-all {base:.3f} ms" if cost is not None and base is not None else ""
            print(f"  {key[:16]}  {decision.strategy:<12} {fused}/{len(plan)} fused{timing}  {decision.reason}")
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        return 0
    if args.action == "clear":
        removed = cache.clear()
        print(f"removed {removed} entr{'y' if removed == 1 else 'ies'} from {cache.directory}")
        return 0
    if args.action == "export":
        with warnings.catch_warnings(record=True) as caught:  # unusable files: one line, as show says it
            warnings.simplefilter("always")
            try:
                count = save_state(args.path, cache)
            except OSError as exc:  # a directory, a read-only place: the user's to fix, in one line
                raise CLIError(f"cannot write {args.path}: {exc}") from None
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        print(f"exported {count} entr{'y' if count == 1 else 'ies'} from {cache.directory} to {args.path}")
        return 0
    from .tune.cache import TuningCacheWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            count = load_state(args.path, cache)
        except TuningStateError as exc:
            raise CLIError(str(exc)) from None
    # A cache directory that cannot be written (a file, a read-only place) warned from deep in the
    # cache and then reported "imported 0 entries" with status 0: the user's to fix, in one line.
    unwritable = [w for w in caught if issubclass(w.category, TuningCacheWarning) and "cannot write" in str(w.message)]
    if unwritable:
        raise CLIError(f"imported {count} of the file's decisions into {cache.directory}: {unwritable[0].message}")
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"imported {count} entr{'y' if count == 1 else 'ies'} from {args.path} into {cache.directory}")
    return 0


# ------------------------------------------------------------------------------------------------
# The parser
# ------------------------------------------------------------------------------------------------

def _para(text: str) -> str:
    """A description paragraph wrapped for the terminal (the raw formatter keeps epilogs' lines
    as written, and would not wrap descriptions either)."""
    return textwrap.fill(text, 88)


def build_parser() -> argparse.ArgumentParser:
    """The `truthfuse` argument parser (exposed for tests and docs)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="truthfuse", formatter_class=fmt,
                     description=_para("truthfuse: a torch.compile backend that fuses attention and feed-forward "
                                       "blocks into Triton kernels."),
                     epilog="examples:\n"
                            "  truthfuse explain examples.truthgpt:build --arg metric=cosine\n"
                            "  truthfuse bench --device cuda --json bench.json --plot speedup.png\n"
                            "  truthfuse cache show\n\n"
                            "TRUTHFUSE_LOG=info|debug logs the backend's decisions to stderr.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("explain", formatter_class=fmt, help="what truthfuse fuses in a model, and why not",
                       description=_para("Compile the model a factory returns with truthfuse, run it once on the "
                                         "example inputs, and print which attention/feed-forward sites were "
                                         "fused or kept, with reasons and source locations."),
                       epilog="MODULE:FACTORY names a callable returning (model, example_inputs), where the\n"
                              "inputs are a tuple of arguments (or a dict of keyword arguments). MODULE is\n"
                              "imported with the current directory on sys.path, e.g.\n"
                              "  truthfuse explain examples.truthgpt:build --arg metric=l1 --arg seq=64")
    p.add_argument("target", metavar="MODULE:FACTORY", help="e.g. examples.truthgpt:build")
    p.add_argument("--arg", action="append", metavar="NAME=VALUE",
                   help="keyword argument for the factory (repeatable; values are Python literals or strings)")
    p.add_argument("--strategy", choices=STRATEGIES, default="moderate", help="tuning strategy (default moderate)")
    p.add_argument("--inner", choices=INNERS, default="inductor",
                   help="compiler for the rewritten graph (default inductor)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the tuning cache")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("bench", formatter_class=fmt, help="eager vs Inductor vs truthfuse timings",
                       description=_para("Time attention written by hand for each metric (per-head temperature, "
                                         "causal mask) and the TruthGPT training step, under eager, Inductor "
                                         "and truthfuse. CUDA: triton.testing.do_bench median; CPU: "
                                         "wall-clock median."),
                       epilog="built-in sizes: cuda B=4 H=8 D=64, T in 512,1024,2048,4096 (TruthGPT B=8 T=1024);\n"
                              "cpu B=1 H=2 D=32, T in 32,64 (TruthGPT B=2 T=32). On CPU the kernels run only\n"
                              "under TRITON_INTERPRET=1. --plot needs matplotlib (pip install matplotlib).")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    p.add_argument("--metrics", default=",".join(METRICS), help="comma-separated subset of dot,l2,l1,cosine")
    p.add_argument("--seqs", default=None, help="comma-separated sequence lengths (default: the built-in sizes)")
    p.add_argument("--batch", type=int, default=None, help="attention batch size (default: built-in)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: built-in)")
    p.add_argument("--head-dim", type=int, default=None, help="attention head dim (default: built-in)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="default bf16 on cuda (what models train in; torch.cdist, the l1 rows' eager form, has no "
                        "bf16 kernel there, so their eager and Inductor columns fail), fp32 on cpu (where "
                        "cdist has no bf16 kernel at all)")
    p.add_argument("--strategy", choices=STRATEGIES, default="aggressive",
                   help="truthfuse's strategy (default aggressive: time the fused kernels)")
    p.add_argument("--inner", choices=INNERS, default="inductor",
                   help="truthfuse's compiler for the rewritten graph (default inductor)")
    p.add_argument("--mode", choices=MODES, default="default",
                   help="torch.compile mode for Inductor and truthfuse alike (reduce-overhead: CUDA graphs, "
                        "for steps the host paces)")
    p.add_argument("--backward", action="store_true", help="time forward+backward of the attention cases")
    p.add_argument("--no-model", action="store_true", help="skip the TruthGPT training-step rows")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions on CPU (default 5)")
    p.add_argument("--json", metavar="OUT.json", help="write every number and the environment as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="draw truthfuse's speedup against sequence length per metric")
    p.add_argument("--from-json", metavar="IN.json",
                   help="measure nothing: print and plot the results of an earlier --json (from a GPU machine, say)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("cache", formatter_class=fmt, help="show, clear, export or import tuning decisions",
                       description=_para("The persistent tuning cache ($TRUTHFUSE_CACHE_DIR, else "
                                         "$XDG_CACHE_HOME/truthfuse, else ~/.cache/truthfuse)."),
                       epilog="export writes one JSON file of every decision; import merges such a file into\n"
                              "the cache (fusion_backend.save_state / load_state).")
    p.add_argument("--dir", default=None, help="cache directory (default: as above)")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    actions.required = True
    action_parsers = [actions.add_parser("show", help="list the cached decisions"),
                      actions.add_parser("clear", help="delete every cached decision")]
    a = actions.add_parser("export", help="write every decision to one JSON file")
    a.add_argument("path", metavar="PATH")
    action_parsers.append(a)
    a = actions.add_parser("import", help="merge decisions from a file written by export")
    a.add_argument("path", metavar="PATH")
    action_parsers.append(a)
    for a in action_parsers:  # `cache show --dir D` as well as `cache --dir D show`
        a.add_argument("--dir", default=argparse.SUPPRESS, help="cache directory (default: as above)")
    p.set_defaults(func=cmd_cache)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `truthfuse` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("batch", "heads", "head_dim", "reps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.exit(EXIT_USAGE, f"truthfuse {args.command}: error: --{name.replace('_', '-')} must be at least 1\n")
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"truthfuse {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
