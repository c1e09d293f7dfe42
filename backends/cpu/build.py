"""Small builders over the MLIR Python bindings for the cpu kernels: constants, loads and stores, loops,
slices and views with mixed static and dynamic sizes. Kept apart from the kernels so those read as
algorithms."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from torch_mlir import ir
from torch_mlir.dialects import arith, bufferization, linalg, memref, scf, tensor, vector
from torch_mlir.dialects import math as mmath

Size = int | ir.Value
DYN = ir.ShapedType.get_dynamic_size


def index() -> ir.Type:
    return ir.IndexType.get()


def c_index(n: int) -> ir.Value:
    return arith.ConstantOp(index(), n).result


def c_int(n: int, bits: int = 64) -> ir.Value:
    return arith.ConstantOp(ir.IntegerType.get_signless(bits), n).result


def c_float(x: float, et: ir.Type) -> ir.Value:
    """A float constant of type et (a vector type: every element x)."""
    if isinstance(et, ir.VectorType):
        return splat(x, et)
    return arith.ConstantOp(et, ir.FloatAttr.get(et, x)).result


def as_index(v: Size) -> ir.Value:
    """An index value from an int, an index or an integer value."""
    if isinstance(v, int):
        return c_index(v)
    if isinstance(v.type, ir.IndexType):
        return v
    return arith.IndexCastOp(index(), v).result


def as_i64(v: ir.Value) -> ir.Value:
    if isinstance(v.type, ir.IndexType):
        return arith.IndexCastOp(ir.IntegerType.get_signless(64), v).result
    width = ir.IntegerType(v.type).width
    return v if width == 64 else arith.ExtSIOp(ir.IntegerType.get_signless(64), v).result


def load(mem: ir.Value, *indices: Size) -> ir.Value:
    return memref.LoadOp(mem, [as_index(i) for i in indices]).result


def store(v: ir.Value, mem: ir.Value, *indices: Size) -> None:
    memref.StoreOp(v, mem, [as_index(i) for i in indices])


def extract(t: ir.Value, *indices: Size) -> ir.Value:
    return tensor.ExtractOp(t, [as_index(i) for i in indices]).result


def mdim(v: ir.Value, axis: int) -> ir.Value:
    """Size of `axis` of a memref or tensor, as an index."""
    if isinstance(v.type, ir.MemRefType):
        return memref.DimOp(v, c_index(axis)).result
    return tensor.DimOp(v, c_index(axis)).result


def add(a: ir.Value, b: ir.Value) -> ir.Value:
    return arith.AddIOp(a, b).result


def sub(a: ir.Value, b: ir.Value) -> ir.Value:
    return arith.SubIOp(a, b).result


def mul(a: ir.Value, b: ir.Value) -> ir.Value:
    return arith.MulIOp(a, b).result


def minsi(a: ir.Value, b: ir.Value) -> ir.Value:
    return arith.MinSIOp(a, b).result


def cmpi(pred: str, a: ir.Value, b: ir.Value) -> ir.Value:
    return arith.CmpIOp({"eq": 0, "ne": 1, "lt": 2, "le": 3, "gt": 4, "ge": 5}[pred], a, b).result


def select(c: ir.Value, a: ir.Value, b: ir.Value) -> ir.Value:
    return arith.SelectOp(c, a, b).result


def loop(lo: Size, hi: Size, step: Size = 1, iter_args: Sequence[ir.Value] = ()) -> scf.ForOp:
    """An scf.for; build its body under `with ir.InsertionPoint(loop.body)` and end it with `scf.YieldOp`."""
    return scf.ForOp(as_index(lo), as_index(hi), as_index(step), list(iter_args) or None)


def if_(cond: ir.Value, types: Sequence[ir.Type] = (), has_else: bool = False) -> scf.IfOp:
    return scf.IfOp(cond, list(types), has_else=has_else or bool(types))


def _mixed(values: Sequence[Size]) -> tuple[list[int], list[ir.Value]]:
    static, dynamic = [], []
    for v in values:
        if isinstance(v, int):
            static.append(v)
        else:
            static.append(DYN())
            dynamic.append(as_index(v))
    return static, dynamic


def slice_tensor(t: ir.Value, offsets: Sequence[Size], sizes: Sequence[Size], drop: Sequence[int] = ()) -> ir.Value:
    """tensor.extract_slice with unit strides; `drop` lists size-1 axes left out of the result type."""
    et = ir.RankedTensorType(t.type).element_type
    so, do = _mixed(offsets)
    ss, ds = _mixed(sizes)
    shape = [s for i, s in enumerate(ss) if i not in drop]
    return tensor.ExtractSliceOp(ir.RankedTensorType.get(shape, et), t, do, ds, [], so, ss, [1] * len(ss)).result


def subview(m: ir.Value, offsets: Sequence[Size], sizes: Sequence[Size], drop: Sequence[int] = ()) -> ir.Value:
    """memref.subview with unit strides; `drop` lists size-1 axes left out of the result type. The result
    layout is the one MLIR infers: the source's strides, and an offset known only when every term is."""
    mt = ir.MemRefType(m.type)
    so, do = _mixed(offsets)
    ss, ds = _mixed(sizes)
    src_strides, src_offset = mt.get_strides_and_offset()
    offset = src_offset
    for o, st in zip(so, src_strides, strict=True):
        if o == 0:
            continue
        offset = DYN() if DYN() in (offset, o, st) else offset + o * st
    kept = [i for i in range(len(ss)) if i not in drop]
    layout = ir.StridedLayoutAttr.get(offset, [src_strides[i] for i in kept])
    result = ir.MemRefType.get([ss[i] for i in kept], mt.element_type, layout)
    return memref.SubViewOp(result, m, do, ds, [], so, ss, [1] * len(ss)).result


