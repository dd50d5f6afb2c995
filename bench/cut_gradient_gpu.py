"""A user replacement that cuts one input's gradient (F.linear(x, w.detach(), b)) keeps its site,
and the same replacement without the cut is fused; outputs and gradients against eager. Run:
`python bench/cut_gradient_gpu.py cuda` (or `cpu` with TRITON_INTERPRET=1)."""
import sys, warnings, torch, torch.nn.functional as F
import fusion_backend
from fusion_backend import Rule, register_rule, unregister_rule
dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
OPTS = dict(strategy="aggressive", inner="eager", cache=False)
class LinearGelu(torch.nn.Module):
    def __init__(self):
        super().__init__(); self.lin = torch.nn.Linear(8, 16)
    def forward(self, x):
        return F.gelu(self.lin(x)) * 2 + x.sum(-1, keepdim=True)
ok = True
for cut in ["none", "x", "w", "b"]:
    def replacement(x, w, b, cut=cut):
        x, w, b = (t.detach() if n == cut else t for n, t in (("x", x), ("w", w), ("b", b)))
        return F.gelu(F.linear(x, w, b))
    rule = Rule(name=f"user.cut_{cut}", kind="custom", pattern=lambda x, w, b: F.gelu(F.linear(x, w, b)),
                replacement=replacement, priority=1000)
    register_rule(rule)
    try:
        torch._dynamo.reset()
        model = LinearGelu().to(dev)
        x = torch.randn(2, 3, 8, device=dev, requires_grad=True)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            report = fusion_backend.explain(model, x, options=OPTS)
        sites = [s for s in report.sites if s.rule == rule.name]
        decision = sites[0].decision if sites else "no site"
        want = "fused" if cut == "none" else "kept"
        torch._dynamo.reset()
        xc = x.detach().clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = torch.compile(model, backend=fusion_backend.backend(**OPTS))(xc)
        ref = model(x)
        gc = torch.autograd.grad(out.sum(), [xc] + list(model.parameters()))
        gr = torch.autograd.grad(ref.sum(), [x] + list(model.parameters()))
        grads_ok = all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(gc, gr))
        good = decision == want and grads_ok and torch.allclose(out, ref, atol=1e-5)
        ok &= good
        print(f"cut={cut}: {decision} (want {want}), grads equal eager's: {grads_ok}",
              sites[0].reason if sites and decision == "kept" else "", "OK" if good else "FAIL")
    finally:
        unregister_rule(rule.name)
print("ALL OK" if ok else "SOME FAILED")
