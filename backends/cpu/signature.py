"""What a cpu kernel is to the host: its function's name, the IR values it reads and writes in argument
order, and how the host splits its work."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sparsa.ir.core import Operation, Value
from sparsa.ir.types import TensorType


@dataclass
class Kernel:
    """One op's function: the IR values it reads and writes, in argument order, and how it splits."""

    name: str
    op: Operation
    inputs: list[Value]
    outputs: list[Value]
    split: str = "none"  # "none", "parts" (takes part, parts) or "rows" (the host cuts dim 0)
    rows: list[bool] = field(default_factory=list)  # with "rows": which inputs are cut
    panels: list[int] = field(default_factory=list)  # inputs the host passes packed in panels (pack_panels)
    repacked: list[int] = field(default_factory=list)  # of those, the ones packed at each call (not weights)


@dataclass(eq=False)
class Scratch:
    """A buffer of the native host's that is no IR value (K transposed for attention's kernel): its type, and its
    shape from the shapes of the values (by id) in one call. With `data`, its contents too, made once per set of
    shapes from them and the call's dims (a strided view's offset and strides for the kernel that copies it)."""

    type: TensorType
    shape: Callable[[dict[int, tuple[int, ...]]], tuple[int, ...]]
    name_hint: str = "scratch"
    data: Callable[[dict[int, tuple[int, ...]], Any], Any] | None = None


@dataclass
class Hosted:
    """How the native host runs an op whose Python host does more than run its kernel (its LAUNCHES rule): kernels
    run first (`before`, writing Scratch buffers), index tensors checked against a value's dims before the kernel
    reads them (`checks`: index value, indexed value, axis), and kernel arguments (by position, operands then
    results) replaced by Scratch buffers (`args`)."""

    before: list[Kernel] = field(default_factory=list)
    checks: list[tuple[Value, Value, int]] = field(default_factory=list)
    args: dict[int, Any] = field(default_factory=dict)
