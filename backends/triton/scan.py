"""The fused scan (`scan.fused`) as a generated Triton kernel: the state lives in registers and the kernel
streams over the time axis, computing each step's (a, b) from the inputs (the producer region) and the
step's output from the state (the consumer region, a sum of h * x over one state axis, the "reduced" axis:
the last for Mamba, the key axis for a linear-attention state with a per-key or per-value decay).

Each program owns a tile of the state's outer positions (every axis but time and the reduced one) and the
whole reduced axis; inputs of any broadcastable shape are read with zero strides on their size-1 axes, so
no input is expanded in memory and no [.., L, .., N] state is ever written.
"""

from __future__ import annotations

import hashlib
import textwrap
from dataclasses import dataclass
from typing import Any

from sparsa.backends.triton.attention import load_kernel_module
from sparsa.backends.triton.program import (
    LOWERINGS,
    TORCH_DTYPES,
    TritonProgram,
    dot_precision,
    npow2,
)
from sparsa.backends.triton.regions import ExprEmitter, RegionEmitter
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dialects import scan as SC
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.dialects.scan import FusedScanOp, consumer_parts

KERNEL = '''
@triton.jit
def {name}(
    {input_params}OUT, {out_strides}
    {outer_sizes}M, L, N,
    BLOCK_O: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # {op_line}
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_n = tl.arange(0, BLOCK_N)
    live = (offs_o[:, None] < M) & (offs_n[None, :] < N)
{decompose}
{bases}
    h = tl.zeros([BLOCK_O, BLOCK_N], tl.float32)
    for t in range(0, L):
{loads}
{producer}
        h = a_t * h + b_t
{consumer}
        tl.store(OUT + out_base + t * so_t, y_t.to(OUT.dtype.element_ty), mask=offs_o < M)
'''


def tile_walk(n_in: int, rank: int, axis: int, r: int, out: str, strides: str) -> tuple[str, str, list[str], list[str]]:
    """What a scan kernel's program knows of its tile (BLOCK_O outer positions x the reduced axis r) and its
    n_in inputs' strides broadcast to the state: (input parameters, outer-size parameters, the lines splitting
    offs_o into the outer indices, the lines of `out`'s row offsets and each input's tile offsets)."""
    outer = [d for d in range(rank) if d not in (axis, r)]
    params = "".join(f"X{i}, " + "".join(f"sx{i}_{d}, " for d in range(rank)) for i in range(n_in))
    sizes = "".join(f"size{d}, " for d in outer)
    decompose, rest = [], "offs_o"
    for d in reversed(outer):
        decompose.append(f"i{d} = ({rest}) % size{d}")
        rest = f"({rest}) // size{d}"
    bases = [f"{out}_base = {' + '.join(f'i{d} * {strides}_{d}' for d in outer) or '0'}"]
    for i in range(n_in):
        terms = [f"i{d}[:, None] * sx{i}_{d}" for d in outer] + [f"offs_n[None, :] * sx{i}_{r}"]
        bases.append(f"base{i} = {' + '.join(terms)}")
    return params, sizes, decompose, bases


def reduced_axis(op: FusedScanOp) -> int:
    """The state axis a fused scan's consumer sums over (or its backward's): the form the kernels take, sum(h * x)
    over one state axis, then an elementwise epilogue of inputs that do not vary along it."""
    rank = len(op.state)
    parts = consumer_parts(op.consumer)
    total, before, _ = parts if parts is not None else (None, [], [])
    ok = (total is not None and len(before) == 2 and isinstance(before[0], T.MulOp) and len(total.axes) == 1
          and total.axes[0] % rank != op.axis)
    if not ok or SC.epilogue_reads_along(op, total.axes[0] % rank):
        raise SparsaError(f"the triton backend supports {op.NAME} consumers of the form sum(h * x, axis=d) over one "
                          "state axis d, then elementwise ops of inputs without d", op.loc)
    return total.axes[0] % rank


