"""Where a Triton kernel can run: on a GPU, or on CPU tensors through Triton's interpreter."""
import os

import torch


def interpreting() -> bool:
    """True when Triton's interpreter is on (TRITON_INTERPRET=1), so kernels run on CPU tensors.

    Read from the environment each time: the interpreter is chosen when triton is imported, and
    the variable must be set before that, so tests set it at the top of conftest.py.
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


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
