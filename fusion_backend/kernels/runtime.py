"""Where a Triton kernel can run: on a GPU, or on CPU tensors through Triton's interpreter."""
import inspect
import os

import torch
import triton

from . import compile_ahead


@triton.jit
def _interpreter_probe():
    pass


def interpreting() -> bool:
    """True when Triton's interpreter runs our kernels (TRITON_INTERPRET=1), so they take CPU tensors.

    Triton chooses per kernel when the kernel is defined, which is when fusion_backend is
    imported: a TRITON_INTERPRET=1 set later leaves the kernels compiled for a GPU, so this asks
    a kernel defined with ours (tests set the variable at the top of conftest.py).
    """
    return type(_interpreter_probe).__name__ == "InterpretedFunction"


def _interpreter_asked_too_late() -> bool:
    return not interpreting() and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def can_launch(*tensors: torch.Tensor) -> bool:
    """Whether Triton kernels can take these tensors: all on one CUDA device, or all on CPU
    while the interpreter is on."""
    devices = {t.device.type for t in tensors if t is not None}
    if devices == {"cuda"}:
        return True
    if devices == {"cpu"}:
        return interpreting()
    return False


def device_unsupported(t: torch.Tensor) -> str:
    """Why Triton kernels cannot take tensors on t's device ("" when they can). Works on fake
    and meta tensors: it reads the device type only."""
    dev = t.device.type
    if dev == "cpu" and _interpreter_asked_too_late():
        return ("CPU tensors, and TRITON_INTERPRET=1 was set after fusion_backend was imported: Triton reads it "
                "when the kernels are defined, so set it before importing fusion_backend")
    if dev == "cpu" and not interpreting():
        return "CPU tensors while Triton's interpreter is off (TRITON_INTERPRET=1 runs kernels on CPU)"
    if dev not in ("cpu", "cuda"):
        return f"device {dev!r} has no Triton kernel"
    return ""


# Launch arithmetic on the host. In triton 3.6, triton.cdiv and triton.next_power_of_2 are
# ConstexprFunction objects: about 1.8 us a call from Python against 0.04 us for the integer
# expressions below, and an op's launchers make a few dozen such calls per forward and backward
# while the host sets the pace of small steps.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative a and positive b."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def env_switch(name: str) -> bool:
    """A TRUTHFUSE_ on/off variable: unset, empty or "1" is on, "0" is off. Anything else raises
    an error naming the variable and both values: only "0" turned a switch off, so "false" or
    "off" left it on without a word."""
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{name} must be 0 (off) or 1 (on, the default), got {value!r}")
    return value != "0"


# Triton versions whose `CompiledKernel[grid](*args)` takes the same argument list as the
# JITFunction (constexprs included), checked bit for bit on the GPU (bench/feedforward_gpu.py).
_DIRECT_LAUNCH_VERSIONS = ("3.6.",)


def launch_key(args) -> tuple:
    """What Triton specializes a compiled kernel on, for each runtime argument, or more: a
    tensor's dtype and the address modulo 16, an int's residue modulo 16, whether it is 1 and
    which integer width holds it; floats are never specialized; anything else by value."""
    return tuple([
        (a.dtype, a.data_ptr() & 15) if type(a) is torch.Tensor
        else (a & 15, a == 1, -0x80000000 <= a <= 0x7FFFFFFF, a <= 0x7FFFFFFFFFFFFFFF) if type(a) is int
        else 0 if type(a) is float
        else (type(a), a)
        for a in args
    ])


class KernelLauncher:
    """Launches one @triton.jit kernel whose constexpr parameters follow its runtime ones.

    Triton's own launch binds and specializes every argument on each call, about 20 us of host
    time for a kernel of ~30 parameters on an H100 host (more on slower ones), and a feed-forward
    training step makes a dozen such launches while the host sets its pace. This launcher keys the
    compiled kernel by `launch_key` (a superset of what Triton specializes on) and calls it
    directly once seen, through the compiled kernel's own launcher (which still calls Triton's
    launch hooks, for profilers). The first call of a key, the interpreter, untested Triton
    versions and TRUTHFUSE_DIRECT_LAUNCH=0 take Triton's path."""

    def __init__(self, kernel):
        self.kernel = kernel
        # JITFunction and the interpreter's InterpretedFunction both keep the Python function
        params = list(inspect.signature(kernel.fn).parameters.values())
        is_constexpr = ["constexpr" in str(p.annotation) for p in params]
        self.constexpr_names = tuple(p.name for p, c in zip(params, is_constexpr) if c)
        if any(is_constexpr[:len(params) - len(self.constexpr_names)]):
            raise ValueError(f"{kernel.fn.__name__}: constexpr parameters must follow the runtime ones")
        self._constexpr_defaults = {p.name: p.default for p, c in zip(params, is_constexpr)
                                    if c and p.default is not inspect.Parameter.empty}
        self._compiled = {}
        # TRUTHFUSE_DIRECT_LAUNCH=0 keeps every launch on Triton's own path (to rule this one out)
        self._direct = (env_switch("TRUTHFUSE_DIRECT_LAUNCH")  # first: a bad value is an error on any Triton
                        and triton.__version__.startswith(_DIRECT_LAUNCH_VERSIONS))

    def __call__(self, grid, args, constexprs, num_warps=None, num_stages=None):
        """kernel[grid](*args, **constexprs by name, num_warps=..., num_stages=...), with the
        constexprs as a tuple in signature order (None: Triton's default warps or stages)."""
        if compile_ahead.active() is not None and not interpreting():
            # recording what a call compiles (`compile_ahead.recording`): nothing launches
            options = {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v is not None}
            self.kernel.warmup(*args, grid=grid, **dict(zip(self.constexpr_names, constexprs)), **options)
            return
        direct = self._direct and not interpreting()
        if direct:
            device = _driver().get_current_device()
            key = (constexprs, num_warps, num_stages, device, launch_key(args))
            compiled = self._compiled.get(key)
            if compiled is not None:
                # a CompiledKernel's launcher reads all three grid dimensions
                grid3 = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
                compiled[grid3](*args, *constexprs, stream=_driver().get_current_stream(device))
                return
        options = {}
        if num_warps is not None:
            options["num_warps"] = num_warps
        if num_stages is not None:
            options["num_stages"] = num_stages
        compiled = self.kernel[grid](*args, **dict(zip(self.constexpr_names, constexprs)), **options)
        if direct and hasattr(compiled, "function"):  # a CompiledKernel (JITFunction.run returns it)
            self._compiled[key] = compiled

    def __getitem__(self, grid):
        """Triton's launch syntax: launcher[grid](*args, CONSTEXPR=..., num_warps=..., num_stages=...)."""
        def launch(*args, num_warps=None, num_stages=None, **constexprs):
            unknown = constexprs.keys() - set(self.constexpr_names)
            missing = [n for n in self.constexpr_names if n not in constexprs and n not in self._constexpr_defaults]
            if unknown or missing:
                raise TypeError(f"{self.kernel.fn.__name__}: unknown launch arguments {sorted(unknown)}, "
                                f"missing constexprs {missing}")
            values = tuple(constexprs[n] if n in constexprs else self._constexpr_defaults[n]
                           for n in self.constexpr_names)
            self(grid, args, values, num_warps, num_stages)
        return launch


def _driver():
    return triton.runtime.driver.active
