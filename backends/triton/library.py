"""The triton target's fixed kernels: the ones whose code does not depend on a region (row reductions
and normalizations, top-k, strided copy, MoE routing and dispatch, BSR and N:M matmul).

Kernels that inline a region (fused elementwise groups, attention, grouped matmul epilogues, scans, block
maps of data masks) are generated per op (codegen.py). The generated launcher calls these by name, with a
comment naming the IR op and its `.sp` line at each call.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_RANK = 6  # strided copies and elementwise groups handle up to this many dims


@triton.jit
def copy_strided(X, OUT, NUMEL, n1, n2, n3, n4, n5, sx0, sx1, sx2, sx3, sx4, sx5, so0, so1, so2, so3, so4, so5,
                 BLOCK: tl.constexpr):
    """OUT[i] = X[i] over a 6-D index space (leading dims padded with size 1); both sides strided; casts
    to OUT's element type. Used for reshapes of non-contiguous views, concat pieces and dtype casts."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < NUMEL
    r = offs
    i5 = r % n5
    r = r // n5
    i4 = r % n4
    r = r // n4
    i3 = r % n3
    r = r // n3
    i2 = r % n2
    r = r // n2
    i1 = r % n1
    i0 = r // n1
    x = tl.load(X + i0 * sx0 + i1 * sx1 + i2 * sx2 + i3 * sx3 + i4 * sx4 + i5 * sx5, mask=live)
    tl.store(OUT + i0 * so0 + i1 * so1 + i2 * so2 + i3 * so3 + i4 * so4 + i5 * so5,
             x.to(OUT.dtype.element_ty), mask=live)


SUM, MEAN, MAX, MIN, LOGSUMEXP, ARGMAX = range(6)


