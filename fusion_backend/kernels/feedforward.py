"""Feed-forward kernels: GEMMs with fused epilogues, and standalone elementwise epilogues.

The feed-forward block is

    hidden = dropout(act(x @ W_gate^T + b_gate) * (x @ W_in^T + b_in))   (gated)
    hidden = dropout(act(x @ W_in^T + b_in))                              (plain)
    out    = dropout(hidden @ W_out^T + b_out) + residual

Two ways to run it share every formula here:

* `gemm(...)`: one Triton GEMM kernel whose epilogue (EPI_*) adds the bias, applies the activation
  and the dropout, gates, adds the residual, or, in backward, turns dL/dhidden into dL/dpre-activation.
* cuBLAS for the products plus `hidden_epilogue(...)` / `output_epilogue(...)`, elementwise kernels
  that do the same epilogue work in one pass over memory.

Dropout never stores a mask: `kernels.philox` regenerates it from a seed and the position.

Activation codes (ACT constexpr): see `ACTIVATIONS`. Kernels compute in float32 and round to the
output dtype on store. Pre-activations are rounded to the storage dtype before the activation so
that forward, and backward's recomputation from the stored pre-activation, see the same value.

Launchers take tensors and Python scalars only; nothing here knows about FX or custom ops.
"""

import torch
import triton
import triton.language as tl

from .philox import dropout_scale, dropout_threshold, keep_mask, load_seed, seed_arg
from .runtime import KernelLauncher, cdiv, interpreting

ACTIVATIONS = {"gelu": 1, "gelu_tanh": 2, "relu": 3, "silu": 4, "quick_gelu": 5, "relu2": 6}
"""Activation name -> ACT constexpr code. Code 0 is the identity (no activation)."""
QUICK_GELU_SLOPE = 1.702  # quick_gelu(z) = z * sigmoid(1.702 z), CLIP's MLP (written out in the kernels)

EPI_PLAIN = 0  # C = A @ B (+ bias); optional second K segment C += A2 @ B2
EPI_HIDDEN = 1  # forward first GEMM: store pre-activation(s), then dropout(act(.)[* up])
EPI_OUT = 2  # forward second GEMM: dropout(acc + bias) + residual
EPI_DHIDDEN = 3  # backward: dL/dhidden -> dL/dpre-activation(s), reading stored pre-activations

_SMEM_BUDGET = 200 * 1024  # bytes of pipelined tiles per program; H100 allows 227 KB in all
_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_SQRT_2_OVER_PI = 0.7978845608028654


# ----------------------------------------------------------------------------------------------
# Shared jit helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # tl has no tanh that also runs in the interpreter. Clamped so exp cannot overflow;
    # tanh(15) is 1 in float32 anyway.
    x = tl.minimum(tl.maximum(x, -15.0), 15.0)
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _act(z, ACT: tl.constexpr):
    """act(z) in float32 for activation code ACT (0 identity, 1 gelu, 2 gelu_tanh, 3 relu, 4 silu,
    5 quick_gelu, 6 relu2 = relu(z)**2)."""
    if ACT == 1:
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        return 0.5 * z * (1.0 + t)
    elif ACT == 3:
        return tl.maximum(z, 0.0)
    elif ACT == 4:
        return z / (1.0 + tl.exp(-z))
    elif ACT == 5:
        return z / (1.0 + tl.exp(-1.702 * z))
    elif ACT == 6:
        r = tl.maximum(z, 0.0)
        return r * r
    else:
        return z


@triton.jit
def _act_and_grad(z, ACT: tl.constexpr):
    """(act(z), act'(z)) in float32; one evaluation of the transcendental serves both."""
    if ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        return z * cdf, cdf + z * pdf
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        return 0.5 * z * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dinner
    elif ACT == 3:
        return tl.maximum(z, 0.0), tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 4:
        s = 1.0 / (1.0 + tl.exp(-z))
        return z * s, s * (1.0 + z * (1.0 - s))
    elif ACT == 5:
        s = 1.0 / (1.0 + tl.exp(-1.702 * z))
        return z * s, s * (1.0 + 1.702 * z * (1.0 - s))
    elif ACT == 6:
        r = tl.maximum(z, 0.0)
        return r * r, 2.0 * r
    else:
        return z, tl.full(z.shape, 1.0, tl.float32)


