"""Flash-style L1-distance attention: logits = -s * sum_d |q_d - k_d|, forward and backward.

No tensor cores for the scores: each [BLOCK_M, BLOCK_N] tile is built on the FP32 units from one
query column and one key column per head-dim step (two instructions per (i, j, d): a subtract and an
add of its absolute value). q and k are first copied to fp32, transposed to (B, H, D, N), so each
column is a contiguous load. P @ V still uses the tensor cores.

The forward keeps that tile, and its online softmax, as a 4-d [SUB_M, SUB_N, TM, TN] tensor
(`_l1_dist_sub`): Triton's default layout puts lanes and warps on the two trailing dims, so every
thread owns a SUB_M x SUB_N block of scores and loads SUB_M + SUB_N values per head-dim step for
SUB_M * SUB_N of them. Laid out as a plain 2-d tile, each thread owned a 64 x 1 strip and needed
about one shared-memory load per subtract, which held the kernel to a third of the FP32 peak. On
a GPU the column loads are issued as inline PTX vector loads (not layout anchors for Triton, so
the 4-d layout survives) and the next key block is prefetched into L1.

The backward recomputes the tile from the logsumexp (the distance as the forward's 4-d tile, made
2-d once per tile for the dots). dL/dq_d = -s * sum_j dS_ij sign(q_d - k_jd) and dL/dk_d =
s * sum_i dS_ij sign(q_id - k_d) are accumulated in registers, a SUB_R x SUB_D block of (row, head
dim) a thread: each tile's dS goes through a small per-program scratch tile, then every thread
walks the other operand's rows adding +-dS with predicated adds (sign(0) = 0 as in torch's abs
backward). No atomics: the result is deterministic. Tiles or head dims without such a layout use
the earlier kernels (`_l1_bwd_dkdv_kernel`, `_l1_bwd_dq_kernel`), which reduce one head-dim column
at a time into fp32 transposed buffers. Extra memory: fp32 copies of q and k, fp32 gradient
buffers and the scratch tiles, O(N).

Conventions (base-2 LSE, masks, dropout, GQA) are those of `fusion_backend.kernels.attention`.
"""
import torch
import triton
import triton.language as tl

from fusion_backend.kernels.attention import (
    DROPOUT_BITS, _dq_tile, _dropout_keep, _exp_rel, _fwd_epilogue, _group_head, _idle_launch, _kernel_scale, _key_end,
    _key_program, _load_row_stats, _load_rows, _logits, _mask_args, _pad_dim, _probs, _query_program, _query_start,
    _split_forward, _store_dv,
    backward_tiles, dropout_args, mask_grad_buffer, mask_launches, new_row_stats, reduce_mask_grad, row_dot,
    split_applies, wide_offsets,
)
from fusion_backend.kernels.philox import load_seed, seed_arg
from fusion_backend.kernels.runtime import KernelLauncher, cdiv, interpreting


