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
from sparsa.backends.triton.regions import RegionEmitter
from sparsa.ir.core import Operation
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
