"""One MLIR function ("kernel") per Sparsa op, all in one module: dense ops through `Lowering` (linalg on
tensors, tiled and vectorized by the schedule), the sparse ops as loops over their sparse structure around
dense tiles — block-sparse flash attention visiting only the non-empty key blocks, the fused scan
streaming over time, BSR and N:M matmuls over the stored blocks only — here; the MoE kernels in moe.py and
the memref loop kernels (cumsum, scans, concat, top-k, linear attention) in loops.py, mixed in.

A kernel takes its operands, then its outputs, as memrefs (symbolic dims dynamic); kernels that split
their work take two more index arguments (part, parts) and do every parts-th work item from `part`, so
the host (jit.py) can run them on several threads at once. Outputs are allocated by the host.
"""

from __future__ import annotations

import dataclasses
import re

from torch_mlir import ir
from torch_mlir.dialects import arith, func, linalg, scf

from sparsa.backends.cpu import build as B
from sparsa.backends.cpu.build import Size
from sparsa.backends.cpu.loops import LoopKernels
from sparsa.backends.cpu.lower import PARALLEL, REDUCTION, CpuLoweringError, Lowering, element_type, exp
from sparsa.backends.cpu.moe import MoeKernels
from sparsa.backends.cpu.signature import Kernel, memref_type
from sparsa.ir.core import Operation, Region
from sparsa.ir.dialects import tensor_reduce as R
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.dialects.attn_blocks import EMPTY, FULL, outer_values
from sparsa.ir.traits import Elementwise
from sparsa.ir.types import TensorType

SCAN_BLOCK = 128  # channels of a fused scan done together: a [.., 128, N] state block and its temporaries in L1


