"""TruthGPT: the seed's small language model, trained under eager, Inductor and truthfuse.

    python examples/truthgpt.py --steps 6 --metric l2 --device cpu
    python examples/truthgpt.py --steps 50 --metric l2 --device cuda --batch 8 --seq 4096 --dtype bf16

On CPU truthfuse's kernels run in Triton's interpreter (the script sets TRITON_INTERPRET=1), which
checks that everything runs but is far slower than eager; speed comparisons need --device cuda.
`torch.cdist` has no half-precision kernel for p=1 (nor for p=2 with at most 25 rows), so in bf16
and fp16 eager and Inductor fail for --metric l1; the table reports the failure and goes on.

The model is written the way a user would write it, with nothing truthfuse-specific in it:
vocabulary 1000, hidden size 256, 2 pre-LayerNorm blocks of 8 heads, fixed sinusoidal positions
(so the parameter count, 2.09M, is the seed's), and a distance attention chosen by --metric:

    dot     softmax(lambda * q @ k^T)
    l2      softmax(-lambda * cdist(q, k) ** 2)
    l1      softmax(-lambda * cdist(q, k, p=1))
    cosine  softmax(lambda * normalize(q) @ normalize(k)^T)

with a learnable lambda per head (a (H, 1, 1) log-parameter, exponentiated so it stays positive),
a causal mask, and a feed-forward Linear -> GELU -> dropout -> Linear.

The corpus is the documentation that ships with Python itself (the docstrings of a fixed list of
standard-library modules, and the Zen of Python), tokenized into the 999 most frequent words plus
an unknown token: nothing is downloaded.

`build(metric, batch, seq, device)` returns `(model, (tokens, targets))` for
`fusion_backend.explain` and `truthfuse explain examples.truthgpt:build`; the model's forward
returns the mean cross-entropy loss when given targets.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import inspect
import math
import os
import re
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 1000
HIDDEN = 256
LAYERS = 2
HEADS = 8
METRICS = ("dot", "l2", "l1", "cosine")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ("eager", "inductor", "truthfuse")


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------

def _initial_lambda(metric: str, head_dim: int) -> float:
    """A starting temperature that gives the first logits a spread across keys of about one. For
    unit-variance q and k, dot products and L1 distances vary across keys by about sqrt(D), squared
    L2 distances by about twice that (they contain -2 q.k), and cosines only by about 1/sqrt(D),
    which needs a large temperature."""
    if metric == "dot":
        return 1.0 / math.sqrt(head_dim)
    if metric == "l2":
        return 0.5 / math.sqrt(head_dim)
    if metric == "l1":
        return 1.0 / math.sqrt(head_dim)
    return 10.0


class DistanceAttention(nn.Module):
    """Causal multi-head attention whose logits come from a distance (or dot product) between
    queries and keys, scaled by a learnable positive lambda per head."""

    def __init__(self, hidden: int, heads: int, metric: str, max_len: int, dropout: float):
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        self.heads, self.metric = heads, metric
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.log_lam = nn.Parameter(torch.full((heads, 1, 1), math.log(_initial_lambda(metric, hidden // heads))))
        self.drop = nn.Dropout(dropout)
        self.register_buffer("future", torch.ones(max_len, max_len, dtype=torch.bool).triu(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        lam = self.log_lam.exp()
        if self.metric == "dot":
            scores = (q @ k.transpose(-2, -1)) * lam
        elif self.metric == "l2":
            scores = -lam * torch.cdist(q, k) ** 2
        elif self.metric == "l1":
            scores = -lam * torch.cdist(q, k, p=1)
        else:
            scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * lam
        scores = scores.masked_fill(self.future[:T, :T], float("-inf"))
        weights = self.drop(scores.softmax(dim=-1))
        y = (weights @ v).transpose(1, 2).reshape(B, T, C)
        return self.out(y)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attention(ln(x)), then x + feed-forward(ln(x))."""

    def __init__(self, hidden: int, heads: int, metric: str, max_len: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = DistanceAttention(hidden, heads, metric, max_len, dropout)
        self.ln2 = nn.LayerNorm(hidden)
        self.ff = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(4 * hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ff(self.ln2(x))


def sinusoidal_positions(length: int, hidden: int) -> torch.Tensor:
    """The fixed (length, hidden) sin/cos table of "Attention is all you need"."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, hidden, 2, dtype=torch.float32) * (-math.log(10000.0) / hidden))
    table = torch.zeros(length, hidden)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


class TruthGPT(nn.Module):
    """Token embedding + fixed positions, `layers` blocks, a final LayerNorm and an untied head."""

    def __init__(self, metric: str = "l2", vocab: int = VOCAB, hidden: int = HIDDEN, layers: int = LAYERS,
                 heads: int = HEADS, max_len: int = 1024, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.register_buffer("positions", sinusoidal_positions(max_len, hidden), persistent=False)
        self.blocks = nn.ModuleList(Block(hidden, heads, metric, max_len, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (B, T, vocab), or the mean cross-entropy (fp32) when `targets` is given."""
        T = tokens.shape[1]
        x = self.embed(tokens) + self.positions[:T].to(self.embed.weight.dtype)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


# ------------------------------------------------------------------------------------------------
# The corpus: Python's own documentation
# ------------------------------------------------------------------------------------------------

_CORPUS_MODULES = ("this", "argparse", "collections", "functools", "itertools", "json", "logging",
                   "pathlib", "re", "string", "textwrap", "typing", "unittest", "dataclasses",
                   "contextlib", "statistics", "heapq", "bisect", "fractions", "decimal")
_WORD = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")


def corpus_text() -> str:
    """Docstrings of a fixed list of standard-library modules and their public members, and the
    Zen of Python: a few hundred kB of English about programming that every Python install has."""
    import codecs
    import contextlib
    import importlib
    import io

    parts: List[str] = []
    for name in _CORPUS_MODULES:
        if name == "this":
            with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
                module = importlib.import_module("this")
            parts.append(codecs.decode(module.s, "rot13"))
            continue
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(getattr(module, "__all__", None) or dir(module)):
            if attr.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(module, attr, None))
            if doc and not doc.startswith(("int(", "str(", "dict(")):
                parts.append(doc)
    return "\n\n".join(p for p in parts if p)


def tokenize(text: str, vocab: int = VOCAB) -> torch.Tensor:
    """Lower-cased words, numbers and punctuation; the `vocab - 1` most frequent become ids 1.., the
    rest the unknown token 0 (ties broken alphabetically, so the ids are reproducible)."""
    words = _WORD.findall(text.lower())
    counts = collections.Counter(words)
    ranked = sorted(counts, key=lambda w: (-counts[w], w))[: vocab - 1]
    ids = {w: i + 1 for i, w in enumerate(ranked)}
    return torch.tensor([ids.get(w, 0) for w in words], dtype=torch.long)


def batches(tokens: torch.Tensor, steps: int, batch: int, seq: int, seed: int = 0) -> List[tuple]:
    """`steps` random (inputs, next-token targets) windows, the same for every variant."""
    if tokens.numel() < seq + 2:
        reps = (seq + 2) // max(tokens.numel(), 1) + 1
        tokens = tokens.repeat(reps)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        start = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=gen)
        window = torch.stack([tokens[s: s + seq + 1] for s in start.tolist()])
        out.append((window[:, :-1], window[:, 1:]))
    return out


