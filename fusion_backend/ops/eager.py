"""When a fused op may skip torch.library's dispatch layers, and how its implementations run.

The ops are `torch.library` custom ops so that torch.compile, export and the dispatcher's modes
see one opaque call with a fake implementation. A plain eager call pays for that machinery on
the host every time (dispatch, the custom op's autograd wrapper, Dynamo's disable guard), and at
transformer sizes the host, not the GPU, sets the pace. Such calls go through an
autograd.Function over the same implementations instead, so the numbers are the same.
"""
import functools

import torch
from torch.autograd import forward_ad
from torch.utils import _python_dispatch

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def plain_eager_call(tensors) -> bool:
    """Whether this call runs eagerly on ordinary tensors: not traced by torch.compile, no
    tensor subclass (fake, functional, DTensor) and no dispatch mode. Anything else takes the
    custom op, which those systems understand."""
    if torch.compiler.is_compiling() or _python_dispatch._get_current_dispatch_mode() is not None:
        return False
    return all(type(t) in _PLAIN_TENSORS for t in tensors if t is not None)


def reference_only(tensors):
    """Why these tensors need the op's PyTorch reference, or None. Forward-mode AD
    (`torch.autograd.forward_ad`, `torch.func.jvp`) may have given one a tangent, and a torch.func
    transform (grad, vjp, jacrev, vmap) wraps them: the kernels read the plain values and have no
    jvp or transform rule, so they would drop the tangent, fail on the wrapper, or (the eager
    path's autograd.Function) raise torch's own error about setup_context. The reference's
    PyTorch ops go through every transform."""
    level = forward_ad._current_level
    if level < 0 and torch._C._functorch.maybe_current_level() is None:  # neither is on: the usual call
        return None
    present = [t for t in tensors if t is not None]
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in present):
        return "inside a torch.func transform (grad, vjp, jacrev, vmap), whose wrapped tensors the kernels cannot read"
    if level >= 0 and any(forward_ad.unpack_dual(t, level=level).tangent is not None for t in present):
        return "forward-mode AD (an input carries a tangent): the kernels have no jvp"
    return None


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
        if not torch.is_grad_enabled():
            return input_grads(ctx, grad_out, backward)
        # create_graph=True: the kernels' gradients are not differentiable. Returned as they are,
        # they read as constants to a second backward, which then leaves out every path through
        # them (a gradient penalty's derivative, silently wrong). So a second backward that
        # reaches them raises, as it does through the custom op's backward op.
        with torch.no_grad():
            grads = input_grads(ctx, grad_out, backward)
        return _not_differentiable_again(name, grads, (grad_out,) + tuple(ctx.saved_tensors))

    return type(name, (torch.autograd.Function,), {
        "__doc__": f"{name}: the custom ops' forward and backward for plain eager calls (see `ops.eager`).",
        "forward": staticmethod(forward_fn),
        "backward": staticmethod(backward_fn),
    })


class _NoDoubleBackward(torch.autograd.Function):
    """A gradient as it is, tied to what it was computed from (`sources`), whose own backward
    raises: a second backward toward any of those sources reaches it and fails."""

    @staticmethod
    def forward(ctx, message, grad, *sources):
        ctx.message = message
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *_grads):
        raise RuntimeError(ctx.message)


def _not_differentiable_again(name: str, grads, sources):
    """`grads` (computed under no_grad) as results whose backward raises, where they depend on a
    tensor that requires grad (the gradient flowing in, or a saved input of the forward)."""
    sources = [t for t in sources if isinstance(t, torch.Tensor) and t.requires_grad]
    if not sources:
        return grads
    op = name.removeprefix("_Eager").lower()
    message = (f"truthfuse: double backward through the fused {op} op is not supported: its gradients are not "
               "differentiable (create_graph=True, then a backward through them). Compute this part with "
               "PyTorch's own ops (a compiled model: options={'disable': ['attention', 'feedforward']})")
    return tuple(_NoDoubleBackward.apply(message, g, *sources) if isinstance(g, torch.Tensor) else g
                 for g in grads)


def outside_autocast(impl):
    """An op implementation (first argument a tensor on the op's device) run with autocast off.
    The ops compute in their inputs' dtypes, and an autocast around the call (the caller's, or one
    entered around a compiled graph) would recast the products inside them: cuBLAS products in
    bf16 where the op's inputs are fp32, and the fp32 references' products in bf16."""
    @functools.wraps(impl)
    def run(*args, **kwargs):
        device = args[0].device.type
        if not torch.is_autocast_enabled(device):
            return impl(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return impl(*args, **kwargs)
    return run
