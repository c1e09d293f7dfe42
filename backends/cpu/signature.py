"""What a cpu kernel is to the host: its function's name, the IR values it reads and writes in argument
order, and how the host splits its work; and the memref type an IR tensor type is passed as."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch_mlir import ir

from sparsa.backends.cpu import build as B
from sparsa.backends.cpu.lower import element_type
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


def memref_type(t: TensorType) -> ir.MemRefType:
    return ir.MemRefType.get([d if isinstance(d, int) else B.DYN() for d in t.shape], element_type(t.dtype))

