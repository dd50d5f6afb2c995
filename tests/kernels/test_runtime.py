"""The host-side launch arithmetic agrees with Triton's own, and the direct launcher reuses a
compiled kernel only for arguments Triton would have compiled the same way."""
import os

import pytest
import torch
import triton
import triton.language as tl

from fusion_backend.kernels import runtime
from fusion_backend.kernels.runtime import KernelLauncher, cdiv, launch_key, next_power_of_2


def test_cdiv_and_next_power_of_2_match_triton():
    for a in range(0, 600, 7):
        for b in (1, 3, 16, 64, 128):
            assert cdiv(a, b) == triton.cdiv(a, b)
    for n in list(range(1, 1100)) + [2**20 - 1, 2**20, 2**20 + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n)


def test_launch_key_separates_what_triton_specializes_on():
    base = torch.zeros(64, dtype=torch.float16)
    same = torch.ones(64, dtype=torch.float16)
    assert launch_key((base, 64, 0.5)) == launch_key((same, 64, 0.25))  # floats are not specialized
    for other in [
        (base[1:], 64, 0.5),  # address 2 bytes off 16-byte alignment
        (base.float(), 64, 0.5),  # dtype
        (base, 65, 0.5),  # not a multiple of 16
        (base, 1, 0.5),  # equal to 1
        (base, 64 + 2**32, 0.5),  # needs 64 bits
        (base, 64.0, 0.5),  # a float where an int was
    ]:
        assert launch_key(other) != launch_key((base, 64, 0.5)), other


class _Compiled:
    """Stands in for a CompiledKernel: records direct launches."""
    function = object()

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):  # Triton's launcher reads grid[0], grid[1] and grid[2]
        return lambda *args, stream: self.log.append(("direct", (grid[0], grid[1], grid[2]), args))


class _Jit:
    """Stands in for a JITFunction: records launches through Triton's path."""

    def __init__(self, fn):
        self.fn = fn
        self.log = []

    def __getitem__(self, grid):
        def launch(*args, num_warps, **constexprs):
            self.log.append(("triton", grid, args, constexprs, num_warps))
            return _Compiled(self.log)
        return launch


def _kernel(x_ptr, n, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr):
    pass


def test_kernel_launcher_reuses_a_compiled_kernel_only_for_the_same_key(monkeypatch):
    monkeypatch.setattr(runtime, "interpreting", lambda: False)
    driver = type("Driver", (), {"get_current_device": staticmethod(lambda: 0),
                                 "get_current_stream": staticmethod(lambda device: 7)})()
    monkeypatch.setattr(runtime, "_driver", lambda: driver)
    jit = _Jit(_kernel)
    launch = KernelLauncher(jit)
    launch._direct = True
    assert launch.constexpr_names == ("BLOCK", "FLAG")
    x = torch.zeros(32)
    launch((2, 1), (x, 32, 0.5), (64, True), 4)
    launch((3, 1), (x, 32, 0.25), (64, True), 4)  # same key: direct, with the constexprs appended
    launch((3, 1), (x[1:], 32, 0.25), (64, True), 4)  # misaligned: Triton's path again
    launch((3, 1), (x, 32, 0.25), (64, False), 4)  # another constexpr
    launch((3, 1), (x, 32, 0.25), (64, True), 8)  # other warps
    kinds = [entry[0] for entry in jit.log]
    assert kinds == ["triton", "direct", "triton", "triton", "triton"]
    assert jit.log[0][3] == {"BLOCK": 64, "FLAG": True} and jit.log[0][4] == 4
    assert jit.log[1][1:] == ((3, 1, 1), (x, 32, 0.25, 64, True))


def test_kernel_launcher_takes_tritons_path_in_the_interpreter(monkeypatch):
    monkeypatch.setattr(runtime, "interpreting", lambda: True)
    jit = _Jit(_kernel)
    launch = KernelLauncher(jit)
    launch._direct = True
    for _ in range(3):
        launch((1, 1), (torch.zeros(4), 4, 1.0), (16, False), 4)
    assert [entry[0] for entry in jit.log] == ["triton"] * 3


def test_kernel_launcher_wants_constexprs_last():
    def bad(x_ptr, BLOCK: tl.constexpr, n):
        pass

    try:
        KernelLauncher(_Jit(bad))
    except ValueError as e:
        assert "constexpr" in str(e)
    else:
        raise AssertionError("a constexpr before a runtime parameter was accepted")


