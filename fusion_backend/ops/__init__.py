"""truthfuse ops: `torch.library` custom ops with fake implementations and autograd.

Rules reach kernels only through these ops. Each op validates its input, launches Triton kernels
where it can (CUDA, or CPU under TRITON_INTERPRET=1), and otherwise runs a PyTorch reference. If a
kernel fails to compile or launch, the op warns once and computes the same result with the
reference, so a fused graph never crashes where the original would have run.
"""

# The public functions shadow their modules' names on purpose: `fusion_backend.ops.attention(...)`
# is the op; `from fusion_backend.ops.attention import attention_supports` still finds the module.
from .attention import attention  # noqa: E402
from .feedforward import feedforward  # noqa: E402

__all__ = ["attention", "feedforward"]
