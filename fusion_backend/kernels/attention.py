"""Flash-style attention kernels for the tensor-core metrics: "dot", "l2" and "cosine".

One pass with an online softmax; the forward stores the row logsumexp and the backward recomputes
the probabilities from it (dK/dV in one kernel, dQ plus the scale and mask gradients in another),
so no Nq x Nk matrix ever reaches memory. Calls with a few query rows (decoding) take a split
forward instead: the keys are cut into ranges that run in parallel, each program takes every query
head of one kv head, and a second pass joins the ranges into the same output and row statistics.

Logits, with s the per-head scale (one fp32 value per query head):
    dot     s * q.k
    l2      -s * |q - k|^2  computed as  s * (2 q.k - |k|^2): |q|^2 is constant along a softmax row and
            cancels. q.k comes from the tensor cores with fp32 accumulation of exact bf16/fp16
            products, and |k|^2 is summed in fp32 from the loaded k, so neither term is rounded to
            the input dtype (the augmented-vector SDPA trick rounds |k|^2 and 2*s*q to bf16, which is
            where its error at large s comes from). The forward adds -|k|^2/2 to q.k in the tensor
            cores instead (KEXT), from three bf16 parts that carry its fp32 value
            (`l2_key_parts`); the backward kernels keep the FMA per score, which measured faster
            there.
    cosine  s * q^.k^  with q^ = q / max(|q|, eps) normalized in fp32 by a pre-pass (`_prepass`)
            and rounded once to the input dtype; the backward projects the gradient with the norms.
    dot, soft-capped (SOFTCAP, Gemma 2)  cap * tanh(s * q.k / cap), the mask added after the cap;
            tanh is built from exp2 (`_softcap`), so its derivative 1 - tanh^2 comes out without
            cancellation where the cap saturates.

Conventions shared by the kernels (and by `attention_l1`):
- Logits are handled in base 2 (multiplied by log2(e)) so the softmax uses exp2, except with a
  float mask (natural units, see `_logits`). The forward stores per row the max logit (natural
  units) and log2 of the row sum, apart (`_store_row_stats`); the backward recomputes the
  probabilities from them. A fully masked row stores max = +inf, so its probabilities recompute as
  0 and its output is 0 (the convention of torch's safe softmax).
- Masks: MASK_KIND 0 none, 1 bool (True = keep), 2 float (added to the logits). The mask pointer
  carries four strides over (B, H, Nq, Nk), 0 on broadcast dims. A bool mask shared by every
  batch and head comes with layout flags computed on the device (`mask_layout_flags`): blocks
  above the diagonal are skipped when it keeps nothing there, and an exact lower triangle runs
  the causal specialization, which never reads the mask (`mask_launches`). A mask of over 1M
  entries also gets, on the device, each query row's range of kept keys and its run of keys kept
  unchanged (`MaskRanges`; the same pass finds a shared bool mask's flags): the kernels visit only
  the blocks those ranges reach (sliding windows, packed documents, padding), and read the mask
  only in the blocks that are not inside every row's clean run, so the result is the same.
- Dropout: the keep mask of (b, h) is `kernels.philox`'s for an (Nq, Nk) matrix with seed
  seed + b*H + h, the seed read on the device (`philox.seed_arg`); kept values are scaled by
  1/(1-p) (once per output row, not per element). The backward regenerates the same mask.
- GQA: query head h reads key/value head h // GROUP.

Nothing here knows about FX or custom ops; `fusion_backend.ops.attention` wraps these launchers.
"""
import os
import re

import torch
import triton
import triton.language as tl

from .philox import dropout_threshold, effective_p, keep_mask, load_seed, seed_arg
from .runtime import KernelLauncher, cdiv, env_switch, interpreting, next_power_of_2

LOG2E = 1.4426950408889634
COSINE_EPS = 1e-12
METRICS_TC = ("dot", "l2", "cosine")
METRIC_IDS = {"dot": 0, "l2": 1, "cosine": 2, "l1": 3}
MAX_HEAD_DIM = 256
# Bits per dropout draw (see kernels.philox): 16 rounds p to a multiple of 2**-16; 8, as
# FlashAttention does, to a multiple of 2**-8 for fewer Philox calls. Read once, at import.
def _dropout_bits(value: str) -> int:
    """TRUTHFUSE_ATTENTION_DROPOUT_BITS: unset or empty is 16, as for the other TRUTHFUSE_ variables;
    anything but 8 or 16 stops the import with an error naming both (int('') and int('abc') raised
    "invalid literal for int()", which named neither the variable nor its values)."""
    value = value.strip()
    if not value:
        return 16
    if value not in ("8", "16"):
        raise ValueError(f"TRUTHFUSE_ATTENTION_DROPOUT_BITS must be 8 or 16, got {value!r}")
    return int(value)


DROPOUT_BITS = _dropout_bits(os.environ.get("TRUTHFUSE_ATTENTION_DROPOUT_BITS", ""))

# Rows of the kept ranges a dK/dV program scans at a time (`_query_range`): the scan is a few
# percent of a skipping dK/dV kernel on an H100, 2048 rows 1-4% faster than 1024 (packed documents,
# windows, HF's causal mask) where 4096 was 2% slower on the causal mask (docs/performance.md)
QUERY_SCAN_ROWS = 2048
# l2's per-key term -|k|^2/2 as a sum of L2_KEY_PARTS values in the tensor cores' input dtype (bf16:
# 3 x 8 bits hold fp32's 24), in rows of L2_PARTS_WIDTH (the narrowest product width) zero-padded:
# one more small product adds it to q.k instead of an FMA per score (`l2_key_parts`).
L2_KEY_PARTS = tl.constexpr(3)
L2_PARTS_WIDTH = tl.constexpr(16)


# ----------------------------------------------------------------------------------------------
# Shared jit helpers (also used by attention_l1)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _kernel_scale(scale, MASK_KIND: tl.constexpr):
    """The factor that turns raw scores into the kernels' logit units (see `_logits`)."""
    if MASK_KIND == 2:
        return scale
    else:
        return scale * 1.4426950408889634


@triton.jit
def _apply_mask(s, mask_ptr, rows, cols, s_r, s_c, N_R, N_C, MASK_KIND: tl.constexpr, clean):
    """Apply the user mask to a logit tile: a bool mask sets dropped entries to -inf, a float mask
    is added. rows / cols: index tensors that broadcast against s (offs_r[:, None] and
    offs_c[None, :] for a 2-d tile; queries and keys, or keys and queries for a transposed tile,
    with s_r/s_c and N_R/N_C to match). clean: the mask keeps the whole tile unchanged (its
    `MaskRanges` clean run), so it is not read at all; a constant, or a flag computed per tile (then
    the read is branched around)."""
    if MASK_KIND != 0 and clean == 0:
        mptr = mask_ptr + rows * s_r + cols * s_c
        inb = (rows < N_R) & (cols < N_C)
        if MASK_KIND == 1:
            keep = tl.load(mptr, mask=inb, other=0) != 0
            s = tl.where(keep, s, float("-inf"))
        else:
            s = s + tl.load(mptr, mask=inb, other=0.0).to(tl.float32)
    return s


@triton.jit
def _logits(raw, scale_k, mask_ptr, smm, smn, rows, cols, N_Q, N_K,
            MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, EVEN_N: tl.constexpr, clean=False):
    """Logits of one tile: raw * scale_k, plus the mask, with causal and out-of-range keys set to
    -inf. `mask_ptr` already points at this (batch, head). rows / cols: query and key indices
    that broadcast against raw (offs_m[:, None] and offs_n[None, :] for a [BLOCK_M, BLOCK_N] tile).

    Units: base 2 (scale_k = scale * log2(e)) except with a float mask (MASK_KIND 2), where they
    are natural (scale_k = scale, the mask added as is): finfo.min * log2(e) overflows to -inf, which
    would turn an eager-uniform, finfo.min-padded row into a fully masked one. `_exp_rel` and
    `_probs` undo the units. clean: see `_apply_mask`."""
    s = _apply_mask(raw * scale_k, mask_ptr, rows, cols, smm, smn, N_Q, N_K, MASK_KIND, clean)
    if CAUSAL:
        s = tl.where(cols <= rows, s, float("-inf"))
    if not EVEN_N:
        s = tl.where(cols < N_K, s, float("-inf"))
    return s


@triton.jit
def _logits_t(rawT, scale_k, mask_ptr, smm, smn, offs_m, offs_n, N_Q, N_K,
              MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, clean=False):
    """`_logits` for a transposed [BLOCK_N, BLOCK_M] tile (keys along rows). Out-of-range key rows
    are left finite: the dK/dV kernel never stores them and they feed nothing else."""
    s = _apply_mask(rawT * scale_k, mask_ptr, offs_n[:, None], offs_m[None, :], smn, smm, N_K, N_Q, MASK_KIND,
                    clean)
    if CAUSAL:
        s = tl.where(offs_n[:, None] <= offs_m[None, :], s, float("-inf"))
    return s


@triton.jit
def _exp_rel(x, MASK_KIND: tl.constexpr):
    """exp(x) for a logit difference x in the kernels' units."""
    if MASK_KIND == 2:
        return tl.math.exp2(x * 1.4426950408889634)
    else:
        return tl.math.exp2(x)


@triton.jit
def _store_row_stats(STATS_M, STATS_L, bh, offs_m, N_Q, m_i, l_i, MASK_KIND: tl.constexpr):
    """Store the row max (natural units, +inf for a fully masked row) and log2 of the row sum.
    Kept apart, not as one logsumexp: for a row whose logits all sit near a huge finite negative
    (padding masks), m + log(l) rounds to m and the backward's probabilities would sum to l.
    In base-2 units the max goes to natural units and back (`_load_row_stats`), which rounds: by
    up to an ulp of the max, so at logits near 1e4 the top key's recomputed probability was 1.003,
    not 1, and dV 1e-2 off (6.7e9 at 1e8). What the round trip loses is added to the stored log2
    of the row sum (it is exact: the two are within a factor 2), so the backward reads the max
    back as the forward had it."""
    empty = l_i == 0.0
    log2l = tl.math.log2(tl.where(empty, 1.0, l_i))
    if MASK_KIND == 2:
        m_nat = m_i
    else:
        m_nat = m_i * 0.6931471805599453
        lost = m_i - m_nat * 1.4426950408889634
        log2l += tl.where(lost == lost, lost, 0.0)  # 0 for an empty row's -inf and an inf max
    tl.store(STATS_M + bh * N_Q + offs_m, tl.where(empty, float("inf"), m_nat), mask=offs_m < N_Q)
    tl.store(STATS_L + bh * N_Q + offs_m, log2l, mask=offs_m < N_Q)


