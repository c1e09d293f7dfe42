"""The triton target: one Python module per compiled function, holding the generated kernels and a host
launcher that allocates outputs, computes grids and calls the kernels in program order.

Ops map to kernels as follows:
- chains of elementwise ops (and splat constants, iota) fuse into one generated kernel per group: an op
  is folded into its only user when both have the same shape, so intermediates stay in registers;
- dense `tensor.matmul` is cuBLAS's (torch.matmul, as Inductor's extern mm);
- row reductions and normalizations, top-k, MoE routing and dispatch, BSR and N:M matmuls call the fixed
  kernels of `library.py`;
- `attn.attention`, `attn.block_map` (maps of data masks or symbolic sizes, built per call on the GPU),
  `moe.grouped_matmul[_combine]`, `scan.fused` and `tensor.gather` get kernels generated from their regions;
- layout ops (transpose, expand_dims, squeeze, slice, split, broadcast_to, reshape of a contiguous tensor)
  are views: no kernel, no copy; a reshape that has no view copies with the strided copy kernel;
- what depends only on weights (parameters, packed sparse layouts, compile-time block maps) is prepared
  once per weight load and device and passed to the launcher as constants.
Any other op is refused at compile time with its name and `.sp` line.
"""

from __future__ import annotations

import hashlib
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any

from sparsa.backends.triton.attention import NUM_STAGES, NUM_WARPS, AttentionKernel, head_block
from sparsa.backends.triton.moe import GroupedMatmulKernel
from sparsa.backends.triton.regions import ExprEmitter, RegionEmitter
from sparsa.backends.triton.scan import FusedScanKernel
from sparsa.ir.analysis import weight_only_ops
from sparsa.ir.core import Operation, Value
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dialects import attn as AT
from sparsa.ir.dialects import moe as M
from sparsa.ir.dialects import scan as SC
from sparsa.ir.dialects import sparse as SP
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_reduce as R
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.dialects.attn_blocks import BlockMapOp, outer_values
from sparsa.ir.dims import Dim
from sparsa.ir.traits import Elementwise, Generator
from sparsa.ir.types import TensorType, is_float

TORCH_DTYPES = {"f32": "torch.float32", "f16": "torch.float16", "bf16": "torch.bfloat16", "f64": "torch.float64",
                "i8": "torch.int8", "i32": "torch.int32", "i64": "torch.int64", "i1": "torch.bool"}
ELEMENTWISE = (Elementwise, Generator)  # fused into one kernel per group
BLOCK_EW = 1024
REDUCE_OPS = {R.SumOp: "SUM", R.MeanOp: "MEAN", R.MaxOp: "MAX", R.MinOp: "MIN", R.LogSumExpOp: "LOGSUMEXP"}

BUILDER = '''
@triton.jit
def {name}(
    FULL_IDX, FULL_CNT, PART_IDX, PART_CNT, {data_params}
    SQ, SK, NQB, NKB, H, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # {op_line}: classified per call, one program per (batch, head, query block), exact (every pair)
    row = tl.program_id(0)
    qb = row % NQB
    b = row // NQB // H
    h = row // NQB % H
    offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_idx = offs_q[:, None].to(tl.int64)
    b_idx = b.to(tl.int64)
    h_idx = h.to(tl.int64)
    n_full = 0
    n_part = 0
    for kb in range(0, NKB):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_idx = offs_k[None, :].to(tl.int64)
        live = (offs_q[:, None] < SQ) & (offs_k[None, :] < SK)
{mask}
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
'''

EW = '''
@triton.jit
def {name}({params}OUT, {out_strides}{sizes}NUMEL, BLOCK: tl.constexpr):
    # {header}
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < NUMEL
{body}
    tl.store(OUT + {out_addr}, ({value}).to(OUT.dtype.element_ty), mask=live)
'''


def loc_comment(op: Operation) -> str:
    return f"{op.NAME}" + (f' from "{op.loc.file}":{op.loc.line}' if op.loc else "")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Const:
    """A launcher constant prepared once per weight load and device: a weight-only value, the column index
    of a packed BSR weight, or the block lists of a compile-time block map."""

    kind: str  # "value" | "bsc" | "lists"
    op: Operation
    index: int = 0


