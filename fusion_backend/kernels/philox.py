"""Dropout masks that are never stored: Philox-4x32-10 keyed by a seed, countered by position.

The keep decision of element (i, j) of an (M, N) matrix is a pure function of the seed and (i, j).
One Philox call (`tl.randint4x`) gives four 32-bit words, cut into draws of BITS = 16 or 8 bits:
G = 128 / BITS draws (8 or 16) per call. Element (i, j) uses the call with counter
i * ceil(N / G) + j // G, and within it draw (j % G) % (32 / BITS) of word (j % G) // (32 / BITS)
(draw 0 the lowest bits). It is kept when the draw is >= `dropout_threshold(p, BITS)` =
round(p * 2**BITS), so the drop probability is `effective_p(p, BITS)`: p rounded to a multiple of
2**-BITS. Kept values are scaled by 1 / (1 - effective_p), so their expectation is exact. (With
8 bits this is FlashAttention's choice: p = 0.1 drops 26/256 = 10.16%.) Several draws per call
because Philox is integer-multiply heavy: attention draws Nq x Nk decisions three times (forward
and both backward kernels), and the generator is a large share of a training step.

`keep_mask` is the Triton side (any tile whose first column is a multiple of G), and
`philox_keep_mask` the same function in PyTorch for references and tests, so a reference and a
kernel given one seed drop the same elements and a backward regenerates its forward's mask.
"""
import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _split_draws(w, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr, BITS: tl.constexpr):
    """(BLOCK_M, WIDTH) words -> (BLOCK_M, WIDTH * 32 / BITS) draws, draw k of word c at column
    c * (32 / BITS) + k (joins put the new axis last; the row-major reshape flattens it)."""
    if BITS == 16:
        return tl.reshape(tl.join(w & 0xFFFF, w >> 16), (BLOCK_M, WIDTH * 2))
    else:
        tl.static_assert(BITS == 8, "dropout draws are 16 or 8 bits")
        b = tl.join(tl.join(w & 0xFF, (w >> 16) & 0xFF), tl.join((w >> 8) & 0xFF, w >> 24))
        return tl.reshape(b, (BLOCK_M, WIDTH * 4))


@triton.jit
def keep_mask(seed, rows, col0, N, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BITS: tl.constexpr = 16):
    """Bool (BLOCK_M, BLOCK_N) keep tile for global rows `rows` and columns col0 .. col0+BLOCK_N-1
    (col0 a multiple of 128 / BITS) of an (M, N) matrix."""
    G: tl.constexpr = 128 // BITS
    tl.static_assert(BLOCK_N % G == 0, "dropout tiles cover whole groups of columns")
    q = col0 // G + tl.arange(0, BLOCK_N // G)
    r0, r1, r2, r3 = tl.randint4x(seed, rows.to(tl.int64)[:, None] * ((N + G - 1) // G) + q[None, :])
    # join(join(r0, r2), join(r1, r3)) has shape (BM, BN/G, 2, 2) and element [.., q, a, b] is
    # word 2a + b, so the row-major reshape puts word k of counter q at position 4q + k.
    w = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_N // G * 4))
    return _split_draws(w, BLOCK_M, BLOCK_N // G * 4, BITS).to(tl.int32) >= threshold


@triton.jit
def load_seed(SEED, DROPOUT: tl.constexpr):
    """The dropout seed, read on the device from SEED (see `seed_arg`); 0 without dropout, where
    SEED is never read."""
    if DROPOUT:
        return tl.load(SEED)
    else:
        return 0


def seed_arg(seed, like: torch.Tensor) -> torch.Tensor:
    """The kernels' SEED argument. The seed stays a 0-d int64 tensor on the kernels' device, read
    by the kernel: no host sync, and a CUDA graph replays with each step's fresh draw. An int
    (tests, benchmarks) is copied there; None (no dropout) passes `like`, which the kernels do not
    read then."""
    if seed is None:
        return like
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != like.device:
            raise ValueError(f"dropout seed: expected one int64 on {like.device}, got {seed.dtype} "
                             f"{tuple(seed.shape)} on {seed.device}")
        return seed
    return torch.tensor(int(seed), dtype=torch.int64, device=like.device)


def dropout_threshold(p: float, bits: int = 16) -> int:
    """Integer threshold on `bits`-bit draws: an element is kept when draw >= threshold, so p = 1
    (threshold 2**bits) keeps nothing. A p below 1 keeps the top draw at least: rounded to 1 it
    dropped everything (p = 0.999995 with 16 bits, 0.998 with 8), an output of 0 on every draw
    where dropout's expectation is the input."""
    return _threshold(float(p), int(bits))


@functools.lru_cache(maxsize=256)  # asked on every launch of a dropout kernel; keyed by value
def _threshold(p: float, bits: int) -> int:
    return min(max(int(round(p * 2.0**bits)), 0), 2**bits if p >= 1.0 else 2**bits - 1)


def effective_p(p: float, bits: int = 16) -> float:
    """The drop probability the masks have: p rounded to a multiple of 2**-bits (below 1 for p
    below 1)."""
    return dropout_threshold(p, bits) / 2.0**bits


def dropout_scale(p: float, bits: int = 16) -> float:
    """Scale for kept elements, 1 / (1 - effective_p): exact in expectation; 0 when everything
    is dropped."""
    q = effective_p(p, bits)
    return 0.0 if q >= 1.0 else 1.0 / (1.0 - q)


_M32 = 0xFFFFFFFF


def _mul_hi_lo(a: torch.Tensor, b: int):
    """High and low 32 bits of a * b for uint32 values held in int64, without int64 overflow."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p_lo = a * b_lo  # < 2**48
    t = a * b_hi + (p_lo >> 16)  # < 2**49
    hi = (t >> 16) & _M32
    lo = ((t & 0xFFFF) << 16) | (p_lo & 0xFFFF)
    return hi, lo


def philox_keep_mask(seed: int, rows: int, cols: int, p: float, device=None, row0: int = 0,
                     bits: int = 16) -> torch.Tensor:
    """Bool (rows, cols) keep mask of dropout with probability p, identical to the kernels' for
    the same `bits` (see the module docstring for which draw decides element (i, j))."""
    if p <= 0.0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    g = 128 // bits
    ng = -(-cols // g)
    off = (torch.arange(rows, dtype=torch.int64, device=device)[:, None] + row0) * ng + torch.arange(
        ng, dtype=torch.int64, device=device)[None, :]
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
    words = torch.stack([c0, c1, c2, c3], dim=-1)  # (rows * ng, 4): word k of each counter
    per_word = 32 // bits
    draws = torch.stack([(words >> (bits * k)) & (2**bits - 1) for k in range(per_word)], dim=-1)
    return draws.reshape(rows, g * ng)[:, :cols] >= dropout_threshold(p, bits)
