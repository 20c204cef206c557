"""Tiled attention (FlashAttention-2's algorithm) for refdpo, forward and backward, in Triton.

The scores matrix is never written to memory: each program holds a tile of queries against
tiles of keys and values, keeps an online softmax in f32 and writes the output and each row's
log-sum-exp; the backward recomputes the probabilities from that log-sum-exp. Inputs are bf16,
f16 or f32; every dot accumulates in f32.

Covered: causal attention within each sequence; a sliding window (key j is seen from query i
when i - window < j <= i; window 0 for none); grouped-query heads (query head h reads kv head
h // groups, K and V never repeated); Gemma 2's soft cap (cap * tanh(s / cap) on the scaled
scores); and variable-length batches: sequence s is the tokens [cu[s], cu[s+1]) of a flat token
axis, which covers a padded batch (cu = 0, T, 2T, ...) and sequences packed end to end alike.

Queries may be fewer than keys: sequence s's queries are the tokens [cu_q[s], cu_q[s+1]) of the
queries' own flat axis, its last positions (query r at position first + r, first = the keys'
length less the queries'), as FlashAttention's varlen causal mask aligns them bottom-right.
That is a pair sharing its prompt: the rejected sequence's keys are the whole sequence and its
queries only its own tokens. With cu_q = cu every position is a query.

Layout: a token n of the flat axis sits in batch row n // row_len at position n % row_len, so
q [B, T, H, D] and [B, H, T, D] both work through their strides (the head dim contiguous). A
sequence never crosses a batch row. Q, O and their gradients live on the queries' axis (rows of
q_row_len), K, V and theirs on the keys'. The log-sum-exp and the backward's delta are f32
[Hq, N] (N = B * q_row_len query tokens).

This file is the single source of the kernels: `test_flash_attn.py` runs these very functions on
CPU tensors under TRITON_INTERPRET=1, and `compile.py` compiles them ahead of time to the cubins
that refdpo launches on the GPU.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)

# What each head-dim tile is compiled with: (BLOCK_M, BLOCK_N, num_warps, num_stages). The
# compiled kernels (compile.py) and every launcher (host.py, the Rust one through manifest.json)
# take their tiles from here.
CONFIGS = {64: (64, 64, 4, 3), 128: (64, 64, 4, 2), 256: (32, 32, 4, 1)}


@triton.jit
def _tanh(x):
    # tanh from exp, exact at both ends (exp overflow gives 1, underflow -1); the interpreter
    # and every target have exp.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _scores(q, k, scale, softcap, SOFTCAP: tl.constexpr):
    """q [BM, D] · k [BN, D]ᵀ · scale, soft-capped when SOFTCAP; also tanh (for the backward)."""
    s = tl.dot(q, tl.trans(k)) * scale
    t = s
    if SOFTCAP:
        t = _tanh(s / softcap)
        s = softcap * t
    return s, t


@triton.jit
def _visible(rows, cols, length, window):
    """Which (query row, key col) pairs of a sequence attend: causal, within the window."""
    ok = (cols[None, :] <= rows[:, None]) & (cols[None, :] < length) & (rows[:, None] < length)
    if window > 0:
        ok = ok & (rows[:, None] - cols[None, :] < window)
    return ok


@triton.jit
def _tile(base, pos, stride, length, dims, dmask):
    """Positions `pos` of a sequence's [T, D] slice at `base`: zero past its end or the head."""
    mask = (pos < length)[:, None] & dmask[None, :]
    return tl.load(base + pos[:, None] * stride + dims[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(base, pos, stride, length, dims, dmask, value):
    mask = (pos < length)[:, None] & dmask[None, :]
    tl.store(base + pos[:, None] * stride + dims[None, :], value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _query_tile(base, local, stride, rmask, dims, dmask):
    """Query rows `local` (on the queries' axis) of a sequence's [Tq, D] slice at `base`: zero
    where `rmask` is off (positions before its first query, or past its end) or past the head."""
    mask = rmask[:, None] & dmask[None, :]
    return tl.load(base + local[:, None] * stride + dims[None, :], mask=mask, other=0.0)


@triton.jit
def _store_query_tile(base, local, stride, rmask, dims, dmask, value):
    mask = rmask[:, None] & dmask[None, :]
    tl.store(base + local[:, None] * stride + dims[None, :], value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _keys_seen(m0, length, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key range [lo, hi) the query tile at m0 sees, lo on a key-tile boundary, and within
    it [a, b): the key tiles every row of the tile sees whole, which need no mask. Those end
    before the diagonal (n0 + BLOCK_N - 1 <= m0) and, with a window, start past its edge
    (m0 + BLOCK_M - 1 - n0 < window); lo <= a <= b <= hi, all but hi on tile boundaries."""
    hi = tl.minimum(length, m0 + BLOCK_M)
    lo = 0
    a = 0
    if window > 0:
        lo = tl.maximum(0, m0 - window + 1) // BLOCK_N * BLOCK_N
        a = (tl.maximum(0, m0 + BLOCK_M - window) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    b = (m0 + 1) // BLOCK_N * BLOCK_N
    a = tl.minimum(tl.maximum(a, lo), b)
    return lo, hi, a, b


@triton.jit
def _queries_seeing(n0, length, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The query range [lo, hi) that sees the key tile at n0, lo on a query-tile boundary, and
    within it [a, b): the query tiles that see the whole key tile in all their rows, which need
    no mask. Those start past the diagonal (m0 >= n0 + BLOCK_N - 1), end within the sequence
    (m0 + BLOCK_M <= length) and, with a window, before its edge (m0 + BLOCK_M - 1 - n0 <
    window); lo <= a <= b <= hi, all but hi on tile boundaries."""
    lo = n0 // BLOCK_M * BLOCK_M
    hi = length
    b = length // BLOCK_M * BLOCK_M
    if window > 0:
        hi = tl.minimum(length, n0 + BLOCK_N + window - 1)
        b = tl.minimum(b, tl.maximum(0, n0 + window) // BLOCK_M * BLOCK_M)
    a = (n0 + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    a = tl.minimum(tl.maximum(a, lo), tl.maximum(b, lo))
    b = tl.maximum(a, b)
    return lo, hi, a, b


@triton.jit
def _probs_and_grads(q, k, v, do, lse, delta, rows, cols, length, window, scale, softcap, masked,
                     SOFTCAP: tl.constexpr):
    """P recomputed from the log-sum-exp, and dS = P · (dO Vᵀ − delta) · cap' (the scores'
    gradient before the scale), for a query tile against a key tile (masked unless every pair
    is known to attend)."""
    s, t = _scores(q, k, scale, softcap, SOFTCAP)
    p = tl.exp2((s - lse[:, None]) * LOG2E)
    if masked:
        p = tl.where(_visible(rows, cols, length, window), p, 0.0)
    ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return p, ds


@triton.jit
def _seq(CU, row_len, seq):
    """Start of sequence `seq` in the flat axis, its length, batch row and position in it."""
    start = tl.load(CU + seq)
    length = tl.load(CU + seq + 1) - start
    return start, length, start // row_len, start % row_len


@triton.jit
def flash_fwd(
    Q, K, V, O, LSE, CU, CU_Q,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_b, so_t, so_h,
    row_len, q_row_len, n_tokens, head_dim, groups, window, scale, softcap,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """O = softmax(mask(cap(Q Kᵀ · scale))) V and LSE, one program per (query tile, seq, head);
    the tile's rows are positions of the sequence, those before its first query skipped."""
    m0 = tl.program_id(0) * BLOCK_M
    seq = tl.program_id(1)
    h = tl.program_id(2)
    start, length, b, t0 = _seq(CU, row_len, seq)
    q_start, q_len, qb, q_t0 = _seq(CU_Q, q_row_len, seq)
    first = length - q_len
    if (m0 >= length) | (m0 + BLOCK_M <= first):
        return
    kvh = h // groups
    rows = m0 + tl.arange(0, BLOCK_M)
    local = rows - first
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < head_dim
    rmask = (rows >= first) & (rows < length)
    q = _query_tile(Q + qb * sq_b + h * sq_h + q_t0 * sq_t, local, sq_t, rmask, dims, dmask)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi, a, z = _keys_seen(m0, length, window, BLOCK_M, BLOCK_N)
    k_base = K + b * sk_b + kvh * sk_h + t0 * sk_t
    v_base = V + b * sv_b + kvh * sv_h + t0 * sv_t
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k = _tile(k_base, cols, sk_t, length, dims, dmask)
        v = _tile(v_base, cols, sv_t, length, dims, dmask)
        s, _ = _scores(q, k, scale, softcap, SOFTCAP)
        s = s * LOG2E
        # Only the window's edge and the diagonal are masked: a branch per tile, in one loop
        # (three loops, one per range, spilled registers in the backward).
        if (n0 < a) | (n0 >= z):
            s = tl.where(_visible(rows, cols, length, window), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps m = -inf: subtract 0 there, not -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    _store_query_tile(O + qb * so_b + h * so_h + q_t0 * so_t, local, so_t, rmask, dims, dmask, acc)
    lse = (m_i + tl.log2(l_safe)) / LOG2E
    tl.store(LSE + h * n_tokens + q_start + local, lse, mask=rmask)


@triton.jit
def flash_bwd_delta(
    O, DO, DELTA, CU,
    so_b, so_t, so_h, sdo_b, sdo_t, sdo_h,
    row_len, n_tokens, head_dim,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = Σ_d O · dO per row (f32), what every probability's gradient subtracts. On the
    queries' axis: CU and row_len are the queries' offsets and rows."""
    m0 = tl.program_id(0) * BLOCK_M
    seq = tl.program_id(1)
    h = tl.program_id(2)
    start, length, b, t0 = _seq(CU, row_len, seq)
    if m0 >= length:
        return
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < head_dim
    o = _tile(O + b * so_b + h * so_h + t0 * so_t, rows, so_t, length, dims, dmask)
    do = _tile(DO + b * sdo_b + h * sdo_h + t0 * sdo_t, rows, sdo_t, length, dims, dmask)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + h * n_tokens + start + rows, delta, mask=rows < length)


@triton.jit
def flash_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU, CU_Q,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h,
    sdk_b, sdk_t, sdk_h, sdv_b, sdv_t, sdv_h,
    row_len, q_row_len, n_tokens, head_dim, groups, window, scale, softcap,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """dK and dV of one key tile of one kv head: every query head of its group, every query
    tile that sees the keys, summed in f32 in the program (no atomics)."""
    n0 = tl.program_id(0) * BLOCK_N
    seq = tl.program_id(1)
    kvh = tl.program_id(2)
    start, length, b, t0 = _seq(CU, row_len, seq)
    q_start, q_len, qb, q_t0 = _seq(CU_Q, q_row_len, seq)
    first = length - q_len
    if n0 >= length:
        return
    cols = n0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < head_dim
    k = _tile(K + b * sk_b + kvh * sk_h + t0 * sk_t, cols, sk_t, length, dims, dmask)
    v = _tile(V + b * sv_b + kvh * sv_h + t0 * sv_t, cols, sv_t, length, dims, dmask)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Query tiles that see these keys: from the diagonal on, within the window; only the
    # diagonal, the window's edge and the sequence's end are masked.
    # No tile wholly before the first query. The rows before it in the tile that holds it load
    # zero queries and output gradients: their P·dO and dS add nothing.
    lo, hi, a, z = _queries_seeing(n0, length, window, BLOCK_M, BLOCK_N)
    lo = tl.maximum(lo, first // BLOCK_M * BLOCK_M)
    a = tl.maximum(a, lo)
    z = tl.maximum(a, z)
    for g in range(0, groups):
        h = kvh * groups + g
        q_base = Q + qb * sq_b + h * sq_h + q_t0 * sq_t
        do_base = DO + qb * sdo_b + h * sdo_h + q_t0 * sdo_t
        for m0 in range(lo, hi, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            local = rows - first
            rmask = (rows >= first) & (rows < length)
            q = _query_tile(q_base, local, sq_t, rmask, dims, dmask)
            do = _query_tile(do_base, local, sdo_t, rmask, dims, dmask)
            lse = tl.load(LSE + h * n_tokens + q_start + local, mask=rmask, other=0.0)
            delta = tl.load(DELTA + h * n_tokens + q_start + local, mask=rmask, other=0.0)
            masked = (m0 < a) | (m0 >= z)
            p, ds = _probs_and_grads(q, k, v, do, lse, delta, rows, cols, length, window, scale, softcap,
                                     masked, SOFTCAP)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    _store_tile(DK + b * sdk_b + kvh * sdk_h + t0 * sdk_t, cols, sdk_t, length, dims, dmask, dk * scale)
    _store_tile(DV + b * sdv_b + kvh * sdv_h + t0 * sdv_t, cols, sdv_t, length, dims, dmask, dv)


@triton.jit
def flash_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, CU, CU_Q,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h,
    sdq_b, sdq_t, sdq_h,
    row_len, q_row_len, n_tokens, head_dim, groups, window, scale, softcap,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """dQ of one query tile of one head, over the key tiles it sees."""
    m0 = tl.program_id(0) * BLOCK_M
    seq = tl.program_id(1)
    h = tl.program_id(2)
    start, length, b, t0 = _seq(CU, row_len, seq)
    q_start, q_len, qb, q_t0 = _seq(CU_Q, q_row_len, seq)
    first = length - q_len
    if (m0 >= length) | (m0 + BLOCK_M <= first):
        return
    kvh = h // groups
    rows = m0 + tl.arange(0, BLOCK_M)
    local = rows - first
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < head_dim
    rmask = (rows >= first) & (rows < length)
    q = _query_tile(Q + qb * sq_b + h * sq_h + q_t0 * sq_t, local, sq_t, rmask, dims, dmask)
    do = _query_tile(DO + qb * sdo_b + h * sdo_h + q_t0 * sdo_t, local, sdo_t, rmask, dims, dmask)
    lse = tl.load(LSE + h * n_tokens + q_start + local, mask=rmask, other=0.0)
    delta = tl.load(DELTA + h * n_tokens + q_start + local, mask=rmask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi, a, z = _keys_seen(m0, length, window, BLOCK_M, BLOCK_N)
    k_base = K + b * sk_b + kvh * sk_h + t0 * sk_t
    v_base = V + b * sv_b + kvh * sv_h + t0 * sv_t
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k = _tile(k_base, cols, sk_t, length, dims, dmask)
        v = _tile(v_base, cols, sv_t, length, dims, dmask)
        masked = (n0 < a) | (n0 >= z)
        _, ds = _probs_and_grads(q, k, v, do, lse, delta, rows, cols, length, window, scale, softcap,
                                 masked, SOFTCAP)
        dq += tl.dot(ds.to(k.dtype), k)
    _store_query_tile(DQ + qb * sdq_b + h * sdq_h + q_t0 * sdq_t, local, sdq_t, rmask, dims, dmask,
                      dq * scale)
