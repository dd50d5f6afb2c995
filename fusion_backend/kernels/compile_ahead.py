"""Compiling the Triton kernels of a coming call on worker processes, ahead of the call.

Triton compiles a kernel at its first launch with a new specialization, in the calling process and
holding the GIL: 1-2 s per attention kernel for sm_90, and a fused attention call launches three
to eight kernels (forward, dK/dV, dQ, the mask's range pass, twice where a bool mask is shared).
The tuner's first measurement of each fused site paid those compiles one after another. Here:

1. `recording()`: inside it, a `KernelLauncher` launches nothing, and each kernel that Triton would
   compile is recorded instead (its specialization, as Triton's `jit_cache_hook` gives it), so one
   run of an op inside it lists every kernel that the op's real call will need.
2. `start_compiles(recorded)`: a pool of `python -m fusion_backend.kernels.compile_ahead` processes
   (`start_pool`; the backend starts it when it first compiles a graph on a GPU, so that their
   imports are done when the kernels come) compiles them in parallel into Triton's on-disk cache,
   where the real launch then finds them.

No result depends on this. Triton keys its cache by everything a compile depends on (source,
specialization, options, target, compiler versions); a kernel that was not compiled ahead, or whose
compile failed in a worker, compiles at its launch as before.
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import importlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import triton
import triton.language as tl

log = logging.getLogger("truthfuse")

# Triton versions whose jit_cache_hook and specialization JSON this module reads: 3.6 run on the GPU,
# 3.7.1, 3.8.0 and 3.9.0 by tests/kernels/test_compile_ahead.py (compiled for sm_90 on a CPU machine).
_VERSIONS = ("3.6.", "3.7.", "3.8.", "3.9.")
MAX_WORKERS = 8
WORKER_TIMEOUT_S = 120.0  # per batch of kernels; past it the rest compile at their launch


@dataclass
class Recorded:
    """The kernels one or more runs inside `recording()` would have compiled."""
    target: Optional[tuple] = None   # (backend, arch, warp size) of the device they were for
    kernels: List[dict] = field(default_factory=list)   # {"module", "name", "spec"}
    _seen: set = field(default_factory=set)

    def add(self, module: str, name: str, spec: str) -> None:
        if spec not in self._seen:
            self._seen.add(spec)
            self.kernels.append({"module": module, "name": name, "spec": spec})


_active: Optional[Recorded] = None


def available() -> bool:
    """Whether this Triton build can record and compile ahead (and the user has not turned it
    off with TRUTHFUSE_COMPILE_WORKERS=0)."""
    if workers_wanted() == 0:
        return False
    knobs = getattr(triton, "knobs", None)
    return (triton.__version__.startswith(_VERSIONS) and knobs is not None
            and hasattr(knobs.runtime, "jit_cache_hook"))


def active() -> Optional[Recorded]:
    """The record being filled, while inside `recording()`; None otherwise."""
    return _active


@contextlib.contextmanager
def recording() -> Iterator[Recorded]:
    """Within: launchers launch nothing, and Triton records what it would compile instead of
    compiling it. The ops still run (their PyTorch parts on real memory), so their outputs are
    meaningless: run them only to find out which kernels they launch. A kernel launched other than
    through a `KernelLauncher` (the feed-forward op's Triton GEMM) is recorded too where it is not
    compiled yet, but launches where it is, on whatever its inputs hold: a GEMM reads and writes
    only within its operands, whatever their values."""
    global _active
    from triton import knobs

    if _active is not None:
        raise RuntimeError("compile_ahead.recording() does not nest")
    record = Recorded()

    def skip_and_record(*, key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002
        record.add(fn.module, fn.name, compile["specialization_data"])
        if record.target is None:
            target = triton.runtime.driver.active.get_current_target()
            record.target = (target.backend, target.arch, target.warp_size)
        return True  # True: Triton neither compiles nor launches this kernel

    previous = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = skip_and_record
    _active = record
    try:
        yield record
    finally:
        _active = None
        knobs.runtime.jit_cache_hook = previous


def workers_wanted() -> Optional[int]:
    """TRUTHFUSE_COMPILE_WORKERS as a number (0: none), or None when it is unset or empty. Anything
    but a whole number raises an error naming the variable: "off", "false" or "-1" had left the
    default pool of workers on without a word."""
    value = os.environ.get("TRUTHFUSE_COMPILE_WORKERS", "").strip()
    if not value:
        return None
    if not (value.isascii() and value.isdigit()):
        raise ValueError(f"TRUTHFUSE_COMPILE_WORKERS must be a whole number of worker processes (0: none, "
                         f"unset: one per core but one, at most {MAX_WORKERS}), got {value!r}")
    return int(value)


def worker_count() -> int:
    """How many worker processes compile: TRUTHFUSE_COMPILE_WORKERS if set, else one per core
    but one (this process keeps working), at most MAX_WORKERS."""
    wanted = workers_wanted()
    if wanted:
        return wanted
    return min(MAX_WORKERS, max(1, (os.cpu_count() or 2) - 1))


class _Worker:
    """One `python -m fusion_backend.kernels.compile_ahead` process: a kernel as a JSON line in,
    a JSON line out when it is compiled. It imports torch, Triton and the kernel modules and sets
    up the compiler when it starts, then says so in a first line ("ready"); a pool started early
    (`start_pool`) has usually done that by the time kernels come."""

    def __init__(self, env: dict, target: tuple):
        self.lock = threading.Lock()  # one reader and writer at a time on its pipes
        self.ready = False
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, json.dumps(list(target))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env, text=True)

    def await_ready(self) -> bool:
        """Block until the worker has started up; False if it exited instead."""
        with self.lock:
            if not self.ready:
                line = self.proc.stdout.readline()
                with contextlib.suppress(ValueError):
                    self.ready = bool(line) and json.loads(line).get("ready") is True
            return self.ready

    def compile(self, target: tuple, kernel: dict) -> dict:
        """{"failed": None or a message, "seconds": compile time}; raises OSError if the worker is gone."""
        with self.lock:
            self.proc.stdin.write(json.dumps({"target": list(target), "kernel": kernel}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise OSError("the worker exited")
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # the worker exits at the end of its input


_pool: List[_Worker] = []
_pool_lock = threading.Lock()


def start_pool() -> int:
    """Start the worker processes if they are not running (and `available()`); returns how many
    run. They live as long as this process."""
    with _pool_lock:
        _pool[:] = [w for w in _pool if w.proc.poll() is None]
        if _pool or not available():
            return len(_pool)
        env = dict(os.environ, TRITON_INTERPRET="0")
        # the workers import this package from where this process did, installed or not
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        gpu = triton.runtime.driver.active.get_current_target()
        for _ in range(worker_count()):
            try:
                _pool.append(_Worker(env, (gpu.backend, gpu.arch, gpu.warp_size)))
            except OSError as exc:
                log.info("compile ahead: could not start a worker process: %s", exc)
                break
        if len(_pool) and not getattr(start_pool, "_atexit", False):
            atexit.register(_close_pool)
            start_pool._atexit = True
        return len(_pool)


def _close_pool() -> None:
    with _pool_lock:
        for worker in _pool:
            worker.close()
        _pool.clear()


def _size_rank(kernel: dict) -> int:
    """Backward kernels are the largest (most code, most registers) and take longest to compile,
    then forwards; the workers take the largest first and this process the smallest."""
    name = kernel["name"]
    return 2 if "bwd" in name else 1 if "fwd" in name else 0


class Compiling:
    """Kernels being compiled on the worker pool (`start_compiles`); `wait()` for them, which
    also compiles in this process whatever no worker has taken yet."""

    def __init__(self, recorded: Recorded, timeout_s: float):
        self.kernels = [k for k in recorded.kernels if k["module"] != "__main__"]  # workers cannot import it
        self._target = recorded.target
        self._jobs = collections.deque(sorted(self.kernels, key=_size_rank, reverse=True))
        self._jobs_lock = threading.Lock()
        self._results: List[dict] = []
        self._finished = threading.Condition()  # notified with each result
        self._started = self._last_done = time.perf_counter()
        self._deadline = time.monotonic() + timeout_s
        self._timeout_s = timeout_s
        self._summary: Optional[dict] = None
        workers = list(_pool)[:len(self.kernels)] if self._target is not None else []
        self.workers = len(workers)
        self._threads = [threading.Thread(target=self._feed, args=(w,), daemon=True) for w in workers]
        for thread in self._threads:
            thread.start()

    def _take(self, largest: bool) -> Optional[dict]:
        with self._jobs_lock:
            if not self._jobs:
                return None
            return self._jobs.popleft() if largest else self._jobs.pop()

    def _add(self, result: dict) -> None:
        with self._finished:
            self._results.append(result)
            self._last_done = time.perf_counter()
            self._finished.notify_all()

    def _feed(self, worker: _Worker) -> None:
        # A worker still starting up takes nothing: meanwhile this process compiles (`wait`).
        if not worker.await_ready():
            return
        while (kernel := self._take(largest=True)) is not None:
            try:
                result = worker.compile(self._target, kernel)
            except (OSError, ValueError) as exc:
                result = {"failed": f"{kernel['name']}: worker lost ({exc})", "seconds": 0.0}
            self._add(result)

    def wait(self) -> dict:
        """Compile here what no worker has taken yet (smallest first), then wait for the kernels
        the workers took, at most until the timeout given at the start (the rest then compile at
        their launch). Returns {"kernels", "workers", "here": how many this process compiled,
        "failed": [messages], "seconds", "compile_seconds": summed over all}; failures are logged,
        never raised."""
        if self._summary is not None:
            return self._summary
        here = 0
        while self._target is not None and time.monotonic() < self._deadline:
            kernel = self._take(largest=False)
            if kernel is None:
                break
            started = time.perf_counter()
            try:
                compile_one(kernel, self._target)
                failed = None
            except Exception as exc:  # noqa: BLE001 -- reported; the kernel compiles at its launch
                failed = f"{kernel['name']}: {type(exc).__name__}: {str(exc)[:200]}"
            self._add({"failed": failed, "seconds": time.perf_counter() - started})
            here += 1
        # Only kernels a worker took are left; a worker still starting up took none.
        with self._finished:
            self._finished.wait_for(lambda: len(self._results) >= len(self.kernels),
                                    max(0.0, self._deadline - time.monotonic()))
            results = list(self._results)
        failed = [r["failed"] for r in results if r.get("failed")]
        if len(results) < len(self.kernels):
            failed.append(f"{len(self.kernels) - len(results)} kernel(s) not done within {self._timeout_s:.0f} s")
        self._summary = {"kernels": len(self.kernels), "workers": self.workers, "here": here, "failed": failed,
                         "seconds": self._last_done - self._started,  # until the last one was done
                         "compile_seconds": sum(r.get("seconds", 0.0) for r in results)}
        if failed:
            log.info("compile ahead: %d problem(s); those kernels compile at launch: %s", len(failed),
                     "; ".join(failed)[:300])
        return self._summary


def start_compiles(recorded: Recorded, timeout_s: float = WORKER_TIMEOUT_S) -> Compiling:
    """Start compiling the recorded kernels into Triton's on-disk cache on the worker pool
    (started here if it is not running); returns at once."""
    start_pool()
    return Compiling(recorded, timeout_s)


def compile_in_workers(recorded: Recorded, timeout_s: float = WORKER_TIMEOUT_S) -> dict:
    """`start_compiles` and wait for them."""
    return start_compiles(recorded, timeout_s).wait()


# ----------------------------------------------------------------------------------------------
# The worker
# ----------------------------------------------------------------------------------------------


def _decoded_constant(value):
    """A constexpr value as Triton's specialization JSON wrote it: dtypes as their names,
    tl.constexpr objects as {"constexpr": value}, plain values as themselves."""
    import triton.language as tl

    if isinstance(value, dict) and set(value) == {"constexpr"}:
        return tl.constexpr(value["constexpr"])
    if isinstance(value, str) and tl.dtype.is_dtype(value):
        return tl.dtype(value)
    return value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def compile_one(kernel: dict, target: tuple) -> None:
    """Compile one recorded kernel for `target` into Triton's cache (the worker's job; also
    callable in-process)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    fn = importlib.import_module(kernel["module"])
    for part in kernel["name"].split("."):
        fn = getattr(fn, part)
    data = json.loads(kernel["spec"])
    signature = {name: _tuples(kind) for name, kind in data["signature"].items()}
    constexprs = {tuple(k): _decoded_constant(v) for k, v in zip(data["constant_keys"], data["constant_vals"])}
    attrs = {tuple(k): v for k, v in zip(data["attrs_keys"], data["attrs_vals"])}
    gpu = GPUTarget(*target)
    options = make_backend(gpu).parse_options({k: _tuples(v) for k, v in data["options"].items()})
    triton.compile(ASTSource(fn, signature, constexprs, attrs), target=gpu, options=options.__dict__)