# ------------------------------------------------------------------------------------------------
# build(): the factory for explain and the CLI
# ------------------------------------------------------------------------------------------------

def build(metric: str = "l2", batch: int = 4, seq: int = 16, device: str = "cpu", dtype: str = "fp32",
          dropout: float = 0.1, seed: int = 0):
    """(model, (tokens, targets)): a fresh TruthGPT in training mode on `device`, and one batch of
    the corpus, `batch` windows of `seq` tokens. The forward on those inputs returns the loss."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    torch.manual_seed(seed)
    model = TruthGPT(metric=metric, max_len=seq, dropout=dropout).to(device=device, dtype=DTYPES[dtype])
    tokens, targets = batches(tokenize(corpus_text()), 1, batch, seq, seed=seed)[0]
    return model, (tokens.to(device), targets.to(device))


# ------------------------------------------------------------------------------------------------
# Training under eager, Inductor and truthfuse
# ------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _compiled(model: nn.Module, variant: str, strategy: str, inner: str = "inductor", mode: str = "default"):
    """(the callable to train, truthfuse's backend or None); Inductor and truthfuse compile in
    torch.compile's `mode` alike."""
    if variant == "eager":
        return model, None
    if variant == "inductor":
        return torch.compile(model, mode=None if mode == "default" else mode), None
    import fusion_backend

    backend = fusion_backend.backend(strategy=strategy, inner=inner, mode=mode)
    return torch.compile(model, backend=backend), backend


@contextlib.contextmanager
def _quiet_fds():
    """Silence what C++ code prints straight to file descriptors 1 and 2 (the profiler's start and
    stop lines), which Python's sys.stdout redirection cannot catch."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [devnull]:
            os.close(fd)


def _cpu_peak_bytes(fn) -> Optional[int]:
    """The most bytes PyTorch's CPU allocator held at once, beyond what was live before, while
    `fn()` runs: from the profiler's allocation events (CPU has no peak counter like CUDA's).
    None if the profiler recorded none."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_fds(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    if not events:
        return None
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def train(variant: str, model: nn.Module, data: Sequence[tuple], device: torch.device, *, lr: float = 3e-3,
          strategy: str = "aggressive", inner: str = "inductor", warmup: int = 2,
          log_every: int = 0, mode: str = "default") -> Dict[str, object]:
    """Train `model` (modified in place) on `data` under one variant; returns its step times (ms),
    losses, peak memory of training (bytes; the CUDA allocator's peak over the steps after the
    first, whose compilation and tuning are no training step, or the CPU allocator's from the
    profiler over one extra step) and the first step's time, which includes compilation and
    tuning."""
    step_model, backend = _compiled(model, variant, strategy, inner, mode)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def step(x, y):
        torch.compiler.cudagraph_mark_step_begin()  # a new step, for CUDA graphs (reduce-overhead)
        loss = step_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    losses: List[float] = []
    times: List[float] = []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for i, (x, y) in enumerate(data):
        x, y = x.to(device), y.to(device)
        _sync(device)
        start = time.perf_counter()
        loss = step(x, y)
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
        losses.append(loss.detach().item())
        if i == 0 and device.type == "cuda" and len(data) > 1:
            torch.cuda.reset_peak_memory_stats(device)  # the tuner's timings are no training step
        if log_every and (i % log_every == 0 or i == len(data) - 1):
            print(f"  [{variant}] step {i:4d}  loss {losses[-1]:.4f}  {times[-1]:9.1f} ms", flush=True)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        # After training, so that this extra step's numbers do not enter the loss curve compared
        # between variants; it only measures memory.
        x, y = data[-1]
        peak = _cpu_peak_bytes(lambda: step(x, y))
    steady = times[warmup:] if len(times) > warmup else times[-1:]
    fused = None
    if backend is not None:
        fused = sum(1 for r in backend.records for d in r.sites if d.decision == "fused")
    return {"variant": variant, "losses": losses, "step_ms": statistics.median(steady),
            "first_step_ms": times[0], "peak_bytes": peak, "fused_sites": fused}


