"""Dropout masks that are never stored: Philox-4x32-10 keyed by a seed, countered by position.

The keep decision of element (i, j) of an (M, N) matrix is a pure function of the seed and (i, j):
one Philox call (`tl.randint4x`) with counter i * ceil(N/8) + j // 8 gives four 32-bit words, that
is eight 16-bit draws; element (i, j) takes half j % 2 (0 the low 16 bits) of word (j % 8) // 2,
and is kept when that draw is >= `dropout_threshold(p)` = round(p * 2**16). So the drop
probability is p rounded to a multiple of 2**-16 (at most 7.7e-6 away; FlashAttention's dropout
rounds it to a multiple of 2**-8). Eight draws per call because Philox is integer-multiply heavy:
attention draws Nq x Nk decisions three times (forward, and both backward kernels), and at one
call per four elements the generator still took a large share of a training step.

`keep_mask` is the Triton side (any tile whose first column is a multiple of 4), and
`philox_keep_mask` the same function in PyTorch for references and tests, so a reference and a
kernel given one seed drop the same elements and a backward regenerates its forward's mask.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def keep_mask(seed, rows, col0, N, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Bool (BLOCK_M, BLOCK_N) keep tile for global rows `rows` and columns col0 .. col0+BLOCK_N-1
    (col0 a multiple of 8) of an (M, N) matrix."""
    tl.static_assert(BLOCK_N % 8 == 0, "dropout tiles cover whole groups of 8 columns")
    q = col0 // 8 + tl.arange(0, BLOCK_N // 8)
    r0, r1, r2, r3 = tl.randint4x(seed, rows.to(tl.int64)[:, None] * ((N + 7) // 8) + q[None, :])
    # join(join(r0, r2), join(r1, r3)) has shape (BM, BN/8, 2, 2) and element [.., q, a, b] is
    # word 2a + b, so the row-major reshape puts word k of counter q at position 4q + k; joining
    # its low and high halves and reshaping again puts half h of that word at column 8q + 2k + h.
    w = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_N // 2))
    r = tl.reshape(tl.join(w & 0xFFFF, w >> 16), (BLOCK_M, BLOCK_N))
    return r.to(tl.int32) >= threshold


def dropout_threshold(p: float) -> int:
    """Integer threshold on 16-bit draws: an element is kept when draw >= threshold, so p = 1
    (threshold 2**16) keeps nothing."""
    return min(max(int(round(p * 2.0**16)), 0), 2**16)


def dropout_scale(p: float) -> float:
    """Scale for kept elements: 1/(1-p); 0 when p == 1 (everything dropped)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


_M32 = 0xFFFFFFFF


def _mul_hi_lo(a: torch.Tensor, b: int):
    """High and low 32 bits of a * b for uint32 values held in int64, without int64 overflow."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p_lo = a * b_lo  # < 2**48
    t = a * b_hi + (p_lo >> 16)  # < 2**49
    hi = (t >> 16) & _M32
    lo = ((t & 0xFFFF) << 16) | (p_lo & 0xFFFF)
    return hi, lo


def philox_keep_mask(seed: int, rows: int, cols: int, p: float, device=None, row0: int = 0) -> torch.Tensor:
    """Bool (rows, cols) keep mask of dropout with probability p, identical to the kernels'.

    Element (i, j) takes half j % 2 of word (j % 8) // 2 of Philox-4x32-10 with key `seed` and
    counter (row0 + i) * ceil(cols / 8) + j // 8, exactly as the kernels' `tl.randint4x` does.
    """
    if p <= 0.0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    n8 = -(-cols // 8)
    off = (torch.arange(rows, dtype=torch.int64, device=device)[:, None] + row0) * n8 + torch.arange(
        n8, dtype=torch.int64, device=device)[None, :]
    off = off.reshape(-1)
    c0, c1 = off & _M32, (off >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(c2, 0xCD9E8D57)
        hi_a, lo_a = _mul_hi_lo(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    words = torch.stack([c0, c1, c2, c3], dim=-1)  # (rows * n8, 4): word k of each counter
    halves = torch.stack([words & 0xFFFF, words >> 16], dim=-1)  # (rows * n8, 4, 2)
    return halves.reshape(rows, 8 * n8)[:, :cols] >= dropout_threshold(p)
