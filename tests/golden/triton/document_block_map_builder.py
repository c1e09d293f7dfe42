@triton.jit
def attn_block_map_b38fc13e449418b5(
    FULL_IDX, FULL_CNT, PART_IDX, PART_CNT, data0, data0_d0, 
    SQ, SK, NQB, NKB, H, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BQP: tl.constexpr, BKP: tl.constexpr,
):
    # attn.block_map from "examples/document_attention.sp":6: classified per call, one program per (batch, head, query block), exact (every pair);
    # BQP x BKP is the block padded to powers of two (tl.arange's extents)
    row = tl.program_id(0)
    qb = row % NQB
    b = row // NQB // H
    h = row // NQB % H
    in_q = tl.arange(0, BQP)
    offs_q = qb * BLOCK_Q + in_q
    q_idx = offs_q[:, None].to(tl.int64)
    b_idx = b.to(tl.int64)
    h_idx = h.to(tl.int64)
    n_full = 0
    n_part = 0
    for kb in range(0, NKB):
        in_k = tl.arange(0, BKP)
        offs_k = kb * BLOCK_K + in_k
        k_idx = offs_k[None, :].to(tl.int64)
        live = (offs_q[:, None] < SQ) & (offs_k[None, :] < SK) & (in_q[:, None] < BLOCK_Q) & (in_k[None, :] < BLOCK_K)
        mk0 = tl.load(data0 + (tl.minimum(tl.maximum(q_idx, 0), data0_d0 - 1)))  # tensor.gather @ examples/document_attention.sp:3:38
        mk1 = tl.load(data0 + (tl.minimum(tl.maximum(k_idx, 0), data0_d0 - 1)))  # tensor.gather @ examples/document_attention.sp:3:48
        mk2 = (mk0 == mk1)  # tensor.cmp @ examples/document_attention.sp:3:45
        mk3 = (k_idx <= q_idx)  # tensor.cmp @ examples/document_attention.sp:3:61
        mk4 = (mk2 & mk3)  # tensor.and @ examples/document_attention.sp:3:38
        keep = mk4
        keep = (keep != 0) & live
        any_kept = tl.max(tl.max(keep.to(tl.int32), 1), 0)
        any_dropped = tl.max(tl.max((live & (keep == 0)).to(tl.int32), 1), 0)
        is_full = (any_kept == 1) & (any_dropped == 0)
        is_part = (any_kept == 1) & (any_dropped == 1)
        tl.store(FULL_IDX + row * NKB + n_full, kb, mask=is_full)
        tl.store(PART_IDX + row * NKB + n_part, kb, mask=is_part)
        n_full += is_full.to(tl.int32)
        n_part += is_part.to(tl.int32)
    tl.store(FULL_CNT + row, n_full)
    tl.store(PART_CNT + row, n_part)
