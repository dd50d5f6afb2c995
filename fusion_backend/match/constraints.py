"""Constraint helpers for rules. Shapes may be symbolic (dynamic=True): comparisons go through
sympy via torch's symbolic-shape machinery and only succeed when they hold for every size the
compiled graph accepts, without adding guards; `guard_equal` alone adds one, and says so."""
from __future__ import annotations

from typing import Any, Iterable, Optional

import sympy
import torch
from torch.fx.experimental.symbolic_shapes import guard_bool, statically_known_true

from .rule import Match


def as_expr(size: Any) -> sympy.Expr:
    """A size (int or SymInt) as a sympy expression."""
    if isinstance(size, torch.SymInt):
        return size.node.expr
    return sympy.Integer(int(size))


def known_equal(a: Any, b: Any) -> bool:
    """True only when a == b holds for every value the symbols can take."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001
        return sympy.simplify(as_expr(a) - as_expr(b)) == 0


def guard_equal(a: Any, b: Any) -> bool:
    """Whether sizes a and b are equal: as `known_equal`, and also when they are separate symbols
    whose example values agree. Then a guard keeps the compiled graph to calls where they stay
    equal (a call where they differ compiles anew). For sizes a valid program always has equal but
    Dynamo traced apart, such as the lengths of K and V read from a cache."""
    if known_equal(a, b):
        return True
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        try:
            return bool(guard_bool(a == b))
        except Exception:  # noqa: BLE001 -- a size with no example value (data-dependent): unsure, no match
            return False
    return False


def _reads(check, *names: str):
    """Mark a helper's constraint with the wildcards it reads: Rule() refuses one that names a
    wildcard its pattern lacks (a typo), which the constraint would otherwise read as absent and
    pass at every site."""
    check.wildcards = names
    return check


def _unknown(m: Match, *names: str) -> Optional[str]:
    """A reason where the match has no wildcard of one of `names` (a constraint given to another
    rule than it was checked against at Rule()), so that it keeps the site rather than pass it."""
    missing = [n for n in names if n not in m.values]
    if missing:
        return (f"the constraint reads wildcard {missing[0]!r}, which the pattern does not have "
                f"(its wildcards: {', '.join(sorted(m.values))})")
    return None


def dtype_in(name: str, dtypes: Iterable[torch.dtype]):
    """The wildcard's tensor has one of `dtypes`."""
    allowed = tuple(dtypes)

    def check(m: Match) -> Optional[str]:
        if (unknown := _unknown(m, name)):
            return unknown
        v = m.values.get(name)
        if isinstance(v, torch.Tensor) and v.dtype not in allowed:
            return f"{name} has dtype {v.dtype}; supported: {', '.join(str(d) for d in allowed)}"
        return None
    check.__name__ = f"dtype_in({name})"
    return _reads(check, name)


def plain_tensors(m: Match) -> Optional[str]:
    """Every tensor the match binds is a plain tensor (a fake one while compiling), not a tensor
    subclass that dispatches ops itself, such as a DTensor (tensor parallelism) or a nested
    tensor: the fused ops have no rule for those (a DTensor's op needs a sharding strategy)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    for name, v in m.values.items():
        if isinstance(v, torch.Tensor) and is_traceable_wrapper_subclass(v):
            return f"{name} is a {type(v).__name__}, a tensor subclass; the fused ops take plain tensors"
    return None


def same_device(*names: str):
    """All the named tensors live on one device."""
    def check(m: Match) -> Optional[str]:
        if (unknown := _unknown(m, *names)):
            return unknown
        devices = {m.values[n].device for n in names if isinstance(m.values.get(n), torch.Tensor)}
        if len(devices) > 1:
            return f"{', '.join(names)} are on different devices: {sorted(map(str, devices))}"
        return None
    check.__name__ = "same_device"
    return _reads(check, *names)


def rank_is(name: str, *ranks: int):
    """The wildcard's tensor has one of the given ranks."""
    def check(m: Match) -> Optional[str]:
        if (unknown := _unknown(m, name)):
            return unknown
        v = m.values.get(name)
        if isinstance(v, torch.Tensor) and v.dim() not in ranks:
            return f"{name} is {v.dim()}-D; expected {' or '.join(map(str, ranks))}-D"
        return None
    check.__name__ = f"rank_is({name})"
    return _reads(check, name)


def dims_equal(a: str, dim_a: int, b: str, dim_b: int):
    """size(a, dim_a) == size(b, dim_b) for every shape the graph accepts."""
    def check(m: Match) -> Optional[str]:
        if (unknown := _unknown(m, a, b)):
            return unknown
        va, vb = m.values.get(a), m.values.get(b)
        if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)):
            return None
        sa, sb = va.shape[dim_a], vb.shape[dim_b]
        if not known_equal(sa, sb):
            return f"cannot prove {a}.size({dim_a}) == {b}.size({dim_b}) ({sa} vs {sb})"
        return None
    check.__name__ = f"dims_equal({a},{b})"
    return _reads(check, a, b)


def is_scalar_like(value: Any, per_head: Optional[int] = None, rank: int = 4) -> bool:
    """A Python number, or a tensor with one element and no more dims than rank-`rank` scores
    (more would broadcast them up), or (with per_head=H) a tensor that only varies along the head
    dim (-3) of such scores: shapes (H,1,1), (1,H,1,1), (H,)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    if isinstance(value, torch.SymFloat) or isinstance(value, torch.SymInt):
        return True
    if not isinstance(value, torch.Tensor):
        return False
    if value.dim() > rank:
        return False
    if known_equal(value.numel(), 1):
        return True
    if per_head is None:
        return False
    shape = list(value.shape)
    padded = [1] * (rank - len(shape)) + shape
    for i, s in enumerate(padded):
        if i == rank - 3:
            if not (known_equal(s, per_head) or known_equal(s, 1)):
                return False
        elif not known_equal(s, 1):
            return False
    return True
