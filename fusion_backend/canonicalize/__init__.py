"""Canonicalization: rewrite an FX graph so that equivalent spellings of an operation become one.

Rules are matched against the canonical graph, and their patterns are canonicalized the same way,
so one rule covers `q @ k.transpose(-2, -1) / s`, `torch.matmul(q, k.permute(0, 1, 3, 2)) * (1/s)`,
`torch.einsum("bhqd,bhkd->bhqk", q, k).mul_(1/s)` and `torch.bmm(...)` alike.

Every rewrite here is an exact equivalent of what it replaces (up to the last bit of a scale that
becomes a multiplication by its reciprocal), so the canonical graph can run as it is.
"""
from .passes import canonicalize, canonical_copy, is_cast, softmax_with_sinks, CANONICAL_TARGETS, UnsafeRewrite

__all__ = ["canonicalize", "canonical_copy", "is_cast", "softmax_with_sinks", "CANONICAL_TARGETS", "UnsafeRewrite"]
