"""When a fused op may skip torch.library's dispatch layers.

The ops are `torch.library` custom ops so that torch.compile, export and the dispatcher's modes
see one opaque call with a fake implementation. A plain eager call pays for that machinery on
the host every time (dispatch, the custom op's autograd wrapper, Dynamo's disable guard), and at
transformer sizes the host, not the GPU, sets the pace. Such calls go through an
autograd.Function over the same implementations instead, so the numbers are the same.
"""
import torch
from torch.utils import _python_dispatch

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def plain_eager_call(tensors) -> bool:
    """Whether this call runs eagerly on ordinary tensors: not traced by torch.compile, no
    tensor subclass (fake, functional, DTensor) and no dispatch mode. Anything else takes the
    custom op, which those systems understand."""
    if torch.compiler.is_compiling() or _python_dispatch._get_current_dispatch_mode() is not None:
        return False
    return all(type(t) in _PLAIN_TENSORS for t in tensors if t is not None)


def eager_function(name: str, forward, setup_context, input_grads, backward):
    """An autograd.Function class for a custom op's plain eager calls: `forward(*inputs)` is the
    op's implementation, `setup_context` the one registered with it, and its backward returns
    `input_grads(ctx, grad_out, backward)`, with `backward` the backward op's implementation
    (gradients of the forward's other outputs, saved tensors only, are ignored)."""

    # forward takes ctx and calls setup_context itself: with a separate setup_context, every
    # Function.apply binds its arguments through inspect.signature, ~30 us of host time a call.
    def forward_fn(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    def backward_fn(ctx, grad_out, *_other_outputs):
        return input_grads(ctx, grad_out, backward)

    return type(name, (torch.autograd.Function,), {
        "__doc__": f"{name}: the custom ops' forward and backward for plain eager calls (see `ops.eager`).",
        "forward": staticmethod(forward_fn),
        "backward": staticmethod(backward_fn),
    })
