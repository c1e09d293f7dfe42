"""triton lowerings of the `tensor` dialect's elementwise part: chains of elementwise ops (and splat constants,
iota) fuse into one generated kernel per group. An op is folded into its only user when both have the same
shape, so intermediates stay in registers; each op's scalar expression is its `regions.SCALARS` rule."""

from __future__ import annotations

import textwrap

from sparsa.backends.triton.program import (
    LOWERINGS,
    TritonProgram,
    digest,
    literal,
    loc_comment,
    tl_dtype,
)
from sparsa.backends.triton.regions import ExprEmitter
from sparsa.ir.core import Operation, Value
from sparsa.ir.dialects import tensor as T
from sparsa.ir.traits import Elementwise, Generator

BLOCK_EW = 1024
FUSED = (Elementwise, Generator)  # ops fused into one kernel per group

EW = '''
@triton.jit
def {name}({params}OUT, {out_strides}{sizes}NUMEL, BLOCK: tl.constexpr):
    # {header}
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < NUMEL
{body}
    tl.store(OUT + {out_addr}, ({value}).to(OUT.dtype.element_ty), mask=live)
'''




# ---- elementwise groups ---------------------------------------------------------------------------
def inlined(p: TritonProgram, op: Operation) -> bool:
    """True when `op` is folded into the kernel of its (elementwise) user instead of being stored."""
    if not isinstance(op, FUSED) or id(op) in p.weight_only:
        return False
    users = [u.op for u in op.result.uses]
    if not users or id(op.result) in p.returned:
        return False
    if not all(isinstance(u, FUSED) and not isinstance(u, T.ConstantOp) and u.parent_op is p.func
               for u in users):
        return False
    if isinstance(op, T.ConstantOp):
        return True
    return len(users) == 1 and tuple(users[0].result.type.shape) == tuple(op.result.type.shape)


@LOWERINGS.lowers(Elementwise, Generator)
def elementwise(p: TritonProgram, root: Operation) -> None:
    if inlined(p, root):  # computed in its user's kernel
        return
    group: list[Operation] = []

    def collect(op: Operation) -> None:
        for v in op.operands:
            d = v.defining_op
            if d is not None and inlined(p, d) and not isinstance(d, T.ConstantOp) and d not in group:
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
            if isinstance(d, T.ConstantOp) and inlined(p, d):
                names[id(v)] = literal(d.value)
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
            names[id(op.result)] = f"tl.full([BLOCK], {literal(op.value)}, {tl_dtype(op.result.type.dtype)})"
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
    name = f"fused_elementwise_{digest(EW.format(name='_', **fields))}"
    p.kernel(name, EW.format(name=name, **fields))
    out = p.new(root.result)
    leaf_shapes = "".join(f"{p.name(v)}.shape, " for v in leaves)
    p.alloc(root.result, out, f"torch.broadcast_shapes({leaf_shapes})")
    args = "".join(f"{p.name(v)}, *bstrides({p.name(v)}, {out}.shape), " for v in leaves)
    read = {id(v) for v in leaves}
    for op in group:  # a value computed in the kernel has the output's shape (an op is folded into a user of its own)
        p.check_unknown_dims(op, [f"{p.name(v)}.shape" if id(v) in read else f"{out}.shape" for v in op.operands],
                             f"{out}.shape")
    p.lines.append(f"{name}[(max(1, cdiv({out}.numel(), {BLOCK_EW})),)]({args}{out}, *{out}.stride(), "
                      f"*{out}.shape, {out}.numel(), BLOCK={BLOCK_EW})")
