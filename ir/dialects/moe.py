"""`moe` dialect: mixture-of-experts routing of tokens through an expert-body region."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sparsa.ir import attrs as A
from sparsa.ir.core import Attr, Operand, Operation, RegionField, Result
from sparsa.ir.dims import compatible
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


class MoeOp(Operation):
    """y[t] = sum_j gates[t, j] * body(idx[t, j], x[t]), with at most ceil(capacity*T*K/E) tokens per expert."""

    NAME = "moe.moe"
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
