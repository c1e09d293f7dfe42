"""The backend contract, and the registry that `sparsa.compile`, the torch backend and the command line read.

A backend declares its name, its default pipeline, what it supports (`supports(op)`: None, or why not), its
ordered named stages (what `--emit` and `CompiledModel.stage` offer) and `compile(func, options)`, which
returns an `Executable`: one calling convention for every target.

Targets are chosen by name; `auto` is the first of `AUTO_ORDER` that can run here (`triton` with an NVIDIA
GPU, else `cpu`, else `reference` with a warning that says why).
"""

from __future__ import annotations

import importlib
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from sparsa.ir.analysis import weight_only_ops
from sparsa.ir.core import Module, Operation
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.traits import Composite

# name -> backend class; filled by `Backend.__init_subclass__` when a backend's module is imported
REGISTRY: dict[str, type[Backend]] = {}
# the modules that define the backends (each light to import: heavy dependencies load at compile time)
MODULES = ("sparsa.backends.reference.backend", "sparsa.backends.cpu.backend", "sparsa.backends.triton.backend")
AUTO = "auto"
AUTO_ORDER = ("triton", "cpu", "reference")


class UnsupportedOp(SparsaError):
    """An op the chosen backend cannot lower: names the op, the backend and the op's source line."""


class Executable(ABC):
    """A function compiled by a backend. `stages` holds the text of each of the backend's stages."""

    stages: dict[str, str]

    @abstractmethod
    def __call__(self, inputs: Sequence[Any], weights: Mapping[str, Any] | None, cache: dict,
                 constant_args: frozenset[int] = frozenset()) -> list[Any]:
        """Run on `inputs` (in order) with named `weights`; a list of results (`Backend.OUTPUTS` says their kind).
        `cache` holds what depends only on the weights (and on `constant_args`, inputs the caller keeps the same
        while it keeps the cache: a torch model's parameters) between calls."""

    def binary(self, stage: str) -> bytes:
        """A stage that is bytes, not text (the backend's BINARY_STAGES: cpu's "obj")."""
        raise SparsaError(f"no binary stage '{stage}' here")

    def reset(self) -> None:  # noqa: B027 (optional: most executables prepare nothing of their own)
        """Forget anything prepared from the weights (new weights were loaded)."""