@triton.jit
def _load_row_stats(STATS_M, STATS_L, bh, offs_m, N_Q, MASK_KIND: tl.constexpr):
    """(a, b) for `_probs`: with a float mask the row max (natural units) and log2 of the row sum;
    otherwise the base-2 logsumexp and 0. Rows past N_Q read as fully masked."""
    m = tl.load(STATS_M + bh * N_Q + offs_m, mask=offs_m < N_Q, other=float("inf"))
    log2l = tl.load(STATS_L + bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
    if MASK_KIND == 2:
        return m, log2l
    else:
        return m * 1.4426950408889634 + log2l, log2l * 0.0


@triton.jit
def _probs(s, a, b, MASK_KIND: tl.constexpr):
    """Softmax probabilities recomputed from logits s and row stats (a, b) of `_load_row_stats`
    (already broadcast to s's shape)."""
    if MASK_KIND == 2:
        return tl.math.exp2((s - a) * 1.4426950408889634 - b)
    else:
        return tl.math.exp2(s - a)


@triton.jit
def _softcap(raw, cap_in):
    """(tanh(raw * cap_in), 1 - tanh^2) for soft-capped logits (cap_in = scale / cap), from one exp2:
    with r = 2 / (1 + e^(2x)), tanh x = 1 - r and 1 - tanh^2 = r * (2 - r). Saturates to +-1 (and a
    derivative of 0) for large |x| instead of overflowing; near 0 tanh is off by ~1e-7 absolute, i.e.
    cap * 1e-7 in the logit."""
    r = 2.0 / (1.0 + tl.math.exp2(raw * (cap_in * 2.8853900817779268)))
    return 1.0 - r, r * (2.0 - r)


@triton.jit
def _key_range(RANGES, base, plane, offs_m, N_Q, N_K, BLOCK_N: tl.constexpr):
    """[lo, hi) of the keys that the query rows offs_m keep anywhere, from the mask's row ranges
    (`MaskRanges`; base: this (b, h)'s offset), lo rounded down to a multiple of BLOCK_N; empty
    when none keeps anything. Then [clean_lo, clean_hi), the keys that every one of the rows keeps
    unchanged (empty when one of them has no clean run)."""
    lo = tl.min(tl.load(RANGES + base + offs_m, mask=offs_m < N_Q, other=N_K), axis=0)
    hi = tl.max(tl.load(RANGES + plane + base + offs_m, mask=offs_m < N_Q, other=0), axis=0)
    clean_lo, clean_hi = _shared_clean_run(RANGES, base, plane, offs_m, N_Q, N_K)
    return (lo // BLOCK_N) * BLOCK_N, hi, clean_lo, clean_hi


@triton.jit
def _shared_clean_run(RANGES, base, plane, offs_m, N_Q, N_K):
    """[clean_lo, clean_hi): the keys that every query row offs_m keeps unchanged, from the rows'
    clean runs (`MaskRanges`); empty when one of them has none. Rows past N_Q do not count."""
    rows_in = offs_m < N_Q
    clean_lo = tl.max(tl.load(RANGES + 2 * plane + base + offs_m, mask=rows_in, other=0), axis=0)
    clean_hi = tl.min(tl.load(RANGES + 3 * plane + base + offs_m, mask=rows_in, other=N_K), axis=0)
    return clean_lo, clean_hi


@triton.jit
def _span_bounds(span: tl.constexpr, lo, c0, c1, hi):
    """Bounds of span 0, 1 or 2 of a loop over [lo, hi) split at c0 <= c1: [lo, c0) reads the mask,
    [c0, c1) holds the clean tiles, [c1, hi) reads the mask again. One span: c0 = hi."""
    if span == 0:
        return lo, c0
    elif span == 1:
        return c0, c1
    else:
        return c1, hi


@triton.jit
def _clean_span(lo, hi, clean_lo, clean_hi, BLOCK: tl.constexpr):
    """[c0, c1): the tiles of a loop over [lo, hi) in steps of BLOCK (lo a multiple of BLOCK) that
    lie inside the clean run [clean_lo, clean_hi), as a middle span: lo <= c0 <= c1 <= hi."""
    c0 = tl.minimum(lo + ((tl.maximum(clean_lo - lo, 0) + BLOCK - 1) // BLOCK) * BLOCK, hi)
    c1 = tl.minimum(c0 + (tl.maximum(clean_hi - c0, 0) // BLOCK) * BLOCK, hi)
    return c0, c1


@triton.jit
def _query_range(RANGES, base, plane, key_lo, key_hi, N_Q, N_K, BLOCK_M: tl.constexpr, SCAN_ROWS: tl.constexpr):
    """[lo, hi) of the query rows whose kept range meets keys [key_lo, key_hi), scanning every
    row's range (a few KB from L2 per key block) SCAN_ROWS rows at a time, lo rounded down to a
    multiple of BLOCK_M."""
    q_lo = N_Q
    q_hi = 0
    for start in range(0, N_Q, SCAN_ROWS):
        rows = start + tl.arange(0, SCAN_ROWS)
        lo = tl.load(RANGES + base + rows, mask=rows < N_Q, other=N_K)
        hi = tl.load(RANGES + plane + base + rows, mask=rows < N_Q, other=0)
        meets = (lo < key_hi) & (hi > key_lo)
        q_lo = tl.minimum(q_lo, tl.min(tl.where(meets, rows, N_Q), axis=0))
        q_hi = tl.maximum(q_hi, tl.max(tl.where(meets, rows + 1, 0), axis=0))
    return (q_lo // BLOCK_M) * BLOCK_M, q_hi


@triton.jit
def _tile_is_clean(start, clean_lo, clean_hi, BLOCK: tl.constexpr):
    """Whether keys [start, start + BLOCK) lie inside the clean run [clean_lo, clean_hi)."""
    return (start >= clean_lo) & (start + BLOCK <= clean_hi)


@triton.jit
def _query_block_clean(RANGES, base, plane, offs_m, N_Q, N_K, key_lo, BLOCK_N: tl.constexpr):
    """For the dK/dV kernel: whether every query row offs_m keeps keys [key_lo, key_lo + BLOCK_N)
    unchanged (rows past N_Q do not count)."""
    c_lo, c_hi = _shared_clean_run(RANGES, base, plane, offs_m, N_Q, N_K)
    return _tile_is_clean(key_lo, c_lo, c_hi, BLOCK_N)


@triton.jit
def _query_program(H, GROUP, WIDE: tl.constexpr):
    """(pid_m, bh, b, h, hk) of a program that owns one query block of one (b, h): grid
    (cdiv(Nq, BLOCK_M), B * H); hk is the kv head that h reads. WIDE (`wide_offsets`): bh, b, h
    and hk are int64, so that the slice bases built from them (b * stride_b, bh * N * D) do not
    wrap in 32 bits; offsets within a slice stay int32 (`ops.attention` keeps slices below 2**31)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    if WIDE:
        bh = bh.to(tl.int64)
    h = bh % H
    return pid_m, bh, bh // H, h, h // GROUP


@triton.jit
def _key_program(HKV, WIDE: tl.constexpr):
    """(pid_n, bhk, b, hk) of a program that owns one key block of one (b, kv head): grid
    (cdiv(Nk, BLOCK_N), B * Hkv); int64 with WIDE, as in `_query_program`."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    if WIDE:
        bhk = bhk.to(tl.int64)
    return pid_n, bhk, bhk // HKV, bhk % HKV


@triton.jit
def _group_head(b, hk, g, H, GROUP, SCALE, MASK_KIND: tl.constexpr):
    """(h, bh, scale, scale_k) of the g-th query head that kv head hk serves, in a key-block program:
    its index, its (b, h) row, its scale and that scale in the kernels' logit units."""
    h = hk * GROUP + g
    scale = tl.load(SCALE + h)
    return h, b * H + h, scale, _kernel_scale(scale, MASK_KIND)


@triton.jit
def _store_dv(DV, bhk, offs_n, offs_dv, dv_acc, N_K, dropout_p, HEAD_DIM_V: tl.constexpr, DROPOUT: tl.constexpr):
    """Store a key-block program's dV ((B, Hkv, Nk, Dv) contiguous, DV's dtype), taking the
    dropout's 1/(1-p) once here rather than per probability."""
    if DROPOUT:
        dv_acc = dv_acc * (1.0 / (1.0 - dropout_p))
    ptrs = DV + bhk * N_K * HEAD_DIM_V + offs_n[:, None] * HEAD_DIM_V + offs_dv[None, :]
    tl.store(ptrs, dv_acc.to(DV.dtype.element_ty), mask=(offs_n[:, None] < N_K) & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _idle_launch(MASK_FLAGS, RUN_IF: tl.constexpr):
    """Whether this program belongs to the launch of a pair that does not compute: a shared bool
    mask gets two launches (RUN_IF 1: the causal specialization, 2: the one that reads the mask),
    and MASK_FLAGS, computed on the device, decides which one works (`mask_launches`)."""
    if RUN_IF == 1:
        return tl.load(MASK_FLAGS) != 3
    elif RUN_IF == 2:
        return tl.load(MASK_FLAGS) == 3
    else:
        return False


@triton.jit
def _key_end(pid_m, N_K, MASK_FLAGS, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """One past the last key that query block pid_m must visit: N_K, or the end of its diagonal
    block when nothing above the diagonal is kept: causal, or a bool mask for which the launcher
    found that (bit 1 of the int32 MASK_FLAGS, see `mask_layout_flags`)."""
    diag = tl.minimum(N_K, (pid_m + 1) * BLOCK_M)
    if CAUSAL:
        return diag
    elif MASK_KIND == 1:
        return tl.where((tl.load(MASK_FLAGS) & 1) != 0, diag, N_K)
    else:
        return N_K


@triton.jit
def _query_start(pid_n, MASK_FLAGS, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """First query (a multiple of BLOCK_M) that key block pid_n must visit; see `_key_end`."""
    diag = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    if CAUSAL:
        return diag
    elif MASK_KIND == 1:
        return tl.where((tl.load(MASK_FLAGS) & 1) != 0, diag, 0)
    else:
        return 0


@triton.jit
def _dropout_keep(seed, bh, offs_m, col0, N_K, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  DROP_BITS: tl.constexpr):
    """Bool [BLOCK_M, BLOCK_N] tile for queries offs_m and keys col0.. (col0 a multiple of 8):
    which probabilities survive dropout. A function of (seed + b*H + h, i, j) only, so forward and
    backward agree for any blocking."""
    return keep_mask(seed + bh, offs_m, col0, N_K, threshold, BLOCK_M, BLOCK_N, DROP_BITS)


@triton.jit
def _load_rows(ptr, offs_r, offs_c, stride_r, stride_c, N_R, N_C: tl.constexpr,
               EVEN_R: tl.constexpr, EVEN_C: tl.constexpr):
    """Load a [R, C_PAD] tile (rows offs_r, cols offs_c), zero outside N_R rows / N_C cols."""
    ptrs = ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    if EVEN_R and EVEN_C:
        return tl.load(ptrs)
    elif EVEN_R:
        return tl.load(ptrs, mask=offs_c[None, :] < N_C, other=0.0)
    elif EVEN_C:
        return tl.load(ptrs, mask=offs_r[:, None] < N_R, other=0.0)
    else:
        return tl.load(ptrs, mask=(offs_r[:, None] < N_R) & (offs_c[None, :] < N_C), other=0.0)


@triton.jit
def _normalize_grad(g, xh, nrm):
    """Gradient through x -> x / max(|x|, eps), given the gradient g w.r.t. the normalized rows."""
    proj = tl.sum(xh * g, axis=1)
    return tl.where(nrm[:, None] > 1e-12, (g - xh * proj[:, None]) / nrm[:, None], g / nrm[:, None])


@triton.jit
def _add_key_parts(qk, parts_base, offs_n, N_K, EVEN_N: tl.constexpr, DOT_PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    """qk [BLOCK_M, BLOCK_N] + (-|k_j|^2 / 2) for each key j, added by the tensor cores from the
    key parts at parts_base ((Nk, L2_PARTS_WIDTH) rows, `l2_key_parts`) times a tile of ones: l2's
    raw score in half units, with no per-score arithmetic. Parts past N_K read as 0."""
    cols = tl.arange(0, L2_PARTS_WIDTH)
    parts = _load_rows(parts_base, offs_n, cols, L2_PARTS_WIDTH, 1, N_K, L2_PARTS_WIDTH, EVEN_N, True)
    ones = tl.zeros([BLOCK_M, L2_PARTS_WIDTH], tl.float32) + tl.where(cols < L2_KEY_PARTS, 1.0, 0.0)[None, :]
    return tl.dot(ones.to(parts.dtype), tl.trans(parts), qk, input_precision=DOT_PREC)


@triton.jit
def _softmax_step(s, raw, m_i, l_i, r_i, acc, MASK_KIND: tl.constexpr, STATS: tl.constexpr):
    """One key tile of the online softmax: fold logits s (and, when STATS, E_p[raw]) into the row
    max m_i, row sum l_i and r_i, and rescale the output accumulator acc to the new max. Returns
    the tile's unnormalized probabilities p with the updated m_i, l_i, r_i, acc."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = _exp_rel(s - m_safe[:, None], MASK_KIND)
    alpha = _exp_rel(m_i - m_safe, MASK_KIND)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if STATS:
        r_i = r_i * alpha + tl.sum(p * raw, axis=1)
    return p, m_new, l_i, r_i, acc * alpha[:, None]


@triton.jit
def _sink_logit(SINKS, h, MASK_KIND: tl.constexpr):
    """Head h's sink logit (h: a scalar or one per row) in the kernels' logit units."""
    sink = tl.load(SINKS + h)
    if MASK_KIND != 2:
        sink = sink * 1.4426950408889634
    return sink


@triton.jit
def _softmax_start(SINKS, h, BLOCK_M: tl.constexpr, DV_PAD: tl.constexpr, MASK_KIND: tl.constexpr,
                   SINK: tl.constexpr):
    """(m_i, l_i, r_i, acc) before a row block's first key tile: empty, or, with SINK, the head's
    sink as the first key seen (max = its logit, sum = exp(0)), so the row stats include it."""
    if SINK:
        m_i = tl.full([BLOCK_M], 0.0, tl.float32) + _sink_logit(SINKS, h, MASK_KIND)
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    return m_i, l_i, tl.zeros([BLOCK_M], tl.float32), tl.zeros([BLOCK_M, DV_PAD], tl.float32)


@triton.jit
def _fwd_epilogue(acc, m_i, l_i, r_i, OUT, RBAR, STATS_M, STATS_L, b, h, bh, offs_m, offs_dv, sob, soh, som, sod,
                  N_Q, HEAD_DIM_V: tl.constexpr, MASK_KIND: tl.constexpr):
    """Normalize and store one query block's output, E_p[raw] and row stats."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(RBAR + bh * N_Q + offs_m, r_i / tl.where(empty, 1.0, l_i), mask=offs_m < N_Q)
    _store_row_stats(STATS_M, STATS_L, bh, offs_m, N_Q, m_i, l_i, MASK_KIND)
    o_ptrs = OUT + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=(offs_m[:, None] < N_Q) & (offs_dv[None, :] < HEAD_DIM_V))


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_step(start_n, q, m_i, l_i, r_i, acc, k_base, v_base, kvec_base, mask_base, skn, skd, svn, svd, smm, smn,
              offs_m, offs_d, offs_dv, N_Q, N_K, scale, scale_k, cap, seed, bh, threshold,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
              METRIC: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
              STATS: tl.constexpr, EVEN_N: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, DROP_BITS: tl.constexpr, SOFTCAP: tl.constexpr, CLEAN: tl.constexpr,
              KEXT: tl.constexpr = False):
    """One key tile of `_attn_fwd_kernel`, from key start_n: returns the updated m_i, l_i, r_i, acc.
    CLEAN: the tile lies in the clean run of every row, so the mask is not read. KEXT: l2's raw
    is in half units, q.k - |k|^2/2, the second term from the key parts at kvec_base
    (`_add_key_parts`); scale_k is then twice the scale's."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(k_base, offs_n, offs_d, skn, skd, N_K, HEAD_DIM, EVEN_N, HEAD_DIM == D_PAD)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if METRIC == 1 and KEXT:
        raw = _add_key_parts(qk, kvec_base, offs_n, N_K, EVEN_N, DOT_PREC, BLOCK_M)
    elif METRIC == 1:
        kn = tl.load(kvec_base + offs_n, mask=offs_n < N_K, other=0.0)
        raw = 2.0 * qk - kn[None, :]
    elif SOFTCAP:
        raw, _ = _softcap(qk, scale / cap)
    else:
        raw = qk
    s = _logits(raw, scale_k, mask_base, smm, smn, offs_m[:, None], offs_n[None, :], N_Q, N_K, MASK_KIND, CAUSAL,
                EVEN_N, CLEAN)
    p, m_i, l_i, r_i, acc = _softmax_step(s, raw, m_i, l_i, r_i, acc, MASK_KIND, STATS)
    if DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m, start_n, N_K, threshold, BLOCK_M, BLOCK_N, DROP_BITS)
        p = tl.where(keep, p, 0.0)
    v = _load_rows(v_base, offs_n, offs_dv, svn, svd, N_K, HEAD_DIM_V, EVEN_N, HEAD_DIM_V == DV_PAD)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return m_i, l_i, r_i, acc


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, SCALE, KVEC, MASK, MASK_FLAGS, OUT, STATS_M, STATS_L, RBAR, SINKS,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smh, smm, smn,
    sob, soh, som, sod,
    H, N_Q, N_K, GROUP, SEED, dropout_p, threshold, cap, RANGES, rgb, rgh, rg_plane,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    METRIC: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    STATS: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RUN_IF: tl.constexpr = 0,
    DROP_BITS: tl.constexpr = 16, SOFTCAP: tl.constexpr = False, SKIP: tl.constexpr = False,
    SINK: tl.constexpr = False, WIDE: tl.constexpr = False, KEXT: tl.constexpr = False,
):
    """Forward of dot / l2 / cosine attention for one block of BLOCK_M queries of one (b, h).

    Grid: (cdiv(Nq, BLOCK_M), B * H).
    Q:     (B, H, Nq, D) strides sq*;  K: (B, Hkv, Nk, D) strides sk*;  V: (B, Hkv, Nk, Dv) sv*.
    SCALE: (H,) fp32, the per-head scale s.
    KVEC:  (B*Hkv, Nk) fp32: |k|^2 for l2 (summed in fp32 from the un-rounded k); unused otherwise.
           With KEXT, l2's (B*Hkv, Nk, L2_PARTS_WIDTH) key parts instead (`l2_key_parts`).
           For cosine, Q and K arrive already normalized (`_prepass`), so the kernel is the dot one.
    MASK:  (B, H, Nq, Nk) broadcast view, strides sm* (0 on broadcast dims); unused if MASK_KIND 0.
    MASK_FLAGS: int32 flags of a bool mask's layout (`mask_layout_flags`): skip or triangle-test.
    OUT:   (B, H, Nq, Dv) strides so*, written in OUT's dtype.
    STATS_M, STATS_L: (B*H, Nq) fp32 contiguous, see `_store_row_stats`.
    RBAR:  (B*H, Nq) fp32: E_p[raw] per row when STATS (else 0). The backward centres the scale
           gradient on it: sum_j dS_ij = 0, so subtracting it changes nothing exactly but removes
           the cancellation that bf16 rounding of O (through delta) would otherwise expose.
    GROUP: H // Hkv.  SEED (the int64 seed, `philox.seed_arg`), dropout_p: see the module docstring.
    cap:   the soft cap (fp32, > 0) when SOFTCAP (dot only, no STATS): logits cap * tanh(s * q.k / cap).
    RANGES, rgb, rgh, rg_plane: the mask's per-row key ranges (`MaskRanges.args()`); with
           SKIP the program visits only the key blocks its rows keep anything in.
    SINKS: (H,) fp32 when SINK: each head's sink logit, one more key with no value that every row's
           softmax sums over (GPT-OSS); the online softmax starts from it. The row stats include
           it, so the backward kernels need nothing more.
    Constexprs: HEAD_DIM/HEAD_DIM_V the true head dims, D_PAD/DV_PAD their powers of two (>= 16);
    METRIC 0 dot, 1 l2, 2 cosine; MASK_KIND 0/1/2; CAUSAL top-left triangle; DROPOUT on/off;
    EVEN_M/EVEN_N whether Nq/Nk are multiples of the blocks (skip bounds checks);
    DOT_PREC tl.dot input precision ("ieee" for fp32 inputs); BLOCK_M/BLOCK_N the tile.
    """
    seed = load_seed(SEED, DROPOUT)
    if _idle_launch(MASK_FLAGS, RUN_IF):
        return
    pid_m, bh, b, h, hk = _query_program(H, GROUP, WIDE)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    scale = tl.load(SCALE + h)
    if SOFTCAP:  # the logits are cap * t: scale the tanh by cap in the kernel's units
        scale_k = _kernel_scale(cap, MASK_KIND)
    else:
        scale_k = _kernel_scale(scale, MASK_KIND)
        if METRIC == 1 and KEXT:  # raw scores in half units: twice the factor, exactly
            scale_k = scale_k * 2.0

    q = _load_rows(Q + b * sqb + h * sqh, offs_m, offs_d, sqm, sqd, N_Q, HEAD_DIM, EVEN_M, HEAD_DIM == D_PAD)
    kvec_base = KVEC + (b * (H // GROUP) + hk) * N_K * (L2_PARTS_WIDTH if KEXT else 1)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    mask_base = MASK + b * smb + h * smh

    m_i, l_i, r_i, acc = _softmax_start(SINKS, h, BLOCK_M, DV_PAD, MASK_KIND, SINK)
    hi = _key_end(pid_m, N_K, MASK_FLAGS, MASK_KIND, CAUSAL, BLOCK_M)
    lo = 0
    c0 = hi
    c1 = hi
    if SKIP:
        lo, kept_end, clean_lo, clean_hi = _key_range(RANGES, b * rgb + h * rgh, rg_plane, offs_m, N_Q, N_K,
                                                      BLOCK_N)
        hi = tl.minimum(hi, kept_end)
        c0, c1 = _clean_span(lo, hi, clean_lo, clean_hi, BLOCK_N)
    for span in tl.static_range(1 + 2 * SKIP):  # with ranges: masked, clean, masked
        span_lo, span_hi = _span_bounds(span, lo, c0, c1, hi)
        for start_n in range(span_lo, span_hi, BLOCK_N):
            m_i, l_i, r_i, acc = _fwd_step(
                start_n, q, m_i, l_i, r_i, acc, k_base, v_base, kvec_base, mask_base, skn, skd, svn, svd, smm, smn,
                offs_m, offs_d, offs_dv, N_Q, N_K, scale, scale_k, cap, seed, bh, threshold, HEAD_DIM, HEAD_DIM_V,
                D_PAD, DV_PAD, METRIC, MASK_KIND, CAUSAL, DROPOUT, STATS, EVEN_N, DOT_PREC, BLOCK_M, BLOCK_N,
                DROP_BITS, SOFTCAP, span == 1, KEXT)
    if DROPOUT:  # kept probabilities scale by 1/(1-p): once per row here, not per element above
        acc = acc * (1.0 / (1.0 - dropout_p))
    if METRIC == 1 and KEXT:  # E_p[raw] in whole units, as every reader of RBAR takes it
        r_i = r_i * 2.0
    _fwd_epilogue(acc, m_i, l_i, r_i, OUT, RBAR, STATS_M, STATS_L, b, h, bh, offs_m, offs_dv, sob, soh, som, sod,
                  N_Q, HEAD_DIM_V, MASK_KIND)


# ----------------------------------------------------------------------------------------------
# Forward for a few query rows against many keys (decoding): split over the keys
# ----------------------------------------------------------------------------------------------
@triton.jit
def _l1_columns(q_rows, sqd, k_base, offs_n, skn, skd, N_K, HEAD_DIM: tl.constexpr, EVEN_N: tl.constexpr):
    """sum_d |q_d - k_d| in fp32 for query rows at pointers q_rows (each in bounds) and keys offs_n,
    one head-dim column of each a step: with 16 or more packed rows this beat the chunked tiles of
    `_l1_split_step` on an H100 (the columns are short, and K's come from L1)."""
    dist = tl.zeros([q_rows.shape[0], offs_n.shape[0]], tl.float32)
    for d in tl.range(0, HEAD_DIM, loop_unroll_factor=4):
        qc = tl.load(q_rows + d * sqd).to(tl.float32)
        if EVEN_N:
            kc = tl.load(k_base + offs_n * skn + d * skd).to(tl.float32)
        else:
            kc = tl.load(k_base + offs_n * skn + d * skd, mask=offs_n < N_K, other=0.0).to(tl.float32)
        dist += tl.abs(qc[:, None] - kc[None, :])
    return dist


@triton.jit
def _l1_split_step(start_n, q_rows, sqd, m_i, l_i, r_i, acc, k_base, v_base, mask_base, skn, skd, svn, svd, smm, smn,
                   offs_i, offs_dv, N_Q, N_K, scale_k, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                   DV_PAD: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, EVEN_N: tl.constexpr,
                   DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_CHUNK: tl.constexpr,
                   L1_UNROLL: tl.constexpr):
    """One key tile of the split forward for L1 logits, -sum_d |q_d - k_d| in fp32 from q and k in
    their own layouts (rows at pointers q_rows, in bounds for every packed row). With fewer than 16
    packed rows (not padded to a tensor-core tile): D_CHUNK head dims a step as one [BLOCK_M,
    BLOCK_N, D_CHUNK] tile, K's chunk a coalesced load, and P @ V a broadcast product summed in
    fp32; with 16 or more, one head-dim column a step (`_l1_columns`) and P @ V on tensor cores."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if BLOCK_M >= 16:
        dist = _l1_columns(q_rows, sqd, k_base, offs_n, skn, skd, N_K, HEAD_DIM, EVEN_N)
    else:
        offs_c = tl.arange(0, D_CHUNK)
        dist = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for d0 in tl.range(0, HEAD_DIM, D_CHUNK, loop_unroll_factor=L1_UNROLL):
            cols = d0 + offs_c
            qc = tl.load(q_rows[:, None] + cols[None, :] * sqd, mask=cols[None, :] < HEAD_DIM, other=0.0)
            k_ptrs = k_base + offs_n[:, None] * skn + cols[None, :] * skd
            if EVEN_N and HEAD_DIM % D_CHUNK == 0:
                kc = tl.load(k_ptrs)
            else:
                kc = tl.load(k_ptrs, mask=(offs_n[:, None] < N_K) & (cols[None, :] < HEAD_DIM), other=0.0)
            dist += tl.sum(tl.abs(qc.to(tl.float32)[:, None, :] - kc.to(tl.float32)[None, :, :]), axis=2)
    raw = -dist
    s = _logits(raw, scale_k, mask_base, smm, smn, offs_i[:, None], offs_n[None, :], N_Q, N_K, MASK_KIND, CAUSAL,
                EVEN_N)
    p, m_i, l_i, r_i, acc = _softmax_step(s, raw, m_i, l_i, r_i, acc, MASK_KIND, True)
    v = _load_rows(v_base, offs_n, offs_dv, svn, svd, N_K, HEAD_DIM_V, EVEN_N, HEAD_DIM_V == DV_PAD)
    if BLOCK_M >= 16:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    else:
        acc += tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
    return m_i, l_i, r_i, acc


@triton.jit
def _attn_fwd_split_kernel(
    Q, K, V, SCALE, KVEC, MASK, MASK_FLAGS, PART_O, PART_S, SINKS, OUT, STATS_M, STATS_L, RBAR,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smh, smm, smn,
    sob, soh, som, sod,
    H, N_Q, N_K, GROUP, cap, split_len, n_splits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    METRIC: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, STATS: tl.constexpr,
    EVEN_N: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    RUN_IF: tl.constexpr = 0, SOFTCAP: tl.constexpr = False, ONE_SPLIT: tl.constexpr = False,
    SINK: tl.constexpr = False, D_CHUNK: tl.constexpr = 16, L1_UNROLL: tl.constexpr = 1,
    WIDE: tl.constexpr = False,
):
    """One key range (split) of the forward for every query row that one (b, kv head) serves.

    Grid: (n_splits, B * Hkv). The GROUP query heads of the kv head and their N_Q rows are packed
    into the program's BLOCK_M rows (row r: head hk * GROUP + r // N_Q, query r % N_Q), so each K/V
    tile is read once for all of them; a decoding step has one or a few query rows, and the
    per-(b, h) grid of `_attn_fwd_kernel` then leaves most of the GPU idle and most of each tile's
    rows empty. Keys [split * split_len, + split_len) (split_len a multiple of BLOCK_N).
    Arguments as in `_attn_fwd_kernel` (no dropout, no kept ranges; METRIC 3 also: L1 logits,
    `_l1_split_step`, q and k as given, KVEC unread; BLOCK_M may then be below 16), plus
    PART_O: (n_splits, B*H, N_Q, DV_PAD) fp32, the split's unnormalized output rows;
    PART_S: (3, n_splits, B*H, N_Q) fp32, the split's row max (kernel units), row sum and
            sum of p * raw (when STATS); `_attn_split_combine_kernel` joins the splits.
    ONE_SPLIT: one split walks every key, so the program writes OUT, RBAR and the row stats itself
    (with the sink, when SINK), as `_attn_fwd_kernel` does, and no join follows.
    """
    if _idle_launch(MASK_FLAGS, RUN_IF):
        return
    split = tl.program_id(0)
    bhk = tl.program_id(1)
    if WIDE:  # 64-bit slice bases, as in `_query_program`
        bhk = bhk.to(tl.int64)
    hkv = H // GROUP
    b = bhk // hkv
    hk = bhk % hkv
    offs_r = tl.arange(0, BLOCK_M)
    row_ok = offs_r < GROUP * N_Q
    h = hk * GROUP + tl.where(row_ok, offs_r // N_Q, 0)
    offs_i = offs_r % N_Q
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    scale = tl.load(SCALE + h)[:, None]
    if SOFTCAP:
        scale_k = _kernel_scale(cap, MASK_KIND)
    else:
        scale_k = _kernel_scale(scale, MASK_KIND)
    q_rows = Q + b * sqb + h * sqh + offs_i * sqm  # in bounds for every packed row, used or not
    if METRIC == 3:
        q = q_rows  # unread: the L1 step loads q a chunk of head dims at a time
    else:
        q = tl.load(q_rows[:, None] + offs_d[None, :] * sqd, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
                    other=0.0)
    mask_base = (MASK + b * smb + h * smh)[:, None]
    # with several splits the join adds the sink, once per row
    m_i, l_i, r_i, acc = _softmax_start(SINKS, h, BLOCK_M, DV_PAD, MASK_KIND, ONE_SPLIT and SINK)
    key_hi = N_K
    if CAUSAL:  # top-left: row i keeps keys j <= i
        key_hi = tl.minimum(N_K, N_Q)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, key_hi)
    for start_n in range(lo, hi, BLOCK_N):
        if METRIC == 3:
            m_i, l_i, r_i, acc = _l1_split_step(
                start_n, q_rows, sqd, m_i, l_i, r_i, acc, K + b * skb + hk * skh, V + b * svb + hk * svh, mask_base,
                skn, skd, svn, svd, smm, smn, offs_i, offs_dv, N_Q, N_K, scale_k, HEAD_DIM, HEAD_DIM_V, DV_PAD,
                MASK_KIND, CAUSAL, EVEN_N, DOT_PREC, BLOCK_M, BLOCK_N, D_CHUNK, L1_UNROLL)
        else:
            m_i, l_i, r_i, acc = _fwd_step(
                start_n, q, m_i, l_i, r_i, acc, K + b * skb + hk * skh, V + b * svb + hk * svh, KVEC + bhk * N_K,
                mask_base, skn, skd, svn, svd, smm, smn, offs_i, offs_d, offs_dv, N_Q, N_K, scale, scale_k, cap, 0, 0,
                0, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, METRIC, MASK_KIND, CAUSAL, False, STATS, EVEN_N, DOT_PREC,
                BLOCK_M, BLOCK_N, 16, SOFTCAP, False)
    n_rows = tl.num_programs(1) * GROUP * N_Q  # B * H * N_Q
    row = split * n_rows + (b * H + h) * N_Q + offs_i
    if ONE_SPLIT:
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        tl.store(RBAR + row, r_i / tl.where(empty, 1.0, l_i), mask=row_ok)  # RBAR, STATS_*: (B*H, N_Q)
        _store_row_stats(STATS_M, STATS_L, 0, tl.where(row_ok, row, n_rows), n_rows, m_i, l_i, MASK_KIND)
        o_ptrs = OUT + (b * sob + h * soh + offs_i * som)[:, None] + offs_dv[None, :] * sod
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    else:
        tl.store(PART_O + row[:, None] * DV_PAD + offs_dv[None, :], acc, mask=row_ok[:, None])
        plane = n_splits * n_rows
        tl.store(PART_S + row, m_i, mask=row_ok)
        tl.store(PART_S + plane + row, l_i, mask=row_ok)
        if STATS:
            tl.store(PART_S + 2 * plane + row, r_i, mask=row_ok)


@triton.jit
def _attn_split_combine_kernel(
    PART_O, PART_S, SINKS, OUT, STATS_M, STATS_L, RBAR, H, N_Q, N_ROWS, n_splits, sob, soh, som, sod,
    HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr, MASK_KIND: tl.constexpr, STATS: tl.constexpr,
    SINK: tl.constexpr, SPLITS_PAD: tl.constexpr, WIDE: tl.constexpr = False,
):
    """Join the splits of `_attn_fwd_split_kernel` for one of the N_ROWS = B*H*N_Q output rows (grid
    (N_ROWS,)): every split's partial row is read at once and rescaled to the common row max, then
    the output, E_p[raw] and the row stats are stored as `_fwd_epilogue` does. A sink (SINK) enters
    here, once per row, as in `_attn_fwd_kernel`."""
    row = tl.program_id(0) + tl.arange(0, 1)
    if WIDE:  # 64-bit output bases, as in `_query_program`
        row = row.to(tl.int64)
    bh = row // N_Q
    h = bh % H
    sp = tl.arange(0, SPLITS_PAD)
    live = sp < n_splits
    plane = n_splits * N_ROWS
    m_s = tl.load(PART_S + sp * N_ROWS + row, mask=live, other=float("-inf"))
    m = tl.max(m_s, axis=0) + tl.zeros([1], tl.float32)
    if SINK:
        sink = _sink_logit(SINKS, h, MASK_KIND)
        m = tl.maximum(m, sink)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = _exp_rel(m_s - m_safe, MASK_KIND)
    l_i = tl.sum(w * tl.load(PART_S + plane + sp * N_ROWS + row, mask=live, other=0.0), axis=0) + tl.zeros([1], tl.float32)
    if SINK:
        l_i += _exp_rel(sink - m_safe, MASK_KIND)
    r_i = tl.zeros([1], tl.float32)
    if STATS:
        r_i += tl.sum(w * tl.load(PART_S + 2 * plane + sp * N_ROWS + row, mask=live, other=0.0), axis=0)
    offs_dv = tl.arange(0, DV_PAD)
    parts = tl.load(PART_O + (sp * N_ROWS + row)[:, None] * DV_PAD + offs_dv[None, :], mask=live[:, None], other=0.0)
    acc = tl.sum(w[:, None] * parts, axis=0)[None, :]
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(RBAR + row, r_i / tl.where(empty, 1.0, l_i))  # RBAR, STATS_*: (B*H, N_Q) = rows
    _store_row_stats(STATS_M, STATS_L, 0, row, N_ROWS, m, l_i, MASK_KIND)
    o_ptrs = OUT + ((bh // H) * sob + h * soh + (row % N_Q) * som)[:, None] + offs_dv[None, :] * sod
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=offs_dv[None, :] < HEAD_DIM_V)


# ----------------------------------------------------------------------------------------------
# Backward: dK and dV (one program per key block of one kv head, looping over its query heads)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dkdv_step(start_m, k_op, v, kvec, dk_acc, dv_acc, csum, q_base, do_base, mask_base, sqm, sqd, sdom, sdod,
               smm, smn, STATS_M, STATS_L, DELTA, bh, offs_n, offs_d, offs_dv, N_Q, N_K, scale, scale_k, cap,
               seed, pid_n, threshold, dropout_p, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
               D_PAD: tl.constexpr, DV_PAD: tl.constexpr, METRIC: tl.constexpr, MASK_KIND: tl.constexpr,
               CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, EVEN_M: tl.constexpr, DOT_PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROP_BITS: tl.constexpr, SOFTCAP: tl.constexpr,
               SCALE_AFTER: tl.constexpr, clean):
    """One query block (from start_m) of `_attn_bwd_dkdv_kernel` for one query head: returns the
    updated dk_acc, dv_acc and (l2) csum, without the scale when SCALE_AFTER. clean: the mask keeps
    these keys for all of the block's rows (`_apply_mask`)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(q_base, offs_m, offs_d, sqm, sqd, N_Q, HEAD_DIM, EVEN_M, HEAD_DIM == D_PAD)
    do = _load_rows(do_base, offs_m, offs_dv, sdom, sdod, N_Q, HEAD_DIM_V, EVEN_M, HEAD_DIM_V == DV_PAD)
    sa, sb = _load_row_stats(STATS_M, STATS_L, bh, offs_m, N_Q, MASK_KIND)
    delta = tl.load(DELTA + bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
    # Transposed tile [BLOCK_N, BLOCK_M]: P^T and dS^T come out of the dots already as the
    # left operands of dV += P^T dO and dK += dS^T Q, with no register transposes.
    qkT = tl.dot(k_op, tl.trans(q), input_precision=DOT_PREC)
    if METRIC == 1:
        rawT = 2.0 * qkT - kvec[:, None]
        sT = _logits_t(rawT, scale_k, mask_base, smm, smn, offs_m, offs_n, N_Q, N_K, MASK_KIND, CAUSAL, clean)
    elif SOFTCAP:
        tT, dtT = _softcap(qkT, scale / cap)
        sT = _logits_t(tT, _kernel_scale(cap, MASK_KIND), mask_base, smm, smn, offs_m, offs_n, N_Q, N_K,
                       MASK_KIND, CAUSAL, clean)
    else:
        sT = _logits_t(qkT, scale_k, mask_base, smm, smn, offs_m, offs_n, N_Q, N_K, MASK_KIND, CAUSAL, clean)
    pT = _probs(sT, sa[None, :], sb[None, :], MASK_KIND)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    if DROPOUT:
        keep = tl.trans(_dropout_keep(seed, bh, offs_m, pid_n * BLOCK_N, N_K, threshold, BLOCK_M, BLOCK_N,
                                      DROP_BITS))
        rescale = 1.0 / (1.0 - dropout_p)
        pdT = tl.where(keep, pT, 0.0)  # dV takes the 1/(1-p) once, at the end
        dpT = tl.where(keep, dpT * rescale, 0.0)
    else:
        pdT = pT
    dv_acc = tl.dot(pdT.to(do.dtype), do, dv_acc, input_precision=DOT_PREC)
    dsT = pT * (dpT - delta[None, :])
    if not SCALE_AFTER:  # else dK takes the scale once, after the loop
        dsT = dsT * scale
    if SOFTCAP:  # through cap * tanh(scale * q.k / cap): d/d(scale * q.k) = 1 - tanh^2
        dsT = dsT * dtT
    if METRIC == 1:
        csum += tl.sum(dsT, axis=1)
    dk_acc = tl.dot(dsT.to(q.dtype), q, dk_acc, input_precision=DOT_PREC)
    return dk_acc, dv_acc, csum


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, SCALE, KVEC, MASK, MASK_FLAGS, DO, STATS_M, STATS_L, DELTA, DK, DV,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smh, smm, smn,
    sdob, sdoh, sdom, sdod,
    H, HKV, N_Q, N_K, GROUP, SEED, dropout_p, threshold, cap, RANGES, rgb, rgh, rg_plane,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    METRIC: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RUN_IF: tl.constexpr = 0,
    DROP_BITS: tl.constexpr = 16, SOFTCAP: tl.constexpr = False, SKIP: tl.constexpr = False,
    SCAN_ROWS: tl.constexpr = QUERY_SCAN_ROWS, WIDE: tl.constexpr = False, SCALE_AFTER: tl.constexpr = False,
):
    """dK, dV for BLOCK_N keys of one (b, kv head), summed over the GROUP query heads that read it.
    SCALE_AFTER (one query head a kv head, GROUP == 1): dK is scaled once at the end instead of
    every dS: one multiply a score fewer.

    Grid: (cdiv(Nk, BLOCK_N), B * Hkv). Pointers as in `_attn_fwd_kernel`, plus
    DO:    (B, H, Nq, Dv) strides sdo*;  STATS_M, STATS_L, DELTA: (B*H, Nq) fp32 contiguous (the
           forward's row stats; DELTA = rowsum(dO*O));
    KVEC:  (B*Hkv, Nk) fp32: |k|^2 for l2, max(|k|, eps) for cosine (Q, K then hold q^, k^).
    DK:    (B, Hkv, Nk, D) contiguous, K's dtype;  DV: (B, Hkv, Nk, Dv) contiguous, V's dtype.
    RANGES, rgb, rgh, rg_plane: the mask's per-row key ranges (`MaskRanges.args()`); with SKIP
           each query head visits only the query blocks whose ranges meet these keys.
    BLOCK_N keys are owned by the program, BLOCK_M queries are visited per step.
    """
    seed = load_seed(SEED, DROPOUT)
    if _idle_launch(MASK_FLAGS, RUN_IF):
        return
    pid_n, bhk, b, hk = _key_program(HKV, WIDE)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)

    k = _load_rows(K + b * skb + hk * skh, offs_n, offs_d, skn, skd, N_K, HEAD_DIM, EVEN_N, HEAD_DIM == D_PAD)
    v = _load_rows(V + b * svb + hk * svh, offs_n, offs_dv, svn, svd, N_K, HEAD_DIM_V, EVEN_N, HEAD_DIM_V == DV_PAD)
    k_op = k
    if METRIC == 0:  # dot reads no per-key vector: KVEC is a 1-element placeholder then
        kvec = tl.full([BLOCK_N], 1.0, tl.float32)
    else:
        kvec = tl.load(KVEC + bhk * N_K + offs_n, mask=offs_n < N_K, other=1.0)

    dk_acc = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv_acc = tl.zeros([BLOCK_N, DV_PAD], tl.float32)
    csum = tl.zeros([BLOCK_N], tl.float32)
    lo = _query_start(pid_n, MASK_FLAGS, MASK_KIND, CAUSAL, BLOCK_M, BLOCK_N)
    for g in range(0, GROUP):
        h, bh, scale, scale_k = _group_head(b, hk, g, H, GROUP, SCALE, MASK_KIND)
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        mask_base = MASK + b * smb + h * smh
        lo_g = lo
        hi_g = N_Q
        if SKIP:
            kept_lo, kept_end = _query_range(RANGES, b * rgb + h * rgh, rg_plane, pid_n * BLOCK_N,
                                             pid_n * BLOCK_N + BLOCK_N, N_Q, N_K, BLOCK_M, SCAN_ROWS)
            lo_g = tl.maximum(lo, kept_lo)
            hi_g = tl.minimum(N_Q, kept_end)
        for start_m in range(lo_g, hi_g, BLOCK_M):
            if SKIP:  # a query block can be clean for these keys anywhere in the range: decided per block
                clean = _query_block_clean(RANGES, b * rgb + h * rgh, rg_plane, start_m + tl.arange(0, BLOCK_M), N_Q,
                                           N_K, pid_n * BLOCK_N, BLOCK_N)
            else:
                clean = False
            dk_acc, dv_acc, csum = _dkdv_step(
                start_m, k_op, v, kvec, dk_acc, dv_acc, csum, q_base, do_base, mask_base, sqm, sqd, sdom, sdod,
                smm, smn, STATS_M, STATS_L, DELTA, bh, offs_n, offs_d, offs_dv, N_Q, N_K, scale, scale_k, cap,
                seed, pid_n, threshold, dropout_p, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, METRIC, MASK_KIND, CAUSAL,
                DROPOUT, EVEN_M, DOT_PREC, BLOCK_M, BLOCK_N, DROP_BITS, SOFTCAP, SCALE_AFTER, clean)

    if SCALE_AFTER:
        dk_scale = tl.load(SCALE + hk)
        dk_acc = dk_acc * dk_scale
        csum = csum * dk_scale
    if METRIC == 1:
        dk = 2.0 * dk_acc - 2.0 * k.to(tl.float32) * csum[:, None]
    elif METRIC == 2:
        dk = _normalize_grad(dk_acc, k.to(tl.float32), kvec)
    else:
        dk = dk_acc
    nmask = offs_n[:, None] < N_K
    dk_ptrs = DK + bhk * N_K * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=nmask & (offs_d[None, :] < HEAD_DIM))
    _store_dv(DV, bhk, offs_n, offs_dv, dv_acc, N_K, dropout_p, HEAD_DIM_V, DROPOUT)


# ----------------------------------------------------------------------------------------------
# Backward: dQ, the per-row scale gradient, and the float-mask gradient
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dq_tile(raw, do, v, delta, rbar, dsc, sa, sb, scale_k, mask_base, smm, smn, dmask_base, sgm, sgn, offs_m, offs_n,
             N_Q, N_K, seed, bh, start_n, threshold, dropout_p, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr,
             EVEN_N: tl.constexpr, DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr, SCALE_GRAD: tl.constexpr,
             DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROP_BITS: tl.constexpr,
             clean=False):
    """One (query block, key block) tile of a dQ kernel (here and in `attention_l1`), from its raw
    scores: returns (dS, dsc plus the tile's share of the per-row scale gradient, centred on
    E_p[raw]), and adds dS into the float-mask gradient at dmask_base when MASK_GRAD."""
    s = _logits(raw, scale_k, mask_base, smm, smn, offs_m[:, None], offs_n[None, :], N_Q, N_K, MASK_KIND, CAUSAL,
                EVEN_N, clean)
    p = _probs(s, sa[:, None], sb[:, None], MASK_KIND)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    if DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m, start_n, N_K, threshold, BLOCK_M, BLOCK_N, DROP_BITS)
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    if MASK_GRAD:
        tl.atomic_add(dmask_base + offs_m[:, None] * sgm + offs_n[None, :] * sgn, ds,
                      mask=(offs_m[:, None] < N_Q) & (offs_n[None, :] < N_K))
    if SCALE_GRAD:
        dsc += tl.sum(ds * (raw - rbar[:, None]), axis=1)
    return ds, dsc


@triton.jit
def _dq_step(start_n, q_op, do, delta, rbar, sa, sb, dq_acc, dsc, k_base, v_base, kvec_base, mask_base, dmask_base,
             skn, skd, svn, svd, smm, smn, sgm, sgn, offs_m, offs_d, offs_dv, N_Q, N_K, scale, scale_k, cap, seed,
             bh, threshold, dropout_p, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr,
             DV_PAD: tl.constexpr, METRIC: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr,
             DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr, SCALE_GRAD: tl.constexpr, EVEN_N: tl.constexpr,
             DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROP_BITS: tl.constexpr,
             SOFTCAP: tl.constexpr, clean):
    """One key tile (from start_n) of `_attn_bwd_dq_kernel`: returns the updated dq_acc and dsc.
    clean: the tile lies in the clean run of every row, so the mask is not read."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(k_base, offs_n, offs_d, skn, skd, N_K, HEAD_DIM, EVEN_N, HEAD_DIM == D_PAD)
    v = _load_rows(v_base, offs_n, offs_dv, svn, svd, N_K, HEAD_DIM_V, EVEN_N, HEAD_DIM_V == DV_PAD)
    qk = tl.dot(q_op, tl.trans(k), input_precision=DOT_PREC)
    if METRIC == 1:
        raw = 2.0 * qk - tl.load(kvec_base + offs_n, mask=offs_n < N_K, other=0.0)[None, :]
    elif SOFTCAP:
        raw, dt = _softcap(qk, scale / cap)
    else:
        raw = qk
    ds, dsc = _dq_tile(raw, do, v, delta, rbar, dsc, sa, sb, scale_k, mask_base, smm, smn, dmask_base, sgm, sgn,
                       offs_m, offs_n, N_Q, N_K, seed, bh, start_n, threshold, dropout_p, MASK_KIND, CAUSAL, EVEN_N,
                       DROPOUT, MASK_GRAD, SCALE_GRAD, DOT_PREC, BLOCK_M, BLOCK_N, DROP_BITS, clean)
    if SOFTCAP:  # the mask's gradient (inside _dq_tile) is taken after the cap, dq's before it
        ds = ds * dt
    return tl.dot(ds.to(k.dtype), k, dq_acc, input_precision=DOT_PREC), dsc


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, SCALE, QVEC, KVEC, MASK, MASK_FLAGS, DO, STATS_M, STATS_L, RBAR, DELTA, DQ, DSCALE, DMASK,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smh, smm, smn,
    sdob, sdoh, sdom, sdod,
    sgb, sgh, sgm, sgn,
    H, N_Q, N_K, GROUP, SEED, dropout_p, threshold, cap, RANGES, rgb, rgh, rg_plane,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    METRIC: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    MASK_GRAD: tl.constexpr, SCALE_GRAD: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RUN_IF: tl.constexpr = 0,
    DROP_BITS: tl.constexpr = 16, SOFTCAP: tl.constexpr = False, SKIP: tl.constexpr = False,
    WIDE: tl.constexpr = False,
):
    """dQ for BLOCK_M queries of one (b, h); also d(loss)/d(scale) per row (when SCALE_GRAD) and dMask.

    Grid: (cdiv(Nq, BLOCK_M), B * H). Pointers as in `_attn_bwd_dkdv_kernel`, plus
    QVEC:   (B*H, Nq) fp32: max(|q|, eps) for cosine (Q, K then hold q^, k^); KVEC as in dkdv.
    DQ:     (B, H, Nq, D) contiguous, Q's dtype.
    RBAR:   (B*H, Nq) fp32 from the forward (E_p[raw] or 0).
    DSCALE: (B*H, Nq) fp32: sum_j dS_ij * (raw_ij - RBAR_i) (raw = logit / scale); summed over b, i
            outside. Centring on E_p[raw] changes nothing exactly (sum_j dS_ij = 0) but removes the
            cancellation that rounding (bf16 O inside delta) would expose with large raws (l2's
            |k|^2). Two cheaper forms were measured on the H100 and set aside for accuracy: the
            sum from the products (q . dQ, no per-score work; bf16 scale gradients up to 2.6e-2
            off) and centring on the raw at the row's largest logit (no E_p[raw] in the forward;
            up to 4.3e-3 off). This form gives about 1e-6.
    DMASK:  fp32 buffer addressed with strides sg* over (B, H, Nq, Nk) (0 on dims the mask
            broadcasts over B/H); dS is atomically added when MASK_GRAD.
    """
    seed = load_seed(SEED, DROPOUT)
    if _idle_launch(MASK_FLAGS, RUN_IF):
        return
    pid_m, bh, b, h, hk = _query_program(H, GROUP, WIDE)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    scale = tl.load(SCALE + h)
    if SOFTCAP:  # the logits are cap * t (no scale gradient: SCALE_GRAD is off)
        scale_k = _kernel_scale(cap, MASK_KIND)
    else:
        scale_k = _kernel_scale(scale, MASK_KIND)

    q = _load_rows(Q + b * sqb + h * sqh, offs_m, offs_d, sqm, sqd, N_Q, HEAD_DIM, EVEN_M, HEAD_DIM == D_PAD)
    q_op = q
    kvec_base = KVEC + (b * (H // GROUP) + hk) * N_K
    do = _load_rows(DO + b * sdob + h * sdoh, offs_m, offs_dv, sdom, sdod, N_Q, HEAD_DIM_V, EVEN_M, HEAD_DIM_V == DV_PAD)
    sa, sb = _load_row_stats(STATS_M, STATS_L, bh, offs_m, N_Q, MASK_KIND)
    delta = tl.load(DELTA + bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
    rbar = tl.load(RBAR + bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    mask_base = MASK + b * smb + h * smh

    dq_acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    dsc = tl.zeros([BLOCK_M], tl.float32)
    hi = _key_end(pid_m, N_K, MASK_FLAGS, MASK_KIND, CAUSAL, BLOCK_M)
    lo = 0
    if SKIP:  # the forward's ranges (rows): skipped blocks have p = 0, so dS = 0 there
        lo, kept_end, clean_lo, clean_hi = _key_range(RANGES, b * rgb + h * rgh, rg_plane, offs_m, N_Q, N_K,
                                                      BLOCK_N)
        hi = tl.minimum(hi, kept_end)
    for start_n in range(lo, hi, BLOCK_N):
        if SKIP:  # one loop with the mask read branched around: faster here than the forward's spans
            clean = _tile_is_clean(start_n, clean_lo, clean_hi, BLOCK_N)
        else:
            clean = False
        dq_acc, dsc = _dq_step(
            start_n, q_op, do, delta, rbar, sa, sb, dq_acc, dsc, k_base, v_base, kvec_base, mask_base,
            DMASK + b * sgb + h * sgh, skn, skd, svn, svd, smm, smn, sgm, sgn, offs_m, offs_d, offs_dv, N_Q, N_K,
            scale, scale_k, cap, seed, bh, threshold, dropout_p, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, METRIC,
            MASK_KIND, CAUSAL, DROPOUT, MASK_GRAD, SCALE_GRAD, EVEN_N, DOT_PREC, BLOCK_M, BLOCK_N, DROP_BITS,
            SOFTCAP, clean)

    dq_acc = dq_acc * scale
    if METRIC == 1:
        dq = 2.0 * dq_acc
    elif METRIC == 2:
        qnrm = tl.load(QVEC + bh * N_Q + offs_m, mask=offs_m < N_Q, other=1.0)
        dq = _normalize_grad(dq_acc, q.to(tl.float32), qnrm)
    else:
        dq = dq_acc
    mmask = offs_m[:, None] < N_Q
    dq_ptrs = DQ + bh * N_Q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mmask & (offs_d[None, :] < HEAD_DIM))
    tl.store(DSCALE + bh * N_Q + offs_m, dsc, mask=offs_m < N_Q)


# ----------------------------------------------------------------------------------------------
# Launch configs
# ----------------------------------------------------------------------------------------------
_KEY_RE = re.compile(r"^m(\d+)n(\d+)w(\d+)s(\d+)(?:-bm(\d+)n(\d+)w(\d+)s(\d+)(?:-qm(\d+)n(\d+)w(\d+)s(\d+))?)?$")
_KEY_PARTS = (("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"),
              ("BWD_BLOCK_M", "BWD_BLOCK_N", "bwd_num_warps", "bwd_num_stages"),
              ("DQ_BLOCK_M", "DQ_BLOCK_N", "dq_num_warps", "dq_num_stages"))


def config_key(cfg: dict) -> str:
    """Stable string for a launch config, e.g. "m128n64w4s3-bm64n64w4s2-qm64n64w4s2": the forward
    tile, then the dK/dV tile, then the dQ tile (each part optional from the right)."""
    parts = []
    for prefix, names in zip(("m", "bm", "qm"), _KEY_PARTS):
        if names[0] not in cfg:
            break
        bm, bn, w, st = (cfg[n] for n in names)
        parts.append(f"{prefix}{bm}n{bn}w{w}s{st}")
    return "-".join(parts)


def parse_config_key(key: str) -> dict:
    """Inverse of `config_key`. Raises ValueError on a malformed key."""
    m = _KEY_RE.match(key)
    if not m:
        raise ValueError(f"bad attention config key {key!r}; expected like 'm128n64w4s3-bm64n64w4s2-qm64n64w4s2'")
    g = m.groups()
    cfg = {}
    for i, names in enumerate(_KEY_PARTS):
        if g[4 * i] is not None:
            cfg.update({n: int(x) for n, x in zip(names, g[4 * i:4 * i + 4])})
    return cfg


def _pad_dim(d: int) -> int:
    return max(16, next_power_of_2(d))


# fp32 accumulator elements one thread of a kernel may hold. At 256 the D=256 dK/dV tiles ran
# 1.9x slower than at 128 (bench/attention_sweep_gpu.py, H100, 2026-11-27): they spill.
_ACC_PER_THREAD = 128


def _feasible(cfg: dict, metric: str, d_pad: int, elem_bytes: int) -> bool:
    """Drop tiles whose accumulators or shared memory cannot fit: per thread, at most
    _ACC_PER_THREAD fp32 elements of each kernel's accumulators (the forward's output rows and its
    score tile, dK/dV's two gradients of its keys, dQ's query rows), and the forward's K/V stages
    within 160 KB of shared memory (with l2's key parts, at most 64 bytes a key)."""
    bm, bn, w = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"]
    key_bytes = d_pad * elem_bytes * 2 + (4 * L2_PARTS_WIDTH.value if metric == "l2" else 0)
    if bn * key_bytes * cfg["num_stages"] > 160 * 1024 or bm < 16 * w // 4:
        return False
    if max(bm * bn, bm * d_pad) // (32 * w) > _ACC_PER_THREAD:
        return False
    kv, q = backward_tiles(cfg)
    if kv["BLOCK_N"] * 2 * d_pad // (32 * kv["num_warps"]) > _ACC_PER_THREAD:
        return False
    return q["BLOCK_M"] * d_pad // (32 * q["num_warps"]) <= _ACC_PER_THREAD


# (dK/dV tile, dQ tile) pairs as (BLOCK_M, BLOCK_N, num_warps, num_stages). The first is the
# default for head dims up to 64 in half precision: the fastest of 6 x 6 tiles timed one kernel at
# a time (bench/attention_sweep_gpu.py, H100, dot, B=4 H=8 N=8192 D=64 bf16, forward+backward
# 5.02 ms against 5.67 with the earlier shared 64x64 tile); the others were next best.
# The last two are the defaults at head dims 128 and 256 (see default_attention_config).
_BACKWARD_PAIRS = (
    ((32, 128, 4, 3), (128, 64, 4, 3)),
    ((32, 128, 4, 5), (128, 64, 8, 3)),
    ((64, 64, 4, 3), (128, 32, 4, 5)),
    ((64, 64, 4, 2), (64, 64, 4, 2)),
    ((32, 128, 4, 3), (64, 32, 4, 3)),
    ((32, 64, 4, 3), (128, 64, 8, 2)),
    ((64, 32, 4, 2), (128, 32, 8, 2)),
    # the first pair unpipelined: the default of calls with dropout at head dim 64, where ptxas
    # serializes the pipelined kernels' products (default_attention_config)
    ((32, 128, 4, 1), (128, 64, 4, 1)),
)


# Half-precision tiles for calls that skip blocks (windows, packed documents, masked triangles), by
# padded head dim: (forward tile, backward pair). A program there walks a few key blocks; a
# forward tile that lets two programs share an SM (m64n32, 4 warps: 156-168 registers, 50-82 KB of
# shared memory), presumably hiding one program's start and end behind the other's loop, ran
# forwards 11-17% faster than the dense defaults on an H100 (N=8192: sliding windows of 1024 and
# 4096, 8 packed documents, HF's float causal mask; docs/performance.md). The backward keeps the
# dense pairs, except that at D=64 the dQ tile m64n32 wins too (a window of 1024 with l2: training
# 1.62 against 1.77 ms with only that tile changed); the pairs tried in their place at D=128 were
# slower (up to 1.7x).
_SKIP_TILES = {
    64: ((64, 32, 4, 3), _BACKWARD_PAIRS[4]),
    128: ((64, 32, 4, 3), _BACKWARD_PAIRS[5]),
}


def _with_backward(cfg: dict, pair) -> dict:
    (bm, bn, w, st), (qm, qn, qw, qs) = pair
    return dict(cfg, BWD_BLOCK_M=bm, BWD_BLOCK_N=bn, bwd_num_warps=w, bwd_num_stages=st,
                DQ_BLOCK_M=qm, DQ_BLOCK_N=qn, dq_num_warps=qw, dq_num_stages=qs)


def attention_config_space(metric: str, head_dim: int, dtype: torch.dtype, device_type: str) -> list:
    """Launch configs the tuner may search for this metric / head dim / dtype / device.

    Each config is a dict: BLOCK_M, BLOCK_N (forward tile), num_warps, num_stages; BWD_BLOCK_M,
    BWD_BLOCK_N, bwd_num_warps, bwd_num_stages (the dK/dV kernel); and DQ_BLOCK_M, DQ_BLOCK_N,
    dq_num_warps, dq_num_stages (the dQ kernel).
    """
    d_pad = _pad_dim(head_dim)
    eb = 4 if dtype == torch.float32 else 2
    if device_type == "cpu":  # the interpreter: big blocks mean few (slow) program instances
        return [dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1,
                     BWD_BLOCK_M=64, BWD_BLOCK_N=64, bwd_num_warps=4, bwd_num_stages=1)]
    out = []
    for bm in (64, 128):
        for bn in (32, 64, 128):
            for w in (4, 8):
                for st in (2, 3, 4):
                    for pair in _BACKWARD_PAIRS:
                        cfg = _with_backward(dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st), pair)
                        if _feasible(cfg, metric, d_pad, eb):
                            out.append(cfg)
    default = default_attention_config(metric, head_dim, dtype, device_type)
    if default not in out:  # the tuner's starting point is always a member
        out.insert(0, default)
    return out


def default_attention_config(metric: str, head_dim: int, dtype: torch.dtype, device_type: str,
                             skips: bool = False, dropout: bool = False) -> dict:
    """A sound default per device: big blocks on CPU (interpreter), measured tiles on GPU. skips:
    the call skips blocks by its mask's kept ranges (`ranges_layout`), so each program walks a
    short key range, and at head dims 64 and 128 smaller tiles win there (`_SKIP_TILES`).
    dropout: the call drops probabilities (at head dim 64 the backward then loads unpipelined)."""
    d_pad = _pad_dim(head_dim)
    if device_type == "cpu":
        return attention_config_space(metric, head_dim, dtype, device_type)[0]
    if skips and dtype != torch.float32 and d_pad in _SKIP_TILES:
        forward, pair = _SKIP_TILES[d_pad]
        return _with_backward(dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), forward)), pair)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2,
                    BWD_BLOCK_M=32, BWD_BLOCK_N=32, bwd_num_warps=4, bwd_num_stages=1)
    if d_pad <= 32:  # fastest of four tiles per kernel at D=32 (TruthGPT: causal, dropout) on an H100
        return _with_backward(dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3), _BACKWARD_PAIRS[4])
    if d_pad <= 64:  # forward m128n64w8s3: fastest of six forward tiles in the same sweep
        cfg = _with_backward(dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3), _BACKWARD_PAIRS[0])
        if dropout:
            # with the dropout draws in their loops ptxas serializes every wgmma of both backward
            # kernels unless their loads are not pipelined; one stage ran the backward 6-10% faster
            # on an H200 (docs/performance.md). Without dropout three stages stay faster.
            cfg = _with_backward(cfg, _BACKWARD_PAIRS[7])
        return cfg
    # D=128 and 256: the fastest tiles per kernel of 7-8 each (bench/attention_sweep_gpu.py, H100,
    # bf16, N=8192, causal dot; at 256 also soft-capped dot and learnable l2 / cosine): forward and
    # backward 8.57 -> 5.45 ms at D=128 (B=2, H=16), 22.1 -> 7.2 ms at D=256 (B=2, H=8)
    if d_pad <= 128:
        return _with_backward(dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3), _BACKWARD_PAIRS[5])
    return _with_backward(dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2), _BACKWARD_PAIRS[6])


