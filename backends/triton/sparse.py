"""triton lowerings of the `sparse` dialect: BSR matmuls walking a weight's blocks by column (the column index
prepared once per weight load) and N:M matmuls, both from `library.py`."""

from __future__ import annotations

from sparsa.backends.triton.program import (
    LOWERINGS,
    Const,
    TritonProgram,
    dot_precision,
    npow2,
)
from sparsa.ir.core import Operation
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dialects import sparse as SP


@LOWERINGS.lowers(SP.BsrMatmulOp)
def bsr(p: TritonProgram, op: SP.BsrMatmulOp) -> None:
    p.note_dot(op, op.x.type.dtype)
    x = p.name(op.x)
    br, bc = op.blocks.type.shape[1], op.blocks.type.shape[2]
    if not (isinstance(br, int) and isinstance(bc, int)):
        raise SparsaError("'sparse.bsr_matmul' needs static block sizes on triton", op.loc)
    if id(op.row_ptr.defining_op) in p.weight_only:  # a weight's: indexed by column once per weight load
        bsc = f"C[{len(p.consts)}]"
        p.consts.append(Const("bsc", op))
    else:
        bsc = "_bsc"
        p.lines.append(f"_bsc = bsc_index({p.name(op.row_ptr)}, {p.name(op.col_idx)}, {op.cols // bc})")
    blocks = p.name(op.blocks)
    out = p.new(op.result)
    p.alloc(op.result, out, f"{x}.shape[:-1] + ({op.cols},)")
    p.lines += [f"_x = last_contiguous(reshape({x}, (-1, {x}.shape[-1])))",
                   f"_y = {out}.view(-1, {op.cols})",
                   "if _x.shape[0]:",
                   f"    lib.bsr_matmul[(cdiv(_x.shape[0], 32), {op.cols // bc})](_x, {bsc}[0], {bsc}[1], "
                   f"{bsc}[2], {blocks}, _y, _x.shape[0], {op.cols}, _x.stride(0), {br}, {bc}, BLOCK_M=32, "
                   f"BRP={max(16, npow2(br))}, BCP={max(16, npow2(bc))}, "
                   f"PRECISION={dot_precision(op.x.type.dtype)!r})"]


@LOWERINGS.lowers(SP.NmMatmulOp)
def nm(p: TritonProgram, op: SP.NmMatmulOp) -> None:
    x, vals, idx = p.name(op.x), p.name(op.values), p.name(op.indices)
    out = p.new(op.result)
    p.alloc(op.result, out, f"{x}.shape[:-1] + ({vals}.shape[1],)")
    p.lines += [f"_x = last_contiguous(reshape({x}, (-1, {x}.shape[-1])))",
                   f"_N = {vals}.shape[1]",
                   f"_y = {out}.view(-1, _N)",
                   "if _x.shape[0]:",
                   f"    lib.nm_matmul[(cdiv(_x.shape[0], 32), cdiv(_N, 64))](_x, contiguous({vals}), "
                   f"contiguous({idx}), _y, _x.shape[0], _x.shape[1], _N, _x.stride(0), NN={op.n}, MM={op.m}, "
                   f"BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, PRECISION={dot_precision(op.x.type.dtype)!r})"]


@LOWERINGS.lowers(SP.SparseMatmulOp)
def sparse_matmul(p: TritonProgram, op: SP.SparseMatmulOp) -> None:
    """x @ w for a sparse-layout w that is not a weight (lower-sparse-weights packs the weights): the dense
    product, on cuBLAS."""
    p.note_dot(op, op.x.type.dtype)
    p.lines.append(f"{p.new(op.result)} = torch.matmul({p.name(op.x)}, {p.name(op.w)})")


@LOWERINGS.lowers(SP.ConvertOp, SP.PackBsrOp, SP.PackNmOp)
def on_host(p: TritonProgram, op: Operation) -> None:
    """An op the launcher runs on the host by its reference semantics, per call: a layout check or a packing of a
    value that is not a weight (the weights' run once, at load), whose sizes depend on the data; and the plan
    and exchanges of expert parallel, which call the process group."""
    outs = [p.new(r) for r in op.results]
    args = "".join(f", {p.name(v)}" for v in op.operands)
    p.lines.append(f"{', '.join(outs)}, = host_op(C[{len(p.consts)}], dev{args})")
    p.consts.append(Const("op", op))
