"""`moe` dialect: mixture-of-experts routing of tokens through an expert-body region."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from sparsa.ir import attrs as A
from sparsa.ir.analysis import Cost
from sparsa.ir.core import Attr, Operand, Operation, RegionField, Result
from sparsa.ir.dims import compatible
from sparsa.ir.traits import Composite
from sparsa.ir.types import TensorType, is_float, is_int


def expert_capacity(capacity: float, tokens: int, k: int, experts: int) -> int:
    """Most assignments one expert keeps: ceil(capacity * T * K / E)."""
    return math.ceil(capacity * tokens * k / experts)


def kept_assignments(idx: np.ndarray, experts: int, capacity: float | None) -> np.ndarray:
    """Boolean [T, K]: which (token, slot) assignments survive capacity, in token then slot order."""
    keep = np.ones(idx.shape, dtype=bool)
    if capacity is None:
        return keep
    cap = expert_capacity(capacity, idx.shape[0], idx.shape[1], experts)
    flat = idx.reshape(-1)  # row-major: token order, then slot order
    for e in range(experts):
        where = np.flatnonzero(flat == e)
        keep.reshape(-1)[where[cap:]] = False
    return keep


class MoeOp(Composite, Operation):
    """y[t] = sum_j gates[t, j] * body(idx[t, j], x[t]), with at most ceil(capacity*T*K/E) tokens per expert."""

    NAME = "moe.moe"
    LOWERED_BY = "fuse-moe-gating and fuse-moe-dispatch"
    x = Operand()
    idx = Operand()
    gates = Operand()
    num_experts = Attr(A.INT)
    capacity = Attr(A.FLOAT, default=None)
    result = Result()
    body = RegionField()

    def infer(self) -> list[TensorType]:
        x, idx, gates = self.x.type, self.idx.type, self.gates.type
        if x.rank != 2 or idx.rank != 2 or gates.rank != 2:
            raise self.error(f"needs x [T, D], idx [T, K], gates [T, K]; got {x}, {idx}, {gates}")
        if not is_int(idx.dtype) or not is_float(gates.dtype):
            raise self.error(f"needs integer idx and float gates, got {idx.dtype} and {gates.dtype}")
        if not (compatible(x.shape[0], idx.shape[0]) and compatible(idx.shape[0], gates.shape[0])
                and compatible(idx.shape[1], gates.shape[1])):
            raise self.error(f"token/slot dims disagree: x {x}, idx {idx}, gates {gates}")
        out = self.body_result_type()
        return [TensorType(gates.dtype, (x.shape[0], out.shape[-1]))]

    def body_result_type(self) -> TensorType:
        if self.body.empty or not self.body.block.ops:
            raise self.error("needs an expert body ending in 'func.yield'")
        term = self.body.block.terminator
        if term.NAME != "func.yield" or len(term.operands) != 1 or term.operands[0].type.rank != 2:
            raise self.error("expert body must yield one 2-D tensor [rows, D_out]")
        return term.operands[0].type

    def verify(self) -> None:
        if self.num_experts < 1:
            raise self.error(f"num_experts must be positive, got {self.num_experts}")
        if self.capacity is not None and self.capacity <= 0:
            raise self.error(f"capacity must be positive, got {self.capacity}")
        args = self.body.block.args
        if len(args) != 2 or args[0].type.rank != 0 or not is_int(args[0].type.dtype):
            raise self.error("expert body takes (e: integer scalar, h: rows of x)")
        h, x = args[1].type, self.x.type
        if h.rank != 2 or h.dtype != x.dtype or not compatible(h.shape[1], x.shape[1]):
            raise self.error(f"expert body's rows {h} must match the rows of x {x}")

    def reference(self, ctx: Any, x: np.ndarray, idx: np.ndarray, gates: np.ndarray) -> np.ndarray:
        E = self.num_experts
        if idx.size and (idx.min() < 0 or idx.max() >= E):
            raise ValueError(f"moe: expert index {int(idx[(idx < 0) | (idx >= E)].flat[0])} outside 0..{E - 1}")
        keep = kept_assignments(idx, E, self.capacity)
        y: np.ndarray | None = None
        for e in range(E):
            tok, slot = np.nonzero((idx == e) & keep)
            if tok.size == 0:
                continue
            (rows,) = ctx.run_region(self.body, [np.array(e, dtype=np.int64), x[tok]])
            if y is None:
                y = np.zeros((x.shape[0], rows.shape[1]), dtype=np.float64)
            np.add.at(y, tok, gates[tok, slot][:, None].astype(np.float64) * rows)
        if y is None:
            y = np.zeros(ctx.shape_of(self.result.type), dtype=np.float64)
        return y


# ---- routing and dispatch: what `fuse-moe-gating` and `fuse-moe-dispatch` lower `moe.moe` into ----------
def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _topk_indices(x: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-x, axis=-1, kind="stable")[..., :k]


class RouteOp(Operation):
    """Router: scores = softmax|sigmoid(logits); pick top-k of scores (+ selection bias, within the best
    expert groups); weights = the unbiased scores of the picks, renormalized and scaled as asked."""

    NAME = "moe.route"
    logits = Operand()
    bias = Operand(optional=True)
    score = Attr(A.StrKind(("softmax", "sigmoid")))
    k = Attr(A.INT)
    renormalize = Attr(A.BOOL, default=False)
    scale = Attr(A.FLOAT, default=1.0)
    groups = Attr(A.INT, default=1)
    group_top = Attr(A.INT, default=2)
    groups_kept = Attr(A.INT, default=1)
    weights = Result()
    experts = Result()

    def infer(self) -> list[TensorType]:
        t = self.logits.type
        if t.rank != 2 or not is_float(t.dtype):
            raise self.error(f"needs float logits [T, E], got {t}")
        E = t.shape[1]
        if self.bias is not None and (self.bias.type.rank != 1 or not compatible(self.bias.type.shape[0], E)):
            raise self.error(f"selection bias must be [E] = [{E}], got {self.bias.type}")
        if isinstance(E, int):
            if not 1 <= self.k <= E:
                raise self.error(f"k = {self.k} must be in 1..{E}")
            if self.groups < 1 or E % self.groups or not 1 <= self.groups_kept <= self.groups:
                raise self.error(f"{E} experts do not split into {self.groups} groups keeping {self.groups_kept}")
            if self.groups > 1 and self.k > self.groups_kept * (E // self.groups):
                raise self.error(f"k = {self.k} exceeds the experts of {self.groups_kept} kept groups")
            if self.groups > 1 and not 1 <= self.group_top <= E // self.groups:
                raise self.error(f"group_top = {self.group_top} must be in 1..{E // self.groups} (a group's experts: "
                                 "a group is scored by the sum of its best group_top)")
        shape = (t.shape[0], self.k)
        return [TensorType(t.dtype, shape), TensorType("i64", shape)]

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """Through the picked scores only (no gradient through the choice, the selection bias or the groups): the
        renormalization and scale, scattered back to the picked experts, then softmax's or sigmoid's rule."""
        logits, dw = xs[0], dys[0]
        experts = ys[1]
        if dw is None:
            return [None] * len(xs)
        T, K = experts.type.shape
        s = g.emit("tensor.softmax", logits, axis=-1) if self.score == "softmax" else g.emit("tensor.sigmoid", logits)
        row = g.emit("tensor.reshape", g.emit("tensor.iota", result_types=[TensorType("i64", (T,))]), shape=[-1, 1])
        row = g.broadcast_to(row, TensorType("i64", (T, K)))
        picked = g.emit("tensor.gather", s, [row, experts])
        d = g.scale(dw, self.scale)
        if self.renormalize:  # w = p / sum(p): dp = (d - sum(d w)) / sum(p)
            total = g.sum(picked, [1], keepdim=True)
            w = g.div(picked, total)
            d = g.div(g.sub(d, g.sum(g.mul(d, w), [1], keepdim=True)), total)
        ds = g.emit("tensor.scatter_add", g.full(0.0, logits.type), d, [row, experts])
        if self.score == "softmax":
            dl = g.mul(s, g.sub(ds, g.sum(g.mul(ds, s), [1], keepdim=True)))
        else:
            dl = g.mul(ds, g.mul(s, g.sub(g.scalar(1.0, s.type.dtype), s)))
        return [dl] + [None] * (len(xs) - 1)

    def reference(self, ctx: Any, logits: np.ndarray, bias: np.ndarray | None = None) -> tuple:
        x = logits.astype(np.float64)
        s = _softmax(x) if self.score == "softmax" else _sigmoid(x)
        sel = s + bias.astype(np.float64) if bias is not None else s
        if self.groups > 1:
            T, E = sel.shape
            grouped = sel.reshape(T, self.groups, E // self.groups)
            top = -np.sort(-grouped, axis=-1)[..., : self.group_top].sum(-1)
            kept = _topk_indices(top, self.groups_kept)
            allow = np.zeros((T, self.groups), dtype=bool)
            np.put_along_axis(allow, kept, True, axis=-1)
            sel = np.where(np.repeat(allow, E // self.groups, axis=-1), sel, -np.inf)
        idx = _topk_indices(sel, self.k)
        w = np.take_along_axis(s, idx, axis=-1)
        if self.renormalize:
            w = w / w.sum(-1, keepdims=True)
        return w * self.scale, idx


class DispatchOp(Operation):
    """Sorts (token, slot) assignments by expert, stably (token order, then slot order), dropping those over
    capacity; `perm` lists assignment ids t*K+j per expert segment, each segment starting at a multiple of
    `block` (padding is -1); `offsets[e]` is where expert e's segment starts, offsets[E] the total length.
    With `drop_negative`, ids below 0 are no assignment (the slots of a received token that other ranks serve)."""

    NAME = "moe.dispatch"
    experts = Operand()
    num_experts = Attr(A.INT)
    block = Attr(A.INT, default=1)
    capacity = Attr(A.FLOAT, default=None)
    drop_negative = Attr(A.BOOL, default=False)
    perm = Result()
    offsets = Result()

    def infer(self) -> list[TensorType]:
        t = self.experts.type
        if t.rank != 2 or not is_int(t.dtype):
            raise self.error(f"needs integer expert ids [T, K], got {t}")
        if self.block < 1 or self.num_experts < 1:
            raise self.error(f"block ({self.block}) and num_experts ({self.num_experts}) must be positive")
        return [TensorType("i64", (None,)), TensorType("i64", (self.num_experts + 1,))]

    def verify(self) -> None:
        if self.drop_negative and self.capacity is not None:
            raise self.error("drop_negative dispatches what another step kept: it takes no capacity")

    def capacity_limit(self, tokens: int, k: int) -> int:
        """Most assignments one expert keeps for `tokens` tokens of `k` assignments: every one without a
        capacity, else ceil(capacity * T * K / E). The one rule every target uses."""
        return tokens * k if self.capacity is None else expert_capacity(self.capacity, tokens, k, self.num_experts)

    def reference(self, ctx: Any, experts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        E = self.num_experts
        lowest = -1 if self.drop_negative else 0
        if experts.size and (experts.min() < lowest or experts.max() >= E):
            raise ValueError(f"moe.dispatch: expert id outside {lowest}..{E - 1}")
        keep = kept_assignments(experts, E, self.capacity).reshape(-1)
        flat = experts.reshape(-1)
        ids = np.flatnonzero(keep & (flat >= 0))
        ids = ids[np.argsort(flat[ids], kind="stable")]
        counts = np.bincount(flat[ids], minlength=E)
        padded = -(-counts // self.block) * self.block
        offsets = np.concatenate([[0], np.cumsum(padded)]).astype(np.int64)
        perm = np.full(int(offsets[-1]), -1, dtype=np.int64)
        start = np.concatenate([[0], np.cumsum(counts)])
        for e in range(E):
            perm[offsets[e] : offsets[e] + counts[e]] = ids[start[e] : start[e + 1]]
        return perm, offsets

    def cost(self, args: Sequence[Any], outs: Sequence[Any]) -> Cost:
        perm, offsets = outs
        counts = [int((perm[offsets[e] : offsets[e + 1]] >= 0).sum()) for e in range(len(offsets) - 1)]
        padding = int((perm < 0).sum())
        return Cost(0.0, 0.0, f"{sum(counts)} assignments, {padding} padding rows (block {self.block})",
                    tokens_per_expert=counts)


def _plus_one(d: Any) -> Any:
    return d + 1 if isinstance(d, int) else None


def _check_grouped(op: Operation, rows: TensorType, weights: list[TensorType]) -> None:
    if rows.rank != 2:
        raise op.error(f"rows must be 2-D, got {rows}")
    for w in weights:
        if w.rank != 3 or not compatible(w.shape[1], rows.shape[1]) or w.dtype != rows.dtype:
            raise op.error(f"expert weights must be [E, {rows.shape[1]}, N] of {rows.dtype}, got {w}")
    if op.perm.type.rank != 1 or op.offsets.type.rank != 1 or op.perm.type.dtype != "i64" \
            or op.offsets.type.dtype != "i64":
        raise op.error("perm and offsets must be 1-D i64 (from moe.dispatch)")
    experts = {w.shape[0] for w in weights}
    if len(experts) > 1 or not compatible(op.offsets.type.shape[0], _plus_one(next(iter(experts)))):
        raise op.error(f"offsets {op.offsets.type} must have one entry per expert plus one, for weights "
                       f"with {', '.join(str(e) for e in sorted(experts, key=str))} experts")
    epi = op.epilogue
    if epi.empty or len(epi.block.args) != len(weights):
        raise op.error(f"epilogue takes one argument per weight ({len(weights)})")
    term = epi.block.terminator
    if term is None or term.NAME != "func.yield" or len(term.operands) != 1 or term.operands[0].type.rank != 2:
        raise op.error("epilogue must yield one 2-D tensor of rows")


def _width(op: Operation, weight: np.ndarray) -> int:
    """Columns of a grouped matmul's output: static in its type, else the (elementwise) epilogue keeps N."""
    n = op.result.type.shape[1]
    return n if isinstance(n, int) else weight.shape[2]


