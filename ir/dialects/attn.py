"""`attn` dialect: scaled dot-product attention with mask and score-modifier regions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sparsa.ir import attrs as A
from sparsa.ir.analysis import Cost
from sparsa.ir.core import Attr, Operand, Operation, Region, RegionField, Result
from sparsa.ir.dialects.attn_blocks import ceil_div_dim
from sparsa.ir.dims import compatible, format_dim
from sparsa.ir.types import TensorType, is_float, is_int

INDEX_ARGS = ("b", "h", "q", "k")


def scale_by_head_dim(q: Any, emit: Callable[..., Any]) -> Any:
    """q * rsqrt(Dh), Dh summed from ones at run time: the default scale 1/sqrt(Dh) where q's head dim is
    symbolic (the attention then takes scale 1; score(scale * q @ k^T) is the same either way). `emit(cls,
    *operands, result_types=..., **attrs)` builds one op and returns its result."""
    from sparsa.ir.dialects import tensor as T
    from sparsa.ir.dialects import tensor_reduce as R

    ones = emit(T.ConstantOp, value=1.0, result_types=[TensorType(q.type.dtype, (q.type.shape[-1],))])
    return emit(T.MulOp, q, emit(T.RsqrtOp, emit(R.SumOp, ones, axes=(0,))))


class AttentionBase(Operation):
    """The fields attention and its backward share: q, k, v, an optional block map, the scale, the tiles, and the
    mask and score-modifier regions (what `sparsify-attention` and `hoist-region-invariants` work on)."""

    q = Operand()
    k = Operand()
    v = Operand()
    block_map = Operand(optional=True)
    scale = Attr(A.FLOAT)
    block_q = Attr(A.INT, default=0)
    block_k = Attr(A.INT, default=0)
    kernel = Attr(A.StrKind(("", "dense", "block-sparse")), default="")  # the cost model's choice
    mask = RegionField(optional=True)
    score = RegionField(optional=True)

    def check_qkv(self) -> None:
        q, k, v = self.q.type, self.k.type, self.v.type
        if q.rank != 4 or k.rank != 4 or v.rank != 4:
            raise self.error(f"needs q [B, Hq, Sq, Dh], k and v [B, Hkv, Sk, Dh]; got {q}, {k}, {v}")
        if not (q.dtype == k.dtype == v.dtype) or not is_float(q.dtype):
            raise self.error(f"needs q, k, v of one float type, got {q.dtype}, {k.dtype}, {v.dtype}")
        for i, what in ((0, "batch"), (3, "head dim")):
            if not compatible(q.shape[i], k.shape[i]):
                raise self.error(f"{what} of q {q} and k {k} disagree")
        if not all(compatible(a, b) for a, b in zip(k.shape[:3], v.shape[:3], strict=True)):
            raise self.error(f"k {k} and v {v} disagree in batch, heads or length")
        hq, hkv = q.shape[1], k.shape[1]
        if isinstance(hq, int) and isinstance(hkv, int) and (hkv == 0 or hq % hkv):
            raise self.error(f"query heads {hq} must be a multiple of key/value heads {hkv}")

    def verify(self) -> None:
        _check_region(self, self.mask, 4, "i1", "mask")
        _check_region(self, self.score, 5, None, "score")
        if self.block_map is None:
            if self.block_q or self.block_k or self.kernel == "block-sparse":
                raise self.error("has block sizes or a block-sparse kernel but no block map operand")
            return
        if self.block_q < 1 or self.block_k < 1:
            raise self.error(f"needs positive block sizes with a block map, got {self.block_q}x{self.block_k}")
        t, q = self.block_map.type, self.q.type
        want = (None, None, ceil_div_dim(q.shape[2], self.block_q), ceil_div_dim(self.k.type.shape[2], self.block_k))
        if t.rank != 4 or t.dtype != "i8" or not all(compatible(a, b) for a, b in zip(t.shape[2:], want[2:],
                                                                                      strict=True)):
            raise self.error(f"block map {t} does not tile q {q} and k {self.k.type} in "
                             f"{self.block_q}x{self.block_k} blocks (expected [*, *, "
                             f"{', '.join(format_dim(d) for d in want[2:])}] of i8)")
        for axis, full in ((0, q.shape[0]), (1, q.shape[1])):
            if t.shape[axis] != 1 and not compatible(t.shape[axis], full):
                raise self.error(f"block map dim {axis} must be 1 or {format_dim(full)}, "
                                 f"got {format_dim(t.shape[axis])}")
        if self.mask.empty:
            raise self.error("has a block map but no mask")

    def head_scores(self, ctx: Any, q: np.ndarray, k: np.ndarray, b: int, h: int) -> tuple[np.ndarray, ...]:
        """One head's raw scores scale * q @ k^T, the modified scores and the allowed pairs (float64, dense)."""
        rep = q.shape[1] // k.shape[1]
        s0 = self.scale * (q[b, h].astype(np.float64) @ k[b, h // rep].astype(np.float64).T)
        idx = [np.array(b, dtype=np.int64), np.array(h, dtype=np.int64),
               np.arange(s0.shape[0], dtype=np.int64)[:, None], np.arange(s0.shape[1], dtype=np.int64)[None, :]]
        s = s0
        if not self.score.empty:
            (s,) = ctx.run_region(self.score, [s0, *idx])
            s = np.broadcast_to(np.asarray(s, dtype=np.float64), s0.shape)
        allowed = np.ones(s0.shape, dtype=bool)
        if not self.mask.empty:
            (m,) = ctx.run_region(self.mask, idx)
            allowed = np.broadcast_to(np.asarray(m, dtype=bool), s0.shape)
        return s0, s, allowed, idx


class AttentionOp(AttentionBase):
    """softmax(score(scale * q @ k^T) where mask else -inf) @ v per batch and head; an all-masked row gives 0.

    The mask region takes index scalars (b, h, q, k) and yields a boolean; the score region takes
    (s, b, h, q, k) and yields the new score. Either may be empty. Both may read outer values (mask data).
    With a `block_map` operand (from `attn.block_map`, tiles of block_q x block_k), EMPTY tiles are
    skipped, FULL tiles use no mask, and only PARTIAL tiles evaluate the mask.
    """

    NAME = "attn.attention"
    result = Result()

    def infer(self) -> list[TensorType]:
        self.check_qkv()
        q, v = self.q.type, self.v.type
        return [TensorType(q.dtype, q.shape[:3] + (v.shape[3],))]

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        from sparsa.ir.dialects.attn_grad import attention_vjp

        return attention_vjp(self, g, dys, xs, ys)

    def reference(self, ctx: Any, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                  block_map: np.ndarray | None = None) -> np.ndarray:
        if block_map is not None:
            return self._blocked(ctx, q, k, v, block_map)
        B, Hq, Sq, _ = q.shape
        Hkv, Sk = k.shape[1], k.shape[2]
        if Hq % Hkv:
            raise ValueError(f"attention: {Hq} query heads are not a multiple of {Hkv} key/value heads")
        rep = Hq // Hkv
        k64 = np.repeat(k.astype(np.float64), rep, axis=1)
        v64 = np.repeat(v.astype(np.float64), rep, axis=1)
        s = self.scale * (q.astype(np.float64) @ np.swapaxes(k64, -1, -2))
        index = index_grids(B, Hq, Sq, Sk)
        if not self.score.empty:
            (s,) = ctx.run_region(self.score, [s, *index])
            s = np.broadcast_to(np.asarray(s, dtype=np.float64), (B, Hq, Sq, Sk))
        allowed = np.ones((B, Hq, Sq, Sk), dtype=bool)
        if not self.mask.empty:
            (m,) = ctx.run_region(self.mask, index)
            allowed = np.broadcast_to(np.asarray(m, dtype=bool), (B, Hq, Sq, Sk))
        s = np.where(allowed, s, -np.inf)
        row_max = np.max(s, axis=-1, keepdims=True)
        row_max = np.where(np.isfinite(row_max), row_max, 0.0)
        p = np.where(allowed, np.exp(s - row_max), 0.0)
        denom = p.sum(axis=-1, keepdims=True)
        return np.where(denom > 0, (p @ v64) / np.where(denom > 0, denom, 1.0), 0.0)


    def _blocked(self, ctx: Any, q: np.ndarray, k: np.ndarray, v: np.ndarray, bm: np.ndarray) -> np.ndarray:
        """Block-sparse evaluation: visit only non-EMPTY tiles; evaluate the mask only on PARTIAL ones."""
        B, Hq, Sq, _ = q.shape
        Hkv, Sk = k.shape[1], k.shape[2]
        if Hq % Hkv:
            raise ValueError(f"attention: {Hq} query heads are not a multiple of {Hkv} key/value heads")
        bq, bk = self.block_q, self.block_k
        rep = Hq // Hkv
        out = np.zeros(q.shape[:3] + (v.shape[3],), dtype=np.float64)
        k_pos = [np.arange(j * bk, min((j + 1) * bk, Sk)) for j in range(bm.shape[3])]
        for b in range(B):
            for h in range(Hq):
                rows = bm[b % bm.shape[0], h % bm.shape[1]]
                kh, vh = k[b, h // rep].astype(np.float64), v[b, h // rep].astype(np.float64)
                bh = [np.array(b, dtype=np.int64), np.array(h, dtype=np.int64)]
                for i in range(rows.shape[0]):
                    live = np.flatnonzero(rows[i])
                    if live.size == 0:
                        continue
                    qpos = np.arange(i * bq, min((i + 1) * bq, Sq))
                    kpos = np.concatenate([k_pos[j] for j in live])
                    s = self.scale * (q[b, h, qpos].astype(np.float64) @ kh[kpos].T)
                    if not self.score.empty:
                        (s,) = ctx.run_region(self.score, [s, *bh, qpos[:, None], kpos[None, :]])
                        s = np.broadcast_to(np.asarray(s, dtype=np.float64), (len(qpos), len(kpos)))
                    allowed = np.ones(s.shape, dtype=bool)
                    partial = np.concatenate([np.full(len(k_pos[j]), rows[i, j] == 1) for j in live])
                    if partial.any():
                        (m,) = ctx.run_region(self.mask, [*bh, qpos[:, None], kpos[partial][None, :]])
                        shape = (len(qpos), int(partial.sum()))
                        allowed[:, partial] = np.broadcast_to(np.asarray(m, dtype=bool), shape)
                    out[b, h, qpos] = _softmax_rows(s, allowed) @ vh[kpos]
        return out

    def cost(self, args: Sequence[Any], outs: Sequence[Any]) -> Cost:
        q, k, v = args[:3]
        dense = 2.0 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * (q.shape[3] + v.shape[3])
        bm = args[3] if len(args) > 3 else None
        if bm is None:
            why = "dense (cost model)" if self.kernel == "dense" else "dense, no mask" if self.mask.empty else \
                "dense masked"
            return Cost(dense, dense, why)
        full = np.broadcast_to(bm, (q.shape[0], q.shape[1]) + bm.shape[2:])
        visited = float((full != 0).mean())
        c = {name: int((bm == kind).sum()) for name, kind in (("full", 2), ("partial", 1), ("empty", 0))}
        return Cost(dense, dense * visited, f"block-sparse {self.block_q}x{self.block_k}: {c['full']} full, "
                    f"{c['partial']} partial, {c['empty']} empty tiles", block_map=bm)


def _softmax_rows(s: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Row softmax over allowed entries; a row with none allowed is all zeros."""
    s = np.where(allowed, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    p = np.where(allowed, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
    d = p.sum(axis=-1, keepdims=True)
    return p / np.where(d > 0, d, 1.0)


def index_grids(B: int, H: int, Sq: int, Sk: int) -> list[np.ndarray]:
    """Broadcastable (b, h, q, k) index arrays of shape [B,1,1,1], [1,H,1,1], [1,1,Sq,1], [1,1,1,Sk]."""
    return [np.arange(n, dtype=np.int64).reshape([n if i == j else 1 for j in range(4)])
            for i, n in enumerate((B, H, Sq, Sk))]


def _check_region(op: Operation, region: Region, nargs: int, yields: str | None, what: str,
                  scores: tuple[str, ...] = ("s",)) -> None:
    if region.empty:
        return
    args = region.block.args
    if len(args) != nargs:
        raise op.error(f"{what} region takes {nargs} arguments ({', '.join(scores[:nargs - 4] + INDEX_ARGS)}), "
                       f"got {len(args)}")
    for a in args[nargs - 4 :]:
        if a.type.rank != 0 or not is_int(a.type.dtype):
            raise op.error(f"{what} region's index arguments must be integer scalars, got {a.type}")
    term = region.block.terminator
    if term is None or term.NAME != "func.yield" or len(term.operands) != 1:
        raise op.error(f"{what} region must end in 'func.yield' of one value")
    t = term.operands[0].type
    want = yields or op.q.type.dtype
    if t.dtype != want or t.rank != 0:
        raise op.error(f"{what} region must yield a scalar {want}, got {t}")