@triton.jit
def reduce_rows(X, OUT, COLS, OP: tl.constexpr, IS_INT: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[r] = reduce(X[r, :]) of a contiguous [ROWS, COLS] view; OP is one of SUM..ARGMAX above."""
    row = tl.program_id(0).to(tl.int64)
    base = X + row * COLS
    if IS_INT:
        acc_dtype = tl.float64  # exact for the integer sizes reductions see here
    else:
        acc_dtype = tl.float32
    if OP == 2 or OP == 5:
        init = float("-inf")
    elif OP == 3:
        init = float("inf")
    else:
        init = 0.0
    acc = tl.full([BLOCK], init, acc_dtype)
    arg = tl.zeros([BLOCK], tl.int64)
    run_max = tl.full([BLOCK], float("-inf"), tl.float32)
    for c0 in range(0, COLS, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        live = offs < COLS
        x = tl.load(base + offs, mask=live, other=0).to(acc_dtype)
        if OP == 0 or OP == 1:
            acc += tl.where(live, x, 0.0)
        elif OP == 2:
            acc = tl.maximum(acc, tl.where(live, x, float("-inf")))
        elif OP == 3:
            acc = tl.minimum(acc, tl.where(live, x, float("inf")))
        elif OP == 4:  # online logsumexp per lane
            xm = tl.where(live, x, float("-inf"))
            new_max = tl.maximum(run_max, xm)
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            acc = acc * tl.exp(run_max - safe) + tl.where(live, tl.exp(xm - safe), 0.0)
            run_max = new_max
        else:  # argmax: first index of the maximum (strictly greater keeps the earlier lane's index)
            xm = tl.where(live, x, float("-inf"))
            better = xm > acc
            arg = tl.where(better, offs.to(tl.int64), arg)
            acc = tl.where(better, xm, acc)
    if OP == 0:
        result = tl.sum(acc, 0)
    elif OP == 1:
        result = tl.sum(acc, 0) / COLS
    elif OP == 2:
        result = tl.max(acc, 0)
    elif OP == 3:
        result = tl.min(acc, 0)
    elif OP == 4:
        m = tl.max(run_max, 0)
        ms = tl.where(m == float("-inf"), 0.0, m)
        result = tl.log(tl.sum(acc * tl.exp(run_max - ms), 0)) + ms
    else:
        best = tl.max(acc, 0)
        result = tl.min(tl.where(acc == best, arg, COLS), 0)
    tl.store(OUT + row, result.to(OUT.dtype.element_ty))


@triton.jit
def softmax_rows(X, OUT, COLS, BLOCK: tl.constexpr):
    """Softmax of each row of a contiguous [ROWS, COLS] view: one online pass for max and sum, one to write."""
    row = tl.program_id(0).to(tl.int64)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for c0 in range(0, COLS, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        x = tl.load(X + row * COLS + offs, mask=offs < COLS, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m, x)
        safe = tl.where(new_m == float("-inf"), 0.0, new_m)
        s = s * tl.exp(m - safe) + tl.exp(x - safe)
        m = new_m
    mx = tl.max(m, 0)
    total = tl.sum(s * tl.exp(m - mx), 0)
    for c0 in range(0, COLS, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        x = tl.load(X + row * COLS + offs, mask=offs < COLS, other=float("-inf")).to(tl.float32)
        tl.store(OUT + row * COLS + offs, (tl.exp(x - mx) / total).to(OUT.dtype.element_ty), mask=offs < COLS)


@triton.jit
def norm_rows(X, W, Bias, OUT, COLS, eps, RMS: tl.constexpr, BLOCK: tl.constexpr):
    """RMSNorm (x / sqrt(mean(x^2) + eps) * w) or LayerNorm ((x - mean) / sqrt(var + eps) * w + b) per row."""
    row = tl.program_id(0).to(tl.int64)
    base = X + row * COLS
    s1 = tl.zeros([BLOCK], tl.float32)
    s2 = tl.zeros([BLOCK], tl.float32)
    for c0 in range(0, COLS, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < COLS, other=0.0).to(tl.float32)
        s1 += x
        s2 += x * x
    if RMS:
        mean = 0.0
        inv = 1.0 / tl.sqrt(tl.sum(s2, 0) / COLS + eps)
    else:
        mean = tl.sum(s1, 0) / COLS
        var = tl.maximum(tl.sum(s2, 0) / COLS - mean * mean, 0.0)
        inv = 1.0 / tl.sqrt(var + eps)
    for c0 in range(0, COLS, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        live = offs < COLS
        x = tl.load(base + offs, mask=live, other=0.0).to(tl.float32)
        y = (x - mean) * inv * tl.load(W + offs, mask=live, other=0.0).to(tl.float32)
        if not RMS:
            y += tl.load(Bias + offs, mask=live, other=0.0).to(tl.float32)
        tl.store(OUT + row * COLS + offs, y.to(OUT.dtype.element_ty), mask=live)


@triton.jit
def cumsum_rows(X, OUT, COLS, IS_INT: tl.constexpr, BLOCK: tl.constexpr):
    """Inclusive prefix sum of each row, chunk by chunk with a running carry."""
    row = tl.program_id(0).to(tl.int64)
    if IS_INT:
        carry = tl.zeros([1], tl.int64)
    else:
        carry = tl.zeros([1], tl.float32)
    for c0 in range(0, COLS, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        if IS_INT:
            x = tl.load(X + row * COLS + offs, mask=offs < COLS, other=0).to(tl.int64)
        else:
            x = tl.load(X + row * COLS + offs, mask=offs < COLS, other=0.0).to(tl.float32)
        y = tl.cumsum(x, 0) + carry
        tl.store(OUT + row * COLS + offs, y.to(OUT.dtype.element_ty), mask=offs < COLS)
        carry = carry + tl.sum(x, 0)


@triton.jit
def linear_scan(A, B, H0, OUT, M, L, HAS_H0: tl.constexpr, BLOCK: tl.constexpr):
    """h[t] = a[t] * h[t-1] + b[t] along each of M rows of [M, L] (a, b and out contiguous), from h0 [M] or 0;
    each program carries the state of BLOCK rows in registers (in float32) over time."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = rows < M
    if HAS_H0:
        h = tl.load(H0 + rows, mask=live, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK], tl.float32)
    for t in range(0, L):
        a = tl.load(A + rows * L + t, mask=live, other=0.0).to(tl.float32)
        b = tl.load(B + rows * L + t, mask=live, other=0.0).to(tl.float32)
        h = a * h + b
        tl.store(OUT + rows * L + t, h.to(OUT.dtype.element_ty), mask=live)