def backward_tiles(cfg: dict) -> tuple:
    """(dK/dV tile, dQ tile), each dict(BLOCK_M, BLOCK_N, num_warps, num_stages). A config without a
    dQ part uses the dK/dV tile for both."""
    dkdv = dict(BLOCK_M=cfg.get("BWD_BLOCK_M", 64), BLOCK_N=cfg.get("BWD_BLOCK_N", 64),
                num_warps=cfg.get("bwd_num_warps", 4), num_stages=cfg.get("bwd_num_stages", 2))
    if "DQ_BLOCK_M" not in cfg:
        return dkdv, dkdv
    dq = dict(BLOCK_M=cfg["DQ_BLOCK_M"], BLOCK_N=cfg["DQ_BLOCK_N"], num_warps=cfg["dq_num_warps"],
              num_stages=cfg["dq_num_stages"])
    return dkdv, dq


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _mask_args(mask, B, H, Nq, Nk, device):
    """(tensor, strides, kind) for a mask broadcastable to (B, H, Nq, Nk), or a dummy."""
    if mask is None:
        return torch.empty(1, device=device, dtype=torch.float32), (0, 0, 0, 0), 0
    m4 = mask.expand(B, H, Nq, Nk)
    return m4, m4.stride(), (1 if mask.dtype == torch.bool else 2)


