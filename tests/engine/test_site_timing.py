"""Timing a kept site inside the backend: its compiled backward must not need Dynamo's compile
lock, which the compiling thread holds while the tuner runs."""
import threading

import torch
from torch._dynamo.convert_frame import compile_lock
from torch._inductor.compile_fx import compile_fx

from fusion_backend.site_timing import _eager_backward_compile


class _SinTwice(torch.nn.Module):
    def forward(self, x):
        return torch.sin(x) * 2


def test_kept_site_backward_runs_on_another_thread_while_the_compile_lock_is_held():
    # On CUDA autograd runs the backward on its device thread. A backward compiled lazily there
    # waits for compile_lock, held by the thread that is compiling the enclosing graph and waiting
    # for that backward: the GPU hang this guards against, reproduced here with a plain thread.
    gm = torch.fx.symbolic_trace(_SinTwice())
    x = torch.randn(8, requires_grad=True)
    finished = []
    with compile_lock:
        with _eager_backward_compile():
            fn = compile_fx(gm, [x])
        out = fn(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        worker = threading.Thread(target=lambda: (out.sum().backward(), finished.append(True)), daemon=True)
        worker.start()
        worker.join(timeout=120)
    assert finished, "the kept site's backward waited for the compile lock"
    torch.testing.assert_close(x.grad, 2 * torch.cos(x.detach()))