def read(m: ir.Value, writable: bool = False) -> ir.Value:
    """The tensor view of a memref the kernel only reads (`writable`: or updates in place, a result written back
    to m: bufferization then computes into m rather than into a copy of it)."""
    mt = ir.MemRefType(m.type)
    return bufferization.ToTensorOp(ir.RankedTensorType.get(mt.shape, mt.element_type), m, restrict=True,
                                    writable=writable or None).result


def write(t: ir.Value, m: ir.Value) -> None:
    """Store tensor t into memref m (bufferization writes it there directly)."""
    bufferization.MaterializeInDestinationOp(None, t, m, restrict=True, writable=True)


def empty(sizes: Sequence[Size], et: ir.Type) -> ir.Value:
    static, dynamic = _mixed(sizes)
    return tensor.EmptyOp([s if d is None else d for s, d in _pair(static, dynamic)], et).result


def _pair(static: list[int], dynamic: list[ir.Value]) -> list:
    it = iter(dynamic)
    return [(s, next(it) if s == DYN() else None) for s in static]


def insert_slice(src: ir.Value, dest: ir.Value, offsets: Sequence[Size], sizes: Sequence[Size]) -> ir.Value:
    so, do = _mixed(offsets)
    ss, ds = _mixed(sizes)
    return tensor.InsertSliceOp(src, dest, do, ds, [], so, ss, [1] * len(ss)).result


def reassociation(*groups: Sequence[int]) -> ir.ArrayAttr:
    """The reassociation attribute of an expand or collapse shape: the dims each group joins."""
    return ir.ArrayAttr.get([ir.ArrayAttr.get([ir.IntegerAttr.get(ir.IntegerType.get_signless(64), i) for i in g])
                             for g in groups])


def round_down(a: ir.Value, b: int) -> ir.Value:
    """a rounded down to a multiple of b (the part of a range that whole steps of b cover)."""
    return mul(arith.DivUIOp(a, c_index(b)).result, c_index(b))


def ceil_div(a: ir.Value, b: int) -> ir.Value:
    return arith.DivUIOp(add(a, c_index(b - 1)), c_index(b)).result


def share(part: ir.Value, parts: ir.Value, n: Size) -> tuple[ir.Value, ir.Value]:
    """The bounds of part's contiguous share of 0..n (n * part // parts up to n * (part + 1) // parts): where the
    items are small, threads that take every parts-th one write into each other's cache lines."""
    def cut(p: ir.Value) -> ir.Value:
        return arith.DivUIOp(mul(as_index(n), p), parts).result
    return cut(part), cut(add(part, c_index(1)))


@contextmanager
def nest(sizes: Sequence[Size]) -> Iterator[list[ir.Value]]:
    """Nested scf.for loops from 0 to each size; the body is built inside the `with` (no iter_args)."""
    points, ivs = [], []
    for s in sizes:
        f = loop(0, s)
        point = ir.InsertionPoint(f.body)
        point.__enter__()
        points.append(point)
        ivs.append(f.induction_variable)
    try:
        yield ivs
    finally:
        for point in reversed(points):
            scf.YieldOp([])
            point.__exit__(None, None, None)


def sizes_of(m: ir.Value) -> list[Size]:
    """The sizes of a memref or tensor: static ones as ints, dynamic ones read from it."""
    shape = ir.ShapedType(m.type).shape
    return [s if s != DYN() else mdim(m, i) for i, s in enumerate(shape)]