def _dot_prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _prepass(metric, q, k, key_parts=False):
    """Per-row fp32 vectors the kernels need, and the q/k they should read.
    l2: kvec = |k|^2 (fp32 sum of the exact input values), or with key_parts the forward's KEXT
    form of it (`l2_key_parts`). cosine: q^ = q / max(|q|, eps) and k^ likewise, normalized in fp32
    and rounded once to the input dtype, with qvec/kvec the clamped norms for the backward's
    projection. One O(N) pass instead of re-normalizing every key tile in every query program."""
    dummy = torch.empty(1, device=q.device, dtype=torch.float32)
    if metric == "l2":
        return q, k, dummy, (l2_key_parts(k) if key_parts else row_dot(k, k))
    if metric == "cosine":
        (qh, qn), (kh, kn) = normalize_rows(q), normalize_rows(k)
        return qh, kh, qn, kn
    return q, k, dummy, dummy


@triton.jit
def _row_tile(X, H, N, sxb, sxh, sxm, sxd, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
              WIDE: tl.constexpr):
    """The fp32 [BLOCK, D_PAD] tile of rows of a (B, H, N, D) tensor that program (i, b*H + h) of a
    row-wise kernel owns (zeros outside), with bh (int64 with WIDE), its row offsets and its
    in-bounds mask."""
    bh = tl.program_id(1)
    if WIDE:
        bh = bh.to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    inb = (offs_m[:, None] < N) & (offs_d[None, :] < D)
    ptrs = X + (bh // H) * sxb + (bh % H) * sxh + offs_m[:, None] * sxm + offs_d[None, :] * sxd
    return tl.load(ptrs, mask=inb, other=0.0).to(tl.float32), bh, offs_m, offs_d, inb


@triton.jit
def _normalize_rows_kernel(X, XH, NRM, SCALE, H, N, sxb, sxh, sxm, sxd, D: tl.constexpr, D_PAD: tl.constexpr,
                           EPS: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
                           WIDE: tl.constexpr = False):
    """XH[b, h, m] = X[b, h, m] / NRM[b*H + h, m] (times SCALE[h] when HAS_SCALE),
    NRM = max(|X[b, h, m]|, EPS) in fp32; XH contiguous (B, H, N, D) in its own dtype."""
    x, bh, offs_m, offs_d, inb = _row_tile(X, H, N, sxb, sxh, sxm, sxd, D, D_PAD, BLOCK, WIDE)
    nrm = tl.maximum(tl.sqrt_rn(tl.sum(x * x, axis=1)), EPS)
    xh = tl.div_rn(x, nrm[:, None])
    if HAS_SCALE:
        xh = xh * tl.load(SCALE + bh % H)
    tl.store(XH + bh * N * D + offs_m[:, None] * D + offs_d[None, :], xh.to(XH.dtype.element_ty), mask=inb)
    tl.store(NRM + bh * N + offs_m, nrm, mask=offs_m < N)


@triton.jit
def _normalize_rows_bwd_kernel(X, G, DX, SCALE, DSCALE, H, N, sxb, sxh, sxm, sxd, sgb, sgh, sgm, sgd,
                               D: tl.constexpr, D_PAD: tl.constexpr, EPS: tl.constexpr, HAS_SCALE: tl.constexpr,
                               BLOCK: tl.constexpr, WIDE: tl.constexpr = False):
    """Backward of `_normalize_rows_kernel` for y = s * x / max(|x|, EPS), given G = dL/dy:
    DX (B, H, N, D) contiguous in its own dtype, and with HAS_SCALE this program's share of
    dL/ds = sum over its rows of G . x^ into DSCALE[program_id(0), b*H + h] (fp32). x^ is
    recomputed from X in fp32."""
    x, bh, offs_m, offs_d, inb = _row_tile(X, H, N, sxb, sxh, sxm, sxd, D, D_PAD, BLOCK, WIDE)
    g, _, _, _, _ = _row_tile(G, H, N, sgb, sgh, sgm, sgd, D, D_PAD, BLOCK, WIDE)
    nrm = tl.maximum(tl.sqrt_rn(tl.sum(x * x, axis=1)), EPS)
    xh = x / nrm[:, None]
    dx = _normalize_grad(g, xh, nrm)
    if HAS_SCALE:
        dx = dx * tl.load(SCALE + bh % H)
        tl.store(DSCALE + tl.program_id(0) * tl.num_programs(1) + bh, tl.sum(tl.sum(g * xh, axis=1), axis=0))
    tl.store(DX + bh * N * D + offs_m[:, None] * D + offs_d[None, :], dx.to(DX.dtype.element_ty), mask=inb)


WIDE_OFFSETS_FROM = 2**31
"""A launch whose tensors reach this many elements from their base runs the kernels' WIDE code
(64-bit slice bases); below it the 32-bit code runs, as tuned."""


def wide_offsets(*tensors) -> dict:
    """The constexpr {"WIDE": True} for a launch over these tensors (None skipped) when one of them
    reaches WIDE_OFFSETS_FROM elements from its base (its last element's offset, from its sizes and
    strides, so a broadcast mask counts only what it stores), else {}: the launch stays as it was."""
    for t in tensors:
        if t is not None and t.numel() and \
                sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1 >= WIDE_OFFSETS_FROM:
            return {"WIDE": True}
    return {}


def _rows_per_program(d: int) -> int:
    """Rows per program of the row-wise kernels: about 8K elements a tile."""
    return max(16, min(128, 8192 // _pad_dim(d)))


def normalize_rows(x, scale=None):
    """(x / max(|x|, eps), times scale[h] when given, rounded once to x's dtype, contiguous; the
    clamped norms (B, H, N) fp32) of a (B, H, N, D) tensor of any strides: cosine's inputs in one
    launch instead of eager's casts, norm, clamp and division. scale: (H,) fp32 or None."""
    B, H, N, D = x.shape
    xh = torch.empty(B, H, N, D, device=x.device, dtype=x.dtype)
    nrm = torch.empty(B, H, N, device=x.device, dtype=torch.float32)
    block = _rows_per_program(D)
    _launch_normalize_rows[(cdiv(N, block), B * H)](
        x, xh, nrm, scale if scale is not None else nrm, H, N, *x.stride(), D=D, D_PAD=_pad_dim(D),
        EPS=COSINE_EPS, HAS_SCALE=scale is not None, BLOCK=block, num_warps=4, **wide_offsets(x, xh))
    return xh, nrm


def normalize_rows_backward(x, grad, scale=None):
    """Gradients of `normalize_rows(x, scale)[0]` given grad: (dx in x's dtype, dscale (H,) fp32
    or None without a scale)."""
    B, H, N, D = x.shape
    dx = torch.empty(B, H, N, D, device=x.device, dtype=x.dtype)
    block = _rows_per_program(D)
    grid = (cdiv(N, block), B * H)
    dscale = torch.empty(grid[0], B * H, device=x.device, dtype=torch.float32) if scale is not None else None
    _launch_normalize_rows_bwd[grid](
        x, grad, dx, scale if scale is not None else dx, dscale if scale is not None else dx, H, N,
        *x.stride(), *grad.stride(), D=D, D_PAD=_pad_dim(D), EPS=COSINE_EPS, HAS_SCALE=scale is not None,
        BLOCK=block, num_warps=4, **wide_offsets(x, grad, dx))
    if dscale is None:
        return dx, None
    return dx, dscale.view(grid[0], B, H).sum(dim=(0, 1))


def dropout_args(p: float) -> tuple:
    """The kernels' (dropout_p, threshold) arguments: the probability the masks really have
    (kept values are scaled by its 1/(1-p)) and the draw threshold."""
    return effective_p(p, DROPOUT_BITS), dropout_threshold(p, DROPOUT_BITS)


def _cap_arg(metric: str, softcap: float, scale_stats: bool) -> float:
    """The kernels' `cap` argument: the soft cap, or 1.0 (unread) without one. The kernels soft-cap
    dot logits only, and compute no scale gradient (nor its E_p[raw] statistic) through the cap."""
    if softcap > 0:
        if metric != "dot" or scale_stats:
            raise ValueError(f"softcap applies to metric 'dot' with a constant scale (got {metric!r}, "
                             f"scale gradient {scale_stats})")
        return float(softcap)
    return 1.0


def new_row_stats(B, H, Nq, device):
    """The forward's per-row stats, (3, B*H, Nq) fp32: [0] the row max of the logits (natural
    units, +inf for a fully masked row), [1] E_p[raw] (when asked for, else 0), [2] log2 of the row
    sum of exp(logit - max). Shared by every kernel and the PyTorch reference."""
    return torch.empty(3, B * H, Nq, device=device, dtype=torch.float32)


@triton.jit
def _mask_layout_kernel(MASK, FLAGS, N_Q, N_K, smm, smn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Clear bit 1 of FLAGS if this tile keeps an entry above the diagonal (j > i), and bit 2 if
    it drops one on or below it."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inb = (offs_m[:, None] < N_Q) & (offs_n[None, :] < N_K)
    keep = tl.load(MASK + offs_m[:, None] * smm + offs_n[None, :] * smn, mask=inb, other=0) != 0
    upper = offs_n[None, :] > offs_m[:, None]
    kept_upper = tl.max((keep & upper & inb).to(tl.int32))
    dropped_lower = tl.max(((~keep) & (~upper) & inb).to(tl.int32))
    tl.atomic_and(FLAGS, 3 - kept_upper - 2 * dropped_lower)


def mask_layout_flags(mask, Nq, Nk, causal, device):
    """int32 flags for the kernels about a bool keep mask: bit 1 set when it keeps no (query i,
    key j > i) entry, so blocks above the diagonal can be skipped as under causal=True with the
    same result (a registered tril buffer, nanoGPT-style, is such a mask); bit 2 set when it keeps
    every entry on and below the diagonal. Both set (3): the mask is exactly the lower triangle.
    Computed on the device for every call, one pass over the mask, so a mask that changes between
    calls is always read as it is now, and no host sync is needed. Only for a mask shared by every
    batch and head (see `flags_apply`); the shared zero for other masks."""
    return _device_flags(mask, Nq, Nk) if flags_apply(mask, Nq, Nk, causal) else _zero_flags(device)


def _device_flags(mask, Nq, Nk):
    flags = torch.full((), 3, device=mask.device, dtype=torch.int32)
    m2 = mask.reshape(mask.shape[-2:]) if mask.dim() > 2 else mask
    m2 = m2.view(torch.uint8)
    bm, bn = (64, 256) if not interpreting() else (128, 512)
    _launch_mask_layout[(cdiv(Nq, bm), cdiv(Nk, bn))](
        m2, flags, Nq, Nk, m2.stride(0), m2.stride(1), BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return flags


def _zero_flags(device):
    device = torch.device(device)
    if device not in _NO_SKIP:  # one read-only zero per device: no fill launched per call
        _NO_SKIP[device] = torch.zeros((), device=device, dtype=torch.int32)
    return _NO_SKIP[device]


_NO_SKIP: dict = {}


def flags_apply(mask, Nq, Nk, causal) -> bool:
    """Whether `mask_layout_flags` computes flags for this mask (else they are a constant 0)."""
    shared = mask is not None and all(n == 1 for n in mask.shape[:-2])
    return shared and mask.dtype == torch.bool and not causal and tuple(mask.shape[-2:]) == (Nq, Nk) and Nq > 1


def mask_launches(mask, Nq, Nk, causal, device, ranges=None):
    """(flags, launches) for one kernel call: each launch is (RUN_IF, mask, causal) for the kernel.
    A shared bool mask gets two launches that decide on the device which of them computes: one
    specialized as causal=True without the mask (it runs when the flags say the mask is exactly
    the lower triangle, and is then as fast as causal), and one that reads the mask (it runs
    otherwise; the program that does not compute returns at once). Other calls get one launch. With
    kept ranges (`MaskRanges`) the flags come from the ranges' own pass over the mask."""
    if not flags_apply(mask, Nq, Nk, causal):
        return _zero_flags(device), [(0, mask, causal)]
    flags = ranges.flags if ranges is not None else _device_flags(mask, Nq, Nk)
    return flags, [(1, None, True), (2, mask, False)]


@triton.jit
def _kept(MASK, b, h, offs_m, offs_n, N_Q, N_K, smb, smh, smm, smn, MASK_KIND: tl.constexpr):
    """(kept, clean) for a [rows, cols] mask tile: kept where an entry keeps its score (a bool True,
    or a float above -1e30, NaN included, so that it reaches the result as in eager), clean where
    it keeps it unchanged (a bool True, a float 0). False outside the mask. A float at or below
    -1e30, added in fp32 to any realistic logit, leaves exp(logit - row max) exactly 0 once the
    row keeps one entry (see the patterns' _HUGE_NEGATIVE)."""
    inb = (offs_m[:, None] < N_Q) & (offs_n[None, :] < N_K)
    vals = tl.load(MASK + b * smb + h * smh + offs_m[:, None] * smm + offs_n[None, :] * smn, mask=inb, other=0)
    if MASK_KIND == 1:
        kept = (vals != 0) & inb
        return kept, kept
    else:
        f = vals.to(tl.float32)
        return (~(f <= -1e30)) & inb, (f == 0.0) & inb


@triton.jit
def _mask_row_ranges_kernel(MASK, ROWS, FLAGS, H_M, N_Q, N_K, smb, smh, smm, smn, rpb, rph, ROW_PLANE,
                            MASK_KIND: tl.constexpr, LAYOUT_FLAGS: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, WIDE: tl.constexpr = False):
    """Planes 0, 1 of ROWS[:, b, h, i] (offsets rpb, rph, planes ROW_PLANE apart) = [lo, hi) holding
    every kept key of query row i of the mask's own (b, h), to BLOCK_N keys (the start of the first
    tile that keeps one, the end of the last). Planes 2, 3 = [clean_lo, clean_hi): the longest run
    of whole BLOCK_N tiles in which the row keeps every key unchanged (`_kept`), empty (0, 0)
    without one; a kernel tile inside every row's run needs no mask read. Program (i block,
    b*H_M + h) walks all keys. A float row with nothing kept softmaxes over every key in eager (all
    its logits sit at one huge negative): it gets the whole range. A bool row with nothing kept
    gives 0: an empty range (N_K, 0). LAYOUT_FLAGS (a bool mask shared by every batch and head):
    also clear FLAGS' bits as `_mask_layout_kernel` does (FLAGS set to 3 before the launch), so
    the same pass finds an exact lower triangle."""
    bhm = tl.program_id(1)
    if WIDE:  # 64-bit slice bases, as in `_query_program`
        bhm = bhm.to(tl.int64)
    b = bhm // H_M
    h = bhm % H_M
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_lo = tl.full([BLOCK_M], N_K, tl.int32)
    row_hi = tl.zeros([BLOCK_M], tl.int32)
    run_lo = tl.zeros([BLOCK_M], tl.int32)  # start of the current run of clean tiles
    clean_lo = tl.zeros([BLOCK_M], tl.int32)
    clean_hi = tl.zeros([BLOCK_M], tl.int32)
    # the layout flags' two violations, kept per element and reduced once after the loop
    kept_upper = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    dropped_lower = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kept, clean = _kept(MASK, b, h, offs_m, offs_n, N_Q, N_K, smb, smh, smm, smn, MASK_KIND)
        if LAYOUT_FLAGS:  # `_mask_layout_kernel`'s two tests, accumulated per element
            upper = offs_n[None, :] > offs_m[:, None]
            inb = (offs_m[:, None] < N_Q) & (offs_n[None, :] < N_K)
            kept_upper = kept_upper | (kept & upper).to(tl.int32)
            dropped_lower = dropped_lower | ((~kept) & (~upper) & inb).to(tl.int32)
        # to the tile: one reduction per row and tile (the kernels still apply the mask inside)
        hit = tl.max(kept.to(tl.int32), axis=1) != 0
        row_lo = tl.minimum(row_lo, tl.where(hit, start_n, N_K))
        end = tl.minimum(start_n + BLOCK_N, N_K)
        row_hi = tl.maximum(row_hi, tl.where(hit, end, 0))
        # a tile is clean for a row when all its in-range keys are (a ragged last tile counts)
        whole = tl.min((clean | (offs_n[None, :] >= N_K)).to(tl.int32), axis=1) != 0
        run_lo = tl.where(whole, run_lo, end)
        longer = whole & (end - run_lo > clean_hi - clean_lo)
        clean_lo = tl.where(longer, run_lo, clean_lo)
        clean_hi = tl.where(longer, end, clean_hi)
    row_in = offs_m < N_Q
    if MASK_KIND == 2:
        dead = (row_hi == 0) & row_in
        row_lo = tl.where(dead, 0, row_lo)
        row_hi = tl.where(dead, N_K, row_hi)
    base = ROWS + b * rpb + h * rph + offs_m
    tl.store(base, row_lo, mask=row_in)
    tl.store(base + ROW_PLANE, row_hi, mask=row_in)
    tl.store(base + 2 * ROW_PLANE, clean_lo, mask=row_in)
    tl.store(base + 3 * ROW_PLANE, clean_hi, mask=row_in)
    if LAYOUT_FLAGS:
        tl.atomic_and(FLAGS, 3 - tl.max(kept_upper) - 2 * tl.max(dropped_lower))


# Masks this small are read whole: finding their ranges would cost about what skipping saves.
# TRUTHFUSE_MASK_SKIP=0 turns block skipping off (read at import).
_RANGES_MIN_ENTRIES = 1 << 20 if env_switch("TRUTHFUSE_MASK_SKIP") else float("inf")
# TRUTHFUSE_L2_KEY_PARTS=0: the l2 forward always adds |k|^2 by an FMA per score, never by the
# key parts' product (KEXT, `_key_parts_pay`)
L2_KEY_PARTS_ON = env_switch("TRUTHFUSE_L2_KEY_PARTS")


def _key_parts_pay(cfg: dict, device_type: str) -> bool:
    """Whether the l2 forward takes -|k|^2/2 from the key parts' product (KEXT) at this tile. On an
    H200 (docs/performance.md) the 8-warp m128n64 tiles, the defaults at head dims 64 and 256, ran
    9% and 2-3% faster with it; the 4-warp m64n64 tile of head dim 128 ran 20% slower, so other
    tiles keep the FMA. The interpreter takes it, so that the tests cover the form."""
    return L2_KEY_PARTS_ON and (device_type == "cpu" or (cfg["BLOCK_M"] >= 128 and cfg["num_warps"] >= 8))


def ranges_layout(mask, B, H, Nq, Nk, metric="dot"):
    """(Bm, Hm) of the kept ranges a call's mask gets (`MaskRanges`: B / H, or 1 where the mask
    broadcasts), or None where they would not pay: no mask, one under _RANGES_MIN_ENTRIES entries,
    or L1 (its kernels read every block). Reads shapes only, so it works on fake tensors."""
    if mask is None or metric == "l1" or Nq * Nk < _RANGES_MIN_ENTRIES:
        return None
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    return (B if shape[0] != 1 else 1), (H if shape[1] != 1 else 1)


def new_ranges(layout, Nq, device):
    """An empty ranges tensor, (5, Bm, Hm, Nq) int32: the [lo, hi) and [clean_lo, clean_hi) planes
    of each query row, and a fifth whose first element holds a shared bool mask's layout flags
    (`MaskRanges`)."""
    bm, hm = layout
    return torch.empty(5, bm, hm, Nq, device=device, dtype=torch.int32)


class MaskRanges:
    """Each query row's range of kept keys in a mask, for the kernels to skip blocks the mask drops
    whole (a sliding window, packed documents, padding), and its run of keys the mask leaves
    unchanged: a (5, Bm, Hm, Nq) int32 tensor `t` of [lo, hi) and [clean_lo, clean_hi) planes, and
    in the fifth a bool mask's layout flags when the mask is shared (`mask_layout_flags`). The
    forward and dQ kernels visit the key blocks their rows' ranges cover; the dK/dV kernel the query
    blocks whose ranges meet its keys. A visited tile inside the clean run of all its rows skips
    the mask read (the interior of a window or a document, below a causal diagonal). `compute`
    fills it from the mask (`_mask_row_ranges_kernel`, one pass); `full` with whole ranges and no
    clean runs (nothing skipped, the mask read everywhere). `args()` gives a kernel's (pointer,
    batch offset, head offset, plane offset)."""

    def __init__(self, t, Nq, Nk):
        self.t, self.nq, self.nk = t, Nq, Nk
        self.bm, self.hm = t.shape[1], t.shape[2]

    @classmethod
    def compute(cls, mask4, B, H, Nq, Nk, out=None):
        """Ranges of mask4 (the mask expanded to (B, H, Nq, Nk)), into `out` when given."""
        layout = (B if mask4.stride(0) != 0 else 1, H if mask4.stride(1) != 0 else 1)
        self = cls(out if out is not None else new_ranges(layout, Nq, mask4.device), Nq, Nk)
        if self.bm not in (layout[0], B) or self.hm not in (layout[1], H):  # per b / h, or shared
            raise ValueError(f"ranges of shape {tuple(self.t.shape)} for a mask broadcast as {layout}")
        m = mask4.view(torch.uint8) if mask4.dtype == torch.bool else mask4
        layout_flags = mask4.dtype == torch.bool and self.bm == self.hm == 1
        self.t[4].fill_(3 if layout_flags else 0)  # the flags and the rest of their plane (defined values)
        # the interpreter runs programs one at a time: few tall ones there, as narrow as the
        # interpreter's attention tiles so that its kernels skip as the GPU's do. On the GPU, 4
        # rows a program: 2048 programs for N=8192 keep enough loads in flight (1.3-1.9x faster than
        # 32 rows on an H100, docs/performance.md)
        block_m, block_n = (128, 64) if interpreting() else (4, 128)
        _launch_mask_row_ranges[(cdiv(Nq, block_m), self.bm * self.hm)](
            m, self.t, self.flags, self.hm, Nq, Nk, *m.stride(), *self.args()[1:],
            MASK_KIND=1 if mask4.dtype == torch.bool else 2, LAYOUT_FLAGS=layout_flags, BLOCK_M=block_m,
            BLOCK_N=block_n, num_warps=4, **wide_offsets(m, self.t))
        return self

    @property
    def flags(self):
        """The layout flags of a shared bool mask (int32, one element; 0 otherwise)."""
        return self.t[4, 0, 0, :1]

    @classmethod
    def full(cls, t, Nq, Nk):
        """Fill t with whole ranges: every block visited, as without ranges."""
        self = cls(t, Nq, Nk)
        t[0].fill_(0)
        t[1].fill_(Nk)
        t[2:].fill_(0)  # no clean runs, no layout flags
        return self

    def args(self) -> tuple:
        return (self.t, self.hm * self.nq if self.bm > 1 else 0, self.nq if self.hm > 1 else 0,
                self.bm * self.hm * self.nq)


def _call_ranges(mask4, mask, B, H, Nq, Nk, metric, given):
    """The MaskRanges a launch uses: the `given` tensor (from the forward; empty: none), or
    computed now where `ranges_layout` says they pay."""
    if given is not None:
        return MaskRanges(given, Nq, Nk) if given.numel() else None
    if ranges_layout(mask, B, H, Nq, Nk, metric) is None:
        return None
    return MaskRanges.compute(mask4, B, H, Nq, Nk)


def _no_ranges(device):
    """Kernel arguments for "no ranges" (SKIP off): the shared zero as an unread pointer."""
    return (_zero_flags(device), 0, 0, 0)


def attention_forward(q, k, v, scale, *, metric="dot", causal=False, mask=None, dropout_p=0.0, seed=None,
                      config=None, out=None, stats=True, softcap=0.0, ranges=None, sinks=None):
    """Run the forward kernel. q (B,H,Nq,D), k (B,Hkv,Nk,D), v (B,Hkv,Nk,Dv) any strides, one dtype;
    scale (H,) fp32; mask broadcastable to (B,H,Nq,Nk) (bool keep / float additive) or None;
    softcap > 0 soft-caps dot logits at that value (then `stats` must be False); ranges: a tensor
    of `new_ranges(ranges_layout(...))` to fill with the mask's kept ranges (and skip by), for the
    backward to reuse; None computes them here where they pay. sinks: (H,) fp32 sink logits (no
    scale gradient with them: E_p[raw] then leaves the sink out) or None.
    Returns (out (B,H,Nq,Dv) in q's dtype, or written into `out`; the row stats of `new_row_stats`,
    with E_p[raw] computed when `stats` (needed for an accurate scale gradient))."""
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    cfg = config or default_attention_config(metric, D, q.dtype, q.device.type,
                                             skips=ranges_layout(mask, B, H, Nq, Nk, metric) is not None)
    if out is None:
        out = torch.empty(B, H, Nq, Dv, device=q.device, dtype=q.dtype)
    row_stats = new_row_stats(B, H, Nq, q.device)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (cdiv(Nq, bm), B * H)
    split = split_applies(Nq, H // Hkv, dropout_p)
    key_parts = metric == "l2" and not split and _key_parts_pay(cfg, q.device.type)  # split: |k|^2
    q, k, _qvec, kvec = _prepass(metric, q, k, key_parts)
    seed_t = seed_arg(seed if dropout_p > 0 else None, q)
    kept = None
    if mask is not None and (ranges is None or ranges.numel()):
        m4 = _mask_args(mask, B, H, Nq, Nk, q.device)[0]
        kept = (_call_ranges(m4, mask, B, H, Nq, Nk, metric, None) if ranges is None
                else MaskRanges.compute(m4, B, H, Nq, Nk, out=ranges))
    flags, launches = mask_launches(mask, Nq, Nk, causal, q.device, kept)
    wide = wide_offsets(q, k, v, out, mask, kvec)  # kvec: the parts have 16 values a key
    if split:
        # it reads every key: kept ranges, if computed above, only serve the backward
        _split_forward(q, k, v, scale, kvec, flags, launches, out, row_stats, metric, stats, softcap, sinks)
        return out, row_stats
    for run_if, l_mask, l_causal in launches:
        m4, ms, mkind = _mask_args(l_mask, B, H, Nq, Nk, q.device)
        ranges_used = kept if l_mask is not None else None
        _launch_attn_fwd[grid](
            q, k, v, scale, kvec, m4, flags, out, row_stats[0], row_stats[2], row_stats[1],
            sinks if sinks is not None else scale, *q.stride(), *k.stride(), *v.stride(), *ms, *out.stride(),
            H, Nq, Nk, H // Hkv, seed_t, *dropout_args(dropout_p), _cap_arg(metric, softcap, stats),
            *(ranges_used.args() if ranges_used else _no_ranges(q.device)),
            HEAD_DIM=D, HEAD_DIM_V=Dv, D_PAD=_pad_dim(D), DV_PAD=_pad_dim(Dv),
            METRIC=METRIC_IDS[metric], MASK_KIND=mkind, CAUSAL=l_causal, DROPOUT=dropout_p > 0, STATS=stats,
            EVEN_M=Nq % bm == 0, EVEN_N=Nk % bn == 0, DOT_PREC=_dot_prec(q.dtype),
            BLOCK_M=bm, BLOCK_N=bn, RUN_IF=run_if, DROP_BITS=DROPOUT_BITS, SOFTCAP=softcap > 0,
            SKIP=ranges_used is not None, SINK=sinks is not None, KEXT=key_parts, num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], **wide,
        )
    return out, row_stats


# The split forward (`_attn_fwd_split_kernel`) serves calls with at most SPLIT_MAX_QUERIES query
# rows whose query heads per kv head, times those rows, fit SPLIT_MAX_ROWS packed rows: decoding
# steps, and a few speculative tokens at a time.
SPLIT_MAX_QUERIES = 16
SPLIT_MAX_ROWS = 64
# Its key tile per padded head dim: (BLOCK_N, num_warps, num_stages)
_SPLIT_TILES = {16: (128, 4, 3), 32: (128, 4, 3), 64: (128, 4, 3), 128: (128, 4, 2), 256: (64, 4, 2)}
# Programs per streaming multiprocessor the split count aims at (one was up to 14% faster than two
# in 6 of 9 decoding cases on an H100 and 2-4% slower in 2, docs/performance.md), and the fewest
# key tiles a split walks
SPLIT_WAVES = 1
SPLIT_MIN_TILES = 1
# At most this many splits: the join reads every split of a row at once
SPLIT_MAX = 128
_SM_COUNT: dict = {}


def split_applies(Nq: int, group: int, dropout_p: float) -> bool:
    """Whether `attention_forward` takes the split forward: few query rows and no dropout. It does
    not skip blocks by a mask's kept ranges (few query rows rarely reach the size that computes
    them); where they are computed, the backward still uses them."""
    return Nq <= SPLIT_MAX_QUERIES and Nq * group <= SPLIT_MAX_ROWS and dropout_p == 0


def _sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device; 8 for the interpreter, so that CPU tests split."""
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


# L1's split forward builds its distances on the FP32 units as [rows, BLOCK_N, D_CHUNK] tiles, and
# with at most SPLIT_L1_SMALL_ROWS packed rows (a decoding step of multi-head attention, or a few
# query heads a kv head) does P @ V as a [rows, BLOCK_N, Dv] product, without padding the rows to a
# tensor-core tile of 16: each such tile holds at most SPLIT_L1_TILE_ELEMENTS values (a program has
# 4 warps), which bounds BLOCK_N and D_CHUNK.
SPLIT_L1_SMALL_ROWS = 2
SPLIT_L1_TILE_ELEMENTS = 8192
# Head dims a step: at least MIN (narrower chunks cost more in loop steps than the bigger key tile
# saves), at most MAX (wider ones spread the sum over lanes), unrolled L1_UNROLL times
SPLIT_L1_MIN_CHUNK = 8
SPLIT_L1_MAX_CHUNK = 16
SPLIT_L1_UNROLL = 2
# L1's splits aim at this many programs per SM: its tiles wait on loads and shuffles that other
# programs can cover (4 against 1 on an H100: 0.69-0.91x the time in 7 of 9 decoding cases, the
# same in 2)
SPLIT_L1_WAVES = 4
# With 16 or more rows, at most this many scores a tile (more spills registers at sm_90)
SPLIT_L1_MAX_SCORES = 2048


def l1_split_rows(rows: int) -> int:
    """BLOCK_M of L1's split forward for `rows` packed rows."""
    return next_power_of_2(rows) if rows <= SPLIT_L1_SMALL_ROWS else max(16, next_power_of_2(rows))


def l1_split_tile(block_m: int, d_pad: int, dv_pad: int, block_n: int) -> tuple:
    """(BLOCK_N, D_CHUNK) of L1's split forward: the key tile `block_n` shrunk (not below 16) until
    the P @ V product of small rows fits SPLIT_L1_TILE_ELEMENTS and a distance tile of at least
    SPLIT_L1_MIN_CHUNK head dims does; then as many head dims a step as that tile fits (a power of
    two, at most SPLIT_L1_MAX_CHUNK and d_pad)."""
    if block_m >= 16:  # one column a step (`_l1_columns`): the [rows, keys] tile is the bound
        return max(16, min(block_n, SPLIT_L1_MAX_SCORES // block_m)), 1
    budget = SPLIT_L1_TILE_ELEMENTS
    block_n = min(block_n, budget // (block_m * dv_pad))
    block_n = max(16, min(block_n, budget // (block_m * min(d_pad, SPLIT_L1_MIN_CHUNK))))
    chunk = max(1, min(d_pad, SPLIT_L1_MAX_CHUNK, budget // (block_m * block_n)))
    return block_n, 1 << (chunk.bit_length() - 1)


def _split_tile(d_pad: int, device) -> tuple:
    """The split forward's (BLOCK_N, num_warps, num_stages) before any cap; the interpreter takes
    big tiles (few, slow program instances)."""
    return (64, 4, 1) if device.type == "cpu" else _SPLIT_TILES[d_pad]


def split_plan(B, Hkv, Nq, Nk, d_pad, causal, device, max_block_n=None, waves=None) -> tuple:
    """(n_splits, split_len, (BLOCK_N, num_warps, num_stages)) of the split forward: enough splits
    that the (split, b, kv head) programs fill the GPU SPLIT_WAVES times over, each a whole number
    of key tiles (`_split_tile`). max_block_n caps the key tile and waves replaces SPLIT_WAVES (L1's: `l1_split_tile`, SPLIT_L1_WAVES)."""
    tile = _split_tile(d_pad, device)
    if max_block_n:
        tile = (min(tile[0], max_block_n),) + tile[1:]
    key_hi = max(1, min(Nk, Nq) if causal else Nk)
    blocks = cdiv(key_hi, tile[0])
    waves = SPLIT_WAVES if waves is None else waves
    want = max(1, min(cdiv(blocks, SPLIT_MIN_TILES), SPLIT_MAX, cdiv(waves * _sm_count(device), B * Hkv)))
    split_len = cdiv(blocks, want) * tile[0]
    return cdiv(key_hi, split_len), split_len, tile


def _split_forward(q, k, v, scale, kvec, flags, launches, out, row_stats, metric, stats, softcap, sinks):
    """`attention_forward` through the split kernels: the splits into an fp32 workspace, then one
    pass that joins them into `out` and `row_stats` (the same statistics as the one-pass kernel,
    so the backward is unchanged)."""
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    d_pad, dv_pad = _pad_dim(D), _pad_dim(Dv)
    # a launch pair (`mask_launches`) needs every key in the mask's launch
    causal_all = all(c for _, _, c in launches)
    rows = Nq * (H // Hkv)
    block_m, max_bn, d_chunk = max(16, next_power_of_2(rows)), None, 16
    if metric == "l1":
        block_m = l1_split_rows(rows)
        max_bn, d_chunk = l1_split_tile(block_m, d_pad, dv_pad, _split_tile(d_pad, q.device)[0])
    n_splits, split_len, (bn, warps, stages) = split_plan(B, Hkv, Nq, Nk, d_pad, causal_all, q.device, max_bn,
                                                          SPLIT_L1_WAVES if metric == "l1" else None)
    one = n_splits == 1
    if one:  # the program writes the result itself: the workspace is an unread placeholder
        part_o = part_s = row_stats
    else:
        part_o = torch.empty(n_splits, B * H, Nq, dv_pad, device=q.device, dtype=torch.float32)
        part_s = torch.empty(3, n_splits, B * H, Nq, device=q.device, dtype=torch.float32)
    cap = _cap_arg(metric, softcap, stats)
    wide = wide_offsets(q, k, v, out, part_o, *(m for _, m, _ in launches))
    for run_if, l_mask, l_causal in launches:
        m4, ms, mkind = _mask_args(l_mask, B, H, Nq, Nk, q.device)
        _launch_attn_fwd_split[(n_splits, B * Hkv)](
            q, k, v, scale, kvec, m4, flags, part_o, part_s, sinks if sinks is not None else scale, out,
            row_stats[0], row_stats[2], row_stats[1], *q.stride(), *k.stride(), *v.stride(), *ms, *out.stride(),
            H, Nq, Nk, H // Hkv, cap, split_len, n_splits,
            HEAD_DIM=D, HEAD_DIM_V=Dv, D_PAD=d_pad, DV_PAD=dv_pad, METRIC=METRIC_IDS[metric], MASK_KIND=mkind,
            CAUSAL=l_causal, STATS=stats, EVEN_N=Nk % bn == 0, DOT_PREC=_dot_prec(q.dtype), BLOCK_M=block_m,
            BLOCK_N=bn, RUN_IF=run_if, SOFTCAP=softcap > 0, ONE_SPLIT=one, SINK=sinks is not None, D_CHUNK=d_chunk,
            L1_UNROLL=SPLIT_L1_UNROLL, num_warps=warps, num_stages=stages, **wide)
    if one:
        return
    # one MASK_KIND for the join: natural units only with a float mask (a pair of launches is bool)
    mkind = _mask_args(launches[-1][1], B, H, Nq, Nk, q.device)[2]
    _launch_split_combine[(B * H * Nq,)](
        part_o, part_s, sinks if sinks is not None else scale, out, row_stats[0], row_stats[2], row_stats[1],
        H, Nq, B * H * Nq, n_splits, *out.stride(), HEAD_DIM_V=Dv, DV_PAD=dv_pad, MASK_KIND=mkind, STATS=stats,
        SINK=sinks is not None, SPLITS_PAD=max(2, next_power_of_2(n_splits)), num_warps=4, **wide)


@triton.jit
def _row_dot_kernel(A, B, OUT, H, N, sab, sah, sam, sad, sbb, sbh, sbm, sbd,
                    DV: tl.constexpr, DV_PAD: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr = False):
    """OUT[b*H + h, m] = sum_d A[b, h, m, d] * B[b, h, m, d] in fp32 (the backward's delta)."""
    a, bh, offs_m, _, _ = _row_tile(A, H, N, sab, sah, sam, sad, DV, DV_PAD, BLOCK, WIDE)
    c, _, _, _, _ = _row_tile(B, H, N, sbb, sbh, sbm, sbd, DV, DV_PAD, BLOCK, WIDE)
    tl.store(OUT + bh * N + offs_m, tl.sum(a * c, axis=1), mask=offs_m < N)


@triton.jit
def _l2_key_parts_kernel(K, PARTS, H, N, skb, skh, skn, skd, D: tl.constexpr, D_PAD: tl.constexpr,
                         BLOCK: tl.constexpr, WIDE: tl.constexpr = False):
    """PARTS[b*H + h, n, :] = -|K[b, h, n]|^2 / 2 (summed in fp32) as L2_KEY_PARTS values in PARTS'
    dtype that add up to it (each the rounding of what the ones before leave), then zeros."""
    k, bh, offs_n, _, _ = _row_tile(K, H, N, skb, skh, skn, skd, D, D_PAD, BLOCK, WIDE)
    rest = -0.5 * tl.sum(k * k, axis=1)
    cols = tl.arange(0, L2_PARTS_WIDTH)
    parts = tl.zeros([BLOCK, L2_PARTS_WIDTH], tl.float32)
    for i in tl.static_range(L2_KEY_PARTS):
        part = rest.to(PARTS.dtype.element_ty).to(tl.float32)
        parts = tl.where(cols[None, :] == i, part[:, None], parts)
        # exact: what rounding to fewer bits leaves is an fp32 value; 0 after an infinite |k|^2
        # (inf - inf would make the later parts NaN, and the row's sum with them)
        rest = tl.where(part == rest, 0.0, rest - part)
    ptrs = PARTS + (bh * N + offs_n[:, None]) * L2_PARTS_WIDTH + cols[None, :]
    tl.store(ptrs, parts.to(PARTS.dtype.element_ty), mask=offs_n[:, None] < N)


def l2_key_parts(k, dtype=None):
    """(B*Hkv, Nk, L2_PARTS_WIDTH) -|k|^2 / 2 per key in parts for the forward's KEXT form: bf16 for
    16-bit k (fp16's range is too narrow for |k|^2; three bf16 parts carry fp32's 24 bits), fp32
    (one part) for fp32 k, and in the interpreter, whose bf16 products are wrong. dtype: force one."""
    B, H, N, D = k.shape
    if dtype is None:
        dtype = torch.float32 if (k.dtype == torch.float32 or interpreting()) else torch.bfloat16
    parts = torch.empty(B * H, N, L2_PARTS_WIDTH.value, device=k.device, dtype=dtype)
    block = _rows_per_program(D)
    _launch_l2_key_parts[(cdiv(N, block), B * H)](k, parts, H, N, *k.stride(), D=D, D_PAD=_pad_dim(D), BLOCK=block,
                                                  num_warps=4, **wide_offsets(k, parts))
    return parts


def row_dot(a, b):
    """(B*H, N) fp32 row sums of a * b for two (B, H, N, Dv) tensors of any strides: one launch
    instead of eager's casts, product and sum."""
    B, H, N, Dv = a.shape
    out = torch.empty(B * H, N, device=a.device, dtype=torch.float32)
    block = _rows_per_program(Dv)
    _launch_row_dot[(cdiv(N, block), B * H)](a, b, out, H, N, *a.stride(), *b.stride(),
                                                   DV=Dv, DV_PAD=_pad_dim(Dv), BLOCK=block, num_warps=4,
                                                   **wide_offsets(a, b))
    return out


def mask_grad_buffer(mask, B, H, Nq, Nk):
    """fp32 zeros to receive dS for a float mask, and its strides over (B, H, Nq, Nk): full size
    on Nq/Nk, and on B/H only where the mask itself is not broadcast. Where it is, the programs of
    every (b, h) add into one element in no fixed order; under
    torch.use_deterministic_algorithms(True) the buffer is full on B/H too, each element is added
    once, and `reduce_mask_grad` sums in a fixed order."""
    full = torch.are_deterministic_algorithms_enabled()
    mb = B if (mask.shape[0] != 1 or full) else 1
    mh = H if (mask.shape[1] != 1 or full) else 1
    buf = torch.zeros(mb, mh, Nq, Nk, device=mask.device, dtype=torch.float32)
    st = buf.stride()
    return buf, (st[0] if mb > 1 else 0, st[1] if mh > 1 else 0, st[2], st[3])


def reduce_mask_grad(buf, mask):
    """Sum the dS buffer down to the mask's own (4-d) shape."""
    dims = [i for i in range(4) if mask.shape[i] == 1 and buf.shape[i] != 1]
    if dims:
        buf = buf.sum(dim=dims, keepdim=True)
    return buf.to(mask.dtype)


def attention_backward(do, q, k, v, scale, out, row_stats, *, metric="dot", causal=False, mask=None,
                       dropout_p=0.0, seed=None, mask_grad=False, scale_grad=True, config=None, softcap=0.0,
                       ranges=None):
    """Gradients of the forward above. do (B,H,Nq,Dv); out, row_stats from `attention_forward`
    (with the same softcap; no scale gradient with one); ranges: the tensor the forward filled
    (empty: none), or None to compute them here where they pay.
    Returns dq (q's shape/dtype), dk, dv (k/v's shapes/dtypes), dscale (H,) fp32 (zeros unless
    `scale_grad`), and dmask (the 4-d mask's shape, fp32 summed over broadcast dims) or None."""
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    tile_kv, tile_q = backward_tiles(config or default_attention_config(
        metric, D, q.dtype, q.device.type, skips=ranges_layout(mask, B, H, Nq, Nk, metric) is not None,
        dropout=dropout_p > 0))
    delta = row_dot(do, out)
    seed_t = seed_arg(seed if dropout_p > 0 else None, q)
    q, k, qvec, kvec = _prepass(metric, q, k)
    dq = torch.empty(B, H, Nq, D, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, Hkv, Nk, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, Hkv, Nk, Dv, device=q.device, dtype=v.dtype)
    dsc = torch.zeros(B * H, Nq, device=q.device, dtype=torch.float32)
    if mask_grad:
        gbuf, gs = mask_grad_buffer(mask, B, H, Nq, Nk)
    else:
        gbuf, gs = torch.empty(1, device=q.device, dtype=torch.float32), (0, 0, 0, 0)
    cap = _cap_arg(metric, softcap, scale_grad)
    kept = None
    if mask is not None:
        kept = _call_ranges(_mask_args(mask, B, H, Nq, Nk, q.device)[0], mask, B, H, Nq, Nk, metric, ranges)
    flags, launches = mask_launches(mask, Nq, Nk, causal, q.device, kept)
    wide = wide_offsets(q, k, v, do, dq, dk, dv, mask, gbuf)
    for run_if, l_mask, l_causal in launches:
        m4, ms, mkind = _mask_args(l_mask, B, H, Nq, Nk, q.device)
        ranges_used = kept if l_mask is not None else None
        common = dict(HEAD_DIM=D, HEAD_DIM_V=Dv, D_PAD=_pad_dim(D), DV_PAD=_pad_dim(Dv),
                      METRIC=METRIC_IDS[metric], MASK_KIND=mkind, CAUSAL=l_causal, DROPOUT=dropout_p > 0,
                      DOT_PREC=_dot_prec(q.dtype), RUN_IF=run_if, DROP_BITS=DROPOUT_BITS, SOFTCAP=softcap > 0)
        bm, bn = tile_kv["BLOCK_M"], tile_kv["BLOCK_N"]
        _launch_attn_bwd_dkdv[(cdiv(Nk, bn), B * Hkv)](
            q, k, v, scale, kvec, m4, flags, do, row_stats[0], row_stats[2], delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *ms, *do.stride(),
            H, Hkv, Nq, Nk, H // Hkv, seed_t, *dropout_args(dropout_p), cap,
            *(ranges_used.args() if ranges_used else _no_ranges(q.device)),
            EVEN_M=Nq % bm == 0, EVEN_N=Nk % bn == 0, SKIP=ranges_used is not None, SCAN_ROWS=QUERY_SCAN_ROWS,
            SCALE_AFTER=H == Hkv, **tile_kv, **common, **wide)
        bm, bn = tile_q["BLOCK_M"], tile_q["BLOCK_N"]
        _launch_attn_bwd_dq[(cdiv(Nq, bm), B * H)](
            q, k, v, scale, qvec, kvec, m4, flags, do, row_stats[0], row_stats[2], row_stats[1], delta, dq, dsc,
            gbuf,
            *q.stride(), *k.stride(), *v.stride(), *ms, *do.stride(), *gs,
            H, Nq, Nk, H // Hkv, seed_t, *dropout_args(dropout_p), cap,
            *(ranges_used.args() if ranges_used else _no_ranges(q.device)),
            MASK_GRAD=mask_grad, SCALE_GRAD=scale_grad,
            EVEN_M=Nq % bm == 0, EVEN_N=Nk % bn == 0, SKIP=ranges_used is not None, **tile_q, **common, **wide)
    dscale = dsc.view(B, H, Nq).sum(dim=(0, 2))
    dmask = reduce_mask_grad(gbuf, mask) if mask_grad else None
    return dq, dk, dv, dscale, dmask


# Launched without Triton's per-call binding once compiled (`KernelLauncher`): at small shapes and
# in decoding, the host's launch time sets the pace.
_launch_normalize_rows = KernelLauncher(_normalize_rows_kernel)
_launch_normalize_rows_bwd = KernelLauncher(_normalize_rows_bwd_kernel)
_launch_mask_layout = KernelLauncher(_mask_layout_kernel)
_launch_mask_row_ranges = KernelLauncher(_mask_row_ranges_kernel)
_launch_attn_fwd = KernelLauncher(_attn_fwd_kernel)
_launch_attn_fwd_split = KernelLauncher(_attn_fwd_split_kernel)
_launch_split_combine = KernelLauncher(_attn_split_combine_kernel)
_launch_row_dot = KernelLauncher(_row_dot_kernel)
_launch_l2_key_parts = KernelLauncher(_l2_key_parts_kernel)
_launch_attn_bwd_dkdv = KernelLauncher(_attn_bwd_dkdv_kernel)
_launch_attn_bwd_dq = KernelLauncher(_attn_bwd_dq_kernel)
