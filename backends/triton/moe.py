"""MoE grouped GEMM as a generated Triton kernel, driven by `fuse-moe-dispatch`'s ops.

One program per (row tile, column tile) of the permuted assignment list: the tile's expert comes from
the dispatch offsets (segments are aligned to the tile height), token rows are read through the
permutation (no gathered copy), every weight of the stage is multiplied with one read of the rows, the
epilogue region runs on the accumulators in registers, and for the last stage the gate-weighted rows are
scatter-added straight into the [T, N] output (no [T, E] combine, no padded copy).
"""

from __future__ import annotations

import hashlib
import textwrap
from dataclasses import dataclass
from typing import Any

from sparsa.backends.triton.attention import load_kernel_module, precision
from sparsa.backends.triton.program import (
    LOWERINGS,
    TORCH_DTYPES,
    TritonProgram,
    dot_precision,
    npow2,
)
from sparsa.backends.triton.regions import RegionEmitter
from sparsa.backends.triton.sparse import on_host
from sparsa.ir.core import Operation
from sparsa.ir.dialects import moe as M
from sparsa.ir.dialects import moe_exchange as X
from sparsa.ir.dialects.attn_blocks import outer_values

KERNEL = '''
@triton.jit
def {name}(
    ROWS, PERM, OFFSETS, {weights}OUT, GATES, {data_params}
    P, K, N, TOPK, E,
    GATHER: tl.constexpr, COMBINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, PRECISION: tl.constexpr,
):
    # {op_line}
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # the tile's expert: segments start at multiples of BLOCK_M, so it is the number of segments ending
    # at or before the tile's first row
    eo = tl.arange(0, BLOCK_E)
    ends = tl.load(OFFSETS + 1 + eo, mask=eo < E, other=P + BLOCK_M)
    e = tl.minimum(tl.sum((ends <= pid_m * BLOCK_M).to(tl.int32), 0), E - 1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ids = tl.load(PERM + offs_m, mask=offs_m < P, other=-1)
    valid = ids >= 0
    if GATHER:
        rows = tl.where(valid, ids // TOPK, 0)  # token of each assignment: read through the permutation
    else:
        rows = offs_m.to(tl.int64)
{accumulators}
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(ROWS + rows[:, None] * K + offs_k[None, :], mask=valid[:, None] & (offs_k[None, :] < K),
                    other=0.0)
{products}
{epilogue}
    y = tl.where(valid[:, None], y, 0.0)
    if COMBINE:
        g = tl.load(GATES + tl.where(valid, ids, 0), mask=valid, other=0.0)
        dst = OUT + (tl.where(valid, ids, 0) // TOPK)[:, None] * N + offs_n[None, :]
        tl.atomic_add(dst, (y * g[:, None]).to(OUT.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))
    else:
        tl.store(OUT + offs_m[:, None] * N + offs_n[None, :], y.to(OUT.dtype.element_ty),
                 mask=(offs_m[:, None] < P) & (offs_n[None, :] < N))
'''