class Backend(ABC):
    """A target: its name, default pipeline, stages, what it supports, and how it compiles a function."""

    NAME: ClassVar[str] = ""
    PIPELINE: ClassVar[str] = ""
    STAGES: ClassVar[tuple[str, ...]] = ()  # in order; their text is kept by the executable
    EMIT_ALIASES: ClassVar[dict[str, str]] = {}  # other names `--emit` accepts for a stage
    STAGE_SUFFIX: ClassVar[str] = "txt"  # of a stage's file in a dump folder
    BINARY_STAGES: ClassVar[tuple[str, ...]] = ()  # stages that are bytes (`--emit` them with -o FILE)
    OUTPUTS: ClassVar[str] = "numpy"  # what an executable returns: "numpy" arrays or "torch" tensors
    INPUTS: ClassVar[str] = "numpy"  # what it takes: "numpy" arrays, or "any" (torch tensors or arrays)
    DEVICES: ClassVar[tuple[str, ...]] = ("cpu",)  # torch devices whose tensors it runs on (the torch backend)
    # whether `compile` specializes on options["constant_args"] (so the torch backend compiles at a partition's
    # first call, knowing which inputs are parameters)
    SPECIALIZES_ON_CONSTANTS: ClassVar[bool] = False
    ERROR: ClassVar[type[SparsaError] | None] = None  # raised for an op it cannot lower (default UnsupportedOp)
    # passes the backend runs on whatever function it is given (a user's pipeline may leave them out)
    LEGALIZE: ClassVar[str] = ""
    # what `NAME:<variant>` names, for a backend that takes one (cpu: the machine to compile for); "" : none
    VARIANT: ClassVar[str] = ""

    def __init__(self, variant: str | None = None):
        if variant is not None and not self.VARIANT:
            raise SparsaError(f"target '{self.NAME}' takes no ':' suffix, got '{self.NAME}:{variant}'")
        self.variant = variant

    @property
    def label(self) -> str:
        """The name it was asked for: `cpu` or `cpu:x86-64-v3`."""
        return self.NAME if self.variant is None else f"{self.NAME}:{self.variant}"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.NAME:
            REGISTRY[cls.NAME] = cls

    def unavailable(self) -> str | None:
        """Why this backend cannot run on this machine (None: it can)."""
        return None

    def cannot_run(self) -> str | None:
        """Why what this backend compiles is for another machine (cpu:aarch64 on x86-64 compiles ahead of
        time only), or None. (A backend `unavailable` by default may still run by name: triton's interpreter.)"""
        return None

    @abstractmethod
    def lowering(self, op: Operation) -> Any:
        """The rule that lowers `op` here, or None."""

    def supports(self, op: Operation) -> str | None:
        """None when this backend lowers `op`; otherwise the reason it cannot."""
        if isinstance(op, Composite):
            return f"run the {op.LOWERED_BY} passes first"
        if self.lowering(op) is None:
            return "it has no lowering for it"
        return None

    def check(self, func: Operation) -> None:
        """UnsupportedOp for the first op of `func` this backend cannot lower (naming it and its line)."""
        prepared = weight_only_ops(func)  # run once per weight load, by the reference semantics
        for op in func.regions[0].block.ops:
            if op.TERMINATOR or id(op) in prepared:
                continue
            reason = self.supports(op)
            if reason is not None:
                error = self.ERROR or UnsupportedOp
                raise error(f"'{op.NAME}' is not supported by the {self.NAME} backend ({reason})", op.loc)

    def legalize(self, func: Operation) -> None:
        """Run the LEGALIZE passes on `func`, in place."""
        if self.LEGALIZE:
            from sparsa.passes import PassManager

            PassManager(self.LEGALIZE).run(Module([func]))

    @abstractmethod
    def compile(self, func: Operation, options: Mapping[str, Any] | None = None) -> Executable:
        """`func` (after this backend's pipeline) as an executable."""

    def graphs(self, executable: Executable) -> Any:
        """`executable` replayed from captured device graphs (CUDA graphs), or None where the backend has none."""
        return None

    def stage_name(self, name: str) -> str:
        """A stage's name from what `--emit` accepts."""
        return self.EMIT_ALIASES.get(name, name)


def devices(name: str) -> tuple[str, ...]:
    """The torch devices target `name` runs on (`auto`: any registered target's)."""
    _load()
    if name != AUTO:
        return get(name).DEVICES
    return tuple(dict.fromkeys(d for cls in REGISTRY.values() for d in cls.DEVICES))


def _load() -> None:
    for module in MODULES:
        importlib.import_module(module)


def names() -> tuple[str, ...]:
    """Every registered backend's name."""
    _load()
    return tuple(REGISTRY)


def variant_names() -> list[str]:
    """`NAME:<variant>` for each backend that takes a variant (cpu:<cpu>)."""
    _load()
    return [f"{n}:<{c.VARIANT}>" for n, c in REGISTRY.items() if c.VARIANT]


def get(name: str) -> Backend:
    """The backend called `name` (`auto`: the best that can run here), or a SparsaError listing the names."""
    _load()
    if name == AUTO:
        return choose()
    base, colon, variant = name.partition(":")
    if base not in REGISTRY:
        raise SparsaError(f"unknown target '{name}' (available: {', '.join((AUTO, *REGISTRY, *variant_names()))})")
    return REGISTRY[base](variant if colon else None)


def choose(order: Sequence[str] = AUTO_ORDER) -> Backend:
    """The first backend of `order` that can run here; falling back to the reference interpreter is said once,
    with the reasons the others cannot run."""
    _load()
    reasons = []
    for name in order:
        backend = REGISTRY[name]()
        why = backend.unavailable()
        if why is None:
            if name == "reference" and reasons:
                warnings.warn(f"target 'auto' runs the reference interpreter (NumPy, slow): {'; '.join(reasons)}",
                              RuntimeWarning, stacklevel=3)
            return backend
        reasons.append(f"{name}: {why}")
    raise SparsaError(f"no target can run here ({'; '.join(reasons)})")
