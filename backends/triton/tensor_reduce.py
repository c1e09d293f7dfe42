"""triton lowerings of the `tensor` dialect's reductions: row reductions, softmax, cumsum, norms and top-k call
the fixed kernels of `library.py` on rows made contiguous along the reduced axis."""

from __future__ import annotations

from sparsa.backends.triton.program import (
    LOWERINGS,
    TORCH_DTYPES,
    TritonProgram,
)
from sparsa.ir.core import Operation
from sparsa.ir.dialects import tensor_reduce as R
from sparsa.ir.types import is_float

REDUCE_OPS = {R.SumOp: "SUM", R.MeanOp: "MEAN", R.MaxOp: "MAX", R.MinOp: "MIN", R.LogSumExpOp: "LOGSUMEXP"}


# ---- rows: reductions, softmax, cumsum, norms, top-k ----------------------------------------------
@LOWERINGS.lowers(R.ArgmaxOp, R.ReduceOp)
def reduce(p: TritonProgram, op: Operation) -> None:
    x = p.name(op.x)
    rank = op.x.type.rank
    axes = (op.axis % rank,) if isinstance(op, R.ArgmaxOp) else tuple(sorted(a % rank for a in op.axes))
    kind = "ARGMAX" if isinstance(op, R.ArgmaxOp) else REDUCE_OPS[next(c for c in type(op).__mro__
                                                                       if c in REDUCE_OPS)]
    out = p.new(op.result)
    keep = "1" if op.keepdim else None
    dims = ", ".join(f"{x}.shape[{d}]" if d not in axes else keep for d in range(rank) if d not in axes or keep)
    p.alloc(op.result, out, f"({dims}{',' if dims else ''})")
    is_int = not is_float(op.x.type.dtype)
    p.lines += [f"_x, _ = rows({x}, {axes})",
                   "if _x.shape[0]:",
                   f"    lib.reduce_rows[(_x.shape[0],)](_x, {out}, _x.shape[1], OP=lib.{kind}, IS_INT={is_int}, "
                   f"BLOCK=min(1024, npow2(_x.shape[1])))"]


@LOWERINGS.lowers(R.SoftmaxOp)
def softmax(p: TritonProgram, op: Operation) -> None:
    along(p, op, "lib.softmax_rows[(_x.shape[0],)](_x, _y, _x.shape[1], BLOCK=min(1024, npow2(_x.shape[1])))")


@LOWERINGS.lowers(R.CumsumOp)
def cumsum(p: TritonProgram, op: Operation) -> None:
    is_int = not is_float(op.x.type.dtype)
    along(p, op, f"lib.cumsum_rows[(_x.shape[0],)](_x, _y, _x.shape[1], IS_INT={is_int}, "
                    f"BLOCK=min(1024, npow2(_x.shape[1])))")


def along(p: TritonProgram, op: Operation, call: str) -> None:
    x = p.name(op.x)
    axis = op.axis % op.x.type.rank
    out = p.new(op.result)
    dt = TORCH_DTYPES[op.result.type.dtype]
    p.lines += [f"_x, _perm = rows({x}, ({axis},))",
                   f"_y = torch.empty(_x.shape, dtype={dt}, device=dev)",
                   "if _x.shape[0]:",
                   f"    {call}",
                   f"{out} = unpermute(_y.view([{x}.shape[d] for d in _perm]), _perm)"]


@LOWERINGS.lowers(R.RmsNormOp, R.LayerNormOp)
def norm(p: TritonProgram, op: Operation) -> None:
    x, w = p.name(op.x), p.name(op.weight)
    rms = isinstance(op, R.RmsNormOp)
    bias = w if rms else p.name(op.bias)
    out = p.new(op.result)
    p.alloc(op.result, out, f"{x}.shape")
    p.lines += [f"_x, _ = rows({x}, ({op.x.type.rank - 1},))",
                   "if _x.shape[0]:",
                   f"    lib.norm_rows[(_x.shape[0],)](_x, contiguous({w}), contiguous({bias}), {out}, "
                   f"_x.shape[1], "
                   f"{op.eps!r}, RMS={rms}, BLOCK=min(1024, npow2(_x.shape[1])))"]


@LOWERINGS.lowers(R.TopkOp)
def topk(p: TritonProgram, op: Operation) -> None:
    x = p.name(op.x)
    vals, idx = p.new(op.values), p.new(op.indices)
    p.alloc(op.values, vals, f"{x}.shape[:-1] + ({op.k},)")
    p.alloc(op.indices, idx, f"{x}.shape[:-1] + ({op.k},)")
    p.lines += [f"_x, _ = rows({x}, ({op.x.type.rank - 1},))",
                   "if _x.shape[0]:",
                   f"    lib.topk_rows[(_x.shape[0],)](_x, {vals}, {idx}, _x.shape[1], K={op.k}, "
                   f"BLOCK=npow2(_x.shape[1]))"]