@triton.jit
def _l1_dist(qt_base, kt_base, offs_m, offs_n, N_Q, N_K, HEAD_DIM: tl.constexpr,
             EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """sum_d |q_id - k_jd| for one tile, from the fp32 transposed copies (column d at base + d*N)."""
    dist = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for d in tl.range(0, HEAD_DIM, loop_unroll_factor=4):
        if EVEN_M:
            qc = tl.load(qt_base + d * N_Q + offs_m)
        else:
            qc = tl.load(qt_base + d * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
        if EVEN_N:
            kc = tl.load(kt_base + d * N_K + offs_n)
        else:
            kc = tl.load(kt_base + d * N_K + offs_n, mask=offs_n < N_K, other=0.0)
        dist += tl.abs(qc[:, None] - kc[None, :])
    return dist


@triton.jit
def _add_sign_grad(g, qt_base, kt_base, out_base, offs_m, offs_n, N_Q, N_K, HEAD_DIM: tl.constexpr,
                   INTO_QUERIES: tl.constexpr):
    """For every head-dim column d, add sum of g * sign(q_d - k_d) into column d of a transposed
    fp32 gradient buffer the program owns: over keys into dQ^T's rows offs_m (INTO_QUERIES), else
    over queries into dK^T's rows offs_n. sign(0) = 0."""
    for d in range(0, HEAD_DIM):
        qc = tl.load(qt_base + d * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
        kc = tl.load(kt_base + d * N_K + offs_n, mask=offs_n < N_K, other=0.0)
        diff = qc[:, None] - kc[None, :]
        signed = tl.where(diff > 0, g, tl.where(diff < 0, -g, 0.0))
        if INTO_QUERIES:
            ptr = out_base + d * N_Q + offs_m
            inb = offs_m < N_Q
            col = tl.sum(signed, axis=1)
        else:
            ptr = out_base + d * N_K + offs_n
            inb = offs_n < N_K
            col = tl.sum(signed, axis=0)
        old = tl.load(ptr, mask=inb, other=0.0)
        # replicas of `col` live in several warps: all must read before any writes
        tl.debug_barrier()
        tl.store(ptr, old + col, mask=inb)


@triton.jit
def _l1_sub_idx(start, BLOCK: tl.constexpr, SUB: tl.constexpr, AXIS: tl.constexpr, CONTIG: tl.constexpr = False):
    """Global indices start + r * (BLOCK // SUB) + t of a 4-d [SUB_M, SUB_N, TM, TN] tile's rows
    (AXIS 0: shape [SUB, 1, T, 1]) or columns (AXIS 1: shape [1, SUB, 1, T])."""
    T: tl.constexpr = BLOCK // SUB
    if CONTIG:  # start + t * SUB + r: a thread's SUB indices are contiguous
        if AXIS == 0:
            return start + tl.arange(0, SUB)[:, None, None, None] + tl.arange(0, T)[None, None, :, None] * SUB
        else:
            return start + tl.arange(0, SUB)[None, :, None, None] + tl.arange(0, T)[None, None, None, :] * SUB
    if AXIS == 0:
        return start + tl.arange(0, SUB)[:, None, None, None] * T + tl.arange(0, T)[None, None, :, None]
    else:
        return start + tl.arange(0, SUB)[None, :, None, None] * T + tl.arange(0, T)[None, None, None, :]


@triton.constexpr_function
def _ld_ptx(vec, coherent):
    """(PTX, constraints) of `_ldg`: ld.global.nc (the read-only path) or, coherent, ld.global;
    four floats (ld.v4) or one."""
    op = "ld.global" if coherent else "ld.global.nc"
    if vec == 4:
        return f"{op}.v4.f32 {{$0, $1, $2, $3}}, [$4];", "=r,=r,=r,=r,l,l,l,l"
    return f"{op}.f32 $0, [$1];", "=r,l"


@triton.jit
def _ldg(ptrs, VEC: tl.constexpr, COHERENT: tl.constexpr = False):
    """Unmasked fp32 load, issued as inline PTX so that it is not a layout anchor for Triton (the
    tile keeps its default layout whatever the number of elements). VEC 4: one ld.v4 per four
    consecutive registers of a thread, which must be four consecutive, 16-byte aligned floats;
    VEC 1: scalar loads. COHERENT: through the coherent path (ld.global, not .nc), for data this
    kernel wrote, and not pure: the same addresses are read again after the next barrier and
    store, so the compiler must neither hoist nor merge these loads."""
    ptx: tl.constexpr = _ld_ptx(VEC, COHERENT)
    return tl.inline_asm_elementwise(ptx[0], ptx[1], [ptrs], dtype=tl.float32, is_pure=not COHERENT, pack=VEC)


@triton.jit
def _prefetch_l1(ptrs):
    """prefetch.global.L1 for every address (no result; a side effect Triton keeps)."""
    tl.inline_asm_elementwise("prefetch.global.L1 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _prefetch_key_cols(kt_base, col0, N_K, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pull the [HEAD_DIM, BLOCK_N] fp32 K^T block at columns col0.. into L1, one 128-byte line
    per (d, 32 columns), so that the next key tile's column loads hit L1 instead of waiting on L2."""
    C: tl.constexpr = BLOCK_N // 32
    idx = tl.arange(0, HEAD_DIM * C)
    _prefetch_l1(kt_base + (idx // C) * N_K + col0 + (idx % C) * 32)


@triton.jit
def _l1_dist_sub(qt_base, kt_base, qi, kj, N_Q, N_K, HEAD_DIM: tl.constexpr, EVEN_M: tl.constexpr,
                 EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_M: tl.constexpr,
                 SUB_N: tl.constexpr, UNROLL: tl.constexpr, ASM_M: tl.constexpr = 0, ASM_N: tl.constexpr = 0,
                 CONTIG_M: tl.constexpr = False, CONTIG_N: tl.constexpr = False):
    """sum_d |q_id - k_jd| on the 4-d tile of row indices qi [SUB_M, 1, TM, 1] and column indices
    kj [1, SUB_N, 1, TN]. Triton's default layout gives each thread a SUB_M x SUB_N sub-tile
    (threads and warps go to the trailing dims) as long as neither load is a layout anchor (fewer
    elements than threads): a thread then loads SUB_M + SUB_N values per SUB_M * SUB_N elements."""
    dist = tl.zeros([SUB_M, SUB_N, BLOCK_M // SUB_M, BLOCK_N // SUB_N], tl.float32)
    # ld.v4 takes four consecutive registers of a thread: they must be four consecutive floats
    tl.static_assert(ASM_M != 4 or (CONTIG_M and SUB_M % 4 == 0), "ASM_M=4 needs CONTIG_M and SUB_M % 4 == 0")
    tl.static_assert(ASM_N != 4 or (CONTIG_N and SUB_N % 4 == 0), "ASM_N=4 needs CONTIG_N and SUB_N % 4 == 0")
    for d in tl.range(0, HEAD_DIM, loop_unroll_factor=UNROLL):
        qc = _load_column(qt_base + d * N_Q + qi, qi, N_Q, EVEN_M, ASM_M)
        kc = _load_column(kt_base + d * N_K + kj, kj, N_K, EVEN_N, ASM_N)
        dist += tl.abs(qc - kc)
    return dist


@triton.jit
def _load_column(ptrs, idx, N, EVEN: tl.constexpr, ASM: tl.constexpr):
    """One head-dim column of q^T or k^T at indices idx (masked to idx < N unless EVEN); through
    `_ldg` when ASM > 0 and no mask is needed."""
    if EVEN and ASM > 0:
        return _ldg(ptrs, ASM)
    elif EVEN:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=idx < N, other=0.0)


@triton.jit
def _rowred_max(x):
    return tl.max(tl.max(x, axis=1, keep_dims=True), axis=3, keep_dims=True)  # in-thread first


@triton.jit
def _rowred_sum(x):
    return tl.sum(tl.sum(x, axis=1, keep_dims=True), axis=3, keep_dims=True)  # in-thread first


@triton.jit
def _to_2d(x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CONTIG_M: tl.constexpr, CONTIG_N: tl.constexpr):
    """[SUB_M, SUB_N, TM, TN] (or a row-vector [SUB_M, 1, TM, 1]) -> [BLOCK_M, BLOCK_N] in the
    index order of `_l1_sub_idx`."""
    if CONTIG_M:
        if CONTIG_N:
            y = tl.permute(x, (2, 0, 3, 1))
        else:
            y = tl.permute(x, (2, 0, 1, 3))
    else:
        if CONTIG_N:
            y = tl.permute(x, (0, 2, 3, 1))
        else:
            y = tl.permute(x, (0, 2, 1, 3))
    return tl.reshape(y, (BLOCK_M, BLOCK_N))


@triton.jit
def _l1_fwd_kernel(
    QT, KT, V, SCALE, MASK, MASK_FLAGS, OUT, STATS_M, STATS_L, RBAR,
    svb, svh, svn, svd,
    smb, smh, smm, smn,
    sob, soh, som, sod,
    H, HKV, N_Q, N_K, GROUP, SEED, dropout_p, threshold,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, STATS: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RUN_IF: tl.constexpr = 0,
    DROP_BITS: tl.constexpr = 16, SUB_M: tl.constexpr = 8, SUB_N: tl.constexpr = 8, UNROLL: tl.constexpr = 4,
    CONTIG_M: tl.constexpr = False, CONTIG_N: tl.constexpr = False, ASM_M: tl.constexpr = 0,
    ASM_N: tl.constexpr = 0, PREFETCH: tl.constexpr = False,
    WIDE: tl.constexpr = False,
):
    """L1 attention forward for BLOCK_M queries of one (b, h). Grid: (cdiv(Nq, BLOCK_M), B * H).

    QT: (B, H, D, Nq) fp32 contiguous;  KT: (B, Hkv, D, Nk) fp32 contiguous.
    V: (B, Hkv, Nk, Dv) strides sv*;  SCALE: (H,) fp32;  MASK: (B,H,Nq,Nk) view with strides sm*.
    OUT: (B, H, Nq, Dv) strides so*;  STATS_M, STATS_L: (B*H, Nq) fp32, see
    `attention._store_row_stats`;  RBAR: (B*H, Nq) E_p[raw] if STATS.
    Constexprs as in `attention._attn_fwd_kernel` (DV_PAD the padded value head dim), and the
    sub-tile layout of `l1_sub_tiles`: the score tile and the online softmax are a 4-d
    [SUB_M, SUB_N, BLOCK_M // SUB_M, BLOCK_N // SUB_N] tensor (see `_l1_dist_sub`), so each thread
    owns a SUB_M x SUB_N block and row reductions are in-thread ops plus shuffles over the lanes.
    Only the 16-bit probabilities are reshaped to 2-d, for P @ V.
    """
    seed = load_seed(SEED, DROPOUT)
    if _idle_launch(MASK_FLAGS, RUN_IF):
        return
    pid_m, bh, b, h, hk = _query_program(H, GROUP, WIDE)
    row0 = pid_m * BLOCK_M
    qi = _l1_sub_idx(row0, BLOCK_M, SUB_M, 0, CONTIG_M)
    offs_dv = tl.arange(0, DV_PAD)
    scale_k = _kernel_scale(tl.load(SCALE + h), MASK_KIND)
    qt_base = QT + bh * HEAD_DIM * N_Q
    kt_base = KT + (b * HKV + hk) * HEAD_DIM * N_K
    v_base = V + b * svb + hk * svh
    mask_base = MASK + b * smb + h * smh

    m_i = tl.full([SUB_M, 1, BLOCK_M // SUB_M, 1], float("-inf"), tl.float32)
    l_i = tl.zeros([SUB_M, 1, BLOCK_M // SUB_M, 1], tl.float32)
    r_i = tl.zeros([SUB_M, 1, BLOCK_M // SUB_M, 1], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    hi = _key_end(pid_m, N_K, MASK_FLAGS, MASK_KIND, CAUSAL, BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        kj = _l1_sub_idx(start_n, BLOCK_N, SUB_N, 1, CONTIG_N)
        if PREFETCH and EVEN_N:  # the next key tile (the last one re-fetches itself: stays in bounds)
            _prefetch_key_cols(kt_base, tl.maximum(tl.minimum(start_n + BLOCK_N, hi - BLOCK_N), 0), N_K, HEAD_DIM,
                               BLOCK_N)
        raw = -_l1_dist_sub(qt_base, kt_base, qi, kj, N_Q, N_K, HEAD_DIM, EVEN_M, EVEN_N, BLOCK_M, BLOCK_N,
                            SUB_M, SUB_N, UNROLL, ASM_M, ASM_N, CONTIG_M, CONTIG_N)
        s = _logits(raw, scale_k, mask_base, smm, smn, qi, kj, N_Q, N_K, MASK_KIND, CAUSAL, EVEN_N)
        # attention._softmax_step, with row reductions over the 4-d tile's axes 1 and 3
        m_new = tl.maximum(m_i, _rowred_max(s))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = _exp_rel(s - m_safe, MASK_KIND)
        alpha = _exp_rel(m_i - m_safe, MASK_KIND)
        l_i = l_i * alpha + _rowred_sum(p)
        if STATS:
            r_i = r_i * alpha + _rowred_sum(p * raw)
        m_i = m_new
        p2 = _to_2d(p.to(V.dtype.element_ty), BLOCK_M, BLOCK_N, CONTIG_M, CONTIG_N)  # 2-d in 16 bits
        if DROPOUT:
            keep = _dropout_keep(seed, bh, row0 + tl.arange(0, BLOCK_M), start_n, N_K, threshold, BLOCK_M, BLOCK_N,
                                 DROP_BITS)
            p2 = tl.where(keep, p2, 0.0)
        acc = acc * _to_2d(alpha, BLOCK_M, 1, CONTIG_M, CONTIG_N)
        v = _load_rows(v_base, start_n + tl.arange(0, BLOCK_N), offs_dv, svn, svd, N_K, HEAD_DIM_V, EVEN_N,
                       HEAD_DIM_V == DV_PAD)
        acc = tl.dot(p2, v, acc, input_precision=DOT_PREC)
    if DROPOUT:  # kept probabilities scale by 1/(1-p): once per row here, not per element above
        acc = acc * (1.0 / (1.0 - dropout_p))
    m_i = tl.reshape(_to_2d(m_i, BLOCK_M, 1, CONTIG_M, CONTIG_N), (BLOCK_M,))
    l_i = tl.reshape(_to_2d(l_i, BLOCK_M, 1, CONTIG_M, CONTIG_N), (BLOCK_M,))
    r_i = tl.reshape(_to_2d(r_i, BLOCK_M, 1, CONTIG_M, CONTIG_N), (BLOCK_M,))
    _fwd_epilogue(acc, m_i, l_i, r_i, OUT, RBAR, STATS_M, STATS_L, b, h, bh, row0 + tl.arange(0, BLOCK_M), offs_dv,
                  sob, soh, som, sod, N_Q, HEAD_DIM_V, MASK_KIND)


@triton.jit
def _l1_dkdv_tile(dist, do, v, dv_acc, delta, sa, sb, scale, scale_k, mask_base, smm, smn, offs_m, offs_n, N_Q, N_K,
                  seed, bh, pid_n, threshold, dropout_p, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr,
                  EVEN_N: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, DROP_BITS: tl.constexpr):
    """One (query block, key block) tile of the dK/dV kernels, from its [BLOCK_M, BLOCK_N]
    distances: returns (scale * dS, dv_acc + P^T dO). dV takes the dropout's 1/(1-p) at the end."""
    s = _logits(-dist, scale_k, mask_base, smm, smn, offs_m[:, None], offs_n[None, :], N_Q, N_K, MASK_KIND, CAUSAL,
                EVEN_N)
    p = _probs(s, sa[:, None], sb[:, None], MASK_KIND)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    if DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m, pid_n * BLOCK_N, N_K, threshold, BLOCK_M, BLOCK_N, DROP_BITS)
        pd = tl.where(keep, p, 0.0)
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    else:
        pd = p
    dv_acc = tl.dot(tl.trans(pd.to(do.dtype)), do, dv_acc, input_precision=DOT_PREC)
    return p * (dp - delta[:, None]) * scale, dv_acc


@triton.jit
def _l1_bwd_dkdv_kernel(
    QT, KT, V, SCALE, MASK, MASK_FLAGS, DO, STATS_M, STATS_L, DELTA, DKT, DV,
    svb, svh, svn, svd,
    smb, smh, smm, smn,
    sdob, sdoh, sdom, sdod,
    H, HKV, N_Q, N_K, GROUP, SEED, dropout_p, threshold,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RUN_IF: tl.constexpr = 0,
    DROP_BITS: tl.constexpr = 16,
    WIDE: tl.constexpr = False,
):
    """dK (into DKT: (B, Hkv, D, Nk) fp32 zeros, transposed) and dV ((B, Hkv, Nk, Dv) contiguous)
    for BLOCK_N keys of one (b, kv head), summed over its GROUP query heads.
    Grid: (cdiv(Nk, BLOCK_N), B * Hkv). DO (B, H, Nq, Dv) strides sdo*; STATS_M, STATS_L, DELTA
    (B*H, Nq) fp32."""
    seed = load_seed(SEED, DROPOUT)
    if _idle_launch(MASK_FLAGS, RUN_IF):
        return
    pid_n, bhk, b, hk = _key_program(HKV, WIDE)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dv = tl.arange(0, DV_PAD)
    kt_base = KT + bhk * HEAD_DIM * N_K
    dkt_base = DKT + bhk * HEAD_DIM * N_K
    v = _load_rows(V + b * svb + hk * svh, offs_n, offs_dv, svn, svd, N_K, HEAD_DIM_V, EVEN_N, HEAD_DIM_V == DV_PAD)
    dv_acc = tl.zeros([BLOCK_N, DV_PAD], tl.float32)
    lo = _query_start(pid_n, MASK_FLAGS, MASK_KIND, CAUSAL, BLOCK_M, BLOCK_N)
    for g in range(0, GROUP):
        h, bh, scale, scale_k = _group_head(b, hk, g, H, GROUP, SCALE, MASK_KIND)
        qt_base = QT + bh * HEAD_DIM * N_Q
        do_base = DO + b * sdob + h * sdoh
        mask_base = MASK + b * smb + h * smh
        for start_m in range(lo, N_Q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            do = _load_rows(do_base, offs_m, offs_dv, sdom, sdod, N_Q, HEAD_DIM_V, EVEN_M, HEAD_DIM_V == DV_PAD)
            sa, sb = _load_row_stats(STATS_M, STATS_L, bh, offs_m, N_Q, MASK_KIND)
            delta = tl.load(DELTA + bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
            dist = _l1_dist(qt_base, kt_base, offs_m, offs_n, N_Q, N_K, HEAD_DIM, EVEN_M, EVEN_N, BLOCK_M, BLOCK_N)
            ds, dv_acc = _l1_dkdv_tile(dist, do, v, dv_acc, delta, sa, sb, scale, scale_k, mask_base, smm, smn,
                                       offs_m, offs_n, N_Q, N_K, seed, bh, pid_n, threshold, dropout_p, MASK_KIND,
                                       CAUSAL, EVEN_N, DROPOUT, DOT_PREC, BLOCK_M, BLOCK_N, DROP_BITS)
            _add_sign_grad(ds, qt_base, kt_base, dkt_base, offs_m, offs_n, N_Q, N_K, HEAD_DIM, False)
    _store_dv(DV, bhk, offs_n, offs_dv, dv_acc, N_K, dropout_p, HEAD_DIM_V, DROPOUT)


@triton.jit
def _l1_bwd_dq_kernel(
    QT, KT, V, SCALE, MASK, MASK_FLAGS, DO, STATS_M, STATS_L, RBAR, DELTA, DQT, DSCALE, DMASK,
    svb, svh, svn, svd,
    smb, smh, smm, smn,
    sdob, sdoh, sdom, sdod,
    sgb, sgh, sgm, sgn,
    H, HKV, N_Q, N_K, GROUP, SEED, dropout_p, threshold,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr,
    SCALE_GRAD: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RUN_IF: tl.constexpr = 0,
    DROP_BITS: tl.constexpr = 16,
    WIDE: tl.constexpr = False,
):
    """dQ (into DQT: (B, H, D, Nq) fp32 zeros, transposed), per-row scale gradient DSCALE (B*H, Nq)
    and float-mask gradient (atomics into DMASK, strides sg*) for BLOCK_M queries of one (b, h).
    Grid: (cdiv(Nq, BLOCK_M), B * H)."""
    seed = load_seed(SEED, DROPOUT)
    if _idle_launch(MASK_FLAGS, RUN_IF):
        return
    pid_m, bh, b, h, hk = _query_program(H, GROUP, WIDE)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, DV_PAD)
    scale = tl.load(SCALE + h)
    scale_k = _kernel_scale(scale, MASK_KIND)
    qt_base = QT + bh * HEAD_DIM * N_Q
    dqt_base = DQT + bh * HEAD_DIM * N_Q
    kt_base = KT + (b * HKV + hk) * HEAD_DIM * N_K
    v_base = V + b * svb + hk * svh
    mask_base = MASK + b * smb + h * smh
    do = _load_rows(DO + b * sdob + h * sdoh, offs_m, offs_dv, sdom, sdod, N_Q, HEAD_DIM_V, EVEN_M, HEAD_DIM_V == DV_PAD)
    sa, sb = _load_row_stats(STATS_M, STATS_L, bh, offs_m, N_Q, MASK_KIND)
    delta = tl.load(DELTA + bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
    rbar = tl.load(RBAR + bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
    dsc = tl.zeros([BLOCK_M], tl.float32)
    hi = _key_end(pid_m, N_K, MASK_FLAGS, MASK_KIND, CAUSAL, BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        dist = _l1_dist(qt_base, kt_base, offs_m, offs_n, N_Q, N_K, HEAD_DIM, EVEN_M, EVEN_N, BLOCK_M, BLOCK_N)
        v = _load_rows(v_base, offs_n, offs_dv, svn, svd, N_K, HEAD_DIM_V, EVEN_N, HEAD_DIM_V == DV_PAD)
        ds, dsc = _dq_tile(-dist, do, v, delta, rbar, dsc, sa, sb, scale_k, mask_base, smm, smn,
                           DMASK + b * sgb + h * sgh, sgm, sgn, offs_m, offs_n, N_Q, N_K, seed, bh, start_n,
                           threshold, dropout_p, MASK_KIND, CAUSAL, EVEN_N, DROPOUT, MASK_GRAD, SCALE_GRAD,
                           DOT_PREC, BLOCK_M, BLOCK_N, DROP_BITS)
        _add_sign_grad(-ds * scale, qt_base, kt_base, dqt_base, offs_m, offs_n, N_Q, N_K, HEAD_DIM, True)
    tl.store(DSCALE + bh * N_Q + offs_m, dsc, mask=offs_m < N_Q)


# ----------------------------------------------------------------------------------------------
# Backward, sub-tile version (BWD_IMPL "sub"): the distance tile is built as the forward's 4-d
# [SUB_M, SUB_N, TM, TN] tensor and made 2-d once per tile; the sign gradient is accumulated in
# registers as a 4-d [SUB_R, SUB_D, TR, TD] (row, head-dim) tensor that the program keeps for all
# its tiles. Per tile, the fp32 gradient factor g = dS * (+-scale) goes through a per-program
# global scratch tile (L1-resident), then one key (dq) or query (dk) at a time each thread adds
# g * sign(q_d - k_d) into its SUB_R x SUB_D accumulators: no reduction across threads, no
# per-head-dim loads of the gradient, and SUB_R + SUB_D loaded values per SUB_R * SUB_D elements.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_any(ptrs, ASM: tl.constexpr, COHERENT: tl.constexpr):
    """Unmasked fp32 load: inline PTX (ASM 4: ld.v4, 1: scalar) or tl.load (ASM 0)."""
    if ASM == 0:
        return tl.load(ptrs)
    else:
        return _ldg(ptrs, ASM, COHERENT)


@triton.jit
def _sign_acc(acc, a, b, g, SIGN_ASM: tl.constexpr):
    """acc + g * sign(a - b), sign(0) = 0. SIGN_ASM: two compares and two predicated adds in PTX
    (4 instructions, no subtract); else tl.where."""
    if SIGN_ASM:
        return tl.inline_asm_elementwise(
            "{.reg .pred p, n; setp.gt.f32 p, $2, $3; setp.lt.f32 n, $2, $3; mov.b32 $0, $1; "
            "@p add.f32 $0, $0, $4; @n sub.f32 $0, $0, $4;}",
            "=r,r,r,r,r", [acc, a, b, g], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return acc + tl.where(a > b, g, tl.where(a < b, -g, 0.0))


@triton.jit
def _grad_idx(BLOCK_R: tl.constexpr, SUB_R: tl.constexpr, HEAD_DIM: tl.constexpr, SUB_D: tl.constexpr):
    """Local row indices [SUB_R, 1, TR, 1] and head-dim indices [1, SUB_D, 1, TD] of the 4-d gradient
    accumulator; a thread's SUB_R rows and SUB_D columns are contiguous."""
    return _l1_sub_idx(0, BLOCK_R, SUB_R, 0, True), _l1_sub_idx(0, HEAD_DIM, SUB_D, 1, True)


@triton.jit
def _sign_grad_tile(acc, own, other_base, g_base, other0, N_OTHER, ri, dd,
                    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
                    OWN_IS_Q: tl.constexpr, ASM_R: tl.constexpr, ASM_D: tl.constexpr,
                    SIGN_ASM: tl.constexpr, GUNROLL: tl.constexpr, EVEN_O: tl.constexpr):
    """acc[r, d] += sum_o g[o, r] * sign(q_d - k_d) over the BLOCK_O rows o of the other operand
    (keys when OWN_IS_Q, else queries) starting at other0. own: this program's rows [r, d] (q rows
    or k rows); other_base: fp32 (N, HEAD_DIM) rows of the other operand; g_base: the scratch tile,
    g[o, r] at g_base + o * BLOCK_R + r. Rows past N_OTHER read row N_OTHER - 1 (their g is 0)
    unless EVEN_O (N_OTHER a multiple of BLOCK_O)."""
    other_ptrs = other_base + other0 * HEAD_DIM + dd
    for o in tl.range(0, BLOCK_O, loop_unroll_factor=GUNROLL):
        g = _load_any(g_base + o * BLOCK_R + ri, ASM_R, True)
        if EVEN_O:
            x = _load_any(other_ptrs + o * HEAD_DIM, ASM_D, False)
        else:
            x = _load_any(other_base + tl.minimum(other0 + o, N_OTHER - 1) * HEAD_DIM + dd, ASM_D, False)
        if OWN_IS_Q:
            acc = _sign_acc(acc, own, x, g, SIGN_ASM)
        else:
            acc = _sign_acc(acc, x, own, g, SIGN_ASM)
    return acc


@triton.jit
def _l1_bwd_dkdv_sub_kernel(
    QT, KT, QF, KF, V, SCALE, MASK, MASK_FLAGS, DO, STATS_M, STATS_L, DELTA, DK, DV, SCRATCH,
    svb, svh, svn, svd,
    smb, smh, smm, smn,
    sdob, sdoh, sdom, sdod,
    H, HKV, N_Q, N_K, GROUP, SEED, dropout_p, threshold,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RUN_IF: tl.constexpr = 0,
    DROP_BITS: tl.constexpr = 16, SUB_M: tl.constexpr = 4, SUB_N: tl.constexpr = 8, UNROLL: tl.constexpr = 4,
    CONTIG_M: tl.constexpr = False, CONTIG_N: tl.constexpr = False, ASM_M: tl.constexpr = 0,
    ASM_N: tl.constexpr = 0, PREFETCH: tl.constexpr = False, GSUB_R: tl.constexpr = 4, GSUB_D: tl.constexpr = 8,
    GASM: tl.constexpr = 0, SIGN_ASM: tl.constexpr = False, GUNROLL: tl.constexpr = 4,
    WIDE: tl.constexpr = False,
):
    """`_l1_bwd_dkdv_kernel` with the sub-tile layouts: dK into DK (B, Hkv, Nk, D) fp32 (every row
    written), dV as there. QF/KF: (B, H, Nq, D) / (B, Hkv, Nk, D) fp32 contiguous; SCRATCH: fp32,
    BLOCK_M * BLOCK_N per program."""
    seed = load_seed(SEED, DROPOUT)
    if _idle_launch(MASK_FLAGS, RUN_IF):
        return
    pid_n, bhk, b, hk = _key_program(HKV, WIDE)
    col0 = pid_n * BLOCK_N
    offs_n = col0 + tl.arange(0, BLOCK_N)
    offs_dv = tl.arange(0, DV_PAD)
    kj = _l1_sub_idx(col0, BLOCK_N, SUB_N, 1, CONTIG_N)
    kt_base = KT + bhk * HEAD_DIM * N_K
    kf_base = KF + bhk * N_K * HEAD_DIM
    g_base = SCRATCH + (bhk * tl.num_programs(0) + pid_n).to(tl.int64) * (BLOCK_M * BLOCK_N)
    rj, dd = _grad_idx(BLOCK_N, GSUB_R, HEAD_DIM, GSUB_D)
    own = _load_any(kf_base + tl.minimum(col0 + rj, N_K - 1) * HEAD_DIM + dd, GASM, False)
    acc = tl.zeros([GSUB_R, GSUB_D, BLOCK_N // GSUB_R, HEAD_DIM // GSUB_D], tl.float32)
    v = _load_rows(V + b * svb + hk * svh, offs_n, offs_dv, svn, svd, N_K, HEAD_DIM_V, EVEN_N, HEAD_DIM_V == DV_PAD)
    dv_acc = tl.zeros([BLOCK_N, DV_PAD], tl.float32)
    lo = _query_start(pid_n, MASK_FLAGS, MASK_KIND, CAUSAL, BLOCK_M, BLOCK_N)
    for g in range(0, GROUP):
        h, bh, scale, scale_k = _group_head(b, hk, g, H, GROUP, SCALE, MASK_KIND)
        qt_base = QT + bh * HEAD_DIM * N_Q
        qf_base = QF + bh * N_Q * HEAD_DIM
        do_base = DO + b * sdob + h * sdoh
        mask_base = MASK + b * smb + h * smh
        for start_m in range(lo, N_Q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            qi = _l1_sub_idx(start_m, BLOCK_M, SUB_M, 0, CONTIG_M)
            do = _load_rows(do_base, offs_m, offs_dv, sdom, sdod, N_Q, HEAD_DIM_V, EVEN_M, HEAD_DIM_V == DV_PAD)
            sa, sb = _load_row_stats(STATS_M, STATS_L, bh, offs_m, N_Q, MASK_KIND)
            delta = tl.load(DELTA + bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
            dist = _to_2d(_l1_dist_sub(qt_base, kt_base, qi, kj, N_Q, N_K, HEAD_DIM, EVEN_M, EVEN_N, BLOCK_M,
                                       BLOCK_N, SUB_M, SUB_N, UNROLL, ASM_M, ASM_N, CONTIG_M, CONTIG_N),
                          BLOCK_M, BLOCK_N, CONTIG_M, CONTIG_N)
            ds, dv_acc = _l1_dkdv_tile(dist, do, v, dv_acc, delta, sa, sb, scale, scale_k, mask_base, smm, smn,
                                       offs_m, offs_n, N_Q, N_K, seed, bh, pid_n, threshold, dropout_p, MASK_KIND,
                                       CAUSAL, EVEN_N, DROPOUT, DOT_PREC, BLOCK_M, BLOCK_N, DROP_BITS)
            tl.debug_barrier()  # every thread is done reading the previous tile's g
            loc = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            tl.store(g_base + loc, tl.where((offs_m[:, None] < N_Q) & (offs_n[None, :] < N_K), ds, 0.0))
            tl.debug_barrier()
            acc = _sign_grad_tile(acc, own, qf_base, g_base, start_m, N_Q, rj, dd, HEAD_DIM, BLOCK_N, BLOCK_M,
                                  False, GASM, GASM, SIGN_ASM, GUNROLL, EVEN_M)
    rows = col0 + rj
    tl.store(DK + bhk * N_K * HEAD_DIM + rows * HEAD_DIM + dd, acc, mask=(rows < N_K) & (dd < HEAD_DIM))
    _store_dv(DV, bhk, offs_n, offs_dv, dv_acc, N_K, dropout_p, HEAD_DIM_V, DROPOUT)


@triton.jit
def _l1_bwd_dq_sub_kernel(
    QT, KT, QF, KF, V, SCALE, MASK, MASK_FLAGS, DO, STATS_M, STATS_L, RBAR, DELTA, DQ, DSCALE, DMASK, SCRATCH,
    svb, svh, svn, svd,
    smb, smh, smm, smn,
    sdob, sdoh, sdom, sdod,
    sgb, sgh, sgm, sgn,
    H, HKV, N_Q, N_K, GROUP, SEED, dropout_p, threshold,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr,
    SCALE_GRAD: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RUN_IF: tl.constexpr = 0,
    DROP_BITS: tl.constexpr = 16, SUB_M: tl.constexpr = 4, SUB_N: tl.constexpr = 8, UNROLL: tl.constexpr = 4,
    CONTIG_M: tl.constexpr = False, CONTIG_N: tl.constexpr = False, ASM_M: tl.constexpr = 0,
    ASM_N: tl.constexpr = 0, PREFETCH: tl.constexpr = False, GSUB_R: tl.constexpr = 4, GSUB_D: tl.constexpr = 8,
    GASM: tl.constexpr = 0, SIGN_ASM: tl.constexpr = False, GUNROLL: tl.constexpr = 4,
    WIDE: tl.constexpr = False,
):
    """`_l1_bwd_dq_kernel` with the sub-tile layouts: dQ into DQ (B, H, Nq, D) fp32 (every row
    written); the rest as there. QF/KF and SCRATCH as in `_l1_bwd_dkdv_sub_kernel`."""
    seed = load_seed(SEED, DROPOUT)
    if _idle_launch(MASK_FLAGS, RUN_IF):
        return
    pid_m, bh, b, h, hk = _query_program(H, GROUP, WIDE)
    row0 = pid_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    qi = _l1_sub_idx(row0, BLOCK_M, SUB_M, 0, CONTIG_M)
    offs_dv = tl.arange(0, DV_PAD)
    scale = tl.load(SCALE + h)
    scale_k = _kernel_scale(scale, MASK_KIND)
    qt_base = QT + bh * HEAD_DIM * N_Q
    kt_base = KT + (b * HKV + hk) * HEAD_DIM * N_K
    kf_base = KF + (b * HKV + hk) * N_K * HEAD_DIM
    v_base = V + b * svb + hk * svh
    mask_base = MASK + b * smb + h * smh
    g_base = SCRATCH + (bh * tl.num_programs(0) + pid_m).to(tl.int64) * (BLOCK_M * BLOCK_N)
    ri, dd = _grad_idx(BLOCK_M, GSUB_R, HEAD_DIM, GSUB_D)
    own = _load_any(QF + bh * N_Q * HEAD_DIM + tl.minimum(row0 + ri, N_Q - 1) * HEAD_DIM + dd, GASM, False)
    acc = tl.zeros([GSUB_R, GSUB_D, BLOCK_M // GSUB_R, HEAD_DIM // GSUB_D], tl.float32)
    do = _load_rows(DO + b * sdob + h * sdoh, offs_m, offs_dv, sdom, sdod, N_Q, HEAD_DIM_V, EVEN_M,
                    HEAD_DIM_V == DV_PAD)
    sa, sb = _load_row_stats(STATS_M, STATS_L, bh, offs_m, N_Q, MASK_KIND)
    delta = tl.load(DELTA + bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
    rbar = tl.load(RBAR + bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
    dsc = tl.zeros([BLOCK_M], tl.float32)
    hi = _key_end(pid_m, N_K, MASK_FLAGS, MASK_KIND, CAUSAL, BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kj = _l1_sub_idx(start_n, BLOCK_N, SUB_N, 1, CONTIG_N)
        dist = _to_2d(_l1_dist_sub(qt_base, kt_base, qi, kj, N_Q, N_K, HEAD_DIM, EVEN_M, EVEN_N, BLOCK_M, BLOCK_N,
                                   SUB_M, SUB_N, UNROLL, ASM_M, ASM_N, CONTIG_M, CONTIG_N),
                      BLOCK_M, BLOCK_N, CONTIG_M, CONTIG_N)
        v = _load_rows(v_base, offs_n, offs_dv, svn, svd, N_K, HEAD_DIM_V, EVEN_N, HEAD_DIM_V == DV_PAD)
        ds, dsc = _dq_tile(-dist, do, v, delta, rbar, dsc, sa, sb, scale_k, mask_base, smm, smn,
                           DMASK + b * sgb + h * sgh, sgm, sgn, offs_m, offs_n, N_Q, N_K, seed, bh, start_n,
                           threshold, dropout_p, MASK_KIND, CAUSAL, EVEN_N, DROPOUT, MASK_GRAD, SCALE_GRAD,
                           DOT_PREC, BLOCK_M, BLOCK_N, DROP_BITS)
        tl.debug_barrier()  # every thread is done reading the previous tile's g
        loc = tl.arange(0, BLOCK_N)[None, :] * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
        tl.store(g_base + loc, tl.where((offs_m[:, None] < N_Q) & (offs_n[None, :] < N_K), -ds * scale, 0.0))
        tl.debug_barrier()
        acc = _sign_grad_tile(acc, own, kf_base, g_base, start_n, N_K, ri, dd, HEAD_DIM, BLOCK_M, BLOCK_N,
                              True, GASM, GASM, SIGN_ASM, GUNROLL, EVEN_N)
    rows = row0 + ri
    tl.store(DQ + bh * N_Q * HEAD_DIM + rows * HEAD_DIM + dd, acc, mask=(rows < N_Q) & (dd < HEAD_DIM))
    tl.store(DSCALE + bh * N_Q + offs_m, dsc, mask=offs_m < N_Q)


def default_l1_config(head_dim: int, dtype: torch.dtype, device_type: str) -> dict:
    """Default tiles for the L1 kernels (same dict layout as `attention.attention_config_space`)."""
    if device_type == "cpu":
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1,
                    BWD_BLOCK_M=64, BWD_BLOCK_N=64, bwd_num_warps=4, bwd_num_stages=1)
    # m128n128w8 (8 x 8 scores a thread) was the fastest of the forward tiles and sub-tile layouts timed on
    # an H100: 14.9 ms at B=4 H=8 N=8192 D=64 bf16, 64% of the FP32 peak (bench/l1_forward_gpu.py)
    return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=1,
                BWD_BLOCK_M=64, BWD_BLOCK_N=64, bwd_num_warps=4, bwd_num_stages=1)


def l1_sub_tiles(cfg: dict, interpret: bool) -> dict:
    """The forward's per-thread layout for a tile: SUB_M x SUB_N scores a thread (8 x 8 when the
    tile has 64 a thread, 4 x 8 for 32, 4 x 4 for 16), contiguous indices a thread, and on a GPU
    vector loads through inline PTX, the next key block prefetched into L1 and the head-dim loop
    unrolled 8 times (the interpreter runs none of the PTX). Keys given in cfg override these."""
    per_thread = cfg["BLOCK_M"] * cfg["BLOCK_N"] // (32 * cfg["num_warps"])
    sub_m, sub_n = {64: (8, 8), 32: (4, 8), 16: (4, 4)}.get(per_thread, (0, 0))
    if not sub_m or cfg["BLOCK_M"] % sub_m or cfg["BLOCK_N"] % sub_n:
        raise ValueError(f"L1 forward tile {cfg['BLOCK_M']}x{cfg['BLOCK_N']} with {cfg['num_warps']} warps holds "
                         f"{per_thread} scores a thread; supported: 16, 32 or 64")
    gpu = not interpret
    out = dict(SUB_M=sub_m, SUB_N=sub_n, CONTIG_M=True, CONTIG_N=True, ASM_M=4 if gpu else 0,
               ASM_N=4 if gpu else 0, PREFETCH=gpu and cfg["BLOCK_N"] >= 32, UNROLL=8 if gpu else 4)
    out.update({k: cfg[k] for k in out if k in cfg})
    return out


_PER_THREAD_SUB = {64: (8, 8), 32: (4, 8), 16: (4, 4)}


def l1_bwd_sub_tiles(tile: dict, head_dim: int, cfg: dict, interpret: bool):
    """Constexprs of the sub-tile backward kernels for one backward tile (BLOCK_M, BLOCK_N,
    num_warps): the distance tile's layout as `l1_sub_tiles`, and the gradient accumulator's
    GSUB_R x GSUB_D (rows x head dims) a thread, GASM (4: ld.v4 of the gradient factors and the
    other operand's rows), SIGN_ASM (compare + predicated adds in PTX) and GUNROLL (unroll of the
    per-key / per-query loop). Keys of cfg["bwd_sub"] override these. None if unsupported
    (head_dim not a power of two, or a per-thread count without a layout): use the legacy kernels."""
    over = dict(cfg.get("bwd_sub", {}))
    threads = 32 * tile["num_warps"]
    try:
        out = l1_sub_tiles(dict(tile, **{k: over[k] for k in over if k in ("SUB_M", "SUB_N", "CONTIG_M", "CONTIG_N",
                                                                          "ASM_M", "ASM_N", "PREFETCH", "UNROLL")}),
                           interpret)
    except ValueError:
        return None
    out["PREFETCH"] = False
    if head_dim & (head_dim - 1):
        return None
    gpu = not interpret
    for key, rows in (("kv", tile["BLOCK_N"]), ("q", tile["BLOCK_M"])):
        pt = rows * head_dim // threads
        if pt not in _PER_THREAD_SUB:
            return None
    # dkdv accumulates BLOCK_N rows, dq BLOCK_M rows: one layout for both needs equal counts
    if tile["BLOCK_N"] != tile["BLOCK_M"]:
        return None
    gr, gd = _PER_THREAD_SUB[tile["BLOCK_M"] * head_dim // threads]
    if gd > head_dim or gr > tile["BLOCK_M"]:
        return None
    # GUNROLL 8: 97.1 ms against 106.0 with 4 for the backward at B=4 H=8 N=8192 D=64 bf16 on an
    # H100 (bench/l1_backward_gpu.py; the 2-d kernels: 256.5 ms)
    out.update(GSUB_R=gr, GSUB_D=gd, GASM=4 if gpu and head_dim % 4 == 0 else 0, SIGN_ASM=gpu,
               GUNROLL=8 if gpu else 4)
    out.update({k: over[k] for k in over if k in out})
    return out

_L1_FORWARD_TILES = ((128, 128, 8), (256, 64, 8), (128, 64, 8), (64, 128, 4), (64, 64, 4))


def l1_config_space(head_dim: int, dtype: torch.dtype, device_type: str) -> list:
    """Configs the tuner may search for the L1 kernels."""
    if device_type == "cpu":
        return [default_l1_config(head_dim, dtype, device_type)]
    out = []
    for bm, bn, w in _L1_FORWARD_TILES:
        for bbm, bbn, bw in ((64, 64, 4), (128, 128, 8)):  # square: the sub-tile backward kernels
            out.append(dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=1,
                            BWD_BLOCK_M=bbm, BWD_BLOCK_N=bbn, bwd_num_warps=bw, bwd_num_stages=1))
    return out


def _transposed_f32(x):
    return x.float().transpose(-1, -2).contiguous()


def _dot_prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def l1_attention_forward(q, k, v, scale, *, causal=False, mask=None, dropout_p=0.0, seed=None, config=None, out=None,
                         stats=True):
    """L1 attention forward. Shapes as `attention.attention_forward`; returns (out, row_stats).
    `stats` is accepted for the same signature; E_p[raw] is computed either way. Few query rows
    without dropout take the split forward (`attention.split_applies`), as the other metrics do."""
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    cfg = config or default_l1_config(D, q.dtype, q.device.type)
    if out is None:
        out = torch.empty(B, H, Nq, Dv, device=q.device, dtype=q.dtype)
    row_stats = new_row_stats(B, H, Nq, q.device)
    if split_applies(Nq, H // Hkv, dropout_p):
        # decoding: the split forward reads q and k as they are, with no transposed fp32 copies
        flags, launches = mask_launches(mask, Nq, Nk, causal, q.device)
        _split_forward(q, k, v, scale, scale, flags, launches, out, row_stats, "l1", True, 0.0, None)
        return out, row_stats
    qt, kt = _transposed_f32(q), _transposed_f32(k)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    sub = l1_sub_tiles(cfg, interpreting())
    flags, launches = mask_launches(mask, Nq, Nk, causal, q.device)
    seed_t = seed_arg(seed if dropout_p > 0 else None, q)
    wide = wide_offsets(qt, kt, v, out, mask)
    for run_if, l_mask, l_causal in launches:
        m4, ms, mkind = _mask_args(l_mask, B, H, Nq, Nk, q.device)
        _launch_l1_fwd[(cdiv(Nq, bm), B * H)](
            qt, kt, v, scale, m4, flags, out, row_stats[0], row_stats[2], row_stats[1],
            *v.stride(), *ms, *out.stride(),
            H, Hkv, Nq, Nk, H // Hkv, seed_t, *dropout_args(dropout_p),
            HEAD_DIM=D, HEAD_DIM_V=Dv, DV_PAD=_pad_dim(Dv),
            # E_p[raw] is always computed: on an H100 the kernel compiled without it ran 21.7 ms
            # against 15.1 with it (N=8192, bench/l1_forward_gpu.py), its per-tile work is small
            MASK_KIND=mkind, CAUSAL=l_causal, DROPOUT=dropout_p > 0, STATS=True,
            EVEN_M=Nq % bm == 0, EVEN_N=Nk % bn == 0, DOT_PREC=_dot_prec(q.dtype),
            BLOCK_M=bm, BLOCK_N=bn, RUN_IF=run_if, DROP_BITS=DROPOUT_BITS,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **sub, **wide,
        )
    return out, row_stats


def l1_attention_backward(do, q, k, v, scale, out, row_stats, *, causal=False, mask=None, dropout_p=0.0, seed=None,
                          mask_grad=False, scale_grad=True, config=None):
    """L1 attention backward; returns dq, dk, dv, dscale (H,) fp32 (zeros unless `scale_grad`),
    dmask or None."""
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    tile_kv, tile_q = backward_tiles(config or default_l1_config(D, q.dtype, q.device.type))
    qt, kt = _transposed_f32(q), _transposed_f32(k)
    delta = row_dot(do, out)
    flags, launches = mask_launches(mask, Nq, Nk, causal, q.device)
    seed_t = seed_arg(seed if dropout_p > 0 else None, q)
    dqt = dkt = None
    dv = torch.empty(B, Hkv, Nk, Dv, device=q.device, dtype=v.dtype)
    dsc = torch.zeros(B * H, Nq, device=q.device, dtype=torch.float32)
    if mask_grad:
        gbuf, gs = mask_grad_buffer(mask, B, H, Nq, Nk)
    else:
        gbuf, gs = torch.empty(1, device=q.device, dtype=torch.float32), (0, 0, 0, 0)
    cfg = config or default_l1_config(D, q.dtype, q.device.type)
    impl = cfg.get("BWD_IMPL", "sub")
    subs = None
    if impl == "sub":
        subs = [l1_bwd_sub_tiles(t, D, cfg, interpreting()) for t in (tile_kv, tile_q)]
        if None in subs:
            impl = "legacy"
    if impl == "sub":
        qf, kf = q.float().contiguous(), k.float().contiguous()
        dq32 = torch.zeros(B, H, Nq, D, device=q.device, dtype=torch.float32)
        dk32 = torch.zeros(B, Hkv, Nk, D, device=q.device, dtype=torch.float32)
        n_scr = max(cdiv(Nk, tile_kv["BLOCK_N"]) * B * Hkv * tile_kv["BLOCK_M"] * tile_kv["BLOCK_N"],
                    cdiv(Nq, tile_q["BLOCK_M"]) * B * H * tile_q["BLOCK_M"] * tile_q["BLOCK_N"])
        scratch = torch.empty(n_scr, device=q.device, dtype=torch.float32)
    elif impl != "legacy":
        raise ValueError(f"BWD_IMPL {impl!r}: 'sub' or 'legacy'")
    # the legacy path's (B, H, D, N) gradients span what qt and kt do
    wide = wide_offsets(qt, kt, v, do, dv, mask, gbuf)
    for run_if, l_mask, l_causal in launches:
        m4, ms, mkind = _mask_args(l_mask, B, H, Nq, Nk, q.device)
        common = dict(HEAD_DIM=D, HEAD_DIM_V=Dv, DV_PAD=_pad_dim(Dv), MASK_KIND=mkind, CAUSAL=l_causal,
                      DROPOUT=dropout_p > 0, DOT_PREC=_dot_prec(q.dtype), RUN_IF=run_if, DROP_BITS=DROPOUT_BITS,
                      **wide)
        if impl == "sub":
            bm, bn = tile_kv["BLOCK_M"], tile_kv["BLOCK_N"]
            _launch_l1_bwd_dkdv_sub[(cdiv(Nk, bn), B * Hkv)](
                qt, kt, qf, kf, v, scale, m4, flags, do, row_stats[0], row_stats[2], delta, dk32, dv, scratch,
                *v.stride(), *ms, *do.stride(),
                H, Hkv, Nq, Nk, H // Hkv, seed_t, *dropout_args(dropout_p),
                EVEN_M=Nq % bm == 0, EVEN_N=Nk % bn == 0, **tile_kv, **common, **subs[0])
            bm, bn = tile_q["BLOCK_M"], tile_q["BLOCK_N"]
            _launch_l1_bwd_dq_sub[(cdiv(Nq, bm), B * H)](
                qt, kt, qf, kf, v, scale, m4, flags, do, row_stats[0], row_stats[2], row_stats[1], delta, dq32, dsc,
                gbuf, scratch, *v.stride(), *ms, *do.stride(), *gs,
                H, Hkv, Nq, Nk, H // Hkv, seed_t, *dropout_args(dropout_p),
                MASK_GRAD=mask_grad, SCALE_GRAD=scale_grad,
                EVEN_M=Nq % bm == 0, EVEN_N=Nk % bn == 0, **tile_q, **common, **subs[1])
            continue
        dqt = torch.zeros(B, H, D, Nq, device=q.device, dtype=torch.float32) if dqt is None else dqt
        dkt = torch.zeros(B, Hkv, D, Nk, device=q.device, dtype=torch.float32) if dkt is None else dkt
        bm, bn = tile_kv["BLOCK_M"], tile_kv["BLOCK_N"]
        _launch_l1_bwd_dkdv[(cdiv(Nk, bn), B * Hkv)](
            qt, kt, v, scale, m4, flags, do, row_stats[0], row_stats[2], delta, dkt, dv,
            *v.stride(), *ms, *do.stride(),
            H, Hkv, Nq, Nk, H // Hkv, seed_t, *dropout_args(dropout_p),
            EVEN_M=Nq % bm == 0, EVEN_N=Nk % bn == 0, **tile_kv, **common)
        bm, bn = tile_q["BLOCK_M"], tile_q["BLOCK_N"]
        _launch_l1_bwd_dq[(cdiv(Nq, bm), B * H)](
            qt, kt, v, scale, m4, flags, do, row_stats[0], row_stats[2], row_stats[1], delta, dqt, dsc, gbuf,
            *v.stride(), *ms, *do.stride(), *gs,
            H, Hkv, Nq, Nk, H // Hkv, seed_t, *dropout_args(dropout_p),
            MASK_GRAD=mask_grad, SCALE_GRAD=scale_grad,
            EVEN_M=Nq % bm == 0, EVEN_N=Nk % bn == 0, **tile_q, **common)
    if impl == "sub":
        dq, dk = dq32.to(q.dtype), dk32.to(k.dtype)
    else:
        dq = dqt.transpose(-1, -2).to(q.dtype).contiguous()
        dk = dkt.transpose(-1, -2).to(k.dtype).contiguous()
    dscale = dsc.view(B, H, Nq).sum(dim=(0, 2))
    dmask = reduce_mask_grad(gbuf, mask) if mask_grad else None
    return dq, dk, dv, dscale, dmask


# Launched without Triton's per-call binding once compiled (`KernelLauncher`): at small shapes and
# in decoding, the host's launch time sets the pace.
_launch_l1_fwd = KernelLauncher(_l1_fwd_kernel)
_launch_l1_bwd_dkdv_sub = KernelLauncher(_l1_bwd_dkdv_sub_kernel)
_launch_l1_bwd_dq_sub = KernelLauncher(_l1_bwd_dq_sub_kernel)
_launch_l1_bwd_dkdv = KernelLauncher(_l1_bwd_dkdv_kernel)
_launch_l1_bwd_dq = KernelLauncher(_l1_bwd_dq_kernel)
