@triton.jit
def fused_elementwise_b99a6b1e5dc97c33(X0, sx0_0, sx0_1, sx0_2, X1, sx1_0, sx1_1, sx1_2, X2, sx2_0, sx2_1, sx2_2, OUT, so0, so1, so2, n0, n1, n2, NUMEL, BLOCK: tl.constexpr):
    # tensor.mul from "examples/selective_scan.sp":7; tensor.add from "examples/selective_scan.sp":7
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < NUMEL
    rem = offs
    i2 = rem % n2
    rem = rem // n2
    i1 = rem % n1
    rem = rem // n1
    i0 = rem
    x0 = tl.load(X0 + i0 * sx0_0 + i1 * sx0_1 + i2 * sx0_2, mask=live, other=0)
    x1 = tl.load(X1 + i0 * sx1_0 + i1 * sx1_1 + i2 * sx1_2, mask=live, other=0)
    x2 = tl.load(X2 + i0 * sx2_0 + i1 * sx2_1 + i2 * sx2_2, mask=live, other=0)
    e0 = (x0 * x1)  # tensor.mul @ examples/selective_scan.sp:7:55
    e1 = (x2 + e0)  # tensor.add @ examples/selective_scan.sp:7:47
    tl.store(OUT + i0 * so0 + i1 * so1 + i2 * so2, (e1).to(OUT.dtype.element_ty), mask=live)
