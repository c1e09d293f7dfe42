"""Host-side helpers the generated launcher calls: broadcast strides, views that stay views, strided copies
(through `library.copy_strided`, never a torch kernel), and the per-shape block lists of unmasked attention."""

from __future__ import annotations

import math
from typing import Any

import torch

from sparsa.backends.triton import library as lib
from sparsa.backends.triton.program import npow2

COPY_BLOCK = 1024


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def bstrides(t: Any, shape: tuple[int, ...]) -> list[int]:
    """Strides of `t` broadcast to `shape` (aligned right): 0 along dims `t` lacks or has as size 1."""
    pad = len(shape) - t.dim()
    out = [0] * pad
    for n, s, want in zip(t.shape, t.stride(), shape[pad:], strict=True):
        out.append(0 if n == 1 and want != 1 else s)
    return out


def copy(src: Any, dst: Any) -> Any:
    """dst[...] = src (broadcast, cast to dst's dtype) with the strided copy kernel; returns dst."""
    shape = tuple(dst.shape)
    if len(shape) > lib.MAX_RANK:
        raise ValueError(f"copy of a rank-{len(shape)} tensor (at most {lib.MAX_RANK} on triton)")
    pad = lib.MAX_RANK - len(shape)
    sizes = [1] * pad + list(shape)
    sx = [0] * pad + bstrides(src, shape)
    so = [0] * pad + list(dst.stride())
    n = math.prod(shape)
    if n:
        lib.copy_strided[(cdiv(n, COPY_BLOCK),)](src, dst, n, *sizes[1:], *sx, *so, BLOCK=COPY_BLOCK)
    return dst


def contiguous(t: Any) -> Any:
    """`t` itself when contiguous, else a contiguous copy made by the copy kernel."""
    if t.is_contiguous():
        return t
    return copy(t, torch.empty(tuple(t.shape), dtype=t.dtype, device=t.device))


def reshape(t: Any, shape: tuple[int, ...]) -> Any:
    """A view of `t` with `shape` (copying first only when no view exists)."""
    try:
        return t.view(shape)
    except RuntimeError:
        return contiguous(t).view(shape)


def rows(t: Any, axes: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
    """`t` as a contiguous [rows, cols] matrix with `axes` (reduced or scanned) last, and the permutation (a
    reduction over an empty axis still has its rows: each gets the reduction's value of nothing, a sum's 0)."""
    kept = [d for d in range(t.dim()) if d not in axes]
    perm = tuple(kept + list(axes))
    n, cols = math.prod(t.shape[d] for d in kept), math.prod(t.shape[d] for d in axes)
    return contiguous(t.permute(perm)).reshape(n, cols), perm


def unpermute(t: Any, perm: tuple[int, ...]) -> Any:
    """The view undoing `rows`' permutation."""
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return t.permute(inverse)


def last_contiguous(t: Any) -> Any:
    """`t` with unit stride along its last dim (the kernels' vector loads need it)."""
    return t if t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] == 1 else contiguous(t)


_DENSE_LISTS: dict[tuple, tuple] = {}


def dense_lists(rows_: int, nkb: int, partial: bool, device: Any) -> tuple:
    """Block lists visiting every key block of every row: all PARTIAL (a mask without a block map) or
    all FULL (no mask); cached per shape and device."""
    key = (rows_, nkb, partial, str(device))
    if key not in _DENSE_LISTS:
        idx = torch.arange(nkb, dtype=torch.int32, device=device).repeat(rows_, 1).contiguous()
        cnt = torch.full((rows_,), nkb, dtype=torch.int32, device=device)
        none = torch.zeros((rows_,), dtype=torch.int32, device=device)
        _DENSE_LISTS[key] = (idx, none, idx, cnt) if partial else (idx, cnt, idx, none)
    return _DENSE_LISTS[key]


def scan_args(inputs: list[Any], out: Any, state: tuple[int, ...], axis: int, reduced: int,
              block_o: int = 32) -> tuple:
    """(arguments, grid, BLOCK_N) of a fused scan kernel: every input with its strides broadcast to the state
    (zero on size-1 axes, nothing expanded in memory), the output (the state without its `reduced` axis) and
    the outer sizes."""
    rank = len(state)
    outer = [d for d in range(rank) if d not in (axis, reduced)]
    args: list[Any] = []
    for x in inputs:
        args += [x, *bstrides(x, tuple(state))]

    def out_axis(d: int) -> int:
        return d - (d > reduced)

    args += [out] + [out.stride(out_axis(d)) for d in outer] + [out.stride(out_axis(axis))]
    m = math.prod(state[d] for d in outer)
    args += [state[d] for d in outer] + [m, state[axis], state[reduced]]
    return args, (max(1, cdiv(m, block_o)),), npow2(state[reduced])