@dataclass
class TritonProgram:
    """Kernels and launcher for one function (see the module docstring)."""

    func: Operation
    kernels: dict[str, str] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    consts: list[Const] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.names: dict[int, str] = {}
        self.weight_only = weight_only_ops(self.func)
        self.returned: set[int] = set()
        self.inputs: list[str] = []
        self.bf16_dot: Operation | None = None  # the first op with a bfloat16 tl.dot (see function.py)
        self._generate()

    # ---- names and shapes --------------------------------------------------------------------------------
    def name(self, v: Value) -> str:
        key = id(v)
        if key not in self.names:
            op = v.defining_op
            if op is None or id(op) not in self.weight_only:
                raise SparsaError(f"triton launcher: value {v} used before it is computed")
            self.names[key] = f"C[{len(self.consts)}]"
            self.consts.append(Const("value", op, op.results.index(v) if len(op.results) > 1 else 0))
        return self.names[key]

    @staticmethod
    def dim(d: Dim) -> str:
        if isinstance(d, int):
            return str(d)
        if d is None:
            raise SparsaError("triton launcher: a dim unknown at compile time where a shape is needed")
        return re.sub(r"[A-Za-z_][A-Za-z0-9_]*", lambda m: f"d_{m.group(0)}", d)

    def shape(self, t: TensorType) -> str:
        dims = [self.dim(d) for d in t.shape]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

    def alloc(self, v: Value, name: str, runtime: str) -> None:
        """`name = torch.empty(shape)` for `v`: its shape from the type (symbolic dims as the launcher's
        `d_*` sizes) or, where the type has a dim unknown at compile time, `runtime` (from operand shapes)."""
        shape = self.shape(v.type) if all(d is not None for d in v.type.shape) else runtime
        self.lines.append(f"{name} = torch.empty({shape}, dtype={TORCH_DTYPES[v.type.dtype]}, device=dev)")

    def new(self, v: Value) -> str:
        n = f"v{len(self.names)}"
        self.names[id(v)] = n
        return n

    def kernel(self, name: str, source: str) -> None:
        self.kernels[name] = source

    # ---- driving ------------------------------------------------------------------------------------------
    def _generate(self) -> None:
        block = self.func.regions[0].block
        for i, a in enumerate(block.args):
            n = re.sub(r"\W", "_", a.name_hint or f"arg{i}")
            n = f"x_{n}"
            self.names[id(a)] = n
            self.inputs.append(n)
        seen: set[str] = set()
        for i, a in enumerate(block.args):
            for axis, d in enumerate(a.type.shape):
                if isinstance(d, str) and re.fullmatch(r"[A-Za-z_]\w*", d) and d not in seen:
                    seen.add(d)
                    self.lines.append(f"d_{d} = {self.inputs[i]}.shape[{axis}]")
        term = block.terminator
        self.returned = {id(v) for v in term.operands}
        for op in block.ops:
            if op.TERMINATOR:
                outs = ", ".join(self.name(v) for v in op.operands)
                self.lines.append(f"return ({outs}{',' if len(op.operands) == 1 else ''})")
                break
            if id(op) in self.weight_only or self._inlined(op):
                continue
            if isinstance(op, BlockMapOp) and op.map is not None:  # classified at compile time: a constant
                self.names[id(op.result)] = f"C[{len(self.consts)}]"
                self.consts.append(Const("lists", op))
                continue
            self.lines.append(f"# {loc_comment(op)}")
            self._emit(op)

    def _emit(self, op: Operation) -> None:
        dots = (S.MatmulOp, M.GroupedMatmulOp, M.GroupedMatmulCombineOp, AT.AttentionOp, SP.BsrMatmulOp)
        if isinstance(op, dots) and op.operands[0].type.dtype == "bf16" and self.bf16_dot is None:
            self.bf16_dot = op
        if isinstance(op, ELEMENTWISE):
            return self._elementwise(op)
        handlers = {
            S.MatmulOp: self._matmul, S.ReshapeOp: self._reshape, S.TransposeOp: self._view,
            S.ExpandDimsOp: self._view, S.SqueezeOp: self._view, S.SliceOp: self._view,
            S.BroadcastToOp: self._view, S.SplitOp: self._split, S.ConcatOp: self._concat, S.GatherOp: self._gather,
            R.ArgmaxOp: self._reduce, R.SoftmaxOp: self._softmax, R.CumsumOp: self._cumsum,
            R.RmsNormOp: self._norm, R.LayerNormOp: self._norm, R.TopkOp: self._topk,
            M.RouteOp: self._route, M.DispatchOp: self._dispatch, M.GroupedMatmulOp: self._grouped,
            M.GroupedMatmulCombineOp: self._grouped, AT.AttentionOp: self._attention,
            BlockMapOp: self._block_map, SC.FusedScanOp: self._scan,
            SC.LinearAttentionOp: self._linear_attention, SP.BsrMatmulOp: self._bsr,
            SP.NmMatmulOp: self._nm,
        }
        for cls in type(op).__mro__:
            if cls in REDUCE_OPS:
                return self._reduce(op)
            if cls in handlers:
                return handlers[cls](op)
        hint = {"moe.moe": " (run the fuse-moe-gating and fuse-moe-dispatch passes first)",
                "scan.scan": " (fuse-scan turns it into scan.fused)"}.get(op.NAME, "")
        raise SparsaError(f"'{op.NAME}' is not supported by the triton backend{hint}", op.loc)

    # ---- elementwise groups ---------------------------------------------------------------------------
    def _inlined(self, op: Operation) -> bool:
        """True when `op` is folded into the kernel of its (elementwise) user instead of being stored."""
        if not isinstance(op, ELEMENTWISE) or id(op) in self.weight_only:
            return False
        users = [u.op for u in op.result.uses]
        if not users or id(op.result) in self.returned:
            return False
        if not all(isinstance(u, ELEMENTWISE) and not isinstance(u, T.ConstantOp) and u.parent_op is self.func
                   for u in users):
            return False
        if isinstance(op, T.ConstantOp):
            return True
        return len(users) == 1 and tuple(users[0].result.type.shape) == tuple(op.result.type.shape)

    def _elementwise(self, root: Operation) -> None:
        group: list[Operation] = []

        def collect(op: Operation) -> None:
            for v in op.operands:
                d = v.defining_op
                if d is not None and self._inlined(d) and not isinstance(d, T.ConstantOp) and d not in group:
                    collect(d)
            group.append(op)

        collect(root)
        rank = root.result.type.rank
        names: dict[int, str] = {}
        leaves: list[Value] = []
        body: list[str] = []
        for d in range(rank - 1, -1, -1):  # flat index -> multi-index of the (contiguous-order) output
            body.append(f"i{d} = rem % n{d}" if d else f"i{d} = rem")
            if d:
                body.append(f"rem = rem // n{d}")
        if rank:
            body.insert(0, "rem = offs")
        for op in group:
            for v in op.operands:
                d = v.defining_op
                if id(v) in names:
                    continue
                if isinstance(d, T.ConstantOp) and self._inlined(d):
                    names[id(v)] = _literal(d.value)
                elif d is not None and d in group:
                    continue
                else:
                    j = len(leaves)
                    leaves.append(v)
                    addr = " + ".join(f"i{a} * sx{j}_{a}" for a in range(rank)) or "0 * offs"
                    conv = ".to(tl.float32)" if v.type.dtype in ("bf16", "f16") else ""
                    body.append(f"x{j} = tl.load(X{j} + {addr}, mask=live, other=0){conv}")
                    names[id(v)] = f"x{j}"
        em = ExprEmitter(names, {}, "e")
        for op in group:
            if isinstance(op, T.ConstantOp):
                names[id(op.result)] = f"tl.full([BLOCK], {_literal(op.value)}, {_tl_dtype(op.result.type.dtype)})"
            elif isinstance(op, T.IotaOp):
                names[id(op.result)] = "i0"
            else:
                em.emit_ops([op])
        body += em.lines
        value = names[id(root.result)]
        header = "; ".join(loc_comment(op) for op in group)
        params = "".join(f"X{j}, " + "".join(f"sx{j}_{a}, " for a in range(rank)) for j in range(len(leaves)))
        fields = {"params": params,
                  "out_strides": "".join(f"so{a}, " for a in range(rank)),
                  "sizes": "".join(f"n{a}, " for a in range(rank)), "header": header,
                  "body": textwrap.indent("\n".join(body), " " * 4), "value": value,
                  "out_addr": " + ".join(f"i{a} * so{a}" for a in range(rank)) or "0 * offs"}
        name = f"fused_elementwise_{_digest(EW.format(name='_', **fields))}"
        self.kernel(name, EW.format(name=name, **fields))
        out = self.new(root.result)
        leaf_shapes = "".join(f"{self.name(v)}.shape, " for v in leaves)
        self.alloc(root.result, out, f"torch.broadcast_shapes({leaf_shapes})")
        args = "".join(f"{self.name(v)}, *bstrides({self.name(v)}, {out}.shape), " for v in leaves)
        self.lines.append(f"{name}[(max(1, cdiv({out}.numel(), {BLOCK_EW})),)]({args}{out}, *{out}.stride(), "
                          f"*{out}.shape, {out}.numel(), BLOCK={BLOCK_EW})")

    # ---- matmul, views, copies ------------------------------------------------------------------------
    def _matmul(self, op: Operation) -> None:
        """A dense matmul is cuBLAS's, through torch.matmul (as Inductor's extern mm): the same NumPy
        broadcasting and 1-D rules as `tensor.matmul`, and eager's numerics (float32 follows
        torch.get_float32_matmul_precision). The kernels generated here are the sparse ones."""
        if not is_float(op.result.type.dtype):
            raise SparsaError("integer 'tensor.matmul' is not supported by the triton backend", op.loc)
        a, b = self.name(op.lhs), self.name(op.rhs)
        self.lines.append(f"{self.new(op.result)} = torch.matmul({a}, {b})")

    def _reshape(self, op: Operation) -> None:
        x = self.name(op.x)
        out = self.new(op.result)
        self.lines.append(f"{out} = reshape({x}, {self.shape(op.result.type)})")

    def _view(self, op: Operation) -> None:
        x = self.name(op.x)
        out = self.new(op.result)
        if isinstance(op, S.TransposeOp):
            expr = f"{x}.permute({tuple(op.perm)})"
        elif isinstance(op, S.ExpandDimsOp):
            rank = op.result.type.rank
            expr = x
            for a in sorted(a % rank for a in op.axes):
                expr = f"{expr}.unsqueeze({a})"
        elif isinstance(op, S.SqueezeOp):
            rank = op.x.type.rank
            expr = f"{x}.squeeze({tuple(sorted(a % rank for a in op.axes))})"
        elif isinstance(op, S.BroadcastToOp):
            expr = f"{x}.expand({self.shape(op.result.type)})"
        else:  # slice
            if any(s <= 0 for s in op.steps):
                raise SparsaError("'tensor.slice' with a non-positive step is not supported by the triton backend",
                                  op.loc)
            parts = [f"{a}:{'' if b is None else self.dim(b)}:{s}" for a, b, s in zip(op.starts, op.stops, op.steps,
                                                                                     strict=True)]
            expr = f"{x}[{', '.join(parts)}{',' if len(parts) == 1 else ''}]"
        self.lines.append(f"{out} = {expr}")

    def _split(self, op: Operation) -> None:
        outs = [self.new(r) for r in op.results]
        self.lines.append(f"{', '.join(outs)}{',' if len(outs) == 1 else ''} = torch.split({self.name(op.x)}, "
                          f"{list(op.sizes)}, dim={op.axis})")

    def _concat(self, op: Operation) -> None:
        out = self.new(op.result)
        axis = op.axis % op.result.type.rank
        first = self.name(op.inputs[0])
        total = " + ".join(f"{self.name(v)}.shape[{axis}]" for v in op.inputs)
        self.alloc(op.result, out, f"{first}.shape[:{axis}] + ({total},) + {first}.shape[{axis} + 1:]")
        self.lines.append("_at = 0")
        for v in op.inputs:
            x = self.name(v)
            self.lines.append(f"copy({x}, {out}.narrow({axis}, _at, {x}.shape[{axis}]))")
            self.lines.append(f"_at += {x}.shape[{axis}]")

    def _gather(self, op: Operation) -> None:
        x_t = op.x.type
        n_idx = len(op.indices)
        rank = op.result.type.rank
        r = rank - (x_t.rank - n_idx)  # leading output dims come from the (broadcast) index tensors
        body = ["rem = offs"] if rank else []
        for d in range(rank - 1, -1, -1):
            body.append(f"i{d} = rem % n{d}" if d else f"i{d} = rem")
            if d:
                body.append(f"rem = rem // n{d}")
        terms = []
        for j in range(n_idx):
            addr = " + ".join(f"i{a} * si{j}_{a}" for a in range(r)) or "0 * offs"
            body.append(f"g{j} = tl.load(I{j} + {addr}, mask=live, other=0).to(tl.int64)")
            # negative indices count from the end (as NumPy); out-of-range ones are clamped (the reference
            # interpreter reports them)
            body.append(f"g{j} = tl.minimum(tl.maximum(tl.where(g{j} < 0, g{j} + xn{j}, g{j}), 0), xn{j} - 1)")
            terms.append(f"g{j} * sx{j}")
        terms += [f"i{r + m} * sx{n_idx + m}" for m in range(x_t.rank - n_idx)]
        body.append(f"val = tl.load(X + {' + '.join(terms) or '0'}, mask=live, other=0)")
        fields = {"params": "X, " + "".join(f"sx{a}, " for a in range(x_t.rank))
                  + "".join(f"xn{j}, " for j in range(n_idx))
                  + "".join(f"I{j}, " + "".join(f"si{j}_{a}, " for a in range(r)) for j in range(n_idx)),
                  "out_strides": "".join(f"so{a}, " for a in range(rank)),
                  "sizes": "".join(f"n{a}, " for a in range(rank)), "header": loc_comment(op),
                  "body": textwrap.indent("\n".join(body), " " * 4), "value": "val",
                  "out_addr": " + ".join(f"i{a} * so{a}" for a in range(rank)) or "0 * offs"}
        name = f"gather_{_digest(EW.format(name='_', **fields))}"
        self.kernel(name, EW.format(name=name, **fields))
        x = self.name(op.x)
        out = self.new(op.result)
        idx_shapes = "".join(f"{self.name(v)}.shape, " for v in op.indices)
        self.alloc(op.result, out, f"torch.broadcast_shapes({idx_shapes}) + {x}.shape[{n_idx}:]")
        idx = "".join(f"{self.name(v)}, *bstrides({self.name(v)}, {out}.shape[:{r}]), " for v in op.indices)
        sizes = "".join(f"{x}.shape[{j}], " for j in range(n_idx))
        self.lines.append(f"{name}[(max(1, cdiv({out}.numel(), {BLOCK_EW})),)]({x}, *{x}.stride(), {sizes}{idx}"
                          f"{out}, *{out}.stride(), *{out}.shape, {out}.numel(), BLOCK={BLOCK_EW})")

    # ---- rows: reductions, softmax, cumsum, norms, top-k ----------------------------------------------
    def _reduce(self, op: Operation) -> None:
        x = self.name(op.x)
        rank = op.x.type.rank
        axes = (op.axis % rank,) if isinstance(op, R.ArgmaxOp) else tuple(sorted(a % rank for a in op.axes))
        kind = "ARGMAX" if isinstance(op, R.ArgmaxOp) else REDUCE_OPS[next(c for c in type(op).__mro__
                                                                           if c in REDUCE_OPS)]
        out = self.new(op.result)
        keep = "1" if op.keepdim else None
        dims = ", ".join(f"{x}.shape[{d}]" if d not in axes else keep for d in range(rank) if d not in axes or keep)
        self.alloc(op.result, out, f"({dims}{',' if dims else ''})")
        is_int = not is_float(op.x.type.dtype)
        self.lines += [f"_x, _ = rows({x}, {axes})",
                       "if _x.shape[0]:",
                       f"    lib.reduce_rows[(_x.shape[0],)](_x, {out}, _x.shape[1], OP=lib.{kind}, IS_INT={is_int}, "
                       f"BLOCK=min(1024, npow2(_x.shape[1])))"]

    def _softmax(self, op: Operation) -> None:
        self._along(op, "lib.softmax_rows[(_x.shape[0],)](_x, _y, _x.shape[1], BLOCK=min(1024, npow2(_x.shape[1])))")

    def _cumsum(self, op: Operation) -> None:
        is_int = not is_float(op.x.type.dtype)
        self._along(op, f"lib.cumsum_rows[(_x.shape[0],)](_x, _y, _x.shape[1], IS_INT={is_int}, "
                        f"BLOCK=min(1024, npow2(_x.shape[1])))")

    def _along(self, op: Operation, call: str) -> None:
        x = self.name(op.x)
        axis = op.axis % op.x.type.rank
        out = self.new(op.result)
        dt = TORCH_DTYPES[op.result.type.dtype]
        self.lines += [f"_x, _perm = rows({x}, ({axis},))",
                       f"_y = torch.empty(_x.shape, dtype={dt}, device=dev)",
                       "if _x.shape[0]:",
                       f"    {call}",
                       f"{out} = unpermute(_y.view([{x}.shape[d] for d in _perm]), _perm)"]

    def _norm(self, op: Operation) -> None:
        x, w = self.name(op.x), self.name(op.weight)
        rms = isinstance(op, R.RmsNormOp)
        bias = w if rms else self.name(op.bias)
        out = self.new(op.result)
        self.alloc(op.result, out, f"{x}.shape")
        self.lines += [f"_x, _ = rows({x}, ({op.x.type.rank - 1},))",
                       "if _x.shape[0]:",
                       f"    lib.norm_rows[(_x.shape[0],)](_x, contiguous({w}), contiguous({bias}), {out}, "
                       f"_x.shape[1], "
                       f"{op.eps!r}, RMS={rms}, BLOCK=min(1024, npow2(_x.shape[1])))"]

    def _topk(self, op: Operation) -> None:
        x = self.name(op.x)
        vals, idx = self.new(op.values), self.new(op.indices)
        self.alloc(op.values, vals, f"{x}.shape[:-1] + ({op.k},)")
        self.alloc(op.indices, idx, f"{x}.shape[:-1] + ({op.k},)")
        self.lines += [f"_x, _ = rows({x}, ({op.x.type.rank - 1},))",
                       "if _x.shape[0]:",
                       f"    lib.topk_rows[(_x.shape[0],)](_x, {vals}, {idx}, _x.shape[1], K={op.k}, "
                       f"BLOCK=npow2(_x.shape[1]))"]

    # ---- MoE ----------------------------------------------------------------------------------------
    def _route(self, op: Operation) -> None:
        logits = self.name(op.logits)
        bias = self.name(op.bias) if op.bias is not None else logits
        w, e = self.new(op.weights), self.new(op.experts)
        self.alloc(op.weights, w, f"({logits}.shape[0], {op.k})")
        self.alloc(op.experts, e, f"({logits}.shape[0], {op.k})")
        self.lines += [
            f"_l = contiguous({logits})",
            "_E = _l.shape[1]",
            "if _l.shape[0]:",
            f"    lib.moe_route[(_l.shape[0],)](_l, contiguous({bias}), {w}, {e}, _E, {op.scale!r}, "
            f"SOFTMAX={op.score == 'softmax'}, HAS_BIAS={op.bias is not None}, K={op.k}, RENORM={op.renormalize}, "
            f"GROUPS={op.groups}, GROUP_TOP={op.group_top}, GROUPS_KEPT={op.groups_kept}, BLOCK_E=npow2(_E), "
            f"BLOCK_G=npow2({op.groups}), BLOCK_K=npow2({op.k}))",
        ]

    def _dispatch(self, op: Operation) -> None:
        experts = self.name(op.experts)
        perm, offsets = self.new(op.perm), self.new(op.offsets)
        E, align = op.num_experts, op.block
        cap = "_p" if op.capacity is None else \
            f"math.ceil({op.capacity!r} * {experts}.shape[0] * {experts}.shape[1] / {E})"
        self.lines += [
            f"_ids = contiguous({experts})",
            "_p = _ids.numel()",
            "# the segments are padded to the grouped matmul's tile height; the list is allocated at its upper bound",
            f"{perm} = torch.full((_p + {E * (align - 1)},), -1, dtype=torch.int64, device=dev)",
            f"{offsets} = torch.zeros(({E + 1},), dtype=torch.int64, device=dev)",
            f"_counts = torch.empty(({E},), dtype=torch.int32, device=dev)",
            f"lib.moe_count[({E},)](_ids, _counts, _p, {cap}, BLOCK=1024)",
            f"lib.moe_place[({E},)](_ids, _counts, {perm}, {offsets}, _p, {E}, {align}, BLOCK=1024, "
            f"BLOCK_E={npow2(E)})",
        ]

    def _grouped(self, op: Operation) -> None:
        kern = GroupedMatmulKernel.generate(op)
        self.kernel(kern.name, kern.source)
        combine = kern.combine
        rows, perm, offsets = self.name(op.rows), self.name(op.perm), self.name(op.offsets)
        dispatch = op.perm.defining_op
        block_m = dispatch.block if isinstance(dispatch, M.DispatchOp) else 0
        if block_m < 16 or block_m & (block_m - 1):
            raise SparsaError(f"the triton grouped matmul needs expert segments aligned to a power-of-two tile >= 16 "
                              f"(fuse-moe-dispatch{{block=64}}), got block={block_m}", op.loc)
        weights = [op.weight] if combine else list(op.weights)
        ws = ", ".join(f"contiguous({self.name(w)})" for w in weights)
        data = "".join(f"contiguous({self.name(v)}), *{self.name(v)}.shape, " for v in kern.data)
        out = self.new(op.result)
        w0 = self.name(weights[0])
        self.lines.append(f"_rows = contiguous({rows})")
        self.lines.append(f"_N, _K = {w0}.shape[2], {w0}.shape[1]")
        if combine:
            gates = self.name(op.gates)
            self.lines += [f"_acc = torch.zeros(({gates}.shape[0], _N), dtype=torch.float32, device=dev)",
                           f"_g = contiguous({gates})"]
            target = "_acc"
        else:
            self.lines.append(f"{out} = torch.empty(({perm}.shape[0], _N), dtype={TORCH_DTYPES[op.result.type.dtype]}, "
                              f"device=dev)")
            target = out
        gate_arg = "_g" if combine else target
        self.lines.append(
            f"{kern.name}[(cdiv({perm}.shape[0], {block_m}), cdiv(_N, 64))](_rows, {perm}, {offsets}, {ws}, {target}, "
            f"{gate_arg}, {data}{perm}.shape[0], _K, _N, {op.topk}, {offsets}.shape[0] - 1, GATHER={op.gather}, "
            f"COMBINE={combine}, BLOCK_M={block_m}, BLOCK_N=64, BLOCK_K=32, BLOCK_E=npow2({offsets}.shape[0] - 1), "
            f"PRECISION={_precision(op.rows.type.dtype)!r})")
        if combine:
            if op.result.type.dtype == "f32":
                self.lines.append(f"{out} = _acc")
            else:
                self.alloc(op.result, out, "_acc.shape")
                self.lines.append(f"copy(_acc, {out})")

    # ---- attention ------------------------------------------------------------------------------------
    def _block_map(self, op: BlockMapOp) -> None:
        out = self.new(op.result)
        data_values = outer_values(op.mask)
        data = {id(v): (f"data{i}", v) for i, v in enumerate(data_values)}
        params = "".join(f"data{i}, " + "".join(f"data{i}_d{d}, " for d in range(v.type.rank))
                         for i, v in enumerate(data_values))
        em = RegionEmitter(op.mask, ["b_idx", "h_idx", "q_idx", "k_idx"], data, "mk")
        value = em.emit()
        mask = "\n".join(em.lines + [f"keep = {value}"])
        fields = {"data_params": params, "op_line": loc_comment(op), "mask": textwrap.indent(mask, " " * 8)}
        name = f"attn_block_map_{_digest(BUILDER.format(name='_', **fields))}"
        self.kernel(name, BUILDER.format(name=name, **fields))
        nb, nh = self.dim(op.batch), self.dim(op.heads)
        nqb = f"cdiv({self.dim(op.sq)}, {op.block_q})"
        nkb = f"cdiv({self.dim(op.sk)}, {op.block_k})"
        args = "".join(f"contiguous({self.name(v)}), *{self.name(v)}.shape, " for v in data_values)
        self.lines += [
            f"_nqb, _nkb, _rows = {nqb}, {nkb}, {nb} * {nh} * {nqb}",
            "_fi = torch.empty((_rows, _nkb), dtype=torch.int32, device=dev)",
            "_pi = torch.empty((_rows, _nkb), dtype=torch.int32, device=dev)",
            "_fc = torch.empty((_rows,), dtype=torch.int32, device=dev)",
            "_pc = torch.empty((_rows,), dtype=torch.int32, device=dev)",
            f"{name}[(_rows,)](_fi, _fc, _pi, _pc, {args}{self.dim(op.sq)}, {self.dim(op.sk)}, _nqb, _nkb, {nh}, "
            f"BLOCK_Q={op.block_q}, BLOCK_K={op.block_k})",
            f"{out} = (_fi, _fc, _pi, _pc, {nb}, {nh}, _nqb, _nkb)",
        ]

    def _attention(self, op: AT.AttentionOp) -> None:
        kern = AttentionKernel.generate(op)
        self.kernel(kern.name, kern.source)
        q, k, v = (f"last_contiguous({self.name(x)})" for x in (op.q, op.k, op.v))
        d, dv = op.q.type.shape[3], op.v.type.shape[3]
        for what, n in (("head dim", d), ("value head dim", dv)):
            if not isinstance(n, int) or n > 256:
                raise SparsaError(f"attention with {what} {n} is not supported by the triton backend (needs a "
                                  f"static size <= 256)", op.loc)
        bq, bk = (op.block_q, op.block_k) if op.block_map is not None else (64, 64)
        out = self.new(op.result)
        self.alloc(op.result, out, f"{self.name(op.q)}.shape[:3] + ({dv},)")
        self.lines += [f"_q, _k, _v = {q}, {k}, {v}",
                       "_B, _H, _SQ, _SK = _q.shape[0], _q.shape[1], _q.shape[2], _k.shape[2]"]
        if op.block_map is not None:
            self.lines.append(f"_fi, _fc, _pi, _pc, _mb, _mh, _nqb, _nkb = {self.name(op.block_map)}")
        else:
            self.lines += [f"_nqb, _nkb, _mb, _mh = cdiv(_SQ, {bq}), cdiv(_SK, {bk}), 1, 1",
                           f"_fi, _fc, _pi, _pc = dense_lists(_nqb, _nkb, {not op.mask.empty}, dev)"]
        data = "".join(f"contiguous({self.name(x)}), *{self.name(x)}.shape, " for x in kern.data)
        self.lines.append(
            f"{kern.name}[(_nqb, _B * _H)](_q, _k, _v, {out}, _fi, _fc, _pi, _pc, {data}"
            f"_q.stride(0), _q.stride(1), _q.stride(2), _k.stride(0), _k.stride(1), _k.stride(2), "
            f"_v.stride(0), _v.stride(1), _v.stride(2), {out}.stride(0), {out}.stride(1), {out}.stride(2), "
            f"_H, _k.shape[1], _SQ, _SK, _nqb, _nkb, _mb, _mh, {op.scale!r}, {d}, {dv}, BLOCK_M={bq}, BLOCK_N={bk}, "
            f"D={head_block(d)}, DV={head_block(dv)}, PRECISION={_precision(op.q.type.dtype)!r}, "
            f"num_warps={NUM_WARPS}, num_stages={NUM_STAGES})")

    # ---- scans and sparse weights -------------------------------------------------------------------------
    def _scan(self, op: SC.FusedScanOp) -> None:
        kern = FusedScanKernel.generate(op)
        self.kernel(kern.name, kern.source)
        ins = ", ".join(self.name(v) for v in op.inputs)
        state = "(" + "".join(f"{self.dim(d)}, " for d in op.state) + ")"
        out = self.new(op.result)
        self.lines += [f"_state = {state}",
                       f"_y = torch.empty(_state[:-1], dtype={TORCH_DTYPES[op.result.type.dtype]}, device=dev)",
                       f"_args, _grid, _bn = scan_args([{ins}], _y, _state, {kern.axis})",
                       f"{kern.name}[_grid](*_args, BLOCK_O=32, BLOCK_N=_bn)",
                       f"{out} = reshape(_y, {self.shape(op.result.type)})"]

    def _linear_attention(self, op: SC.LinearAttentionOp) -> None:
        q, k, v, a = (self.name(x) for x in (op.q, op.k, op.v, op.a))
        dk, dv = op.q.type.shape[-1], op.v.type.shape[-1]
        if not all(isinstance(n, int) and n <= 256 for n in (dk, dv)):
            raise SparsaError("'scan.linear_attention' needs static head dims <= 256 on triton", op.loc)
        # any chunk gives the same result (up to rounding); the tensor cores want a power of two >= 16
        chunk = op.chunk if op.chunk >= 16 and not op.chunk & (op.chunk - 1) and op.chunk <= 128 else 64
        out = self.new(op.result)
        self.lines += [
            f"_lead = torch.broadcast_shapes({q}.shape[:-1], {k}.shape[:-1], {v}.shape[:-1], {a}.shape)",
            "_L = _lead[-1]",
            "# broadcast inputs are copied out once; inputs of the full shape are only viewed",
            f"_q = last_contiguous(reshape({q}.expand(_lead + ({dk},)), (-1, _L, {dk})))",
            f"_k = last_contiguous(reshape({k}.expand(_lead + ({dk},)), (-1, _L, {dk})))",
            f"_v = last_contiguous(reshape({v}.expand(_lead + ({dv},)), (-1, _L, {dv})))",
            f"_a = last_contiguous(reshape({a}.expand(_lead), (-1, _L)))",
            f"{out} = torch.empty(_lead + ({dv},), dtype={TORCH_DTYPES[op.result.type.dtype]}, device=dev)",
            f"_o = {out}.view(-1, _L, {dv})",
            "if _o.numel():",
            f"    lib.linear_attention[(_o.shape[0], cdiv({dv}, 64))](_q, _k, _v, _a, _o, _L, {dk}, {dv}, "
            f"_q.stride(0), _q.stride(1), _k.stride(0), _k.stride(1), _v.stride(0), _v.stride(1), _a.stride(0), "
            f"_o.stride(0), _o.stride(1), CHUNK={chunk}, BLOCK_DK={max(16, npow2(dk))}, "
            f"BLOCK_DV={min(64, max(16, npow2(dv)))}, "
            f"PRECISION={_precision(op.q.type.dtype)!r})",
        ]

    def _bsr(self, op: SP.BsrMatmulOp) -> None:
        x = self.name(op.x)
        br, bc = op.blocks.type.shape[1], op.blocks.type.shape[2]
        if not (isinstance(br, int) and isinstance(bc, int)):
            raise SparsaError("'sparse.bsr_matmul' needs static block sizes on triton", op.loc)
        bsc = f"C[{len(self.consts)}]"
        self.consts.append(Const("bsc", op))
        blocks = self.name(op.blocks)
        out = self.new(op.result)
        self.alloc(op.result, out, f"{x}.shape[:-1] + ({op.cols},)")
        self.lines += [f"_x = last_contiguous(reshape({x}, (-1, {x}.shape[-1])))",
                       f"_y = {out}.view(-1, {op.cols})",
                       "if _x.shape[0]:",
                       f"    lib.bsr_matmul[(cdiv(_x.shape[0], 32), {op.cols // bc})](_x, {bsc}[0], {bsc}[1], "
                       f"{bsc}[2], {blocks}, _y, _x.shape[0], {op.cols}, _x.stride(0), {br}, {bc}, BLOCK_M=32, "
                       f"BRP={max(16, npow2(br))}, BCP={max(16, npow2(bc))}, "
                       f"PRECISION={_precision(op.x.type.dtype)!r})"]

    def _nm(self, op: SP.NmMatmulOp) -> None:
        x, vals, idx = self.name(op.x), self.name(op.values), self.name(op.indices)
        out = self.new(op.result)
        self.alloc(op.result, out, f"{x}.shape[:-1] + ({vals}.shape[1],)")
        self.lines += [f"_x = last_contiguous(reshape({x}, (-1, {x}.shape[-1])))",
                       f"_N = {vals}.shape[1]",
                       f"_y = {out}.view(-1, _N)",
                       "if _x.shape[0]:",
                       f"    lib.nm_matmul[(cdiv(_x.shape[0], 32), cdiv(_N, 64))](_x, contiguous({vals}), "
                       f"contiguous({idx}), _y, _x.shape[0], _x.shape[1], _N, _x.stride(0), NN={op.n}, MM={op.m}, "
                       f"BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, PRECISION={_precision(op.x.type.dtype)!r})"]

    # ---- the module ---------------------------------------------------------------------------------------
    @property
    def kernels_text(self) -> str:
        return "\n".join(src.strip("\n") + "\n\n" for src in self.kernels.values()).rstrip() + "\n"

    @property
    def launcher_name(self) -> str:
        return f"launch_{_digest(self.kernels_text + chr(10).join(self.lines))}"

    @property
    def launcher_text(self) -> str:
        sym = self.func.attributes.get("sym_name", "model")
        args = ", ".join(["dev", "C", *self.inputs])
        doc = (f'    """@{sym} on `dev`: C holds the prepared weights and block maps; inputs are torch tensors '
               f'already checked against the signature."""\n')
        return f"def {self.launcher_name}({args}):\n" + doc + textwrap.indent("\n".join(self.lines), " " * 4) + "\n"

    @property
    def source(self) -> str:
        head = ('"""Generated by Sparsa (target triton): kernels, then the host launcher."""\n'
                "import math\n\nimport torch\nimport triton\nimport triton.language as tl\n\n"
                "from sparsa.backends.triton import library as lib\n"
                "from sparsa.backends.triton.host import (bstrides, cdiv, contiguous, copy, dense_lists, "
                "last_contiguous,\n    npow2, reshape, rows, scan_args, unpermute)\n\n")
        return head + self.kernels_text + "\n\n" + self.launcher_text


def _precision(dtype: str) -> str:
    """tl.dot's input precision: float32 in full precision (as PyTorch's default matmul), not TF32."""
    return "ieee" if dtype == "f32" else "tf32"


def npow2(n: int) -> int:
    """The smallest power of two >= n (and >= 1): Triton's tl.arange needs power-of-two extents."""
    return 1 << max(0, (int(n) - 1).bit_length())


def _literal(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float) and v != v:
        return "float('nan')"
    if v in (float("inf"), float("-inf")):
        return f"float('{v}')"
    return repr(v)


def _tl_dtype(dt: str) -> str:
    return {"f32": "tl.float32", "f16": "tl.float32", "bf16": "tl.float32", "f64": "tl.float64", "i8": "tl.int8",
            "i32": "tl.int32", "i64": "tl.int64", "i1": "tl.int1"}[dt]