def _grouped_rows(op: Operation, ctx: Any, rows: np.ndarray, perm: np.ndarray, offsets: np.ndarray,
                  weights: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per expert: (positions in perm with a real assignment, epilogue(rows @ W_e ...)) for those rows."""
    out = []
    for e in range(len(offsets) - 1):
        pos = np.arange(offsets[e], offsets[e + 1])
        pos = pos[perm[pos] >= 0]
        if pos.size == 0:
            continue
        x = rows[perm[pos] // op.topk] if op.gather else rows[pos]
        parts = [x.astype(np.float64) @ w[e].astype(np.float64) for w in weights]
        (y,) = ctx.run_region(op.epilogue, parts)
        out.append((pos, np.asarray(y, dtype=np.float64)))
    return out


class GroupedMatmulOp(Operation):
    """For each expert segment of `perm`: rows @ W_e for every weight, then the epilogue region on the results.

    With `gather`, row p reads token perm[p] // topk of `rows` (tokens read through the permutation);
    otherwise `rows` is already in permuted order. Padding positions give zero rows.
    """

    NAME = "moe.grouped_matmul"
    rows = Operand()
    perm = Operand()
    offsets = Operand()
    weights = Operand(variadic=True)
    topk = Attr(A.INT)
    gather = Attr(A.BOOL, default=False)
    result = Result()
    epilogue = RegionField()

    def infer(self) -> list[TensorType]:
        _check_grouped(self, self.rows.type, [w.type for w in self.weights])
        out = self.epilogue.block.terminator.operands[0].type
        return [TensorType(self.rows.type.dtype, (self.perm.type.shape[0], out.shape[1]))]

    def reference(self, ctx: Any, rows: np.ndarray, perm: np.ndarray, offsets: np.ndarray,
                  *weights: np.ndarray) -> np.ndarray:
        out = np.zeros((len(perm), _width(self, weights[0])), dtype=np.float64)
        for pos, y in _grouped_rows(self, ctx, rows, perm, offsets, list(weights)):
            out[pos] = y
        return out

    def training_form(self, g: Any) -> list[Any] | None:
        """With a fused epilogue: each product its own grouped matmul and the epilogue on them as tensor ops, so
        a backward reads the products (saved) instead of computing them again (two of a SwiGLU expert's three
        GEMMs). The epilogue's padding rows are not zeroed: only grouped ops read them, and those skip padding."""
        if _keeps_product(self.epilogue):
            return None
        (y,), _ = g.inline(self.epilogue, _products(self, g, list(self.weights)))
        return [y]

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """The products again, the epilogue's rules, then dRows through the transposed weights and dW per
        expert segment; nothing to perm and offsets."""
        weights = list(self.weights)
        dzs = g.region(self.epilogue, _products(self, g, weights), [dys[0]])
        drows, dws = _grouped_backward(self, g, weights, dzs)
        return [drows, None, None, *dws]

    def cost(self, args: Sequence[Any], outs: Sequence[Any]) -> Cost:
        return grouped_cost(self, args)


class GroupedMatmulCombineOp(Operation):
    """The last expert matmul with the weighted combine fused: y[t] += gates[t, j] * epilogue(row @ W_e)
    for each kept assignment t*K+j, scattered straight into the [T, N] output (no [T, E] or padded copy)."""

    NAME = "moe.grouped_matmul_combine"
    rows = Operand()
    perm = Operand()
    offsets = Operand()
    weight = Operand()
    gates = Operand()
    topk = Attr(A.INT)
    gather = Attr(A.BOOL, default=False)
    result = Result()
    epilogue = RegionField()

    def infer(self) -> list[TensorType]:
        _check_grouped(self, self.rows.type, [self.weight.type])
        g = self.gates.type
        if g.rank != 2 or not is_float(g.dtype) or not compatible(g.shape[1], self.topk):
            raise self.error(f"gates must be float [T, {self.topk}], got {g}")
        out = self.epilogue.block.terminator.operands[0].type
        return [TensorType(g.dtype, (g.shape[0], out.shape[1]))]

    def reference(self, ctx: Any, rows: np.ndarray, perm: np.ndarray, offsets: np.ndarray, weight: np.ndarray,
                  gates: np.ndarray) -> np.ndarray:
        flat_gates = gates.reshape(-1).astype(np.float64)
        y = np.zeros((gates.shape[0], _width(self, weight)), dtype=np.float64)
        for pos, rows_out in _grouped_rows(self, ctx, rows, perm, offsets, [weight]):
            ids = perm[pos]
            np.add.at(y, ids // self.topk, flat_gates[ids][:, None] * rows_out)
        return y

    def training_form(self, g: Any) -> list[Any] | None:
        """The expert rows as a grouped matmul, then the weighted combine as tensor ops (gather the gate, scale,
        scatter-add to the token), so a backward reads the rows (saved) for the gates' gradient instead of
        computing the last GEMM again. Not where the tokens are known only at run time (rows another rank sent):
        the sum has no shape to start from; nor where the epilogue keeps the product, whose gates' gradient the rule
        takes from the rows' own (`vjp`): the fused op then stays, and its product is neither saved nor made again."""
        if None in self.result.type.shape or _keeps_product(self.epilogue):
            return None
        (rows,), _ = g.inline(self.epilogue, _products(self, g, [self.weight]))
        tok, slot = _token_of(self, g)
        real = g.emit("tensor.cmp", self.perm, g.scalar(0, "i64"), pred="ge")
        gate = g.emit("tensor.expand_dims", g.mask(real, g.emit("tensor.gather", self.gates, [tok, slot])), axes=[1])
        weighted = g.mul(rows, gate)
        if not _keeps_product(self.epilogue):  # an epilogue's padding rows need not be zero (a bias)
            weighted = g.mask(g.emit("tensor.expand_dims", real, axes=[1]), weighted)
        return [g.emit("tensor.scatter_add", g.full(0.0, self.result.type), weighted, [tok])]

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """Each kept assignment's row gets gates[t, j] dY[t]; its gate gets <row @ W_e, dY[t]> (dropped
        assignments, not in perm, get nothing); then as a grouped matmul. Where the epilogue keeps the product
        (a SwiGLU expert's down projection), <row @ W_e, dY[t]> = <row, dY[t] @ W_e^T>: one grouped matmul of dY's
        rows through the transposed weights gives the gates' gradient and, scaled by the gate, the rows', and the
        product is not computed again (a forward GEMM fewer in the backward where residuals are recomputed)."""
        dy = dys[0]
        tok, slot = _token_of(self, g)
        real = g.emit("tensor.cmp", self.perm, g.scalar(0, "i64"), pred="ge")
        dy_rows = g.emit("tensor.gather", dy, [tok])
        gate = g.emit("tensor.expand_dims", g.mask(real, g.emit("tensor.gather", self.gates, [tok, slot])), axes=[1])
        d_out = g.mul(dy_rows, gate)
        if _keeps_product(self.epilogue):
            back = _through_transposed(self, g, self.weight, dy_rows)
            rows = g.emit("tensor.gather", self.rows, [tok]) if self.gather else self.rows
            dot = g.mask(real, g.sum(g.mul(rows, back), [1]))
            drows = g.mul(back, gate)
            if self.gather:  # each position's row back to its token (padding rows are zero)
                drows = g.emit("tensor.scatter_add", g.zeros_like(self.rows), drows, [tok])
            dw = g.emit("moe.grouped_weight_grad", self.rows, self.perm, self.offsets, d_out, topk=self.topk,
                        gather=self.gather)
        else:
            (z,) = _products(self, g, [self.weight])
            inlined = g.inline(self.epilogue, [z])
            dot = g.mask(real, g.sum(g.mul(inlined[0][0], dy_rows), [1]))
            (dz,) = g.region(self.epilogue, [z], [d_out], inlined)
            drows, (dw,) = _grouped_backward(self, g, [self.weight], [dz])
        dgates = g.emit("tensor.scatter_add", g.zeros_like(self.gates), dot, [tok, slot])
        return [drows, None, None, dw, dgates]

    def cost(self, args: Sequence[Any], outs: Sequence[Any]) -> Cost:
        return grouped_cost(self, args)


class GroupedWeightGradOp(Operation):
    """The weight gradient of a grouped matmul: dW[e] = rows_e^T @ dout_e over expert e's segment of `perm`
    (rows read through the permutation with `gather`, token perm[p] // topk; `dout` in permuted order);
    padding positions add nothing. One [K, N] block per expert: X_seg^T dY_seg, never a dense [T, E] form; with
    `transposed`, [N, K] blocks dY_seg^T X_seg (a weight stored [E, N, K], as PyTorch's are)."""

    NAME = "moe.grouped_weight_grad"
    rows = Operand()
    perm = Operand()
    offsets = Operand()
    dout = Operand()
    topk = Attr(A.INT)
    gather = Attr(A.BOOL, default=False)
    transposed = Attr(A.BOOL, default=False)
    result = Result()

    def infer(self) -> list[TensorType]:
        r, d, o = self.rows.type, self.dout.type, self.offsets.type
        if r.rank != 2 or d.rank != 2 or r.dtype != d.dtype or o.rank != 1:
            raise self.error(f"needs rows [P or T, K], dout [P, N] of one type and offsets [E+1], got {r}, {d}, {o}")
        experts = o.shape[0] - 1 if isinstance(o.shape[0], int) else None
        block = (d.shape[1], r.shape[1]) if self.transposed else (r.shape[1], d.shape[1])
        return [TensorType(r.dtype, (experts, *block))]

    def reference(self, ctx: Any, rows: np.ndarray, perm: np.ndarray, offsets: np.ndarray,
                  dout: np.ndarray) -> np.ndarray:
        out = np.zeros((len(offsets) - 1, rows.shape[1], dout.shape[1]), dtype=np.float64)
        for e in range(len(offsets) - 1):
            pos = np.arange(offsets[e], offsets[e + 1])
            pos = pos[perm[pos] >= 0]
            x = rows[perm[pos] // self.topk] if self.gather else rows[pos]
            out[e] = x.astype(np.float64).T @ dout[pos].astype(np.float64)
        return out.transpose(0, 2, 1) if self.transposed else out

    def cost(self, args: Sequence[Any], outs: Sequence[Any]) -> Cost:
        rows, perm, _, dout = args
        f = 2.0 * int((perm >= 0).sum()) * rows.shape[1] * dout.shape[1]
        return Cost(f, f, "X_seg^T dY_seg per expert")


# ---- derivatives: the backward reuses the dispatch (the same permutation and segments) -------------------------
def _products(op: Operation, g: Any, weights: list[Any]) -> list[Any]:
    """Each weight's rows @ W_e again, before the epilogue (a grouped matmul per weight, the product kept)."""
    rows = op.rows
    return [g.emit("moe.grouped_matmul", rows, op.perm, op.offsets, [w], regions=[g.identity(
        TensorType(rows.type.dtype, (None, w.type.shape[2])))], topk=op.topk, gather=op.gather) for w in weights]


def _keeps_product(epilogue: Any) -> bool:
    """An epilogue that yields its one argument as it is."""
    block = epilogue.block
    return len(block.args) == 1 and len(block.ops) == 1 and block.ops[0].operands == [block.args[0]]


def _token_of(op: Operation, g: Any) -> tuple[Any, Any]:
    """(token, slot) of each position of perm (padding reads assignment 0: its rows are zero)."""
    a = g.emit("tensor.maximum", op.perm, g.scalar(0, "i64"))
    k = g.scalar(op.topk, "i64")
    return g.emit("tensor.floordiv", a, k), g.emit("tensor.mod", a, k)


def _through_transposed(op: Operation, g: Any, w: Any, dz: Any) -> Any:
    """dz's rows (in perm order) @ W_e^T per expert segment, padding rows zero."""
    wt = g.emit("tensor.transpose", w, perm=[0, 2, 1])
    return g.emit("moe.grouped_matmul", dz, op.perm, op.offsets, [wt], regions=[g.identity(
        TensorType(dz.type.dtype, (None, w.type.shape[1])))], topk=op.topk, gather=False)


def _grouped_backward(op: Operation, g: Any, weights: list[Any], dzs: list[Any]) -> tuple[Any, list[Any]]:
    """From each product's cotangent (rows in perm order): the rows' cotangent (through the transposed weights,
    scattered back to tokens when the rows were gathered) and each weight's, X_seg^T dZ_seg per expert."""
    drows = None
    dws = []
    for w, dz in zip(weights, dzs, strict=True):
        if dz is None:
            dws.append(None)
            continue
        part = _through_transposed(op, g, w, dz)
        drows = part if drows is None else g.add(drows, part)
        dws.append(g.emit("moe.grouped_weight_grad", op.rows, op.perm, op.offsets, dz, topk=op.topk,
                          gather=op.gather))
    if drows is not None and op.gather:  # each position's row back to its token (padding rows are zero)
        tok, _ = _token_of(op, g)
        drows = g.emit("tensor.scatter_add", g.zeros_like(op.rows), drows, [tok])
    return drows, dws


def grouped_cost(op: Operation, args: Sequence[Any]) -> Cost:
    """A grouped matmul's FLOPs done (every row of the segments, padding included) against every token through
    every expert."""
    rows, perm, offsets = args[:3]
    weights = args[3:-1] if isinstance(op, GroupedMatmulCombineOp) else args[3:]
    kept = int((perm >= 0).sum())
    per_weight = [2.0 * w.shape[1] * w.shape[2] for w in weights]
    done = sum(len(perm) * f for f in per_weight)
    dense = sum(kept / op.topk * (len(offsets) - 1) * f for f in per_weight)
    fused = "gates * rows scattered into the output" if isinstance(op, GroupedMatmulCombineOp) else "epilogue fused"
    return Cost(dense, done, f"{len(weights)} weight(s), {len(perm) - kept} padding rows, {fused}")