@triton.jit
def _dropout(v, seed, rows, col0, N, threshold, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Inverted dropout of the float32 (BLOCK_M, BLOCK_N) block v whose global row indices are
    `rows` (int64) and whose first global column is col0 (a multiple of 8); N the matrix width."""
    keep = keep_mask(seed, rows, col0, N, threshold, BLOCK_M, BLOCK_N)
    return tl.where(keep, v * scale, 0.0)


# ----------------------------------------------------------------------------------------------
# GEMM with fused epilogues
# ----------------------------------------------------------------------------------------------


@triton.jit
def _store_partial(ptrs, col_sums, mask, BIAS_GRAD: tl.constexpr):
    """Write one tile row's column sums of a bias gradient (BIAS_GRAD 1), or add them to what an
    earlier row block left there (BIAS_GRAD 2). Each program owns its slots: no atomics, and the
    summation order is fixed."""
    if BIAS_GRAD == 2:
        col_sums += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, col_sums, mask=mask)


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, a2_ptr, b2_ptr,
    bias_ptr, bias2_ptr,
    z_ptr, zu_ptr, res_ptr,
    c_ptr, c2_ptr, db_ptr, db2_ptr,
    M, N, K, K2,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_a2m, stride_a2k, stride_b2k, stride_b2n,
    stride_zm, stride_zn, stride_rm, stride_rn, stride_cm, stride_cn,
    SEED, seed_offset, threshold, scale, row0,
    EPI: tl.constexpr, ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BIAS2: tl.constexpr, GATED: tl.constexpr, HAS_K2: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_RES: tl.constexpr, STORE_Z: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_K: tl.constexpr, BIAS_GRAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C (M, N) = A (M, K) @ B (K, N) with an epilogue chosen by EPI. Any strides.

    Pointers (all tensors of one dtype, except `bias*` which may be any float dtype):
      a_ptr  (M, K) strides (stride_am, stride_ak): left operand.
      b_ptr  (K, N) strides (stride_bk, stride_bn): right operand; W^T of an (N, K) weight is
             passed as W with swapped strides.
      a2_ptr (M, K2) strides (stride_a2m, stride_a2k): second left operand when HAS_K2
             (EPI_PLAIN computes A @ B + A2 @ B2, e.g. dx of a gated block).
      b2_ptr (K2, N) when HAS_K2, or (K, N) gate weight^T when GATED (EPI_HIDDEN), strides
             (stride_b2k, stride_b2n).
      bias_ptr (N,): bias of B's projection (EPI_PLAIN / EPI_HIDDEN / EPI_OUT), if HAS_BIAS.
      bias2_ptr (N,): bias of the gate projection (EPI_HIDDEN, GATED), if HAS_BIAS2.
      z_ptr, zu_ptr (M, N) strides (stride_zm, stride_zn): pre-activations. EPI_HIDDEN writes
             them when STORE_Z (z = gate or sole projection, zu = up projection when GATED);
             EPI_DHIDDEN reads them.
      res_ptr (M, N) strides (stride_rm, stride_rn): residual added last in EPI_OUT and
             EPI_PLAIN, if HAS_RES (res may be c itself: C += A @ B).
      c_ptr, c2_ptr (M, N) strides (stride_cm, stride_cn): outputs. EPI_HIDDEN: hidden in c.
             EPI_DHIDDEN: dL/dz in c, and dL/dzu in c2 when GATED. Otherwise the result in c.
      db_ptr, db2_ptr (cdiv(M, BLOCK_M), N) float32 contiguous: EPI_DHIDDEN with BIAS_GRAD (1 write, 2 add to): each
             M-tile's column sums of dL/dz (and dL/dzu), summed over dim 0 for bias gradients.
    SEED: the int64 Philox key (`philox.seed_arg`), plus seed_offset; threshold (int, keep if a
      16-bit draw >= it), scale (1/(1-p)); used when HAS_DROPOUT. Element (i, j) is drawn as
      element (row0 + i, j) of the matrix, so a block of rows of a larger matrix (starting at row
      row0) draws that matrix's mask.
    Constexprs: EPI (EPI_* code), ACT (activation code), HAS_BIAS/HAS_BIAS2/GATED/HAS_K2/
      HAS_DROPOUT/HAS_RES/STORE_Z switch the pieces above; UPCAST computes the dot in float32
      (the interpreter's bf16 arithmetic is wrong); EVEN_K: K (and K2) are multiples of BLOCK_K,
      so the K-loop loads need no mask; BIAS_GRAD see db_ptr; PRECISION the float32 dot's
      input precision (`_fp32_dot_precision`; ignored for 16-bit inputs); BLOCK_M/N/K the tile;
      GROUP_M how many M-tiles share a sweep over N, so that B tiles stay in L2.
    """
    seed = load_seed(SEED, HAS_DROPOUT) + seed_offset
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped indices keep every load in bounds without a row/column mask; stores are masked.
    am = rm % M
    bn = rn % N
    rk = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_ptrs = a_ptr + am[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + bn[None, :] * stride_bn
    g_ptrs = b2_ptr + rk[:, None] * stride_b2k + bn[None, :] * stride_b2n
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            kmask = (rk + k0) < K
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if GATED:
            if EVEN_K:
                g = tl.load(g_ptrs)
            else:
                g = tl.load(g_ptrs, mask=kmask[:, None], other=0.0)
            if UPCAST:
                g = g.to(tl.float32)
            acc2 = tl.dot(a, g, acc2, input_precision=PRECISION)
            g_ptrs += BLOCK_K * stride_b2k
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_K2:
        a_ptrs = a2_ptr + am[:, None] * stride_a2m + rk[None, :] * stride_a2k
        b_ptrs = b2_ptr + rk[:, None] * stride_b2k + bn[None, :] * stride_b2n
        for k0 in range(0, K2, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                kmask = (rk + k0) < K2
                a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_a2k
            b_ptrs += BLOCK_K * stride_b2k

    out_ty = c_ptr.dtype.element_ty
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    c_off = rm[:, None] * stride_cm + rn[None, :] * stride_cn
    if HAS_DROPOUT:
        rows = rm.to(tl.int64) + row0
        col0 = pid_n * BLOCK_N
    if EPI == 1:  # EPI_HIDDEN
        if HAS_BIAS:
            acc += tl.load(bias_ptr + bn).to(tl.float32)[None, :]
        z_off = rm[:, None] * stride_zm + rn[None, :] * stride_zn
        if GATED:
            if HAS_BIAS2:
                acc2 += tl.load(bias2_ptr + bn).to(tl.float32)[None, :]
            zg = acc2.to(out_ty)
            zu = acc.to(out_ty)
            if STORE_Z:
                tl.store(z_ptr + z_off, zg, mask=mask)
                tl.store(zu_ptr + z_off, zu, mask=mask)
            h = _act(zg.to(tl.float32), ACT) * zu.to(tl.float32)
        else:
            zg = acc.to(out_ty)
            if STORE_Z:
                tl.store(z_ptr + z_off, zg, mask=mask)
            h = _act(zg.to(tl.float32), ACT)
        if HAS_DROPOUT:
            h = _dropout(h, seed, rows, col0, N, threshold, scale, BLOCK_M, BLOCK_N)
        tl.store(c_ptr + c_off, h.to(out_ty), mask=mask)
    elif EPI == 2:  # EPI_OUT
        if HAS_BIAS:
            acc += tl.load(bias_ptr + bn).to(tl.float32)[None, :]
        if HAS_DROPOUT:
            acc = _dropout(acc, seed, rows, col0, N, threshold, scale, BLOCK_M, BLOCK_N)
        if HAS_RES:
            r = tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :] * stride_rn, mask=mask)
            acc += r.to(tl.float32)
        tl.store(c_ptr + c_off, acc.to(out_ty), mask=mask)
    elif EPI == 3:  # EPI_DHIDDEN
        if HAS_DROPOUT:
            acc = _dropout(acc, seed, rows, col0, N, threshold, scale, BLOCK_M, BLOCK_N)
        z_off = rm[:, None] * stride_zm + rn[None, :] * stride_zn
        zg = tl.load(z_ptr + z_off, mask=mask, other=0.0).to(tl.float32)
        a_val, a_grad = _act_and_grad(zg, ACT)
        if GATED:
            zu = tl.load(zu_ptr + z_off, mask=mask, other=0.0).to(tl.float32)
            dz = (acc * zu * a_grad).to(out_ty)
            dzu = (acc * a_val).to(out_ty)
            tl.store(c2_ptr + c_off, dzu, mask=mask)
            if BIAS_GRAD:
                _store_partial(db2_ptr + pid_m * N + rn, tl.sum(tl.where(mask, dzu.to(tl.float32), 0.0), 0), rn < N,
                               BIAS_GRAD)
        else:
            dz = (acc * a_grad).to(out_ty)
        tl.store(c_ptr + c_off, dz, mask=mask)
        if BIAS_GRAD:  # sums of the rounded values, as dz.sum(0) would give
            _store_partial(db_ptr + pid_m * N + rn, tl.sum(tl.where(mask, dz.to(tl.float32), 0.0), 0), rn < N, BIAS_GRAD)
    else:  # EPI_PLAIN
        if HAS_BIAS:
            acc += tl.load(bias_ptr + bn).to(tl.float32)[None, :]
        if HAS_RES:
            r = tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :] * stride_rn, mask=mask)
            acc += r.to(tl.float32)
        tl.store(c_ptr + c_off, acc.to(out_ty), mask=mask)


