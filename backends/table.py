"""Lowerings found by op class: one table per backend (and per level of a backend), filled by a decorator
in the module of each dialect, looked up through the op class's bases (a rule for `UnaryOp`, or for the
`Elementwise` trait, serves every op that inherits it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sparsa.ir.core import Operation


class LoweringTable:
    """Rules by op class: `@table.lowers(moe.DispatchOp)` registers a function; `find(op)` returns the rule of
    the op's class or of its nearest base that has one."""

    def __init__(self, what: str):
        self.what = what
        self.rules: dict[type, Callable[..., Any]] = {}

    def lowers(self, *classes: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register the decorated function as the rule for each of `classes`."""

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            for cls in classes:
                if cls in self.rules:
                    raise TypeError(f"{self.what}: {cls.__name__} has two rules ({self.rules[cls].__name__}, "
                                    f"{fn.__name__})")
                self.rules[cls] = fn
            return fn

        return register

    def find(self, op: Operation | type) -> Callable[..., Any] | None:
        """The rule for op's class (or its nearest base with one), or None."""
        for cls in (op if isinstance(op, type) else type(op)).__mro__:
            rule = self.rules.get(cls)
            if rule is not None:
                return rule
        return None

    def __contains__(self, op: Operation | type) -> bool:
        return self.find(op) is not None
