"""The reference target: the NumPy interpreter of the IR, the oracle every pass and backend is checked against."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sparsa.backends.base import Backend, Executable
from sparsa.backends.reference.interpreter import Interpreter
from sparsa.ir.analysis import weight_only_ops
from sparsa.ir.core import Operation
from sparsa.passes.pipelines import sparse_pipeline


class ReferenceFunction(Executable):
    """A function run op by op with each op's NumPy semantics. `options["interpreter"]` may name a subclass of
    `Interpreter` (one that records what each op did, say); the last call's interpreter is `last`."""

    def __init__(self, func: Operation, interpreter: type[Interpreter] = Interpreter, exchange: Any = None):
        self.func = func
        self.interpreter = interpreter
        self.exchange = exchange
        self.stages: dict[str, str] = {}
        self.last: Interpreter | None = None
        self._weight_only: dict[frozenset[int], set[int]] = {}

    def __call__(self, inputs: Sequence[Any], weights: Mapping[str, Any] | None, cache: dict,
                 constant_args: frozenset[int] = frozenset()) -> list[Any]:
        if constant_args not in self._weight_only:
            self._weight_only[constant_args] = weight_only_ops(self.func, constant_args)
        self.last = self.interpreter(self.func, weights or {}, cache, self._weight_only[constant_args], self.exchange)
        return self.last.run(list(inputs))


class ReferenceBackend(Backend):
    """Interprets the IR with NumPy: every op is supported (its class carries its semantics)."""

    NAME = "reference"
    # The interpreter skips padding rows, so its expert segments need no alignment (block=1).
    PIPELINE = sparse_pipeline(block=1)

    def lowering(self, op: Operation) -> Any:
        return getattr(op, "reference", None)

    def compile(self, func: Operation, options: Mapping[str, Any] | None = None) -> ReferenceFunction:
        options = options or {}
        return ReferenceFunction(func, options.get("interpreter", Interpreter), options.get("exchange"))