def dense_map(full_idx: Any, full_cnt: Any, part_idx: Any, part_cnt: Any, nb: int, nh: int, nqb: int,
              nkb: int) -> Any:
    """A block map as the `attn.block_map` op's value ([NB, NH, NQ, NK] of EMPTY 0 / PARTIAL 1 / FULL 2) from the
    per-row block lists the attention kernel reads (a block map the function returns)."""
    out = torch.zeros((nb * nh * nqb, nkb), dtype=torch.int8, device=full_idx.device)
    cols = torch.arange(nkb, device=full_idx.device)[None, :]
    for lists, counts, kind in ((full_idx, full_cnt, 2), (part_idx, part_cnt, 1)):
        lists, counts = lists.reshape(-1, nkb), counts.reshape(-1)
        live = cols < counts[:, None].long()
        rows = torch.arange(out.shape[0], device=out.device)[:, None].expand_as(live)
        out[rows[live], lists.long()[live]] = kind
    return out.view(nb, nh, nqb, nkb)


def select_lists(selected: Any) -> tuple[Any, Any]:
    """Per block-map row: the key-block indices selected (first, in order) and how many there are."""
    counts = selected.sum(dim=-1).to(torch.int32).contiguous()
    order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32).contiguous()
    return order, counts


def map_lists(bm: Any, transposed: bool) -> tuple:
    """A block map's FULL and PARTIAL lists by rows (query blocks) or, `transposed`, by columns (key blocks), with
    the map's batch and head extents: from the lists a launcher holds or a dense map passed in (a residual)."""
    if isinstance(bm, tuple):
        if not transposed:
            return bm[:6]
        bm = dense_map(*bm)
    if transposed:
        bm = bm.transpose(-1, -2)
    bm = bm.contiguous()
    return (*select_lists(bm == 2), *select_lists(bm == 1), bm.shape[0], bm.shape[1])


def align_segments(perm: Any, offsets: Any, block: int) -> tuple[Any, Any, Any]:
    """Expert segments [offsets[e], offsets[e+1]) of `perm` each padded with -1 to a multiple of `block` rows
    (the grouped matmul's tile): (padded perm, its offsets, each given row's position in it)."""
    counts = offsets[1:] - offsets[:-1]
    new_offsets = torch.zeros_like(offsets)
    new_offsets[1:] = torch.cumsum((counts + block - 1) // block * block, 0)
    n = perm.shape[0]
    expert = torch.repeat_interleave(torch.arange(counts.shape[0], device=perm.device), counts, output_size=n)
    where = new_offsets[expert] + torch.arange(n, device=perm.device) - offsets[expert]
    padded = torch.full((int(new_offsets[-1]),), -1, dtype=perm.dtype, device=perm.device)
    padded[where] = perm
    return padded, new_offsets, where


def bsc_index(row_ptr: Any, col_idx: Any, ncols: int) -> tuple[Any, Any, Any]:
    """A BSR matrix's blocks by block column, so each program walks only its column's blocks: (column
    pointers [ncols + 1], the block row of each block in column order, its index in the stored order)."""
    row_ptr, col_idx = row_ptr.long(), col_idx.long()
    rows = torch.arange(row_ptr.shape[0] - 1, device=row_ptr.device)
    block_rows = torch.repeat_interleave(rows, row_ptr.diff(), output_size=col_idx.shape[0])
    order = torch.argsort(col_idx, stable=True)
    col_ptr = torch.zeros(ncols + 1, dtype=torch.int64, device=col_idx.device)
    col_ptr[1:] = torch.cumsum(torch.bincount(col_idx, minlength=ncols), 0)
    return col_ptr, block_rows[order], order


class HostStep:
    """An op the launcher runs on the host, with the context its reference semantics reads: the process group
    of an expert-parallel function (`exchange`)."""

    def __init__(self, op: Any, exchange: Any = None):
        self.op = op
        self.exchange = exchange


def unknown_dims(step: HostStep, operands: tuple, result: Any) -> None:
    """The op's check that no dim of unknown size (`?`) broadcast (or, in a matmul, met another contracted dim):
    a RuntimeShapeError as on the reference and cpu targets, where the kernels here would broadcast it."""
    step.op.check_unknown_dims([tuple(s) for s in operands], tuple(result))


def slice_checked(step: HostStep, shape: Any, dims: dict[str, int]) -> None:
    """A slice of bounds known at run time (sizes), checked by the op's own `checked` (a symbolic start not below
    0, the lengths taken its type's), where PyTorch's indexing would clamp them silently."""
    from sparsa.ir.analysis import Sizes

    step.op.checked(Sizes(dims), tuple(shape))


def host_op(step: HostStep, dev: Any, *args: Any) -> tuple[Any, ...]:
    """An op whose results' sizes depend on the data (packing a sparse layout that is not a weight's, the plan
    and the exchanges of expert parallel), run on the host by its reference semantics: a copy to the host and
    back, per call."""
    import numpy as np

    from sparsa.ir.types import round_to_dtype

    op = step.op
    arrays = [a.detach().cpu().numpy() for a in args]
    outs = op.reference(step, *arrays)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return tuple(torch.from_numpy(np.ascontiguousarray(round_to_dtype(np.asarray(o), r.type.dtype))).to(dev)
                 for o, r in zip(outs, op.results, strict=True))
