"""kernels.philox: the Triton keep mask is the PyTorch reference's, bit for bit, for both draw
widths, any starting row/column and a ragged width; the rate is 1 - effective_p."""
import pytest
import torch
import triton
import triton.language as tl

from fusion_backend.kernels.philox import dropout_scale, dropout_threshold, effective_p, keep_mask, philox_keep_mask


@triton.jit
def _keep_tile_kernel(OUT, seed, row0, N, threshold, stride, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BITS: tl.constexpr):
    rows = row0 + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * BLOCK_N
    keep = keep_mask(seed, rows, col0, N, threshold, BLOCK_M, BLOCK_N, BITS)
    lr = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    tl.store(OUT + lr[:, None] * stride + cols[None, :], keep.to(tl.int8), mask=cols[None, :] < N)


@pytest.mark.parametrize("bits", [16, 8])
def test_kernel_mask_is_the_reference_mask(bits):
    M, N, p, seed, row0 = 48, 93, 0.3, 1234567, 17
    out = torch.full((M, N), -1, dtype=torch.int8)
    _keep_tile_kernel[(M // 16, triton.cdiv(N, 32))](out, seed, row0, N, dropout_threshold(p, bits), out.stride(0),
                                                     BLOCK_M=16, BLOCK_N=32, BITS=bits)
    ref = philox_keep_mask(seed, M, N, p, row0=row0, bits=bits)
    assert (out >= 0).all()
    assert torch.equal(out.bool(), ref)


@pytest.mark.parametrize("bits", [16, 8])
def test_rate_and_scale_follow_the_rounded_probability(bits):
    p = 0.1
    q = effective_p(p, bits)
    assert abs(q - p) <= 2.0 ** -(bits + 1)
    keep = philox_keep_mask(99, 512, 512, p, bits=bits)
    assert abs(1 - keep.float().mean().item() - q) < 0.005
    assert dropout_scale(p, bits) == pytest.approx(1 / (1 - q))
    assert not philox_keep_mask(99, 4, 64, 1.0, bits=bits).any()  # p = 1 keeps nothing


@pytest.mark.parametrize("bits", [16, 8])
def test_a_probability_below_one_keeps_something(bits):
    """p just below 1 rounded to 1 (0.999995 with 16 bits, 0.999 with 8) and dropped every
    element: the attention op's output was 0 on every draw, where dropout's expectation is the
    input. It rounds to 1 - 2**-bits, whose scale 2**bits keeps the expectation."""
    p = 1 - 2.0 ** -(bits + 2)
    q = effective_p(p, bits)
    assert q == 1 - 2.0 ** -bits
    assert dropout_scale(p, bits) == 2.0 ** bits
    assert dropout_threshold(p, bits) == 2 ** bits - 1
    assert dropout_threshold(1.0, bits) == 2 ** bits  # p = 1 (not a valid dropout_p) still keeps nothing
