"""triton lowerings of the `tensor` dialect's shape part: dense matmuls on cuBLAS (torch.matmul, as Inductor's
extern mm), layout ops as views (no kernel, no copy; a reshape that has no view copies with the strided copy
kernel), split, concat, and gathers as generated kernels."""

from __future__ import annotations

import textwrap

from sparsa.backends.triton.program import (
    LOWERINGS,
    Const,
    TritonProgram,
    digest,
    loc_comment,
)
from sparsa.backends.triton.tensor import BLOCK_EW, EW
from sparsa.ir.analysis import sizes_of
from sparsa.ir.core import Operation
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.dims import symbols
from sparsa.ir.types import is_float


# ---- matmul, views, copies ------------------------------------------------------------------------
@LOWERINGS.lowers(S.MatmulOp)
def matmul(p: TritonProgram, op: Operation) -> None:
    """A dense matmul is cuBLAS's, through torch.matmul (as Inductor's extern mm): the same NumPy
    broadcasting and 1-D rules as `tensor.matmul`, and eager's numerics (float32 follows
    torch.get_float32_matmul_precision). The kernels generated here are the sparse ones."""
    p.note_dot(op, op.lhs.type.dtype)
    if not is_float(op.result.type.dtype):
        raise SparsaError("integer 'tensor.matmul' is not supported by the triton backend", op.loc)
    a, b = p.name(op.lhs), p.name(op.rhs)
    p.lines.append(f"{p.new(op.result)} = torch.matmul({a}, {b})")


@LOWERINGS.lowers(S.ScatterAddOp)
def scatter_add(p: TritonProgram, op: Operation) -> None:
    """torch's index_put_ with accumulate (atomic adds on a GPU), on a copy of the base: the places a gather read,
    each update added (repeated places add up; negative ones count from the end, as NumPy's)."""
    places = ", ".join(f"{p.name(i)}.long()" for i in op.indices)
    p.lines.append(f"{p.new(op.result)} = {p.name(op.base)}.clone().index_put_(({places},), "
                   f"{p.name(op.updates)}, accumulate=True)")


@LOWERINGS.lowers(S.ReshapeOp)
def reshape(p: TritonProgram, op: Operation) -> None:
    x = p.name(op.x)
    out = p.new(op.result)
    p.lines.append(f"{out} = reshape({x}, {p.shape(op.result.type)})")


@LOWERINGS.lowers(S.TransposeOp, S.ExpandDimsOp, S.SqueezeOp, S.SliceOp, S.BroadcastToOp)
def view(p: TritonProgram, op: Operation) -> None:
    x = p.name(op.x)
    out = p.new(op.result)
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
        expr = f"{x}.expand({p.shape(op.result.type)})"
    else:  # slice: a view along positive steps; a negative step (a reversal) gathers its indices
        parts, picks = [], []
        for d, (a, b, s) in enumerate(zip(op.starts, op.stops, op.steps, strict=True)):
            stop = "None" if b is None else p.dim(b)
            if s > 0:
                parts.append(f"{p.dim(a)}:{'' if b is None else stop}:{s}")
            else:
                parts.append(":")
                picks.append(f".index_select({d}, torch.tensor(range(*slice({a}, {stop}, {s})"
                             f".indices({x}.shape[{d}])), dtype=torch.int64, device=dev))")
        expr = f"{x}[{', '.join(parts)}{',' if len(parts) == 1 else ''}]" + "".join(picks)
    p.lines.append(f"{out} = {expr}")
    if isinstance(op, S.SliceOp) and any(isinstance(b, str) for b in (*op.starts, *op.stops)) and \
            None not in op.result.type.shape:
        names = sorted({s for d in sizes_of(op) for s in symbols(d)})
        p.lines.append(f"slice_checked(C[{len(p.consts)}], {x}.shape, "
                       f"{{{', '.join(f'{s!r}: {p.dim(s)}' for s in names)}}})")
        p.consts.append(Const("op", op))


@LOWERINGS.lowers(S.SplitOp)
def split(p: TritonProgram, op: Operation) -> None:
    outs = [p.new(r) for r in op.results]
    p.lines.append(f"{', '.join(outs)}{',' if len(outs) == 1 else ''} = torch.split({p.name(op.x)}, "
                      f"{list(op.sizes)}, dim={op.axis})")


@LOWERINGS.lowers(S.ConcatOp)
def concat(p: TritonProgram, op: Operation) -> None:
    out = p.new(op.result)
    axis = op.axis % op.result.type.rank
    first = p.name(op.inputs[0])
    total = " + ".join(f"{p.name(v)}.shape[{axis}]" for v in op.inputs)
    p.alloc(op.result, out, f"{first}.shape[:{axis}] + ({total},) + {first}.shape[{axis} + 1:]")
    p.lines.append("_at = 0")
    for v in op.inputs:
        x = p.name(v)
        p.lines.append(f"copy({x}, {out}.narrow({axis}, _at, {x}.shape[{axis}]))")
        p.lines.append(f"_at += {x}.shape[{axis}]")


@LOWERINGS.lowers(S.GatherOp)
def gather(p: TritonProgram, op: Operation) -> None:
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
    name = f"gather_{digest(EW.format(name='_', **fields))}"
    p.kernel(name, EW.format(name=name, **fields))
    x = p.name(op.x)
    out = p.new(op.result)
    idx_shapes = "".join(f"{p.name(v)}.shape, " for v in op.indices)
    p.alloc(op.result, out, f"torch.broadcast_shapes({idx_shapes}) + {x}.shape[{n_idx}:]")
    idx = "".join(f"{p.name(v)}, *bstrides({p.name(v)}, {out}.shape[:{r}]), " for v in op.indices)
    sizes = "".join(f"{x}.shape[{j}], " for j in range(n_idx))
    p.lines.append(f"{name}[(max(1, cdiv({out}.numel(), {BLOCK_EW})),)]({x}, *{x}.stride(), {sizes}{idx}"
                      f"{out}, *{out}.stride(), *{out}.shape, {out}.numel(), BLOCK={BLOCK_EW})")