def _kernel_with_default(x_ptr, n, BLOCK: tl.constexpr, FLAG: tl.constexpr = False):
    pass


def test_kernel_launcher_launch_syntax_orders_constexprs_and_fills_defaults(monkeypatch):
    monkeypatch.setattr(runtime, "interpreting", lambda: True)  # Triton's path: records what it is given
    jit = _Jit(_kernel_with_default)
    launch = KernelLauncher(jit)
    x = torch.zeros(8)
    launch[(2, 1)](x, 8, FLAG=True, BLOCK=32, num_warps=8)
    launch[(2, 1)](x, 8, BLOCK=16, num_warps=4)
    assert jit.log[0][3] == {"BLOCK": 32, "FLAG": True}
    assert jit.log[1][3] == {"BLOCK": 16, "FLAG": False}  # the signature's default
    for bad in (dict(BLOCK=16, WIDTH=2), dict(FLAG=True)):  # an unknown name; BLOCK missing
        try:
            launch[(1, 1)](x, 8, num_warps=4, **bad)
        except TypeError as e:
            assert "_kernel_with_default" in str(e)
        else:
            raise AssertionError(f"{bad} was launched")


def test_direct_launch_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("TRUTHFUSE_DIRECT_LAUNCH", "0")
    assert not KernelLauncher(_Jit(_kernel))._direct
    monkeypatch.setenv("TRUTHFUSE_DIRECT_LAUNCH", "1")
    assert KernelLauncher(_Jit(_kernel))._direct == triton.__version__.startswith(runtime._DIRECT_LAUNCH_VERSIONS)



@pytest.mark.parametrize("value", ["false", "off", "no", "2"])
def test_on_off_variables_refuse_other_values(monkeypatch, value):
    """Only "0" turned TRUTHFUSE_DIRECT_LAUNCH and TRUTHFUSE_MASK_SKIP off, so "false" or "off"
    left them on silently; they are errors naming the variable and both values."""
    monkeypatch.setenv("TRUTHFUSE_DIRECT_LAUNCH", value)
    with pytest.raises(ValueError, match=f"TRUTHFUSE_DIRECT_LAUNCH must be 0 .* or 1 .*got '{value}'"):
        KernelLauncher(_Jit(_kernel))
    monkeypatch.setenv("TRUTHFUSE_DIRECT_LAUNCH", " 0 ")
    assert not KernelLauncher(_Jit(_kernel))._direct
    monkeypatch.setenv("TRUTHFUSE_DIRECT_LAUNCH", "")
    assert KernelLauncher(_Jit(_kernel))._direct == triton.__version__.startswith(runtime._DIRECT_LAUNCH_VERSIONS)


def test_mask_skip_variable_is_read_at_import_or_refused_clearly():
    import subprocess
    import sys

    code = "import fusion_backend.kernels.attention as a; print('MIN', a._RANGES_MIN_ENTRIES)"
    for value, expected in (("0", "MIN inf"), ("", "MIN 1048576"), ("off", "TRUTHFUSE_MASK_SKIP must be 0")):
        env = {**os.environ, "TRUTHFUSE_MASK_SKIP": value}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert expected in (proc.stdout if expected.startswith("MIN") else proc.stderr), proc.stderr[-2000:]
        assert (proc.returncode == 0) == expected.startswith("MIN")

_LATE_INTERPRETER = """
import os, warnings, torch
import fusion_backend
os.environ["TRITON_INTERPRET"] = "1"  # after the kernels were defined: too late
q = torch.randn(1, 2, 8, 16)
report = fusion_backend.explain(lambda q: (q @ q.transpose(-2, -1)).softmax(-1) @ q, q,
                                options={"strategy": "aggressive", "inner": "eager", "cache": False})
print(report.sites[0].decision, "|", report.sites[0].reason)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fusion_backend.ops.attention(q, q, q)
    fusion_backend.ops.attention(q, q, q)
print(len(caught), "|", caught[0].message)
"""


def test_interpreter_asked_for_after_import_is_reported_not_half_used():
    # Triton picks the interpreter when a kernel is defined: set later, the kernels cannot take
    # CPU tensors, so no site may claim to be fused, and the op says why once
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _LATE_INTERPRETER], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    site, warned = out.stdout.strip().splitlines()[-2:]
    assert site.startswith("kept |") and "set after fusion_backend was imported" in site, out.stdout
    assert warned.startswith("1 |") and "set after fusion_backend was imported" in warned, out.stdout
