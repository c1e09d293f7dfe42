"""Element types, tensor types with symbolic dims and sparse layouts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsa.ir.dims import Dim, canonical, format_dim, same_shape

# IR spelling -> NumPy storage dtype. bf16 has no NumPy dtype: it is stored as float32
# and rounded to bf16 precision by the ops that produce it (see `round_to_dtype`).
_NUMPY_DTYPES: dict[str, np.dtype] = {
    "f32": np.dtype(np.float32),
    "f16": np.dtype(np.float16),
    "bf16": np.dtype(np.float32),
    "f64": np.dtype(np.float64),
    "i8": np.dtype(np.int8),
    "i32": np.dtype(np.int32),
    "i64": np.dtype(np.int64),
    "i1": np.dtype(np.bool_),
}
ELEMENT_TYPES: tuple[str, ...] = tuple(_NUMPY_DTYPES)
FLOAT_TYPES = frozenset({"f32", "f16", "bf16", "f64"})
INT_TYPES = frozenset({"i8", "i32", "i64"})
# Language spelling (`bool`) -> IR spelling (`i1`).
LANGUAGE_DTYPES = {"f32": "f32", "f16": "f16", "bf16": "bf16", "i32": "i32", "i64": "i64", "bool": "i1"}


def is_float(dtype: str) -> bool:
    """True for floating element types."""
    return dtype in FLOAT_TYPES


def is_int(dtype: str) -> bool:
    """True for integer element types (not i1)."""
    return dtype in INT_TYPES


def numpy_dtype(dtype: str) -> np.dtype:
    """NumPy storage dtype of an IR element type."""
    return _NUMPY_DTYPES[dtype]


def dtype_of_array(a: np.ndarray) -> str:
    """IR element type of a NumPy array (bf16 cannot be told from f32 and reads as f32)."""
    for name, dt in _NUMPY_DTYPES.items():
        if name != "bf16" and a.dtype == dt:
            return name
    raise TypeError(f"unsupported array dtype {a.dtype}")


def round_to_dtype(a: np.ndarray, dtype: str) -> np.ndarray:
    """Cast `a` to the storage of `dtype`, rounding to bf16 precision (nearest even) for bf16."""
    if dtype != "bf16":
        return np.asarray(a).astype(numpy_dtype(dtype), copy=False)
    bits = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def promote(a: str, b: str) -> str:
    """Result element type of a binary arithmetic op (NumPy-like, booleans only with booleans)."""
    if a == b:
        return a
    if is_float(a) and is_float(b):
        order = ["f16", "bf16", "f32", "f64"]
        if {a, b} == {"f16", "bf16"}:
            return "f32"
        return max(a, b, key=order.index)
    if is_float(a) and is_int(b):
        return a
    if is_int(a) and is_float(b):
        return b
    if is_int(a) and is_int(b):
        order = ["i8", "i32", "i64"]
        return max(a, b, key=order.index)
    raise TypeError(f"element types {a} and {b} do not mix")


@dataclass(frozen=True)
class Layout:
    """A sparse storage layout carried by a tensor type: `#bsr<32x32>` or `#nm<2:4>`."""

    kind: str  # "bsr" | "nm"
    params: tuple[int, int]

    def __str__(self) -> str:
        a, b = self.params
        return f"#bsr<{a}x{b}>" if self.kind == "bsr" else f"#nm<{a}:{b}>"


@dataclass(frozen=True)
class TensorType:
    """A ranked tensor type: element type, dims (int, symbolic name or None for `?`), optional layout."""

    dtype: str
    shape: tuple[Dim, ...] = ()
    layout: Layout | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _NUMPY_DTYPES:
            raise ValueError(f"unknown element type {self.dtype!r}")

    def __eq__(self, other: object) -> bool:
        """Equal element type, layout and dims, symbolic dims by value (`same_shape`: `s2*s1` is `s1*s2`)."""
        if not isinstance(other, TensorType):
            return NotImplemented
        return self.dtype == other.dtype and self.layout == other.layout and same_shape(self.shape, other.shape)

    def __hash__(self) -> int:
        return hash((self.dtype, tuple(canonical(d) if isinstance(d, str) else d for d in self.shape), self.layout))

    @property
    def rank(self) -> int:
        return len(self.shape)

    def with_shape(self, shape: tuple[Dim, ...]) -> TensorType:
        return TensorType(self.dtype, tuple(shape), None)

    def with_dtype(self, dtype: str) -> TensorType:
        return TensorType(dtype, self.shape, self.layout)

    def without_layout(self) -> TensorType:
        return TensorType(self.dtype, self.shape, None)

    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def __str__(self) -> str:
        dims = "".join(f"{format_dim(d)}x" for d in self.shape)
        layout = f", {self.layout}" if self.layout else ""
        return f"tensor<{dims}{self.dtype}{layout}>"


def scalar(dtype: str) -> TensorType:
    """A rank-0 tensor type."""
    return TensorType(dtype, ())


def show_type(t: TensorType) -> str:
    """A tensor type as the `.sp` language writes it (`f32[T, 512]`, `bool`, `i64[B*S]`): for messages
    to users of either frontend and of weights."""
    dtype = "bool" if t.dtype == "i1" else t.dtype
    if t.rank == 0:
        return dtype
    return f"{dtype}[{', '.join('?' if d is None else str(d) for d in t.shape)}]"