def _fp32_dot_precision(dtype) -> str:
    """The GEMM kernel's PRECISION: ignored for 16-bit inputs. float32 follows torch's TF32 flag
    like the cuBLAS path, but where TF32 is allowed it takes three TF32 products ("tf32x3", about
    float32's accuracy): on the H100 one Triton TF32 product left float32 gradients through ReLU
    up to 2.7e-2 off float64 (3e-3 to 3e-2 over two draws), against 4e-4 for cuBLAS's TF32."""
    if dtype != torch.float32:
        return "tf32"  # Triton's default; no effect on 16-bit products
    return "tf32x3" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def gemm(
    a, b, *, epi=EPI_PLAIN, act=0, bias=None, b2=None, bias2=None, a2=None,
    z=None, zu=None, residual=None, out=None, out2=None,
    seed=None, seed_offset=0, p=0.0, row0=0, store_z=True, bias_grad=False, bias_partials=None,
    accumulate_partials=False, config=None,
):
    """Launch `_gemm_kernel`: out (M, N) = a (M, K) @ b (K, N), with the epilogue `epi`.

    a, b: any strides (pass `w.t()` for an nn.Linear weight w of shape (N, K)).
    epi=EPI_PLAIN: out = a @ b [+ a2 @ b2] [+ bias] [+ residual]; residual=out=c accumulates.
    epi=EPI_HIDDEN: z = a @ b + bias (or, with b2 = gate weight^T: z = a @ b2 + bias2 and
        zu = a @ b + bias); out = dropout(act(z) [* zu], p). z/zu are written when store_z.
    epi=EPI_OUT: out = dropout(a @ b + bias, p) + residual.
    epi=EPI_DHIDDEN: g = dropout(a @ b, p) with the forward mask; out = g * act'(z) [* zu];
        gated: out2 = g * act(z) (dL/dzu). Returns (out, out2 or None, db, db2): with bias_grad,
        db / db2 are the float32 column sums of out / out2 (bias gradients), else None.
    bias_partials: EPI_DHIDDEN only: (db, db2) float32 buffers of `bias_partial_rows(M, config)`
        rows to write the per-tile column sums into (db2 None unless gated); then nothing is
        summed here (db, db2 come back None) and the caller sums every partial once. With
        accumulate_partials the sums are added to the buffers' contents (row blocks of one
        matrix share one buffer; a shorter block adds to its first rows).
    row0: the dropout counters are those of rows row0.. of a larger matrix (row blocks).
    seed: the dropout's seed, a 0-d int64 tensor on the device or an int (`philox.seed_arg`);
        seed_offset is added to it in the kernel (the output dropout draws with seed + 1).
    out/out2/z/zu: preallocated (M, N) outputs (any strides) or None to allocate contiguous ones.
    config: dict with BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages; num_stages is
        lowered where the pipeline's tiles would not fit in shared memory (float32, gated).
    Returns out, (out, z, zu) for EPI_HIDDEN, (out, out2, db, db2) for EPI_DHIDDEN.
    """
    M, K = a.shape
    N = b.shape[1]
    gated = epi in (EPI_HIDDEN, EPI_DHIDDEN) and (b2 is not None if epi == EPI_HIDDEN else zu is not None)
    has_k2 = epi == EPI_PLAIN and a2 is not None
    dev, dt = a.device, a.dtype
    if out is None:
        out = torch.empty(M, N, device=dev, dtype=dt)
    if epi == EPI_HIDDEN and store_z:
        if z is None:
            z = torch.empty(M, N, device=dev, dtype=dt)
        if gated and zu is None:
            zu = torch.empty(M, N, device=dev, dtype=dt)
    if epi == EPI_DHIDDEN and gated and out2 is None:
        out2 = torch.empty(M, N, device=dev, dtype=dt)
    cfg = config
    dummy = out
    zt = z if z is not None else dummy
    zut = zu if zu is not None else dummy
    rt = residual if residual is not None else dummy
    a2t = a2 if a2 is not None else a
    b2t = b2 if b2 is not None else b
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    db, db2 = bias_partials if (epi == EPI_DHIDDEN and bias_partials is not None) else (None, None)
    if epi == EPI_DHIDDEN and bias_grad and bias_partials is None:
        db = torch.empty(cdiv(M, cfg["BLOCK_M"]), N, device=dev, dtype=torch.float32)
        db2 = torch.empty_like(db) if gated else None
    stages = cfg["num_stages"]
    tile_bytes = (cfg["BLOCK_M"] + (2 if gated else 1) * cfg["BLOCK_N"]) * cfg["BLOCK_K"] * a.element_size()
    while stages > 1 and stages * tile_bytes > _SMEM_BUDGET:
        stages -= 1
    k2 = a2.shape[1] if has_k2 else 0
    even_k = K % cfg["BLOCK_K"] == 0 and k2 % cfg["BLOCK_K"] == 0
    _gemm_kernel[grid](
        a, b, a2t, b2t,
        bias if bias is not None else dummy, bias2 if bias2 is not None else dummy,
        zt, zut, rt,
        out, out2 if out2 is not None else dummy,
        db if db is not None else dummy, db2 if db2 is not None else dummy,
        M, N, K, k2,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        a2t.stride(0), a2t.stride(1), b2t.stride(0), b2t.stride(1),
        zt.stride(0), zt.stride(1), rt.stride(0), rt.stride(1), out.stride(0), out.stride(1),
        seed_arg(seed if p > 0.0 else None, out), int(seed_offset), dropout_threshold(p), dropout_scale(p), int(row0),
        EPI=epi, ACT=act,
        HAS_BIAS=bias is not None, HAS_BIAS2=bias2 is not None, GATED=gated, HAS_K2=has_k2,
        HAS_DROPOUT=p > 0.0, HAS_RES=residual is not None, STORE_Z=bool(store_z),
        UPCAST=interpreting() or dt == torch.float64, EVEN_K=even_k,
        BIAS_GRAD=0 if db is None else (2 if accumulate_partials else 1),
        PRECISION=_fp32_dot_precision(dt),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=stages,
    )
    if epi == EPI_HIDDEN:
        return out, z, zu
    if epi == EPI_DHIDDEN:
        if bias_partials is not None:
            return out, out2, None, None
        return out, out2, (db.sum(0) if db is not None else None), (db2.sum(0) if db2 is not None else None)
    return out


