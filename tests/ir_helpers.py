"""Helpers for tests: build a one-op function from NumPy inputs, round-trip it, run it on the reference."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sparsa.backends.reference import run_function
from sparsa.ir import (
    OP_REGISTRY,
    Block,
    Module,
    Region,
    TensorType,
    parse_module,
    print_module,
    verify_module,
)
from sparsa.ir.dialects.func import FuncOp, ReturnOp, YieldOp
from sparsa.ir.types import dtype_of_array


def type_of(a: np.ndarray) -> TensorType:
    return TensorType(dtype_of_array(np.asarray(a)), tuple(np.shape(a)))


def make_func(name: str, arg_types: Sequence[TensorType], body: Callable[[Block, list], list],
              arg_names: Sequence[str] | None = None) -> Module:
    """A module with one function whose body `body(block, args)` builds and returns the results."""
    block = Block(arg_types, arg_names or [f"a{i}" for i in range(len(arg_types))])
    results = body(block, block.args)
    block.append(ReturnOp.build(results))
    func = FuncOp([], [], {"sym_name": name, "result_types": tuple(r.type for r in results)}, [Region([block])])
    return Module([func])


def region(arg_types: Sequence[TensorType], body: Callable[[Block, list], list]) -> Region:
    """A single-block region ending in func.yield of what `body` returns."""
    block = Block(arg_types)
    block.append(YieldOp.build(body(block, block.args)))
    return Region([block])


def roundtrip(module: Module) -> Module:
    """Verify, print, parse, print again: the texts must be identical; returns the parsed module."""
    verify_module(module)
    text = print_module(module)
    parsed = parse_module(text)
    verify_module(parsed)
    assert print_module(parsed) == text, f"round trip changed the text:\n{text}\n---\n{print_module(parsed)}"
    return parsed


def run_op(name: str, inputs: Sequence[np.ndarray], attrs: dict[str, Any] | None = None,
           result_types: Sequence[TensorType] | None = None, regions: Sequence[Region] | None = None,
           exchange: Any = None) -> list:
    """Build `name` on function arguments typed like `inputs`, round-trip it, run it on the reference (with
    `exchange`, the process group of an expert-parallel op)."""
    cls = OP_REGISTRY[name]

    def body(block: Block, args: list) -> list:
        kwargs = dict(attrs or {})
        op = cls.build(*args, result_types=result_types, regions=list(regions or []), **kwargs)
        block.append(op)
        return op.results

    module = roundtrip(make_func("f", [type_of(x) for x in inputs], body))
    return run_function(module, list(inputs), exchange=exchange)
