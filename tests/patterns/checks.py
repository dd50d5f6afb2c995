"""Shared checks for the pattern tests: explain() says the site is fused with the right variant,
and the model compiled with backend="truthfuse" matches eager in outputs and gradients (fp32)."""
import contextlib
import copy

import torch

import fusion_backend

# aggressive: fuse every valid site; eager inner compiler: no Inductor compile per test;
# feed-forward rules off: these tests are about attention (and the interpreter is slow)
OPTIONS = {"strategy": "aggressive", "inner": "eager", "cache": False, "disable": ["feedforward"]}


def explain_sites(model, *inputs, **kwargs):
    report = fusion_backend.explain(model, *inputs, options=OPTIONS, **kwargs)
    torch._dynamo.reset()
    return report.sites


def assert_fused(model, *inputs, variant, rule=None, count=1, **kwargs):
    """explain() reports `count` fused attention sites of `variant` (and `rule`, if given)."""
    sites = explain_sites(model, *inputs, **kwargs)
    fused = [s for s in sites if s.decision == "fused" and s.kind == "attention"]
    table = [(s.rule, s.variant, s.decision, s.reason) for s in sites]
    assert len(fused) == count, table
    for s in fused:
        assert s.variant == variant, table
        if rule is not None:
            assert s.rule == rule, table
    return sites


def assert_near_miss(model, *inputs, reason, **kwargs):
    """explain() reports a kept attention site whose reason contains `reason`, and nothing fused."""
    sites = explain_sites(model, *inputs, **kwargs)
    table = [(s.rule, s.variant, s.decision, s.reason) for s in sites]
    attention = [s for s in sites if s.kind == "attention"]
    assert attention and all(s.decision == "kept" for s in attention), table
    assert any(reason in s.reason for s in attention), table
    return sites


def _leaves(inputs):
    return [x.detach().clone().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x
            for x in inputs]


def assert_matches_eager(model, *inputs, dynamic=False, atol=2e-5, rtol=2e-4, grad_inputs=True,
                         loss_mask=None, **kwargs):
    """Outputs and gradients (float inputs and every parameter) of the model compiled with
    backend="truthfuse" equal eager's in fp32. The loss is a random weighting of the output
    (times `loss_mask`, where given: positions a real loss ignores)."""
    ref_in, new_in = _leaves(inputs), _leaves(inputs)
    if not grad_inputs:
        for x in ref_in + new_in:
            if isinstance(x, torch.Tensor):
                x.requires_grad_(False)
    compiled = torch.compile(model, backend="truthfuse", options=OPTIONS, dynamic=dynamic)
    ref = _first(model(*ref_in, **kwargs))
    weight = torch.randn_like(ref)
    if loss_mask is not None:
        weight = weight * loss_mask
    (ref * weight).sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    out = _first(compiled(*new_in, **kwargs))
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    (out * weight).sum().backward()
    new_grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(new_grads) == len(ref_grads)
    for a, b in zip(new_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=atol * 10, rtol=rtol * 10)
    for a, b in zip(new_in, ref_in):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, atol=atol * 10, rtol=rtol * 10)
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()


def _first(out):
    if isinstance(out, tuple):
        return out[0]
    return getattr(out, "logits", out)


def qkv(B=2, H=2, T=8, S=None, D=8, Hkv=None, Dv=None):
    S = S or T
    Hkv = Hkv or H
    return (torch.randn(B, H, T, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, Dv or D))


def assert_as_close_to_float64_as_eager(model, *inputs, factor=3.0, floor=1e-6):
    """For models whose fp32 gradients are ill-conditioned (eager itself is 1e-5 off float64 in
    places), compare with float64 instead of with eager: the compiled model's output and each
    parameter gradient are within `factor` times eager's own error against float64 (+ `floor`),
    each measured relative to the tensor's largest entry."""
    def run(m, xs):
        out = _first(m(*xs))
        out_weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (out.double() * out_weight).sum().backward()
        grads = {n.removeprefix("_orig_mod."): p.grad.double().clone() for n, p in m.named_parameters()
                 if p.grad is not None}
        m.zero_grad(set_to_none=True)
        return {"output": out.detach().double(), **grads}

    ref = run(copy.deepcopy(model).double(), [x.double() if x.is_floating_point() else x for x in inputs])
    eager = run(model, inputs)
    fused = run(torch.compile(model, backend="truthfuse", options=OPTIONS), inputs)
    torch._dynamo.reset()
    assert fused.keys() == ref.keys() == eager.keys()
    for name, want in ref.items():
        scale = want.abs().max()
        err_eager, err_fused = ((x - want).abs().max() / scale for x in (eager[name], fused[name]))
        assert torch.isfinite(fused[name]).all() and err_fused <= factor * err_eager + floor, \
            (name, float(err_fused), float(err_eager))


@contextlib.contextmanager
def one_rank_mesh(tmp_path):
    """A one-process gloo group and its CPU DeviceMesh, for DTensor inputs (tensor parallelism);
    skips where torch.distributed or gloo is missing."""
    import pytest
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def assert_dtensor_site_kept(fn, plain_inputs, mesh, kind, placements=None):
    """fn on DTensor inputs compiled with truthfuse: its `kind` sites are kept with a reason that
    names the DTensor, no FusionWarning, and the output and every input's gradient equal eager's."""
    import warnings

    from torch.distributed.tensor import Replicate, distribute_tensor

    from fusion_backend import FusionWarning

    placements = placements or [Replicate()]
    results = []
    for compiled in (False, True):
        inputs = [distribute_tensor(t.detach().clone(), mesh, placements).requires_grad_() for t in plain_inputs]
        backend = fusion_backend.backend(**OPTIONS_ALL)
        f = torch.compile(fn, backend=backend) if compiled else fn
        with warnings.catch_warnings():
            warnings.simplefilter("error", FusionWarning)
            out = f(*inputs)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        (out.full_tensor() * weight).sum().backward()
        results.append([out.full_tensor()] + [t.grad.full_tensor() for t in inputs])
        torch._dynamo.reset()
    sites = [s for r in backend.records for s in r.sites if s.kind == kind]
    assert sites and all(s.decision == "kept" and "DTensor" in s.reason for s in sites), \
        [(s.rule, s.decision, s.reason) for s in sites]
    for a, b in zip(results[1], results[0]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4)


OPTIONS_ALL = {"strategy": "aggressive", "inner": "eager", "cache": False}
