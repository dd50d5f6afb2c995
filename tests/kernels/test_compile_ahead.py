"""Compiling kernels ahead on worker processes (`fusion_backend.kernels.compile_ahead`).

The test process runs Triton's interpreter, which compiles nothing, so each check runs in a child
process with the interpreter off. That machine has no GPU: the child stands in a driver that names
an sm_90 device (Triton compiles for a named target without one, ptxas included) and never
launches anything, so a launch that was not suppressed fails loudly.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import triton

from fusion_backend.kernels import compile_ahead

pytestmark = pytest.mark.skipif(not triton.__version__.startswith(compile_ahead._VERSIONS),
                                reason="compile_ahead reads Triton 3.6's specialization format only")

_CHILD = textwrap.dedent("""
    import json, os, sys, time
    import torch, triton
    from triton.backends.compiler import GPUTarget

    class NamedGpu:  # a driver for a GPU that is not here: it compiles, it cannot launch
        def get_current_device(self): return 0
        def get_current_stream(self, device=None): return 0
        def get_current_target(self): return GPUTarget("cuda", 90, 32)
        def get_active_torch_device(self): return torch.device("cpu")

    triton.runtime.driver.set_active(NamedGpu())
    from fusion_backend.kernels import attention, compile_ahead

    def cache_files():
        return sorted(os.path.join(d, f) for d, _, fs in os.walk(os.environ["TRITON_CACHE_DIR"]) for f in fs)

    a16 = torch.randn(2, 3, 100, 64, dtype=torch.float16)
    a32 = torch.randn(1, 2, 37, 40)
    with compile_ahead.recording() as recorded:
        attention.row_dot(a16, a16)
        attention.row_dot(a16, a16)   # the same specialization: recorded once
        attention.row_dot(a32, a32)
    files_recorded = cache_files()
    recorded.kernels.append({"module": "no_such_module", "name": "kernel", "spec": "{}"})
    summary = compile_ahead.compile_in_workers(recorded)
    # a worker's start-up compiles a tiny kernel of its own: counted once it has announced itself
    workers_ready = [w.await_ready() for w in compile_ahead._pool]
    files_ahead = cache_files()

    # The same calls compiled in this process (a record with no hook: Triton compiles, nothing
    # launches): every kernel must come from the cache the workers filled.
    compile_ahead._active = compile_ahead.Recorded()
    started = time.perf_counter()
    attention.row_dot(a16, a16)
    attention.row_dot(a32, a32)
    in_process_s = time.perf_counter() - started
    compile_ahead._active = None
    print(json.dumps({"target": recorded.target, "names": [k["name"] for k in recorded.kernels],
                      "summary": summary, "files_recorded": len(files_recorded), "files_ahead": len(files_ahead),
                      "files_after": len(cache_files()), "in_process_s": in_process_s,
                      "workers_ready": workers_ready}))
""")


def test_recorded_kernels_compile_on_workers_into_the_cache_the_launch_reads(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"),
               TRUTHFUSE_COMPILE_WORKERS="2")
    child = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    got = json.loads(child.stdout.strip().splitlines()[-1])
    assert got["target"] == ["cuda", 90, 32]
    # two specializations (fp16 rows of 64, fp32 rows of 40), plus the unimportable record
    assert got["names"] == ["_row_dot_kernel", "_row_dot_kernel", "kernel"]
    assert got["files_recorded"] == 0, "recording must not compile"
    summary = got["summary"]
    assert summary["workers"] == 2 and summary["kernels"] == 3
    assert got["workers_ready"] == [True, True]  # each worker announced itself after starting up
    # every kernel was compiled, here or on a worker (the one that cannot be imported failed)
    assert len(summary["failed"]) == 1 and summary["failed"][0].startswith("kernel: ModuleNotFoundError")
    assert got["files_ahead"] > 0
    assert got["files_after"] == got["files_ahead"], "the in-process compile missed the workers' cache"


def test_worker_count_follows_the_environment(monkeypatch):
    monkeypatch.setenv("TRUTHFUSE_COMPILE_WORKERS", "3")
    assert compile_ahead.worker_count() == 3
    monkeypatch.setenv("TRUTHFUSE_COMPILE_WORKERS", "0")
    assert not compile_ahead.available()
    monkeypatch.delenv("TRUTHFUSE_COMPILE_WORKERS")
    assert 1 <= compile_ahead.worker_count() <= compile_ahead.MAX_WORKERS



@pytest.mark.parametrize("value", ["off", "false", "-1", "two"])
def test_worker_count_refuses_what_is_no_number(monkeypatch, value):
    """"off" or "-1" left the default pool of workers on, silently; only "0" turned it off."""
    monkeypatch.setenv("TRUTHFUSE_COMPILE_WORKERS", value)
    with pytest.raises(ValueError, match=f"TRUTHFUSE_COMPILE_WORKERS must be a whole number.*got '{value}'"):
        compile_ahead.available()
    with pytest.raises(ValueError, match="TRUTHFUSE_COMPILE_WORKERS"):
        compile_ahead.worker_count()
    monkeypatch.setenv("TRUTHFUSE_COMPILE_WORKERS", " 0")
    assert compile_ahead.workers_wanted() == 0

def test_recording_does_not_nest():
    with compile_ahead.recording():
        with pytest.raises(RuntimeError, match="does not nest"):
            with compile_ahead.recording():
                pass
    assert compile_ahead.active() is None
