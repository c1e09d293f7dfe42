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
    # with "rows", for an elementwise kernel: each input's axis along the result's dim 1 (None: not cut), the host
    # cutting that dim instead where dim 0 is 1 (batch 1: [1, S, D] would be one part)
    rows_1: list[int | None] | None = None
    panels: list[int] = field(default_factory=list)  # inputs the host passes packed in panels (pack_panels)
    packed_rows: int = 0  # a grouped GEMM's rows come packed by register tiles of this many rows (pack_rows)
    one_part_below: bool = False  # split in parts, but one part below the split work (a copy: pack_rows)
    repacked: list[int] = field(default_factory=list)  # of those, the ones packed at each call (not weights)
    hosted: bool = False  # the native host asks its HOSTED rule what to run, though the Python host runs it as is
    # the op whose work the hosts' split counts, where not `op` (a matmul whose epilogue's last op is `op`); its
    # result is never made, and `op`'s result has its shape
    work_op: Operation | None = None


@dataclass(eq=False)
class Scratch:
    """A buffer of the native host's that is no IR value (K transposed for attention's kernel): its type, and its
    shape from the shapes of the values (by id) in one call. With `data`, its contents too, made once per set of
    shapes from them and the call's dims (a strided view's offset and strides for the kernel that copies it)."""

    type: TensorType
    shape: Callable[[dict[int, tuple[int, ...]], Any], tuple[int, ...]]  # (known shapes, the plan's context)
    name_hint: str = "scratch"
    data: Callable[[dict[int, tuple[int, ...]], Any], Any] | None = None
    cached: Any = None  # instead: the array the Python host keeps under this key in the call's cache (packed weights)
    alias: Value | None = None  # instead: this value's buffer under the Scratch's shape (x as 2-D rows)


@dataclass
class Hosted:
    """How the native host runs an op whose Python host does more than run its kernel (its LAUNCHES rule), as data
    the host program is generated from:
    - `before`: kernels run first (writing Scratch buffers, or the results of an op that has no kernel);
    - `checks`: index tensors checked before the kernel reads them: (index value, bounds(known shapes) -> (low,
      high)), every index in low..high-1;
    - `args`: the kernel's arguments, operands then results, where they are not its op's (Scratch buffers);
    - `zeroed`: Scratch arguments zeroed before the kernel; `items`: its work items (ctx -> count);
    - `sum_parts`: (a Scratch of [parts, *shape], the result it sums into) each, after the kernel;
    - `shapes`: the results' shapes (known, ctx) where they are not the op's semantics: `padded` ones longer
      (a dispatch's permutation at its bound: what reads them is at the bound too, see HostProgram._place)."""

    before: list[Kernel] = field(default_factory=list)
    checks: list[tuple[Value, Callable[[dict], tuple[int, int]]]] = field(default_factory=list)
    args: list[Any] | None = None
    zeroed: list[Scratch] = field(default_factory=list)
    items: Callable[[Any], int] | None = None
    sum_parts: list[tuple[Scratch, Value]] = field(default_factory=list)
    shapes: Callable[[dict, Any], list[tuple[int, ...]]] | None = None
    padded: list[Value] = field(default_factory=list)
    virtual: bool = False  # the results are never made: other ops' rules read through them (a packed transpose)
    instead: bool = False  # the kernels of `before` compute the results; the op's own kernel is not run
