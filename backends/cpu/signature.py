"""What a cpu kernel is to the host: its function's name, the IR values it reads and writes in argument
order, and how the host splits its work."""

from __future__ import annotations

from dataclasses import dataclass, field

from sparsa.ir.core import Operation, Value


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