@triton.jit
def topk_rows(X, VALUES, INDICES, COLS, K: tl.constexpr, BLOCK: tl.constexpr):
    """The K largest of each row (BLOCK >= COLS), largest first, ties to the lower index."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + row * COLS + offs, mask=offs < COLS, other=float("-inf")).to(tl.float64)
    x = tl.where(offs < COLS, x, float("-inf"))
    taken = offs >= COLS
    for j in tl.static_range(K):
        best = tl.max(tl.where(taken, float("-inf"), x), 0)
        first = tl.min(tl.where((x == best) & ~taken, offs, BLOCK), 0)
        tl.store(VALUES + row * K + j, best.to(VALUES.dtype.element_ty))
        tl.store(INDICES + row * K + j, first.to(tl.int64))
        taken = taken | (offs == first)


@triton.jit
def moe_route(LOGITS, BIAS, WEIGHTS, EXPERTS, E, scale, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr,
              K: tl.constexpr, RENORM: tl.constexpr, GROUPS: tl.constexpr, GROUP_TOP: tl.constexpr,
              GROUPS_KEPT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
    """moe.route for one token: scores (softmax or sigmoid), selection = scores + bias restricted to the best
    groups, top-K of the selection (ties to the lower expert), weights = the picked scores, renormalized
    and scaled."""
    t = tl.program_id(0).to(tl.int64)
    eo = tl.arange(0, BLOCK_E)
    live = eo < E
    x = tl.load(LOGITS + t * E + eo, mask=live, other=float("-inf")).to(tl.float32)
    if SOFTMAX:
        ex = tl.where(live, tl.exp(x - tl.max(x, 0)), 0.0)
        s = ex / tl.sum(ex, 0)
    else:
        s = tl.sigmoid(x)
    sel = s
    if HAS_BIAS:
        sel = sel + tl.load(BIAS + eo, mask=live, other=0.0).to(tl.float32)
    sel = tl.where(live, sel, float("-inf"))
    if GROUPS > 1:
        per = E // GROUPS
        grp = eo // per
        go = tl.arange(0, BLOCK_G)
        gscore = tl.full([BLOCK_G], float("-inf"), tl.float32)
        for g in tl.static_range(GROUPS):
            vals = tl.where(grp == g, sel, float("-inf"))
            total = 0.0
            for _ in tl.static_range(GROUP_TOP):
                best = tl.max(vals, 0)
                total += best
                first = tl.min(tl.where(vals == best, eo, BLOCK_E), 0)
                vals = tl.where(eo == first, float("-inf"), vals)
            gscore = tl.where(go == g, total, gscore)
        allow = eo < 0
        for _ in tl.static_range(GROUPS_KEPT):
            best = tl.max(gscore, 0)
            gbest = tl.min(tl.where(gscore == best, go, BLOCK_G), 0)
            gscore = tl.where(go == gbest, float("-inf"), gscore)
            allow = allow | (grp == gbest)
        sel = tl.where(allow, sel, float("-inf"))
    ko = tl.arange(0, BLOCK_K)
    w = tl.zeros([BLOCK_K], tl.float32)
    idx = tl.zeros([BLOCK_K], tl.int64)
    taken = eo >= E
    for j in tl.static_range(K):
        best = tl.max(tl.where(taken, float("-inf"), sel), 0)
        first = tl.min(tl.where((sel == best) & ~taken, eo, BLOCK_E), 0)
        picked = tl.sum(tl.where(eo == first, s, 0.0), 0)
        w = tl.where(ko == j, picked, w)
        idx = tl.where(ko == j, first.to(tl.int64), idx)
        taken = taken | (eo == first)
    if RENORM:
        w = w / tl.sum(tl.where(ko < K, w, 0.0), 0)
    tl.store(WEIGHTS + t * K + ko, (w * scale).to(WEIGHTS.dtype.element_ty), mask=ko < K)
    tl.store(EXPERTS + t * K + ko, idx, mask=ko < K)


@triton.jit
def moe_count(EXPERTS, COUNTS, P, CAP, BLOCK: tl.constexpr):
    """COUNTS[e] = min(assignments to expert e, capacity); one program per expert."""
    e = tl.program_id(0)
    n = 0
    for p0 in range(0, P, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        ids = tl.load(EXPERTS + offs, mask=offs < P, other=-1)
        n += tl.sum((ids == e).to(tl.int32), 0)
    tl.store(COUNTS + e, tl.minimum(n, CAP))


@triton.jit
def moe_place(EXPERTS, COUNTS, PERM, OFFSETS, P, E, ALIGN, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """Writes expert e's kept assignment ids (token order, then slot order) into its segment of PERM, which
    starts at a multiple of ALIGN (OFFSETS); padding stays -1. One program per expert."""
    e = tl.program_id(0)
    eo = tl.arange(0, BLOCK_E)
    counts = tl.load(COUNTS + eo, mask=eo < E, other=0).to(tl.int64)
    padded = (counts + ALIGN - 1) // ALIGN * ALIGN
    ends = tl.cumsum(padded, 0)
    start = tl.sum(tl.where(eo == e, ends - padded, 0), 0)
    if e == 0:  # OFFSETS[0] is 0 from the launcher's allocation
        tl.store(OFFSETS + 1 + eo, ends, mask=eo < E)
    count = tl.load(COUNTS + e)
    seen = 0
    for p0 in range(0, P, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        hit = tl.load(EXPERTS + offs, mask=offs < P, other=-1) == e
        rank = seen + tl.cumsum(hit.to(tl.int32), 0) - 1
        tl.store(PERM + start + rank, offs.to(tl.int64), mask=hit & (rank < count))
        seen += tl.sum(hit.to(tl.int32), 0)


@triton.jit
def bsr_matmul(X, COL_PTR, ROW_IDX, BLK_ID, BLOCKS, OUT, M, N, sxm, BR, BC, BLOCK_M: tl.constexpr,
               BRP: tl.constexpr, BCP: tl.constexpr, PRECISION: tl.constexpr):
    """OUT = X @ W with W stored as BR x BC blocks, read column block by column block (the packed blocks
    indexed by column at load time): each program multiplies only the stored blocks of its column. Blocks
    smaller than the tensor cores' 16 are padded in registers (BRP, BCP >= 16) by the masked loads."""
    pid_m = tl.program_id(0)
    c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BRP)
    offs_c = tl.arange(0, BCP)
    acc = tl.zeros([BLOCK_M, BCP], tl.float32)
    for j in range(tl.load(COL_PTR + c), tl.load(COL_PTR + c + 1)):
        r = tl.load(ROW_IDX + j)
        blk = tl.load(BLK_ID + j)
        x = tl.load(X + offs_m[:, None] * sxm + (r * BR + offs_r)[None, :],
                    mask=(offs_m[:, None] < M) & (offs_r[None, :] < BR), other=0.0)
        w = tl.load(BLOCKS + blk * BR * BC + offs_r[:, None] * BC + offs_c[None, :],
                    mask=(offs_r[:, None] < BR) & (offs_c[None, :] < BC), other=0.0)
        acc += tl.dot(x, w, input_precision=PRECISION)
    cols = c * BC + offs_c
    tl.store(OUT + offs_m[:, None] * N + cols[None, :], acc.to(OUT.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_c[None, :] < BC))


