"""Dropout seeds for the fused ops, drawn at run time by an op that compilers leave alone.

The attention and feed-forward ops take their Philox seed as a 0-d int64 tensor drawn from torch's
generator of the inputs' device, so `torch.manual_seed` reproduces a run. The kernels read it on
the device (`kernels.philox.seed_arg`): no host sync, and inside a CUDA graph
(`mode="reduce-overhead"`) each replay draws a fresh seed, since CUDA graphs capture the CUDA
generator's draws. A CPU seed tensor would keep Inductor from building the graph at all.

Written as a plain `torch.randint` inside a compiled graph, the draw made Inductor generate and
build a kernel for it, which cost tens of seconds on a cold compile. As a custom op it stays an
opaque call: one `torch.randint` per step. The op is tagged nondeterministic_seeded, so graph
passes never merge two sites' draws into one; `anchor` (a tensor of the call site, detached)
places each draw in the site's data flow and gives its device.
"""
from typing import Optional

import torch
from torch import Tensor

from .eager import plain_eager_call


def _draw(high: int, device: torch.device) -> Tensor:
    """A 0-d int64 tensor on `device`, uniform in [0, high), from that device's default generator."""
    return torch.randint(0, high, (), dtype=torch.int64, device=device)


@torch.library.custom_op("truthfuse::dropout_seed", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def dropout_seed_op(anchor: Tensor, high: int) -> Tensor:
    """`_draw` on the anchor's device, as an op that traced graphs keep opaque."""
    return _draw(high, anchor.device)


@dropout_seed_op.register_fake
def _(anchor, high):
    return torch.empty((), dtype=torch.int64, device=anchor.device)


SEED_HIGH = 2**30
"""Seeds are uniform in [0, SEED_HIGH): the kernels add b*H + h (attention) or 1 (the feed-forward
output's dropout) to it."""


def draw_seed(anchor: Tensor) -> Tensor:
    """The seed tensor for one call of a fused op with dropout (see the module docstring). A plain
    eager call draws it directly: the op is only needed where a graph is traced (`ops.eager`)."""
    if plain_eager_call([anchor]):
        return _draw(SEED_HIGH, anchor.device)
    return dropout_seed_op(anchor.detach(), SEED_HIGH)


def reference_seed(device=None) -> int:
    """The seed a fused op on `device` (default CPU) would draw now, for the PyTorch references:
    the same draw from the same generator, so after one `torch.manual_seed` a reference and an op
    drop alike."""
    return int(_draw(SEED_HIGH, torch.device(device or "cpu")))


def seed_value(seed: Optional[Tensor]) -> int:
    """A seed tensor's value (0 for None) for the PyTorch references: a host sync, so only the
    fallback paths read it, never the kernels'."""
    return int(seed.item()) if seed is not None else 0