def memref_generic(ins: Sequence[tuple[ir.Value, list]], out: ir.Value, out_exprs: list, kinds: list[str],
                   body: Callable[..., ir.Value]) -> None:
    """A linalg.generic on memrefs (no tensors, so nothing for bufferization to analyse): `body` gets the
    input elements and the output's current element and returns the element to store."""
    op = linalg.GenericOp([], [v for v, _ in ins], [out], maps(len(kinds), [x for _, x in ins] + [out_exprs]),
                          iterators(kinds))
    types = [ir.ShapedType(v.type).element_type for v, _ in ins] + [ir.ShapedType(out.type).element_type]
    block = op.regions[0].blocks.append(*types)
    with ir.InsertionPoint(block):
        linalg.YieldOp([body(*block.arguments)])


def maps(rank: int, exprs: list[list]) -> ir.ArrayAttr:
    """Indexing maps of a linalg op over `rank` loops, one per list of affine exprs."""
    return ir.ArrayAttr.get([ir.AffineMapAttr.get(ir.AffineMap.get(rank, 0, e)) for e in exprs])


def iterators(kinds: list[str]) -> ir.ArrayAttr:
    """Iterator types of a linalg op from their textual attributes (PARALLEL, REDUCTION)."""
    return ir.ArrayAttr.get([ir.Attribute.parse(k) for k in kinds])


def alloca(n: ir.Value, et: ir.Type) -> ir.Value:
    """A 1-D stack buffer of n elements."""
    return memref.AllocaOp(ir.MemRefType.get([DYN()], et), [as_index(n)], []).result


def each(n: Size, body: Callable[[ir.Value], None], start: Size = 0, step: int = 1) -> None:
    """body(i) for i = start, start + step, ... below n."""
    f = loop(start, n, step)
    with ir.InsertionPoint(f.body):
        body(f.induction_variable)
        scf.YieldOp([])


def fold(n: ir.Value, start: ir.Value, body: Callable[[ir.Value, ir.Value], ir.Value]) -> ir.Value:
    """acc = body(i, acc) for i in 0..n, from `start`."""
    f = loop(0, n, 1, [start])
    with ir.InsertionPoint(f.body):
        scf.YieldOp([body(f.induction_variable, f.inner_iter_args[0])])
    return f.results[0]


def splat(v: float | int, t: ir.Type) -> ir.Value:
    """A constant of scalar type t, or of vector type t with every element v."""
    if not isinstance(t, ir.VectorType):
        return c_float(v, t) if isinstance(t, ir.FloatType) else arith.ConstantOp(t, v).result
    e = ir.VectorType(t).element_type
    attr = ir.FloatAttr.get(e, v) if isinstance(e, ir.FloatType) else ir.IntegerAttr.get(e, v)
    return arith.ConstantOp(t, ir.DenseElementsAttr.get_splat(t, attr)).result


def transpose_square(rows: Sequence[ir.Value]) -> list[ir.Value]:
    """n vectors of n lanes (a square matrix by rows) transposed in registers: log2(n) rounds of two-source shuffles,
    the round of bit b swapping bit b of every element's row with bit b of its lane (a pair of rows i, i + b gives
    lanes with bit b clear from i and set from i + b, and the other way round), so that element (r, c) ends at
    (c, r). On x86 each shuffle is a vpermt2ps or an unpack and blend: 64 of them for 16 x 16 elements."""
    n, out = len(rows), list(rows)
    if n & (n - 1):
        raise ValueError(f"transpose_square: {n} rows is not a power of two")
    b = n // 2
    while b:
        low = [c if not c & b else n + c - b for c in range(n)]
        high = [c + b if not c & b else n + c for c in range(n)]
        for i in (i for i in range(n) if not i & b):
            out[i], out[i + b] = (vector.ShuffleOp(out[i], out[i + b], low).result,
                                  vector.ShuffleOp(out[i], out[i + b], high).result)
        b //= 2
    return out


EXP_FAST_LOW = -86.0  # for |x| below -EXP_FAST_LOW, e**x is a normal float, n >= -124: 2**n added to its bits
EXP_HIGH = 88.72283935546875  # e**x of it and above is inf in float32; below it the short form's 2**128 * y is finite


