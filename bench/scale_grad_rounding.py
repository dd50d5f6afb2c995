"""How accurate two ways of summing the attention scale's gradient are under the kernels' roundings.

    python bench/scale_grad_rounding.py      (CPU, about a minute)

dλ = Σ_ij dS_ij · raw_ij (logits = λ · raw). The kernels sum it per score, centred on the row's
E_p[raw] from the forward ("centred"). A form with no work per score would take it from
products the backward already has: Σ_i q_i · (Σ_j dS_ij k_j), the dQ accumulator, which the
tensor cores fill from bf16-rounded dS, and for l2 also Σ_j |k_j|² Σ_i dS_ij ("products"). This
emulates both in float32 with the kernels' roundings (bf16 inputs, the forward's P rounded to bf16
for P·V, bf16 O for delta = rowsum(dO·O), bf16 dS into the dQ product), against float64 autograd,
for one head of N=1024, D=64. "products, exact delta" uses delta = Σ_j P_ij dP_ij, to show that
the delta's rounding is not what spoils the products form. "products, centred" takes every term
from the same bf16-rounded dS, centred on E_p[raw] (for l2 the Σ_j dS_ij |k_j|² and Σ_j dS_ij parts
would come from a narrow extra product against [|k|² split in bf16 parts, 1]), so that the delta's
error cancels as in the kernels; what is left is dS's own bf16 rounding. Prints the worst relative
error of 3 draws.
"""
import torch


def bf16(t):
    return t.to(torch.bfloat16).to(t.dtype)


def errors(metric, lam, N=1024, D=64, draws=3, spread=1.0):
    worst = {"centred": 0.0, "products": 0.0, "products, exact delta": 0.0, "products, centred": 0.0}
    for _ in range(draws):
        q, k = bf16(torch.randn(N, D) * spread), bf16(torch.randn(N, D) * spread)
        v, do = bf16(torch.randn(N, D)), bf16(torch.randn(N, D))
        if metric == "cosine":
            qn = q.double() / q.double().norm(dim=1, keepdim=True)
            kn = k.double() / k.double().norm(dim=1, keepdim=True)
            raw64 = qn @ kn.T
            qk, kk = bf16(qn.float()), bf16(kn.float())  # the kernels read q^, k^ rounded once
            raw = qk @ kk.T
        else:
            raw64 = 2 * q.double() @ k.double().T - (k.double() ** 2).sum(1)[None]
            kvec = (k ** 2).sum(1)
            raw = 2 * (q @ k.T) - kvec[None]
        lam64 = torch.tensor(lam, dtype=torch.float64, requires_grad=True)
        (torch.softmax(lam64 * raw64, 1) @ v.double() * do.double()).sum().backward()
        ref = lam64.grad.item()
        s = lam * raw
        unnorm = torch.exp(s - s.max(1, keepdim=True).values)
        rowsum = unnorm.sum(1, keepdim=True)
        out = bf16((bf16(unnorm) @ v) / rowsum)
        p = unnorm / rowsum
        dp = do @ v.T
        deltas = {"centred": (do * out).sum(1, keepdim=True), "products": (do * out).sum(1, keepdim=True),
                  "products, exact delta": (p * dp).sum(1, keepdim=True),
                  "products, centred": (do * out).sum(1, keepdim=True)}
        for name, delta in deltas.items():
            ds = p * (dp - delta)
            rbar = (p * raw).sum(1)
            if name == "centred":
                got = (ds * (raw - rbar[:, None])).sum().item()
            elif name == "products, centred":
                dsb = bf16(ds)
                centring = (rbar * dsb.sum(1)).sum()
                if metric == "cosine":
                    got = ((qk * (dsb @ kk)).sum() - centring).item()
                else:
                    got = (2 * (q * (dsb @ k)).sum() - (dsb @ kvec).sum() - centring).item()
            elif metric == "cosine":
                got = (qk * (bf16(ds) @ kk)).sum().item()
            else:
                got = (2 * (q * (bf16(ds) @ k)).sum() - (kvec * ds.sum(0)).sum()).item()
            worst[name] = max(worst[name], abs(got - ref) / abs(ref))
    return worst


def main():
    torch.manual_seed(0)
    for metric, lam, spread in (("l2", 0.05, 1), ("l2", 0.2, 1), ("l2", 1.0, 1), ("l2", 0.2, 2), ("cosine", 10, 1),
                                ("cosine", 100, 1)):
        row = errors(metric, lam, spread=spread)
        print(f"{metric:6s} λ={lam:<5} input std {spread}: " + ", ".join(f"{k} {v:.1e}" for k, v in row.items()))


if __name__ == "__main__":
    main()