def _table(results: List[Dict[str, object]], device: torch.device) -> str:
    base = next((r for r in results if r["variant"] == "eager" and "error" not in r), None)
    rows = [("variant", "step ms", "vs eager", "peak MB", "first step s", "final loss", "max |dloss| vs eager",
             "fused sites")]
    failed = []
    for r in results:
        if "error" in r:
            failed.append(f"{r['variant']} failed: {r['error']}")
            rows.append((r["variant"],) + ("-",) * 7)
            continue
        speed = f"{base['step_ms'] / r['step_ms']:.2f}x" if base else "-"
        peak = f"{r['peak_bytes'] / 2**20:.1f}" if r["peak_bytes"] is not None else "-"
        diff = "-"
        if base is not None and r is not base:
            diff = f"{max(abs(a - b) for a, b in zip(r['losses'], base['losses'])):.2e}"
        rows.append((r["variant"], f"{r['step_ms']:.2f}", speed, peak, f"{r['first_step_ms'] / 1e3:.2f}",
                     f"{r['losses'][-1]:.4f}", diff, "-" if r["fused_sites"] is None else str(r["fused_sites"])))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if c else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + failed)


def _loss_table(results: List[Dict[str, object]], rows: int = 12) -> str:
    """The loss at each step (about `rows` of them, evenly spaced, always the last), per variant."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return ""
    steps = len(ok[0]["losses"])
    stride = max(1, -(-steps // rows))
    shown = sorted(set(range(0, steps, stride)) | {steps - 1})
    head = "step  " + "  ".join(f"{r['variant']:>10}" for r in ok)
    lines = [head, "-" * len(head)]
    for i in shown:
        lines.append(f"{i:4d}  " + "  ".join(f"{r['losses'][i]:10.4f}" for r in ok))
    return "\n".join(lines)


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="truthgpt",
        description="Train TruthGPT under eager, Inductor and truthfuse and compare step time, peak "
                    "memory and loss. The step time is the median after --warmup steps (the first "
                    "step compiles and tunes).")
    p.add_argument("--steps", type=int, default=6, help="training steps per variant (default 6)")
    p.add_argument("--metric", choices=METRICS, default="l2", help="attention metric (default l2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq", type=int, default=32, help="tokens per sequence (default 32)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="parameter and activation dtype (default fp32; the loss is computed in fp32)")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout probability (default 0.1)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    p.add_argument("--strategy", choices=("conservative", "moderate", "aggressive"), default="aggressive",
                   help="truthfuse's strategy (default aggressive: fuse every site, so the comparison is "
                        "of the fused kernels; moderate lets the tuner keep a site that measures slower)")
    p.add_argument("--inner", choices=("inductor", "eager", "aot_eager"), default="inductor",
                   help="truthfuse's compiler for the rewritten graph (default inductor)")
    p.add_argument("--mode", choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   default="default", help="torch.compile mode for Inductor and truthfuse alike "
                                           "(reduce-overhead: CUDA graphs; default default)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated subset of eager,inductor,truthfuse (default all three)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the step time (default 2)")
    p.add_argument("--seed", type=int, default=0, help="weights, data and dropout seed (default 0)")
    p.add_argument("--log-every", type=int, default=0, help="print the loss every N steps (0: only the table)")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        p.error(f"--variants: unknown {bad or 'empty list'}; choose from {', '.join(VARIANTS)}")
    for name in ("steps", "batch", "seq"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if not 0 <= args.dropout < 1:
        p.error("--dropout must be in [0, 1)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available (use --device cpu)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    """Run the comparison; returns one result dict per variant (see train())."""
    args = _parse_args(argv)
    if args.device == "cpu":
        # On CPU truthfuse's Triton kernels run only in Triton's interpreter; without it every site
        # is kept. Must be set before fusion_backend (and so triton's jit) is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device(args.device)
    model, _ = build(args.metric, args.batch, args.seq, args.device, args.dtype, args.dropout, args.seed)
    tokens = tokenize(corpus_text())
    data = batches(tokens, args.steps, args.batch, args.seq, seed=args.seed)
    params = sum(p.numel() for p in model.parameters())
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"TruthGPT {args.metric}: {params / 1e6:.2f}M parameters, corpus {tokens.numel()} tokens, "
          f"B={args.batch} T={args.seq} {args.dtype} on {card}, {args.steps} steps, torch {torch.__version__}",
          flush=True)
    results = []
    for variant in args.variants:
        torch._dynamo.reset()
        replica = copy.deepcopy(model)
        torch.manual_seed(args.seed + 1)  # the same dropout stream for every variant
        if device.type == "cuda":
            torch.cuda.manual_seed_all(args.seed + 1)
        try:
            results.append(train(variant, replica, data, device, lr=args.lr, strategy=args.strategy,
                                 inner=args.inner, warmup=args.warmup, log_every=args.log_every, mode=args.mode))
        except Exception as exc:  # noqa: BLE001 -- one variant failing must not hide the others
            # e.g. torch.cdist has no half-precision kernel for p=1 (nor for p=2 on <= 25 rows),
            # so eager and Inductor L1 attention fail in bf16 where truthfuse's kernel runs.
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            print(f"  [{variant}] failed: {type(exc).__name__}: {message}", flush=True)
            results.append({"variant": variant, "error": f"{type(exc).__name__}: {message}"})
        del replica
    print()
    print(_loss_table(results))
    print()
    print(_table(results, device))
    if args.steps <= args.warmup:
        # the table's step time is then the last step's; with one step, that one compiled
        print(f"step ms: --steps {args.steps} leaves no step after --warmup {args.warmup}, so it is the last step's "
              + ("time, which includes compiling and tuning (the first step); run more steps to compare speed"
                 if args.steps == 1 else "time alone"))
    if args.dropout > 0:
        print(f"dropout {args.dropout}: each variant draws its own dropout masks (truthfuse's kernels use their "
              "own random stream), so losses differ by noise; --dropout 0 compares the curves exactly")
    if device.type == "cpu":
        print("peak MB on CPU: the most the CPU allocator held beyond what was already live (model, optimizer "
              "state), over one extra profiled step")
    else:
        print("peak MB: torch.cuda.max_memory_allocated over the training steps after the first, which compiles "
              "and tunes (parameters and optimizer state included)")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