@triton.jit
def nm_matmul(X, V, IDX, OUT, M, K, N, sxm, NN: tl.constexpr, MM: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """OUT = X @ W with W [K, N] stored N:M along K (values and in-group offsets): each K-tile of W is
    rebuilt in registers from the NN kept entries of its groups, then one tensor-core dot."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + offs_m[:, None] * sxm + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
                    other=0.0)
        live = (offs_k[:, None] < K) & (offs_n[None, :] < N)
        group = offs_k // MM
        pos = (offs_k % MM)[:, None]
        w = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
        for t in tl.static_range(NN):
            kept = (group * NN + t)[:, None] * N + offs_n[None, :]
            v = tl.load(V + kept, mask=live, other=0.0).to(tl.float32)
            at = tl.load(IDX + kept, mask=live, other=-1).to(tl.int32)
            w += tl.where(at == pos, v, 0.0)
        acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
    tl.store(OUT + offs_m[:, None] * N + offs_n[None, :], acc.to(OUT.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def linear_attention(Q, K, V, A, OUT, L, DK, DV, sq_b, sq_l, sk_b, sk_l, sv_b, sv_l, sa_b, so_b, so_l,
                     CHUNK: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """scan.linear_attention, chunk by chunk: S_t = a_t S_{t-1} + k_t v_t^T, o_t = S_t^T q_t. One program per
    (batch, column tile of Dv) keeps its [DK, BLOCK_DV] state in registers; inside a chunk, (q k^T masked by
    the causal decays) @ v on the tensor cores. Decay products are taken in log space with zeros and signs
    counted, so any decay (negative, zero) is exact as in the reference."""
    b = tl.program_id(0).to(tl.int64)
    offs_dv = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_c = tl.arange(0, CHUNK)
    state = tl.zeros([BLOCK_DK, BLOCK_DV], tl.float32)
    causal = offs_c[:, None] >= offs_c[None, :]
    for c0 in range(0, L, CHUNK):
        t = c0 + offs_c
        live = t < L
        q = tl.load(Q + b * sq_b + t[:, None] * sq_l + offs_dk[None, :], mask=live[:, None] & (offs_dk[None, :] < DK),
                    other=0.0).to(tl.float32)
        k = tl.load(K + b * sk_b + t[:, None] * sk_l + offs_dk[None, :], mask=live[:, None] & (offs_dk[None, :] < DK),
                    other=0.0).to(tl.float32)
        v = tl.load(V + b * sv_b + t[:, None] * sv_l + offs_dv[None, :], mask=live[:, None] & (offs_dv[None, :] < DV),
                    other=0.0).to(tl.float32)
        a = tl.load(A + b * sa_b + t, mask=live, other=1.0).to(tl.float32)  # padding steps: decay 1, no input
        zero = a == 0
        log_abs = tl.cumsum(tl.log(tl.where(zero, 1.0, tl.abs(a))), 0)
        zeros = tl.cumsum(zero.to(tl.int32), 0)
        negs = tl.cumsum((a < 0).to(tl.int32), 0)
        # pair[t, s] = prod a[s+1..t] (s <= t); from_start[t] = prod a[0..t]
        pair_sign = tl.where((negs[:, None] - negs[None, :]) % 2 == 1, -1.0, 1.0)
        pair = tl.where((zeros[:, None] > zeros[None, :]) | ~causal, 0.0,
                        pair_sign * tl.exp(tl.minimum(log_abs[:, None] - log_abs[None, :], 80.0)))
        from_start = tl.where(zeros > 0, 0.0, tl.where(negs % 2 == 1, -1.0, 1.0) * tl.exp(tl.minimum(log_abs, 80.0)))
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * pair
        out = tl.dot(scores, v, input_precision=PRECISION)
        out += tl.dot(q * from_start[:, None], state, input_precision=PRECISION)
        tl.store(OUT + b * so_b + t[:, None] * so_l + offs_dv[None, :], out.to(OUT.dtype.element_ty),
                 mask=live[:, None] & (offs_dv[None, :] < DV))
        last = offs_c == CHUNK - 1
        to_end = tl.sum(tl.where(last[:, None], pair, 0.0), 0)  # the decay from each step to the chunk's end
        total = tl.sum(tl.where(last, from_start, 0.0), 0)
        state = total * state + tl.dot(tl.trans(k * to_end[:, None]), v, input_precision=PRECISION)