@triton.jit
def _warm_up_kernel(X):
    tl.store(X, 1.0)


def _worker_main(target: tuple) -> None:
    # Answers go to the real stdout only; anything else printed while compiling goes to stderr.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for module in ("attention", "attention_l1", "feedforward"):  # the imports, before jobs come
        importlib.import_module(f"fusion_backend.kernels.{module}")
    # A process's first compile also sets up the compiler (about 0.8 s on a CPU of this
    # repository's machine against 0.4 s for the kernel itself): done here, before jobs come.
    with contextlib.suppress(Exception):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        triton.compile(ASTSource(_warm_up_kernel, {"X": "*fp32"}, {}, {}), target=GPUTarget(*target))
    answers.write(json.dumps({"ready": True}) + "\n")
    answers.flush()
    for line in sys.stdin:
        job = json.loads(line)
        started = time.perf_counter()
        failed = None
        try:
            compile_one(job["kernel"], tuple(job["target"]))
        except Exception as exc:  # noqa: BLE001 -- reported; the kernel compiles at its launch
            failed = f"{job['kernel']['name']}: {type(exc).__name__}: {str(exc)[:200]}"
        answers.write(json.dumps({"failed": failed, "seconds": time.perf_counter() - started}) + "\n")
        answers.flush()


if __name__ == "__main__":
    _worker_main(tuple(json.loads(sys.argv[1])))