@dataclass
class FusedScanKernel:
    """The generated kernel for one scan.fused op."""

    name: str
    source: str
    rank: int
    axis: int
    n_inputs: int
    reduced: int  # the state axis the consumer sums over
    keepdim: bool

    @classmethod
    def generate(cls, op: FusedScanOp) -> FusedScanKernel:
        rank, axis = len(op.state), op.axis
        cons = op.consumer.block.ops
        r = reduced_axis(op)
        outer = [d for d in range(rank) if d not in (axis, r)]
        n_in = len(op.inputs)
        input_params, outer_sizes, decompose, bases = tile_walk(n_in, rank, axis, r, "out", "so")
        out_strides = "".join(f"so_{d}, " for d in outer) + "so_t, "
        n_prod = op.num_producer_inputs
        total, before, after = consumer_parts(op.consumer)
        tiled = {id(v) for o in before for v in o.operands}  # (an input only the epilogue reads has no tile)
        tiles = [i for i in range(n_in) if i < n_prod or id(op.consumer.block.args[1 + i - n_prod]) in tiled]
        bases = bases[:1] + [bases[1 + i] for i in tiles]
        loads = [f"x{i} = tl.load(X{i} + base{i} + t * sx{i}_{axis}, mask=live, other=0.0).to(tl.float32)"
                 for i in tiles]
        prod = RegionEmitter(op.producer, [f"x{i}" for i in range(n_prod)], {}, "p")
        a_val, b_val = prod.emit_values()  # the producer yields (a, b)
        producer = prod.lines + [f"a_t = {a_val}", f"b_t = {b_val}"]
        cons_em = RegionEmitter(op.consumer, ["h"] + [f"x{i}" for i in range(n_prod, n_in)], {}, "c")
        product = cons_em.expr(cons[0])
        consumer = [f"y_t = tl.sum(tl.where(live, {product}, 0.0), 1)  # sum(h * x, axis={r})"]
        if after:  # the epilogue on [BLOCK_O] rows: its inputs read once a step, without the reduced axis
            names = {id(a): f"e{i}" for i, a in enumerate(op.consumer.block.args[1:], n_prod)}
            names[id(total.results[0])] = "y_t"
            epi = ExprEmitter(names, {}, "e_")
            read = {id(v) for o in after for v in o.operands}
            for i, a in enumerate(op.consumer.block.args[1:], n_prod):
                if id(a) in read:
                    loads.append(f"e{i} = tl.load(X{i} + ebase{i} + t * sx{i}_{axis}, mask=offs_o < M, "
                                 "other=0.0).to(tl.float32)")
                    bases.append(f"ebase{i} = {' + '.join(f'i{d} * sx{i}_{d}' for d in outer) or '0'}")
            for o in after:
                if isinstance(o, S.SqueezeOp | S.ExpandDimsOp):  # (the same rows)
                    names[id(o.results[0])] = names[id(o.operands[0])]
                else:
                    epi.emit_ops([o])
            consumer += epi.lines + [f"y_t = {epi.value(op.consumer.block.terminator.operands[0])}"]
        where = f' from "{op.loc.file}":{op.loc.line}' if op.loc else ""
        fields = {"input_params": input_params, "out_strides": out_strides, "outer_sizes": outer_sizes,
                  "op_line": f"scan.fused{where}", "decompose": textwrap.indent("\n".join(decompose), " " * 4),
                  "bases": textwrap.indent("\n".join(bases), " " * 4),
                  "loads": textwrap.indent("\n".join(loads), " " * 8),
                  "producer": textwrap.indent("\n".join(producer), " " * 8),
                  "consumer": textwrap.indent("\n".join(consumer), " " * 8)}
        digest = hashlib.sha256(KERNEL.format(name="_", **fields).encode()).hexdigest()[:16]
        name = f"fused_scan_{digest}"
        return cls(name, KERNEL.format(name=name, **fields), rank, axis, n_in, r, cons[1].keepdim)

    def __call__(self, inputs: list[Any], state_shape: tuple[int, ...], block_o: int = 32,
                 num_warps: int = 4) -> Any:
        """Run on torch tensors broadcastable to the state shape; returns [.., L, ..] (the reduced axis summed)."""
        import torch

        from sparsa.backends.triton.host import scan_args

        kept = [n for d, n in enumerate(state_shape) if d != self.reduced]
        out = torch.empty(kept, dtype=inputs[0].dtype, device=inputs[0].device)
        args, grid, block_n = scan_args(inputs, out, tuple(state_shape), self.axis, self.reduced, block_o)
        load_kernel_module(self.name, self.source)[grid](*args, BLOCK_O=block_o, BLOCK_N=block_n,
                                                          num_warps=num_warps)
        return out


