"""Dropout seeds for the fused ops, drawn at run time by an op that compilers leave alone.

The attention and feed-forward ops take their Philox seed as a 0-d int64 CPU tensor drawn from
torch's default generator, so `torch.manual_seed` reproduces a run and the kernels read the seed
without a device sync. Written as a plain `torch.randint` inside a compiled CUDA graph, that one
CPU op made Inductor generate and build a C++ kernel for it, which costs tens of seconds on a cold
compile. As a custom op it stays an opaque call: one host-side `torch.randint` per step.

The op is tagged nondeterministic_seeded, so graph passes never merge two sites' draws into one;
`anchor` (a tensor of the call site, detached) places each draw in the site's data flow.
"""
import torch
from torch import Tensor

from .eager import plain_eager_call


def _draw(high: int, draw: bool) -> Tensor:
    """A 0-d int64 CPU tensor: uniform in [0, high) from torch's default generator when `draw`,
    else 0 (no dropout: nothing is drawn, so the generator's state does not move)."""
    if not draw:
        return torch.zeros((), dtype=torch.int64)
    return torch.randint(0, high, (), dtype=torch.int64)


@torch.library.custom_op("truthfuse::dropout_seed", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def dropout_seed_op(anchor: Tensor, high: int, draw: bool) -> Tensor:
    """`_draw` as an op that traced graphs keep opaque."""
    return _draw(high, draw)


@dropout_seed_op.register_fake
def _(anchor, high, draw):
    return torch.empty((), dtype=torch.int64, device="cpu")


SEED_HIGH = 2**30
"""Seeds are uniform in [0, SEED_HIGH): the kernels add b*H + h to it and keep it in int32."""


def draw_seed(anchor: Tensor, draw: bool = True) -> Tensor:
    """The seed tensor for one call of a fused op (see the module docstring). A plain eager call
    draws it directly: the op is only needed where a graph is traced (`ops.eager`)."""
    if plain_eager_call([anchor]):
        return _draw(SEED_HIGH, bool(draw))
    return dropout_seed_op(anchor.detach(), SEED_HIGH, bool(draw))


def reference_seed() -> int:
    """The seed a fused op would draw now, for the PyTorch references: the same draw from torch's
    default generator, so after one `torch.manual_seed` a reference and an op drop alike."""
    return int(torch.randint(0, SEED_HIGH, (), dtype=torch.int64))