@dataclass
class GroupedMatmulKernel:
    """The generated kernel for one moe.grouped_matmul or moe.grouped_matmul_combine op."""

    name: str
    source: str
    num_weights: int
    combine: bool
    gather: bool
    topk: int
    data: list

    @classmethod
    def generate(cls, op: Operation) -> GroupedMatmulKernel:
        combine = op.NAME == "moe.grouped_matmul_combine"
        n = 1 if combine else len(op.weights)
        data_values = outer_values(op.epilogue)
        data = {id(v): (f"data{i}", v) for i, v in enumerate(data_values)}
        params = "".join(f"data{i}, " + "".join(f"data{i}_d{d}, " for d in range(v.type.rank))
                         for i, v in enumerate(data_values))
        args = [f"acc{i}" for i in range(n)]
        em = RegionEmitter(op.epilogue, args, data, "ep")
        value = em.emit()
        accumulators = "\n".join(f"acc{i} = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)" for i in range(n))
        products = "\n".join(
            f"b{i} = tl.load(W{i} + e * K * N + offs_k[:, None] * N + offs_n[None, :],\n"
            f"             mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)\n"
            f"acc{i} += tl.dot(a, b{i}, input_precision=PRECISION).to(tl.float32)" for i in range(n))
        epilogue = "\n".join(em.lines + [f"y = {value}"])
        where = f' from "{op.loc.file}":{op.loc.line}' if op.loc else ""
        fields = {"weights": "".join(f"W{i}, " for i in range(n)), "data_params": params,
                  "op_line": f"{op.NAME}{where}", "accumulators": textwrap.indent(accumulators, " " * 4),
                  "products": textwrap.indent(products, " " * 8), "epilogue": textwrap.indent(epilogue, " " * 4)}
        digest = hashlib.sha256(KERNEL.format(name="_", **fields).encode()).hexdigest()[:16]
        name = f"moe_grouped_matmul_{digest}"
        return cls(name, KERNEL.format(name=name, **fields), n, combine, op.gather, op.topk, data_values)

    def __call__(self, rows: Any, perm: Any, offsets: Any, weights: list[Any], gates: Any = None,
                 data: list[Any] = (), block_m: int = 64, block_n: int = 64, block_k: int = 32,
                 num_tokens: int | None = None, num_warps: int = 4, num_stages: int = 2) -> Any:
        """Run on torch tensors; `offsets` must start every expert segment at a multiple of `block_m`."""
        import torch

        device = rows.device
        perm = torch.as_tensor(perm, device=device)
        offsets = torch.as_tensor(offsets, device=device)
        if bool((offsets % block_m != 0).any()):
            raise ValueError(f"expert segments must be aligned to the tile height {block_m} "
                             f"(fuse-moe-dispatch{{block={block_m}}})")
        P = perm.shape[0]
        tiles = max(1, -(-P // block_m))
        experts = offsets.shape[0] - 1
        K, N = weights[0].shape[1], weights[0].shape[2]
        rows = rows.contiguous()
        if self.combine:
            out = torch.zeros((num_tokens, N), dtype=torch.float32, device=device)
            g = gates.contiguous().reshape(-1)
        else:
            out = torch.empty((P, N), dtype=rows.dtype, device=device)
            g = out  # unused
        extra: list[Any] = []
        for t in data:
            t = torch.as_tensor(t, device=device).contiguous()
            extra += [t, *t.shape]
        grid = (tiles, -(-N // block_n))
        load_kernel_module(self.name, self.source)[grid](
            rows, perm, offsets, *[w.contiguous() for w in weights], out, g, *extra,
            P, K, N, self.topk, experts, GATHER=self.gather, COMBINE=self.combine, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k, BLOCK_E=1 << max(0, (experts - 1).bit_length()), PRECISION=precision(rows.dtype),
            num_warps=num_warps,
            num_stages=num_stages,
        )
        return out.to(rows.dtype) if self.combine else out


# ---- launcher lines ---------------------------------------------------------------------------------
ALIGN = 64  # the tile height segments are padded to when the dispatch did not align them

# ---- MoE ----------------------------------------------------------------------------------------
# The exchange among ranks (expert parallel) is the host's: the launcher calls the process group with the
# tensors the kernels made (host.host_op), as the cpu target's host does.
LOWERINGS.lowers(X.ExchangePlanOp, X.AllToAllOp, X.AllToAllStartOp, X.AllToAllWaitOp, X.CombineRowsOp,
                 X.LocalExpertsOp, X.RankRowsOp, X.InsertOwnRowsOp)(on_host)


@LOWERINGS.lowers(M.RouteOp)
def route(p: TritonProgram, op: Operation) -> None:
    logits = p.name(op.logits)
    bias = p.name(op.bias) if op.bias is not None else logits
    w, e = p.new(op.weights), p.new(op.experts)
    p.alloc(op.weights, w, f"({logits}.shape[0], {op.k})")
    p.alloc(op.experts, e, f"({logits}.shape[0], {op.k})")
    p.lines += [
        f"_l = contiguous({logits})",
        "_E = _l.shape[1]",
        "if _l.shape[0]:",
        f"    lib.moe_route[(_l.shape[0],)](_l, contiguous({bias}), {w}, {e}, _E, {op.scale!r}, "
        f"SOFTMAX={op.score == 'softmax'}, HAS_BIAS={op.bias is not None}, K={op.k}, RENORM={op.renormalize}, "
        f"GROUPS={op.groups}, GROUP_TOP={op.group_top}, GROUPS_KEPT={op.groups_kept}, BLOCK_E=npow2(_E), "
        f"BLOCK_G=npow2({op.groups}), BLOCK_K=npow2({op.k}))",
    ]


@LOWERINGS.lowers(M.DispatchOp)
def dispatch(p: TritonProgram, op: Operation) -> None:
    experts = p.name(op.experts)
    perm, offsets = p.new(op.perm), p.new(op.offsets)
    E, align = op.num_experts, op.block
    cap = "_p" if op.capacity is None else \
        f"expert_capacity({op.capacity!r}, {experts}.shape[0], {experts}.shape[1], {E})"  # the op's capacity_limit
    p.lines += [
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
    if id(op.perm) in p.returned:  # the op's value is the list up to its padded length (a sync, only here)
        p.lines.append(f"{perm} = {perm}[:int({offsets}[-1])]")


@LOWERINGS.lowers(M.GroupedWeightGradOp)
def grouped_weight_grad(p: TritonProgram, op: Operation) -> None:
    """X_seg^T dY_seg per expert on cuBLAS (torch.matmul on each segment's rows), a loop over the experts on the
    host: the offsets are read once per call."""
    p.note_dot(op, op.rows.type.dtype)
    rows, perm, offsets, dout = (p.name(v) for v in (op.rows, op.perm, op.offsets, op.dout))
    out = p.new(op.result)
    pick = f"_rows[{perm}[_pos] // {op.topk}]" if op.gather else "_rows[_pos]"
    block = f"{dout}.shape[1], _rows.shape[1]" if op.transposed else f"_rows.shape[1], {dout}.shape[1]"
    product = f"torch.matmul({dout}[_pos].T, {pick})" if op.transposed else f"torch.matmul({pick}.T, {dout}[_pos])"
    p.lines += [
        f"_off = {offsets}.tolist()",
        f"_rows = contiguous({rows})",
        f"{out} = torch.zeros((len(_off) - 1, {block}), dtype=_rows.dtype, device=dev)",
        "for _e in range(len(_off) - 1):",
        "    _pos = torch.arange(_off[_e], _off[_e + 1], device=dev)",
        f"    _pos = _pos[{perm}[_pos] >= 0]",
        f"    {out}[_e] = {product}",
    ]


@LOWERINGS.lowers(M.GroupedMatmulOp, M.GroupedMatmulCombineOp)
def grouped(p: TritonProgram, op: Operation) -> None:
    p.note_dot(op, op.rows.type.dtype)
    kern = GroupedMatmulKernel.generate(op)
    p.kernel(kern.name, kern.source)
    combine = kern.combine
    rows, perm, offsets = p.name(op.rows), p.name(op.perm), p.name(op.offsets)
    dispatch = op.perm.defining_op
    block_m = dispatch.block if isinstance(dispatch, M.DispatchOp) else 0
    realigned = block_m < 16 or bool(block_m & (block_m - 1))
    if realigned:  # segments not aligned to a tile (a dispatch of another block, or given): padded here, per call
        block_m = ALIGN
        p.lines.append(f"_perm, _offsets, _where = align_segments({perm}, {offsets}, {ALIGN})")
        perm, offsets = "_perm", "_offsets"
    weights = [op.weight] if combine else list(op.weights)
    ws = ", ".join(f"contiguous({p.name(w)})" for w in weights)
    data = "".join(f"contiguous({p.name(v)}), *{p.name(v)}.shape, " for v in kern.data)
    out = p.new(op.result)
    w0 = p.name(weights[0])
    p.lines.append(f"_rows = contiguous({rows})")
    p.lines.append(f"_N, _K = {w0}.shape[2], {w0}.shape[1]")
    if combine:
        gates = p.name(op.gates)
        p.lines += [f"_acc = torch.zeros(({gates}.shape[0], _N), dtype=torch.float32, device=dev)",
                       f"_g = contiguous({gates})"]
        target = "_acc"
    else:
        p.lines.append(f"{out} = torch.empty(({perm}.shape[0], _N), dtype={TORCH_DTYPES[op.result.type.dtype]}, "
                          f"device=dev)")
        target = out
    gate_arg = "_g" if combine else target
    p.lines.append(
        f"{kern.name}[(cdiv({perm}.shape[0], {block_m}), cdiv(_N, 64))](_rows, {perm}, {offsets}, {ws}, {target}, "
        f"{gate_arg}, {data}{perm}.shape[0], _K, _N, {op.topk}, {offsets}.shape[0] - 1, GATHER={op.gather}, "
        f"COMBINE={combine}, BLOCK_M={block_m}, BLOCK_N=64, BLOCK_K=32, BLOCK_E=npow2({offsets}.shape[0] - 1), "
        f"PRECISION={dot_precision(op.rows.type.dtype)!r})")
    if combine:
        if op.result.type.dtype == "f32":
            p.lines.append(f"{out} = _acc")
        else:
            p.alloc(op.result, out, "_acc.shape")
            p.lines.append(f"copy(_acc, {out})")
    elif realigned:
        p.lines.append(f"{out} = {out}[_where]  # back to the given segments' rows")