class Kernels(Lowering, LoopKernels, MoeKernels):
    """Builds the kernels of one function into `module`."""

    def __init__(self, module: ir.Module, fixed: set[int] | None = None):
        """`fixed`: ids of the values that are the same on every call (weights, constant inputs and what
        only they feed)."""
        super().__init__()
        self.module = module
        self.fixed = fixed or set()
        self.kernels: list[Kernel] = []
        self.compiled: dict[tuple, str] = {}  # a kernel's code (its name and tags left out) -> its function's name
        self.last: func.FuncOp | None = None

    # ---- functions ------------------------------------------------------------------------------------
    def function(self, op: Operation, types: list[TensorType], parts: bool) -> tuple:
        """An empty kernel function for `op` over memrefs of `types` (operands, then outputs), with
        (part, parts) index arguments when it splits its work."""
        name = f"k{len(self.kernels)}_{op.NAME.replace('.', '_')}"
        args = [memref_type(t) for t in types] + [ir.IndexType.get()] * (2 if parts else 0)
        with ir.InsertionPoint(self.module.body):
            fn = self.last = func.FuncOp(name, ir.FunctionType.get(args, []))
            fn.attributes["llvm.emit_c_interface"] = ir.UnitAttr.get()
            entry = fn.add_entry_block()
        return name, entry

    def kernel(self, op: Operation) -> Kernel:
        """The kernel computing `op` (CpuLoweringError, naming the op and its line, if there is none)."""
        half = {v.type.dtype for v in list(op.operands) + list(op.results)} & {"f16", "bf16"}
        if half:
            raise CpuLoweringError(f"'{op.NAME}' on {half.pop()} is not supported by the cpu backend yet (its "
                                   "kernels are float32; cast to f32 or use the triton target)", op.loc)
        builder = getattr(self, "kernel_" + type(op).__name__, None)
        start = len(self.tiled)
        k = builder(op) if builder is not None else self.dense(op)
        k = self.reuse(k, start)
        self.kernels.append(k)
        return k

    def reuse(self, k: Kernel, start: int) -> Kernel:
        """k, or an earlier kernel with the same code (a model's layers repeat their ops at the same shapes):
        k's function is then dropped, with its schedule entries (tiled[start:]), and never compiled."""
        fn = self.last  # k's function, the one `function` made last
        tags = {t[0]: f"sparsa.tile#{i}" for i, t in enumerate(self.tiled[start:])}
        text = re.sub(r"sparsa\.tile\d+\b", lambda m: tags.get(m.group(0), m.group(0)),
                      str(fn).replace(f"@{k.name}(", "@kernel(", 1))
        key = (text, tuple(t[1:] for t in self.tiled[start:]))
        same = self.compiled.setdefault(key, k.name)
        if same == k.name:
            return k
        fn.operation.erase()
        del self.tiled[start:]
        return dataclasses.replace(k, name=same)

    def dense(self, op: Operation) -> Kernel:
        """An op of Lowering, on tensor views of its memrefs; written straight into the output."""
        if op.regions and any(not r.empty for r in op.regions):
            hint = " (run the fuse-moe-gating and fuse-moe-dispatch passes first)" if op.NAME == "moe.moe" else " yet"
            raise CpuLoweringError(f"'{op.NAME}' is not supported by the cpu backend{hint}", op.loc)
        inputs = list(op.operands)
        split, cut = self.row_split(op)
        rows = op.results[0].type.shape[0] if split == "rows" else None
        if isinstance(rows, int):  # a static dim 0 the host cuts: dynamic in the kernel
            self.dim_map = {rows: None}
        types = [t.with_shape(self.shape(t)) for t in [v.type for v in inputs] + [r.type for r in op.results]]
        name, entry = self.function(op, types, False)
        with ir.InsertionPoint(entry):
            for v, m in zip(inputs, entry.arguments, strict=False):
                self.values[id(v)] = B.read(m)
            self.lower(op)
            for r, m in zip(op.results, entry.arguments[len(inputs):], strict=True):
                B.write(self.get(r), m)
            func.ReturnOp([])
        self.dim_map = {}
        return Kernel(name, op, inputs, list(op.results), split, cut)

    def row_split(self, op: Operation) -> tuple[str, list[bool]]:
        """Whether the host may cut this op along dim 0 (a dim it only carries through)."""
        out = op.results[0].type if len(op.results) == 1 else None
        if out is None or out.rank == 0 or out.shape[0] in (None, 0, 1):
            return "none", []
        cut = [v.type.rank == out.rank and v.type.shape[0] == out.shape[0] for v in op.operands]
        if isinstance(op, Elementwise):  # every operand that has the dim is cut along it
            return "rows", cut
        if isinstance(op, S.MatmulOp):
            if out.rank == 2:
                cut = [cut[0], False]
            return "rows", cut
        if isinstance(op, R.ReduceOp) and 0 not in {a % op.x.type.rank for a in op.axes}:
            return "rows", cut
        if isinstance(op, R.SoftmaxOp | R.RmsNormOp | R.LayerNormOp) and op.x.type.rank > 1 and \
                (getattr(op, "axis", -1) % op.x.type.rank) != 0:
            return "rows", [cut[0]] + [False] * (len(cut) - 1)
        return "none", []

    # ---- region inlining ----------------------------------------------------------------------------
    def inline(self, region: Region, args: list[ir.Value], scalar: bool) -> list[ir.Value]:
        """The values a region yields, its ops lowered here on `args` (scalars in scalar mode)."""
        saved = self.scalar_mode
        self.scalar_mode = scalar
        try:
            for a, v in zip(region.block.args, args, strict=True):
                self.values[id(a)] = v
            for op in region.block.ops:
                if op.TERMINATOR:
                    return [self.get(v) for v in op.operands]
                self.lower(op)
        finally:
            self.scalar_mode = saved
        raise CpuLoweringError("region without a terminator")

    def matmul_tile(self, a: ir.Value, b: ir.Value, m: ir.Value, n: ir.Value, et: ir.Type,
                    init: ir.Value | None = None) -> ir.Value:
        """a [m, k] @ b [k, n] as a tagged linalg matmul the schedule tiles."""
        if init is None:
            init = linalg.fill(B.c_float(0.0, et), outs=[B.empty([m, n], et)])
        d = [ir.AffineDimExpr.get(i) for i in range(3)]
        res_t = init.type
        g = linalg.GenericOp([res_t], [a, b], [init], B.maps(3, [[d[0], d[2]], [d[2], d[1]], [d[0], d[1]]]),
                             B.iterators([PARALLEL, PARALLEL, REDUCTION]))
        block = g.regions[0].blocks.append(et, et, et)
        with ir.InsertionPoint(block):
            x, y, acc = block.arguments
            linalg.YieldOp([arith.AddFOp(acc, arith.MulFOp(x, y).result).result])
        shape = tuple(s if s != B.DYN() else None for s in ir.RankedTensorType(res_t).shape)
        self.tag(g.result, "matmul", TensorType(_dtype(et), shape))
        return g.result

    # ---- tiles ----------------------------------------------------------------------------------------
    def tile_map(self, inputs: list[tuple[ir.Value, list]], sizes: list[ir.Value], et: ir.Type, body,
                 tag: bool = False) -> ir.Value:
        """An elementwise generic over a tile of `sizes` (inputs with their affine exprs)."""
        rank = len(sizes)
        d = [ir.AffineDimExpr.get(i) for i in range(rank)]
        init = B.empty(sizes, et)
        g = linalg.GenericOp([init.type], [v for v, _ in inputs], [init], B.maps(rank, [e for _, e in inputs] + [d]),
                             B.iterators([PARALLEL] * rank))
        block = g.regions[0].blocks.append(*[ir.RankedTensorType(v.type).element_type for v, _ in inputs], et)
        with ir.InsertionPoint(block):
            linalg.YieldOp([body(*block.arguments[:-1])])
        if tag:
            self.tag(g.result, "elementwise", TensorType(_dtype(et), (None,) * rank))
        return g.result

    def row_reduce(self, x: ir.Value, start: float, combine, tag: bool = False) -> ir.Value:
        """[n, m] -> [n]: combine(acc, v) over each row."""
        et = ir.RankedTensorType(x.type).element_type
        init = linalg.fill(B.c_float(start, et), outs=[B.empty([B.mdim(x, 0)], et)])
        d0, d1 = ir.AffineDimExpr.get(0), ir.AffineDimExpr.get(1)
        g = linalg.GenericOp([init.type], [x], [init], B.maps(2, [[d0, d1], [d0]]), B.iterators([PARALLEL, REDUCTION]))
        block = g.regions[0].blocks.append(et, et)
        with ir.InsertionPoint(block):
            v, acc = block.arguments
            linalg.YieldOp([combine(acc, v)])
        if tag:
            self.tag(g.result, "reduction", TensorType(_dtype(et), (None, None)), (0,))
        return g.result

    # ---- attention ------------------------------------------------------------------------------------
    def kernel_AttentionOp(self, op: Operation) -> Kernel:
        """Flash attention per (batch, head, query block): an online softmax over the key blocks the block
        map does not mark EMPTY; FULL blocks skip the mask, PARTIAL ones evaluate it inline on the scores;
        grouped heads read their shared K/V in place; a row with nothing allowed gives zeros. K comes
        transposed ([B, Hk, Dh, Sk], one copy per call by the host): Q @ K^T with K^T's rows contiguous
        runs 20-25% faster than reading K's columns in the register tile."""
        data = []
        for region in (op.mask, op.score):
            if not region.empty:
                data += [v for v in outer_values(region) if all(v is not d for d in data)]
        inputs = [op.q, op.k, op.v] + ([op.block_map] if op.block_map is not None else []) + data
        types = [v.type for v in inputs]
        kt_ = op.k.type  # the host passes K transposed, [B, Hk, Dh, Sk]: Q @ K^T then reads rows of it
        types[1] = TensorType(kt_.dtype, kt_.shape[:2] + (kt_.shape[3], kt_.shape[2]))
        name, entry = self.function(op, types + [op.result.type], True)
        args = entry.arguments
        q, k, v = args[:3]
        bm = args[3] if op.block_map is not None else None
        out, part, parts = args[len(inputs):]
        et = element_type(op.q.type.dtype)
        bq, bk = op.block_q or 64, op.block_k or 64
        masked = not op.mask.empty
        with ir.InsertionPoint(entry):
            for val, m in zip(data, args[len(inputs) - len(data):len(inputs)], strict=True):
                self.values[id(val)] = B.read(m)
            qt, kt, vt = B.read(q), B.read(k), B.read(v)
            Bn, Hq, Sq, Dh = (B.mdim(q, i) for i in range(4))
            Hkv, Sk, Dv = B.mdim(k, 1), B.mdim(k, 3), B.mdim(v, 3)
            rep = arith.DivUIOp(Hq, Hkv).result
            NQ, NK = B.ceil_div(Sq, bq), B.ceil_div(Sk, bk)
            per_b = B.mul(Hq, NQ)
            items = B.loop(part, B.mul(Bn, per_b), parts)
            with ir.InsertionPoint(items.body):
                it = items.induction_variable
                b = arith.DivUIOp(it, per_b).result
                h = arith.RemUIOp(arith.DivUIOp(it, NQ).result, Hq).result
                i = arith.RemUIOp(it, NQ).result
                q0 = B.mul(i, B.c_index(bq))
                nq = B.minsi(B.c_index(bq), B.sub(Sq, q0))
                Q = B.slice_tensor(qt, [b, h, q0, 0], [1, 1, nq, Dh], drop=[0, 1])
                ninf = B.c_float(float("-inf"), et)
                m0 = linalg.fill(ninf, outs=[B.empty([nq], et)])
                l0 = linalg.fill(B.c_float(0.0, et), outs=[B.empty([nq], et)])
                a0 = linalg.fill(B.c_float(0.0, et), outs=[B.empty([nq, Dv], et)])
                keys = B.loop(0, NK, 1, [m0, l0, a0])
                with ir.InsertionPoint(keys.body):
                    j = keys.induction_variable
                    state = list(keys.inner_iter_args)
                    if bm is not None:
                        kind = B.load(bm, arith.RemUIOp(b, B.mdim(bm, 0)).result,
                                      arith.RemUIOp(h, B.mdim(bm, 1)).result, i, j)
                        live = B.if_(B.cmpi("ne", kind, B.c_int(EMPTY, 8)), [s.type for s in state])
                        with ir.InsertionPoint(live.then_block):
                            scf.YieldOp(self.attend(op, Q, kt, vt, state, b, h, q0, nq, j, bk, Sk, Dh, Dv, rep, et,
                                                    kind))
                        with ir.InsertionPoint(live.else_block):
                            scf.YieldOp(state)
                        scf.YieldOp(list(live.results))
                    else:
                        scf.YieldOp(self.attend(op, Q, kt, vt, state, b, h, q0, nq, j, bk, Sk, Dh, Dv, rep, et,
                                                B.c_int(1 if masked else FULL, 8)))
                _, l_fin, acc = keys.results
                zero = B.c_float(0.0, et)
                d0, d1 = ir.AffineDimExpr.get(0), ir.AffineDimExpr.get(1)
                o = self.tile_map([(acc, [d0, d1]), (l_fin, [d0])], [nq, Dv], et, lambda a, s: B.select(
                    arith.CmpFOp(2, s, zero).result, arith.DivFOp(a, s).result, zero))
                B.write(o, B.subview(out, [b, h, q0, 0], [1, 1, nq, Dv], drop=[0, 1]))
                scf.YieldOp([])
            func.ReturnOp([])
        return Kernel(name, op, inputs, [op.result], "parts")

    def attend(self, op: Operation, Q: ir.Value, kt: ir.Value, vt: ir.Value, state: list[ir.Value], b: ir.Value,
               h: ir.Value, q0: ir.Value, nq: ir.Value, j: ir.Value, bk: int, Sk: ir.Value, Dh: ir.Value,
               Dv: ir.Value, rep: ir.Value, et: ir.Type, kind: ir.Value) -> list[ir.Value]:
        """One key block of the online softmax: (m, l, acc) -> (m', l', acc')."""
        m, l_, acc = state
        k0 = B.mul(j, B.c_index(bk))
        nk = B.minsi(B.c_index(bk), B.sub(Sk, k0))
        hk = arith.DivUIOp(h, rep).result
        KT = B.slice_tensor(kt, [b, hk, 0, k0], [1, 1, Dh, nk], drop=[0, 1])
        V = B.slice_tensor(vt, [b, hk, k0, 0], [1, 1, nk, Dv], drop=[0, 1])
        S = self.matmul_tile(Q, KT, nq, nk, et)
        if op.mask.empty:
            S = self.scores(op, S, b, h, q0, k0, nq, nk, et, False)
        else:
            full = B.if_(B.cmpi("eq", kind, B.c_int(FULL, 8)), [S.type])
            with ir.InsertionPoint(full.then_block):
                scf.YieldOp([self.scores(op, S, b, h, q0, k0, nq, nk, et, False)])
            with ir.InsertionPoint(full.else_block):
                scf.YieldOp([self.scores(op, S, b, h, q0, k0, nq, nk, et, True)])
            S = full.results[0]
        d0, d1 = ir.AffineDimExpr.get(0), ir.AffineDimExpr.get(1)
        ninf, zero = B.c_float(float("-inf"), et), B.c_float(0.0, et)
        mx = self.row_reduce(S, float("-inf"), lambda a, x: arith.MaximumFOp(a, x).result)
        m_new = self.tile_map([(m, [d0]), (mx, [d0])], [nq], et, lambda a, x: arith.MaximumFOp(a, x).result)

        def safe(x: ir.Value) -> ir.Value:  # a row with nothing allowed yet keeps exp() at 0, never NaN
            return B.select(arith.CmpFOp(1, x, ninf).result, zero, x)

        P = self.tile_map([(S, [d0, d1]), (m_new, [d0])], [nq, nk], et,
                          lambda s, mn: exp(arith.SubFOp(s, safe(mn)).result))
        alpha = self.tile_map([(m, [d0]), (m_new, [d0])], [nq], et,
                              lambda mo, mn: exp(arith.SubFOp(mo, safe(mn)).result))
        total = self.row_reduce(P, 0.0, lambda a, x: arith.AddFOp(a, x).result)
        l_new = self.tile_map([(l_, [d0]), (alpha, [d0]), (total, [d0])], [nq], et,
                              lambda s, al, t: arith.AddFOp(arith.MulFOp(s, al).result, t).result)
        scaled = self.tile_map([(acc, [d0, d1]), (alpha, [d0])], [nq, Dv], et, lambda a, al: arith.MulFOp(a, al).result)
        return [m_new, l_new, self.matmul_tile(P, V, nq, Dv, et, init=scaled)]

    def scores(self, op: Operation, S: ir.Value, b: ir.Value, h: ir.Value, q0: ir.Value, k0: ir.Value,
               nq: ir.Value, nk: ir.Value, et: ir.Type, masked: bool) -> ir.Value:
        """scale * s, then the score modifier, then (PARTIAL blocks) -inf where the mask disallows."""
        d0, d1 = ir.AffineDimExpr.get(0), ir.AffineDimExpr.get(1)
        scale = B.c_float(float(op.scale), et)

        def body(s: ir.Value) -> ir.Value:
            s = arith.MulFOp(s, scale).result
            idx = [B.as_i64(b), B.as_i64(h), B.as_i64(B.add(q0, linalg.IndexOp(0).result)),
                   B.as_i64(B.add(k0, linalg.IndexOp(1).result))]
            if not op.score.empty:
                (s,) = self.inline(op.score, [s, *[self.cast_index(op.score, i + 1, x) for i, x in enumerate(idx)]],
                                   True)
            if masked:
                (ok,) = self.inline(op.mask, [self.cast_index(op.mask, i, x) for i, x in enumerate(idx)], True)
                s = B.select(ok, s, B.c_float(float("-inf"), et))
            return s

        return self.tile_map([(S, [d0, d1])], [nq, nk], et, body)

    def cast_index(self, region: Region, arg: int, x: ir.Value) -> ir.Value:
        """An i64 index as the integer type region argument `arg` declares."""
        want = element_type(region.block.args[arg].type.dtype)
        return x if want == x.type else arith.TruncIOp(want, x).result

    # ---- scans ----------------------------------------------------------------------------------------
    def kernel_FusedScanOp(self, op: Operation) -> Kernel:
        """h = a_t * h + b_t streamed over time: per step the producer region makes a_t, b_t from step t of
        the inputs, the consumer reduces h to y_t, stored at step t of the output; h is never stored.

        Where a state dim runs through to the output (Mamba's channels), the kernel takes SCAN_BLOCK of it
        at a time, every time step for one block before the next: the block's state and temporaries stay
        in L1, and blocks are split over threads (part, parts)."""
        inputs = list(op.inputs)
        rank, axis, n = len(op.state), op.axis, op.num_producer_inputs
        y_type = op.consumer.block.terminator.operands[0].type
        channel = _channel_dim(op, y_type)
        name, entry = self.function(op, [v.type for v in inputs] + [op.result.type], True)
        args = entry.arguments
        out, part, parts = args[len(inputs):]
        dt = op.result.type.dtype
        et = element_type(dt)
        with ir.InsertionPoint(entry):
            ts = [B.read(m) for m in args[:len(inputs)]]
            state = TensorType(dt, tuple(op.state))
            sources = self.out_sources(state, [(t, v.type) for t, v in zip(ts, inputs, strict=True)])
            timed = [(t, v) for t, v in zip(ts, inputs, strict=True)
                     if 0 <= axis - (rank - v.type.rank) and v.type.shape[axis - (rank - v.type.rank)] != 1]
            if not timed:
                raise CpuLoweringError("a fused scan needs an input that runs over time", op.loc)
            L = B.mdim(timed[0][0], axis - (rank - timed[0][1].type.rank))
            sizes = [1 if i == axis else (d if isinstance(d, int) else B.mdim(*sources[i])) for i, d in
                     enumerate(state.shape)]
            if channel is None:  # one block: the whole state, on the first thread
                blocks, width = B.select(B.cmpi("eq", part, B.c_index(0)), B.c_index(1), B.c_index(0)), None
            else:
                c, yc = channel
                total = B.as_index(sizes[c])
                blocks = B.ceil_div(total, SCAN_BLOCK)
                self.dim_map = {state.shape[c]: None}
            chunks = B.loop(part, blocks, parts)
            with ir.InsertionPoint(chunks.body):
                views, offs_y, ysz = ts, {}, {}
                block_sizes = list(sizes)
                if channel is not None:
                    c0 = B.mul(chunks.induction_variable, B.c_index(SCAN_BLOCK))
                    width = B.minsi(B.c_index(SCAN_BLOCK), B.sub(total, c0))
                    views = [self.aligned_slice(t, v.type, c, rank, c0, width) for t, v in zip(ts, inputs, strict=True)]
                    block_sizes[c] = width
                    offs_y, ysz = {yc: c0}, {yc: width}
                h0 = linalg.fill(B.c_float(0.0, et), outs=[B.empty(block_sizes, et)])
                self.untiled = True
                loop = B.loop(0, L, 1, [h0])
                with ir.InsertionPoint(loop.body):
                    t = loop.induction_variable
                    sliced = [self.aligned_slice(x, v.type, axis, rank, t, 1)
                              for x, v in zip(views, inputs, strict=True)]
                    a, bb = self.inline(op.producer, sliced[:n], False)
                    prod_types = [v.type for v in op.producer.block.terminator.operands]
                    h = loop.inner_iter_args[0]
                    dd = [ir.AffineDimExpr.get(i) for i in range(rank)]
                    step = state.with_shape(tuple(1 if i == axis else d for i, d in enumerate(state.shape)))
                    # updated in place (h is the generic's own output), so the loop carries one buffer
                    new = self.generic(step, [(a, self.broadcast_exprs(prod_types[0], rank)),
                                              (bb, self.broadcast_exprs(prod_types[1], rank))], h,
                                       [PARALLEL] * rank, dd,
                                       lambda x, y, hv: arith.AddFOp(arith.MulFOp(x, hv).result, y).result)
                    (y,) = self.inline(op.consumer, [new] + sliced[n:], False)
                    yt = ir.RankedTensorType(y.type)
                    offs = [t if i == op.out_axis else offs_y.get(i, 0) for i in range(yt.rank)]
                    ysizes = [1 if i == op.out_axis else ysz.get(i, s if s != B.DYN() else B.mdim(y, i))
                              for i, s in enumerate(yt.shape)]
                    B.write(y, B.subview(out, offs, ysizes))
                    scf.YieldOp([new])
                self.untiled = False
                scf.YieldOp([])
            self.dim_map = {}
            func.ReturnOp([])
        return Kernel(name, op, inputs, [op.result], "parts")

    def aligned_slice(self, x: ir.Value, t: TensorType, axis: int, rank: int, offset: ir.Value,
                      size: Size) -> ir.Value:
        """Elements offset..offset+size along state axis `axis` of an input of type t right-aligned to the
        rank-`rank` state (an input without that axis, or with size 1 there, is taken whole). Sizes come
        from x itself, which may already be a slice."""
        pos = axis - (rank - t.rank)
        if pos < 0 or t.shape[pos] == 1:
            return x
        sizes = B.sizes_of(x)
        sizes[pos] = size
        return B.slice_tensor(x, [offset if i == pos else 0 for i in range(t.rank)], sizes)

    # ---- sparse weights ---------------------------------------------------------------------------------
    def kernel_BsrMatmulOp(self, op: Operation) -> Kernel:
        """x [M, K] @ W with W in BSR: for each stored block (r, c), out[:, c] += x[:, r] @ block; the
        empty blocks cost nothing. The host passes x and the output as 2-D and splits M across threads."""
        x2 = TensorType(op.x.type.dtype, (None, op.x.type.shape[-1]))
        out2 = TensorType(op.result.type.dtype, (None, op.cols))
        name, entry = self.function(op, [x2, op.row_ptr.type, op.col_idx.type, op.blocks.type, out2], False)
        x, row_ptr, col_idx, blocks, out = entry.arguments
        et = element_type(out2.dtype)
        with ir.InsertionPoint(entry):
            xt, bt = B.read(x), B.read(blocks)
            M = B.mdim(x, 0)
            br, bc = B.mdim(blocks, 1), B.mdim(blocks, 2)
            acc0 = linalg.fill(B.c_float(0.0, et), outs=[B.empty([M, op.cols], et)])
            rows = B.loop(0, B.sub(B.mdim(row_ptr, 0), B.c_index(1)), 1, [acc0])
            with ir.InsertionPoint(rows.body):
                r = rows.induction_variable
                xs = B.slice_tensor(xt, [0, B.mul(r, br)], [M, br])
                stored = B.loop(B.load(row_ptr, r), B.load(row_ptr, B.add(r, B.c_index(1))), 1,
                                [rows.inner_iter_args[0]])
                with ir.InsertionPoint(stored.body):
                    i, acc = stored.induction_variable, stored.inner_iter_args[0]
                    c0 = B.mul(B.as_index(B.load(col_idx, i)), bc)
                    blk = B.slice_tensor(bt, [i, 0, 0], [1, br, bc], drop=[0])
                    cur = B.slice_tensor(acc, [0, c0], [M, bc])
                    new = self.matmul_tile(xs, blk, M, bc, et, init=cur)
                    scf.YieldOp([B.insert_slice(new, acc, [0, c0], [M, bc])])
                scf.YieldOp([stored.results[0]])
            B.write(rows.results[0], out)
            func.ReturnOp([])
        return Kernel(name, op, list(op.operands), [op.result], "rows", [True, False, False, False])

    def kernel_NmMatmulOp(self, op: Operation) -> Kernel:
        """x [M, K] @ W with W stored N:M along K: each output reads only the n kept inputs of every m."""
        x2 = TensorType(op.x.type.dtype, (None, op.x.type.shape[-1]))
        out2 = TensorType(op.result.type.dtype, (None, op.values.type.shape[1]))
        name, entry = self.function(op, [x2, op.values.type, op.indices.type, out2], False)
        x, values, indices, out = entry.arguments
        et = element_type(out2.dtype)
        with ir.InsertionPoint(entry):
            xt, vt, it = B.read(x), B.read(values), B.read(indices)
            M, N = B.mdim(x, 0), B.mdim(values, 1)
            init = linalg.fill(B.c_float(0.0, et), outs=[B.empty([M, N], et)])
            d = [ir.AffineDimExpr.get(i) for i in range(3)]
            g = linalg.GenericOp([init.type], [vt, it], [init], B.maps(3, [[d[2], d[1]], [d[2], d[1]], [d[0], d[1]]]),
                                 B.iterators([PARALLEL, PARALLEL, REDUCTION]))
            block = g.regions[0].blocks.append(et, ir.IntegerType.get_signless(8), et)
            with ir.InsertionPoint(block):
                w, off, acc = block.arguments
                kk = linalg.IndexOp(2).result
                col = B.add(B.mul(arith.DivUIOp(kk, B.c_index(op.n)).result, B.c_index(op.m)), B.as_index(off))
                xv = B.extract(xt, linalg.IndexOp(0).result, col)
                linalg.YieldOp([arith.AddFOp(acc, arith.MulFOp(xv, w).result).result])
            B.write(g.result, out)
            func.ReturnOp([])
        return Kernel(name, op, list(op.operands), [op.result], "rows", [True, False, False])



def _dtype(et: ir.Type) -> str:
    return {"f32": "f32", "f64": "f64", "f16": "f16", "bf16": "bf16"}[str(et)]


def _channel_dim(op: Operation, y: TensorType) -> tuple[int, int] | None:
    """A state dim of a fused scan that the consumer keeps, to cut the work into blocks along: (its axis in
    the state, its axis in the consumer's result). Matched by size (symbol or number), so it must occur once
    in each, other than the time axis, and every input must have it whole or not at all (size 1). The
    last such dim is taken (contiguous blocks of the innermost kept axis)."""
    state = list(op.state)
    rank = len(state)
    for c in reversed(range(rank)):
        d = state[c]
        if c == op.axis or d is None or d == 1 or state.count(d) != 1 or list(y.shape).count(d) != 1:
            continue
        yc = list(y.shape).index(d)
        if yc == op.out_axis:
            continue
        if all(v.type.shape[c - (rank - v.type.rank)] in (1, d) for v in op.inputs if c - (rank - v.type.rank) >= 0):
            return c, yc
    return None


