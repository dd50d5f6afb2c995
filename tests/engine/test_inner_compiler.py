"""What the backend does around its inner compiler."""
import sys

import torch

from fusion_backend.backend import TruthfuseBackend
from fusion_backend.options import Options

backend_module = sys.modules["fusion_backend.backend"]  # (the package's `backend` is the function)


def _compile_with(monkeypatch, inner):
    import torch._inductor.async_compile as async_compile

    warmed = []
    monkeypatch.setattr(async_compile, "maybe_warm_pool", lambda: warmed.append(True))
    monkeypatch.setattr(backend_module, "_inner_compile", lambda gm, inputs, options: gm.forward)
    fn = torch.compile(lambda x: torch.sin(x) + 1, backend=TruthfuseBackend(Options(inner=inner, cache=False)))
    x = torch.randn(5)
    torch.testing.assert_close(fn(x), torch.sin(x) + 1)
    torch._dynamo.reset()
    return warmed


def test_inductor_compile_pool_is_warmed_before_analysis(monkeypatch):
    # Dynamo's own "inductor" backend starts the kernel-compiling workers before compiling; a
    # backend calling compile_fx directly must too, or kernels compile one by one in-process
    assert _compile_with(monkeypatch, "inductor") == [True]


def test_no_compile_pool_for_other_inner_compilers(monkeypatch):
    assert _compile_with(monkeypatch, "eager") == []
