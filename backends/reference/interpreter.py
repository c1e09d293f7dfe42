"""Interprets a verified module op by op with each op's NumPy reference semantics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sparsa.ir.analysis import RuntimeShapeError, bind_names, bind_shape, check_int_range, weight_only_ops
from sparsa.ir.core import Module, Operation, Region, Value
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dims import Dim, evaluate, format_dim
from sparsa.ir.types import TensorType, dtype_of_array, numpy_dtype, round_to_dtype


class Interpreter:
    """Runs one function: binds symbolic dims from the inputs, then evaluates ops in order.

    With a `cache` (kept by the caller between calls with the same weights), ops that read only weights
    run once and their results are reused.
    """

    def __init__(self, func: Operation, params: Mapping[str, np.ndarray] | None = None,
                 cache: dict[int, tuple[np.ndarray, ...]] | None = None, weight_only: set[int] | None = None,
                 exchange: Any = None):
        """`exchange`: the process group the expert-parallel ops (moe_exchange) exchange rows over."""
        self.func = func
        self.exchange = exchange
        self.params = params or {}
        self.dims: dict[str, int] = {}
        self.values: dict[int, np.ndarray] = {}
        self.cache = cache
        # Callers that run one function many times pass `weight_only_ops(func)`, computed once.
        if cache is None:
            self.weight_only: set[int] = set()
        else:
            self.weight_only = weight_only if weight_only is not None else weight_only_ops(func)

    # ---- the context the ops' reference() methods see ----------------------------------------------
    def dim(self, d: Dim) -> int:
        """Value of one dim of the current call."""
        try:
            return evaluate(d, self.dims)
        except KeyError as e:
            raise RuntimeShapeError(f"dim {format_dim(d)} is not bound by the inputs ({e.args[0]} unknown)") from None

    def shape_of(self, t: TensorType) -> tuple[int, ...]:
        """Concrete shape of a type in the current call."""
        return tuple(self.dim(d) for d in t.shape)

    def lookup(self, value: Value) -> np.ndarray | None:
        """The array a value holds in the current call (None if not computed yet)."""
        return self.values.get(id(value))

    def run_region(self, region: Region, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Evaluate a single-block region on `args` (arrays may be batched: ops broadcast)."""
        block = region.block
        for a, v in zip(block.args, args, strict=True):
            self.values[id(a)] = np.asarray(v)
        return self._run_block(block.ops)

    # ---- driving ----------------------------------------------------------------------------------
    def bind(self, value: Value, array: np.ndarray, what: str) -> np.ndarray:
        """Check `array` against `value`'s type, binding symbolic dims; returns it in storage dtype."""
        t = value.type
        array = np.asarray(array)
        bind_shape(t, array.shape, self.dims, what)
        if array.dtype.kind != numpy_dtype(t.dtype).kind and not (t.dtype == "i1" and array.dtype == bool):
            raise RuntimeShapeError(f"{what} must have element type {t.dtype}, got {dtype_of_array(array)}")
        if array.dtype.kind == "i" and array.size and array.dtype.itemsize > numpy_dtype(t.dtype).itemsize:
            check_int_range(int(array.min()), int(array.max()), t.dtype, what)
        return round_to_dtype(array, t.dtype)

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Evaluate the function on positional inputs and return its results."""
        block = self.func.regions[0].block
        if len(inputs) != len(block.args):
            raise RuntimeShapeError(f"@{self.func.attributes['sym_name']} takes {len(block.args)} inputs, "
                                    f"got {len(inputs)}")
        bind_names([(a.type, np.shape(x)) for a, x in zip(block.args, inputs, strict=True)], self.dims)
        for a, x in zip(block.args, inputs, strict=True):
            self.values[id(a)] = self.bind(a, x, f"input '{a.name_hint or a.index}'")
        with np.errstate(all="ignore"):
            return self._run_block(block.ops)

    def _run_block(self, ops: list[Operation]) -> list[np.ndarray]:
        top = ops is self.func.regions[0].block.ops  # a region's ops may run on batched arrays
        for op in ops:
            if op.TERMINATOR:
                return [self.values[id(v)] for v in op.operands]
            self._run_op(op)
            if top:
                self.check(op)
        return []

    def check(self, op: Operation) -> None:
        """What a function's op promised in its types, checked in this call: each result's shape fits its type
        (binding a symbol it first names), and no operand dim of unknown size (?) broadcast."""
        for i, r in enumerate(op.results):
            a = self.values.get(id(r))
            if a is not None:
                try:
                    bind_shape(r.type, np.shape(a), self.dims, f"result {i} of '{op.NAME}'")
                except RuntimeShapeError as e:
                    raise RuntimeShapeError(e.message, op.loc) from None
        unknown = getattr(op, "check_unknown_dims", None)
        arrays = [self.values.get(id(v)) for v in [*op.operands, op.results[0]]] if unknown else []
        if arrays and all(a is not None for a in arrays):  # (not where a kernel computed it inside a fused chain)
            unknown([np.shape(a) for a in arrays[:-1]], np.shape(arrays[-1]))

    def precompute(self) -> None:
        """Run the weight-only ops now (at weight-load time), filling the cache."""
        with np.errstate(all="ignore"):
            for op in self.func.regions[0].block.ops:
                if id(op) in self.weight_only:
                    self._run_op(op)

    def _run_op(self, op: Operation) -> None:
        if id(op) in self.weight_only:
            cached = self.cache.get(id(op))
            if cached is None:
                self._compute(op)
                self.cache[id(op)] = tuple(self.values[id(r)] for r in op.results)
            else:
                for r, v in zip(op.results, cached, strict=True):
                    self.values[id(r)] = v
            return
        self._compute(op)

    def _compute(self, op: Operation) -> None:
        if op.NAME == "func.param":
            name = op.attributes["name"]
            if name not in self.params:
                raise RuntimeShapeError(f"missing weight '{name}' ({op.result.type})", op.loc)
            self.values[id(op.result)] = self.bind(op.result, self.params[name], f"weight '{name}'")
            return
        args = [self.values[id(v)] for v in op.operands]
        try:
            out = op.reference(self, *args)
        except SparsaError:
            raise
        except (ValueError, IndexError) as e:
            if hasattr(op, "check_unknown_dims") and None not in op.results[0].type.shape and \
                    all(np.ndim(a) == v.type.rank for a, v in zip(args, op.operands, strict=True)):
                op.check_unknown_dims([np.shape(a) for a in args], self.shape_of(op.results[0].type))  # which dim
            raise SparsaError(f"'{op.NAME}' failed at run time: {e}", op.loc) from None
        outs = out if isinstance(out, tuple) else (out,)
        for v, o in zip(op.results, outs, strict=True):
            self.values[id(v)] = round_to_dtype(np.asarray(o), v.type.dtype)


def run_function(module: Module, inputs: Sequence[np.ndarray], params: Mapping[str, Any] | None = None,
                 func: str | None = None, cache: dict | None = None, exchange: Any = None) -> list[np.ndarray]:
    """Run `func` (default: the last function) of `module` on NumPy inputs with named weights.

    Pass the same `cache` dict on every call with the same weights to compute weight-only ops once; `exchange`
    is the process group of expert-parallel ops.
    """
    f = module.lookup(func) if func else module.funcs[-1]
    return Interpreter(f, params, cache, exchange=exchange).run(inputs)