def exp(x: ir.Value) -> ir.Value:
    """e**x. For float32, Cephes' expf as arith: x = n ln2 + r (|r| <= ln2 / 2, ln2 in two parts), e**r by a
    degree-6 polynomial, 2**n built in the exponent bits (two factors, so subnormal results come out right);
    inf past the overflow point, NaN kept. It vectorizes and inlines; math.exp becomes a scalar libm call per element
    (LLVM has no vector expf without a vector math library). x may be a vector of float32 too: then where every
    lane is within EXP_FAST_LOW of 0 (a scan's decays, a softmax's scores near their max) a branch takes the short
    form, n added to the polynomial's exponent bits and nothing clamped; a NaN, an infinity or a lane farther out
    takes the full one. Other types use math.exp."""
    et = x.type
    shape = ir.VectorType(et).shape if isinstance(et, ir.VectorType) else None
    if str(et.element_type if shape else et) != "f32":
        return mmath.ExpOp(x).result
    if shape is None:
        return _exp(x, False)
    # the short form where every lane has |x| < -EXP_FAST_LOW (within its range): |x|'s bits as integers order as the
    # magnitudes do, NaN and inf above every finite one, so one and and one integer compare a vector (two float
    # compares and an or before: Mamba's scan 5-10% faster on AVX-512 and AVX2 code, Zen 4)
    i32 = ir.IntegerType.get_signless(32)
    it = ir.VectorType.get(shape, i32)
    magnitude = arith.AndIOp(arith.BitcastOp(it, x).result, splat(0x7FFFFFFF, it)).result
    bound = struct.unpack("<I", struct.pack("<f", -EXP_FAST_LOW))[0]
    outside = arith.CmpIOp(arith.CmpIPredicate.sge, magnitude, splat(bound, it)).result
    i1 = ir.IntegerType.get_signless(1)
    some = vector.ReductionOp(i1, ir.Attribute.parse("#vector.kind<or>"), outside).result
    branch = if_(some, [et], has_else=True)
    with ir.InsertionPoint(branch.then_block):
        scf.YieldOp([_exp(x, False)])
    with ir.InsertionPoint(branch.else_block):
        scf.YieldOp([_exp(x, True)])
    return branch.results[0]


def _exp(x: ir.Value, fast: bool) -> ir.Value:
    """exp's arith (`fast`: every element in [EXP_FAST_LOW, EXP_HIGH))."""
    et = x.type
    shape = ir.VectorType(et).shape if isinstance(et, ir.VectorType) else None
    i32 = ir.IntegerType.get_signless(32)
    it = ir.VectorType.get(shape, i32) if shape else i32

    def c(v: float) -> ir.Value:
        return splat(v, et)

    def mul(a: ir.Value, b: ir.Value) -> ir.Value:
        return arith.MulFOp(a, b).result

    def add(a: ir.Value, b: ir.Value) -> ir.Value:
        return arith.AddFOp(a, b).result

    top = c(EXP_HIGH)
    xc = x if fast else arith.MinimumFOp(arith.MaximumFOp(x, c(-104.0)).result, top).result
    n = mmath.FloorOp(add(mul(xc, c(1.44269504088896341)), c(0.5))).result
    r = arith.SubFOp(arith.SubFOp(xc, mul(n, c(0.693359375))).result, mul(n, c(-2.12194440e-4))).result
    p = c(1.9875691500e-4)
    for k in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = add(mul(p, r), c(k))
    y = add(add(mul(p, mul(r, r)), r), c(1.0))
    ni = arith.FPToSIOp(it, n).result
    if fast:  # y in [0.7, 1.5) and n in -124..128 (y < 1 where n = 128, below EXP_HIGH): y's exponent plus n
        bits = arith.AddIOp(arith.BitcastOp(it, y).result, arith.ShLIOp(ni, splat(23, it)).result).result
        return arith.BitcastOp(et, bits).result
    # 2**n as 2**(n >> 1) * 2**(n - (n >> 1)): both factors normal for n in -150..128 (results down to 0)
    half = arith.ShRSIOp(ni, splat(1, it)).result

    def pow2(k: ir.Value) -> ir.Value:
        biased = arith.AddIOp(k, splat(127, it)).result
        return arith.BitcastOp(et, arith.ShLIOp(biased, splat(23, it)).result).result

    result = mul(mul(y, pow2(half)), pow2(arith.SubIOp(ni, half).result))
    result = arith.SelectOp(arith.CmpFOp(2, x, top).result, c(float("inf")), result).result
    return arith.SelectOp(arith.CmpFOp(14, x, x).result, x, result).result  # uno: NaN stays NaN


def erf(x: ir.Value, et: ir.Type) -> ir.Value:
    """erf(x) by Abramowitz and Stegun 7.1.26 (absolute error < 1.5e-7): arith and one exp, so it
    vectorizes (math.erf has no LLVM lowering but a scalar libm call)."""
    a = mmath.AbsFOp(x).result
    t = arith.DivFOp(c_float(1.0, et), arith.AddFOp(c_float(1.0, et), arith.MulFOp(
        a, c_float(0.3275911, et)).result).result).result
    poly = c_float(1.061405429, et)
    for c in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        poly = arith.AddFOp(arith.MulFOp(poly, t).result, c_float(c, et)).result
    poly = arith.MulFOp(poly, t).result
    tail = arith.MulFOp(poly, exp(arith.NegFOp(arith.MulFOp(a, a).result).result)).result
    return mmath.CopySignOp(arith.SubFOp(c_float(1.0, et), tail).result, x).result