def bias_partial_rows(M: int, config: dict) -> int:
    """Rows of the float32 partial column sums that one backward epilogue over M rows writes
    (`bias_partials` of `gemm` and `hidden_epilogue`): one per tile row."""
    return cdiv(M, config["BLOCK_M"])


# ----------------------------------------------------------------------------------------------
# Elementwise epilogues, to pair with cuBLAS products
# ----------------------------------------------------------------------------------------------


@triton.jit
def _hidden_epilogue_kernel(
    z_ptr, zu_ptr, bias_ptr, bias2_ptr, g_ptr, out_ptr, out2_ptr, dbias_ptr, dbias2_ptr,
    M, N, stride_zm, stride_gm, stride_om,
    SEED, seed_offset, threshold, scale, row0,
    ACT: tl.constexpr, BACKWARD: tl.constexpr, GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BIAS2: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Elementwise hidden epilogue over (M, N) tiles; rows may be strided, columns contiguous.

    Pointers:
      z_ptr (M, N) row stride stride_zm: pre-activation of the (gate or sole) projection.
      zu_ptr (M, N) row stride stride_zm: up projection's pre-activation, when GATED.
      bias_ptr (N,): added to z (HAS_BIAS); bias2_ptr (N,): added to zu (HAS_BIAS2). When the
        product already holds its bias (cuBLAS addmm), pass none.
      g_ptr (M, N) row stride stride_gm: dL/dhidden, read in BACKWARD.
      out_ptr (M, N) row stride stride_om: forward: hidden = dropout(act(z)[* zu]);
        BACKWARD: dL/dz. out2_ptr: BACKWARD and GATED: dL/dzu. out may alias g (in place).
      dbias_ptr (cdiv(M, BLOCK_M), N) float32, contiguous: BACKWARD with BIAS_GRAD (1 write, 2 add to): per row-block
        column sums of dL/dz (sum them over dim 0 for the bias gradient); dbias2_ptr the same for
        dL/dzu. Summing inside the pass spares another read of a (M, N) tensor.
    SEED (+ seed_offset), threshold, scale: dropout, element (i, j) drawn as element (row0 + i, j).
    Constexprs: ACT activation code; BACKWARD picks the direction; GATED, HAS_BIAS, HAS_BIAS2,
      HAS_DROPOUT, BIAS_GRAD switch the pieces above; BLOCK_M x BLOCK_N the tile (BLOCK_N a
      multiple of 8: one Philox call covers 8 columns).
    """
    seed = load_seed(SEED, HAS_DROPOUT) + seed_offset
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # 64-bit row base as a scalar, 32-bit offsets inside the tile: the loads stay vectorized.
    m0 = pid_m.to(tl.int64) * BLOCK_M
    z_ptr += m0 * stride_zm
    zu_ptr += m0 * stride_zm
    g_ptr += m0 * stride_gm
    out_ptr += m0 * stride_om
    out2_ptr += m0 * stride_om
    lm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = ((lm + m0) < M)[:, None] & (rn < N)[None, :]
    z_off = lm[:, None] * stride_zm + rn[None, :]
    o_off = lm[:, None] * stride_om + rn[None, :]
    out_ty = out_ptr.dtype.element_ty
    z = tl.load(z_ptr + z_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        z = z.to(out_ty).to(tl.float32)
    if GATED:
        zu = tl.load(zu_ptr + z_off, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS2:
            zu += tl.load(bias2_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            zu = zu.to(out_ty).to(tl.float32)
    if HAS_DROPOUT:
        rows = lm + m0 + row0
    if BACKWARD:
        g = tl.load(g_ptr + lm[:, None] * stride_gm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            g = _dropout(g, seed, rows, pid_n * BLOCK_N, N, threshold, scale, BLOCK_M, BLOCK_N)
        a_val, a_grad = _act_and_grad(z, ACT)
        if GATED:
            dz = g * zu * a_grad
            dzu = g * a_val
            tl.store(out2_ptr + o_off, dzu.to(out_ty), mask=mask)
        else:
            dz = g * a_grad
        dz = dz.to(out_ty)
        tl.store(out_ptr + o_off, dz, mask=mask)
        if BIAS_GRAD:
            # Sum the rounded values, as a separate dz.sum(0) would.
            _store_partial(dbias_ptr + pid_m * N + rn, tl.sum(tl.where(mask, dz.to(tl.float32), 0.0), 0), rn < N,
                           BIAS_GRAD)
            if GATED:
                dzu = dzu.to(out_ty).to(tl.float32)
                _store_partial(dbias2_ptr + pid_m * N + rn, tl.sum(tl.where(mask, dzu, 0.0), 0), rn < N, BIAS_GRAD)
    else:
        h = _act(z, ACT)
        if GATED:
            h = h * zu
        if HAS_DROPOUT:
            h = _dropout(h, seed, rows, pid_n * BLOCK_N, N, threshold, scale, BLOCK_M, BLOCK_N)
        tl.store(out_ptr + o_off, h.to(out_ty), mask=mask)


def hidden_epilogue(
    z, *, act, zu=None, bias=None, bias2=None, grad=None, out=None, out2=None,
    seed=None, seed_offset=0, p=0.0, row0=0, bias_grad=False, bias_partials=None, accumulate_partials=False,
    config=None,
):
    """Forward: hidden = dropout(act(z + bias) [* (zu + bias2)], p).
    Backward (grad given, dL/dhidden): returns (dz, dzu or None, dbias or None, dbias2 or None),
    where dbias are column sums of dz / dzu (when bias_grad), computed in the same pass.
    bias_partials: (db, db2) float32 buffers of `bias_partial_rows(M, config)` rows to write the
    per-tile column sums into instead (db2 None unless gated); dbias then come back None.
    accumulate_partials: add to the buffers' contents instead of overwriting them.

    z, zu, grad, out, out2: (M, N) with contiguous rows (any row stride). out may be `grad` to
    write in place. row0: the rows are rows row0.. of a larger matrix (dropout counters).
    config: dict with BLOCK_M, BLOCK_N, num_warps.
    """
    M, N = z.shape
    cfg = config
    gated = zu is not None
    backward = grad is not None
    if out is None:
        out = torch.empty(M, N, device=z.device, dtype=z.dtype)
    if backward and gated and out2 is None:
        out2 = torch.empty(M, N, device=z.device, dtype=z.dtype)
    grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(N, cfg["BLOCK_N"]))
    db, db2 = bias_partials if (backward and bias_partials is not None) else (None, None)
    if backward and bias_grad and bias_partials is None:
        db = torch.empty(grid[0], N, device=z.device, dtype=torch.float32)
        db2 = torch.empty(grid[0], N, device=z.device, dtype=torch.float32) if gated else None
    dummy = out
    _launch_hidden_epilogue(
        grid,
        (z, zu if gated else dummy,
         bias if bias is not None else dummy, bias2 if bias2 is not None else dummy,
         grad if backward else dummy, out, out2 if out2 is not None else dummy,
         db if db is not None else dummy, db2 if db2 is not None else dummy,
         M, N, z.stride(0), grad.stride(0) if backward else 0, out.stride(0),
         seed_arg(seed if p > 0.0 else None, out), int(seed_offset), dropout_threshold(p), dropout_scale(p), int(row0)),
        (act, backward, gated, bias is not None, bias2 is not None, p > 0.0,
         0 if db is None else (2 if accumulate_partials else 1), cfg["BLOCK_M"], cfg["BLOCK_N"]),
        cfg["num_warps"],
    )
    if not backward:
        return out
    if bias_partials is not None:
        return out, out2, None, None
    return out, out2, (db.sum(0) if db is not None else None), (db2.sum(0) if db2 is not None else None)


@triton.jit
def _output_epilogue_kernel(
    y_ptr, bias_ptr, res_ptr, out_ptr, dbias_ptr,
    M, N, stride_ym, stride_rm, stride_om,
    SEED, seed_offset, threshold, scale, row0,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_RES: tl.constexpr, BIAS_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out = dropout(y + bias) + residual, elementwise over (M, N); columns contiguous.

    Pointers: y_ptr (M, N) row stride stride_ym; bias_ptr (N,) if HAS_BIAS; res_ptr (M, N) row
    stride stride_rm if HAS_RES; out_ptr (M, N) row stride stride_om (may alias y).
    SEED (+ seed_offset), threshold, scale: the dropout (element (i, j) drawn as (row0 + i, j)), if
    HAS_DROPOUT.
    Constexprs: HAS_BIAS, HAS_DROPOUT, HAS_RES switch the three steps; BLOCK_M x BLOCK_N the tile
    (BLOCK_N a multiple of 8: one Philox call covers 8 columns).
    In backward the same kernel with only HAS_DROPOUT gives dL/dy = dropout(dL/dout), and with
    BIAS_GRAD (1 write, 2 add to) the per-tile column sums of the stored values into dbias_ptr
    ((cdiv(M, BLOCK_M), N) float32, contiguous), as `_hidden_epilogue_kernel` does.
    """
    seed = load_seed(SEED, HAS_DROPOUT) + seed_offset
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m0 = pid_m.to(tl.int64) * BLOCK_M
    y_ptr += m0 * stride_ym
    res_ptr += m0 * stride_rm
    out_ptr += m0 * stride_om
    lm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = ((lm + m0) < M)[:, None] & (rn < N)[None, :]
    y = tl.load(y_ptr + lm[:, None] * stride_ym + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if HAS_DROPOUT:
        y = _dropout(y, seed, lm + m0 + row0, pid_n * BLOCK_N, N, threshold, scale, BLOCK_M, BLOCK_N)
    if HAS_RES:
        y += tl.load(res_ptr + lm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    y = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + lm[:, None] * stride_om + rn[None, :], y, mask=mask)
    if BIAS_GRAD:  # sums of the rounded values, as out.sum(0) would give
        _store_partial(dbias_ptr + pid_m * N + rn, tl.sum(tl.where(mask, y.to(tl.float32), 0.0), 0), rn < N, BIAS_GRAD)


def output_epilogue(y, *, bias=None, residual=None, out=None, seed=None, seed_offset=0, p=0.0, row0=0,
                    bias_partials=None, accumulate_partials=False, config=None):
    """out = dropout(y + bias, p) + residual; y, residual, out (M, N) with contiguous rows.
    out may be y (in place). row0: dropout counters of rows row0.. of a larger matrix.
    bias_partials: a float32 buffer of `bias_partial_rows(M, config)` rows that receives the
    per-tile column sums of out (added to its contents with accumulate_partials).
    config: dict with BLOCK_M, BLOCK_N, num_warps."""
    M, N = y.shape
    cfg = config
    if out is None:
        out = torch.empty_like(y)
    grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(N, cfg["BLOCK_N"]))
    _launch_output_epilogue(
        grid,
        (y, bias if bias is not None else y, residual if residual is not None else y, out,
         bias_partials if bias_partials is not None else out,
         M, N, y.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
         seed_arg(seed if p > 0.0 else None, out), int(seed_offset), dropout_threshold(p), dropout_scale(p), int(row0)),
        (bias is not None, p > 0.0, residual is not None,
         0 if bias_partials is None else (2 if accumulate_partials else 1), cfg["BLOCK_M"], cfg["BLOCK_N"]),
        cfg["num_warps"],
    )
    return out


# The epilogues pair with cuBLAS products in host-bound steps: launched without Triton's
# per-call binding (`KernelLauncher`).
_launch_hidden_epilogue = KernelLauncher(_hidden_epilogue_kernel)
_launch_output_epilogue = KernelLauncher(_output_epilogue_kernel)
