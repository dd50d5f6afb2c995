"""Canonicalization: rewrite an FX graph so that equivalent spellings of an operation become one.

Rules are matched against the canonical graph, and their patterns are canonicalized the same way,
so one rule covers `q @ k.transpose(-2, -1) / s`, `torch.matmul(q, k.permute(0, 1, 3, 2)) * (1/s)`,
`torch.einsum("bhqd,bhkd->bhqk", q, k).mul_(1/s)` and `torch.bmm(...)` alike.

Every rewrite here is an exact equivalent of what it replaces, with the same dtypes, so the
canonical graph can run as it is, with these exceptions handled where it runs: a division becomes
a multiplication by the reciprocal (the last bit may differ), and `x * x` and softmax's dtype= of
the input's own dtype become `x ** 2` and a softmax without it (CUDA autocast computes those in
fp32), which `restore_spellings` undoes wherever no fused site took them; and products of scalars
fold into one (only in fp32 and wider, or where neither factor grows the value, so no intermediate
overflows where the folded one would not).
"""
from .passes import (canonicalize, canonical_copy, is_cast, softmax_with_sinks, tanh_gelus_with_runtime_constant,
                     CANONICAL_TARGETS, UnsafeRewrite, WRITTEN_IN_PLACE)

__all__ = ["canonicalize", "canonical_copy", "is_cast", "softmax_with_sinks", "tanh_gelus_with_runtime_constant",
           "CANONICAL_TARGETS", "UnsafeRewrite", "WRITTEN_IN_PLACE"]