# ---- launcher lines ---------------------------------------------------------------------------------

# ---- scans ----------------------------------------------------------------------------------------------
@LOWERINGS.lowers(SC.FusedScanOp)
def fused_scan(p: TritonProgram, op: SC.FusedScanOp) -> None:
    kern = FusedScanKernel.generate(op)
    p.kernel(kern.name, kern.source)
    ins = ", ".join(p.name(v) for v in op.inputs)
    state = "(" + "".join(f"{p.dim(d)}, " for d in op.state) + ")"
    out = p.new(op.result)
    r = kern.reduced
    p.lines += [f"_state = {state}",
                   f"_y = torch.empty(_state[:{r}] + _state[{r + 1}:], dtype={TORCH_DTYPES[op.result.type.dtype]}, "
                   "device=dev)",
                   f"_args, _grid, _bn = scan_args([{ins}], _y, _state, {kern.axis}, {r})",
                   f"{kern.name}[_grid](*_args, BLOCK_O=32, BLOCK_N=_bn)",
                   f"{out} = reshape(_y, {p.shape(op.result.type)})"]


@LOWERINGS.lowers(SC.LinearAttentionOp)
def linear_attention(p: TritonProgram, op: SC.LinearAttentionOp) -> None:
    q, k, v, a = (p.name(x) for x in (op.q, op.k, op.v, op.a))
    dk, dv = op.q.type.shape[-1], op.v.type.shape[-1]
    if not all(isinstance(n, int) and n <= 256 for n in (dk, dv)):
        raise SparsaError("'scan.linear_attention' needs static head dims <= 256 on triton", op.loc)
    # any chunk gives the same result (up to rounding); the tensor cores want a power of two >= 16
    chunk = op.chunk if op.chunk >= 16 and not op.chunk & (op.chunk - 1) and op.chunk <= 128 else 64
    out = p.new(op.result)
    p.lines += [
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
        f"PRECISION={dot_precision(op.q.type.dtype)!r})",
    ]


@LOWERINGS.lowers(SC.ScanOp)
def unfused_scan(p: TritonProgram, op: SC.ScanOp) -> None:
    """The unfused first-order scan (fuse-scan left it: its result is used as a whole): a and b broadcast to the
    result, the time axis made last, one program per block of 64 positions carrying their state over time."""
    rank = op.result.type.rank
    axis = op.axis % rank
    a, b = p.name(op.a), p.name(op.b)
    out = p.new(op.result)
    h0 = f"contiguous({p.name(op.h0)}.expand(_shape[:{axis}] + _shape[{axis} + 1:]))" if op.h0 is not None else "_a"
    # transposed: the forward scan over time reversed, a taken a step ahead (lam[t] = a[t+1] lam[t+1] + b[t])
    flip_a = ".flip(-1).roll(1, -1)" if op.transpose else ""
    flip_b = ".flip(-1)" if op.transpose else ""
    p.lines += [
        f"_shape = torch.broadcast_shapes({a}.shape, {b}.shape)",
        f"_a = contiguous({a}.expand(_shape).movedim({axis}, -1){flip_a})",
        f"_b = contiguous({b}.expand(_shape).movedim({axis}, -1){flip_b})",
        f"_h = torch.empty(_a.shape, dtype={TORCH_DTYPES[op.result.type.dtype]}, device=dev)",
        "_L = _shape[" + str(axis) + "]",
        "_M = _h.numel() // max(1, _L)",
        "if _h.numel():",
        f"    lib.linear_scan[(cdiv(_M, 64),)](_a, _b, {h0}, _h, _M, _L, HAS_H0={op.h0 is not None}, BLOCK=64)",
        f"{out} = _h{flip_b}.movedim(-1, {axis})",
    ]
