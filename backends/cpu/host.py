"""The native host of a cpu function: one LLVM function, `sparsa_main`, that runs the kernels in order on
buffers laid out in one workspace, splits them over a persistent OpenMP team (libgomp's `GOMP_parallel`) and
writes the results into the caller's arrays. Python crosses into native code once per call.

The calling convention is one int64 array, `argv`:

    argv[0]  threads          the team size the plan was made for
    argv[1]  pool             the address of GOMP_parallel (0: no OpenMP runtime, every region on one thread)
    argv[2]  workspace        a 64-byte aligned buffer of the plan's `workspace` bytes
    argv[3]  status           0, or 1 + the index of the kernel whose index tensors failed their check (the call
                              is then run again on the Python host, for its error)
    argv[4:] pointers         each input, then each weight or weight-only result the kernels read, then each output
    ...      the plan         every value's dims and strides, each temporary's offset in the workspace, each
                              split kernel's work items, team and row bounds, each index check's count and
                              bound, each copied output's bytes
    ...      profile          with SPARSA_PROFILE=1: nanoseconds spent in each launch, added at each call (the
                              caller reads and clears them)

Everything that depends on the shapes of a call (the `Plan`) is worked out in Python once per set of input
shapes, from the IR's types and each op's `result_shapes`; the native code only loads it. Functions with an op
whose host side is still Python (a `LAUNCHES` rule without a `HOSTED` one, a host op that is not a view) keep
the Python host; `HostProgram.why_not` says which op."""

from __future__ import annotations

import ctypes
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from sparsa.backends.cpu.context import HOSTED, LAUNCHES, KernelContext
from sparsa.backends.cpu.moe_pack import panels_scratch
from sparsa.backends.cpu.signature import Hosted, Kernel, Scratch
from sparsa.backends.cpu.threads import NATIVE_SPLIT_WORK, one_part_below, row_bounds, work
from sparsa.ir.analysis import Sizes, bind_names, bind_shape
from sparsa.ir.core import Operation, Value
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.types import numpy_dtype

HEADER = 4  # threads, pool, workspace, status
WORKSPACE, STATUS = 2, 3  # their argv slots
ALIGN = 64  # bytes: every temporary starts on a cache line
VIEWS = (S.ReshapeOp, S.ExpandDimsOp, S.SqueezeOp)  # the same contiguous buffer under other dims


@dataclasses.dataclass
class Place:
    """Where a value lives in a call: its address (an argv pointer slot, a workspace offset slot, or another
    value's for a view) and the argv slots of its dims and strides."""

    value: Value
    # "arg" (argv[ptr] is its address, set at each call), "temp" (workspace + argv[ptr]), "view" (of `source`) or
    # "planned" (argv[ptr] is its address, an array the plan computed: a block map of the call's sizes)
    kind: str
    ptr: int
    dims: int = 0  # argv slot of dim 0; its strides follow its dims
    source: Value | None = None

    @property
    def rank(self) -> int:
        return self.value.type.rank

    @property
    def itemsize(self) -> int:
        return numpy_dtype(self.value.type.dtype).itemsize


@dataclasses.dataclass
class Launch:
    """A kernel in the program, on `args` (its operands then results: IR values or Scratch buffers): split ones
    run in a region function over the work items read from argv[slot] (team argv[slot + 1], row bounds from
    argv[argv[slot + 2]]); `checks` are index tensors checked first (index value, indexed value, axis, the argv
    slot of their element count and of the axis's size after it)."""

    kernel: Kernel
    args: list[Any]
    checks: list[tuple[Value, Any, int]] = dataclasses.field(default_factory=list)
    zeroed: list[Scratch] = dataclasses.field(default_factory=list)
    items: Any = None
    sum_parts: list[tuple[Scratch, Value]] = dataclasses.field(default_factory=list)
    slot: int = 0
    sum_slot: int = 0  # argv[sum_slot + 2 i] parts, argv[sum_slot + 2 i + 1] elements of each, for sum_parts[i]


@dataclasses.dataclass
class Plan:
    """What one set of input shapes needs: argv past the pointers, the outputs' shapes and dtypes, the
    workspace's bytes."""

    tail: list[int]
    outputs: list[tuple[tuple[int, ...], np.dtype]]
    workspace: int
    arrays: list[np.ndarray]  # what the "planned" places' addresses point to


class _Shapes(Sizes):
    """The context `result_shapes` reads: the dims the signature binds, and the team the plan is for."""

    def __init__(self, dims: dict[str, int], threads: int = 1, exact: bool = False):
        super().__init__(dims)
        self.threads = threads  # the team the plan is for
        self.exact = exact  # SPARSA_DETERMINISTIC=1


def address(a: np.ndarray) -> int:
    """The address of an array's first element (a third of the time of `a.ctypes.data`, for writable arrays)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    except (TypeError, ValueError):  # read-only, or empty
        return a.ctypes.data


def _panels_only(k: Kernel) -> Hosted:
    """A kernel whose host side differs only in its fixed inputs taken in panels (a dense matmul's `.sp` param or
    frozen weight): those as the Python host packed them (kept in the call's cache), the rest as they are."""
    args: list[Any] = [*k.inputs, *k.outputs]
    for i in k.panels:
        args[i] = panels_scratch(k.inputs[i])
    return Hosted(args=args)


def _stand_in(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An array of `shape` with no data (stride 0): what `result_shapes` reads is shapes and dtypes."""
    return np.broadcast_to(np.zeros((), dtype), shape)


class HostProgram:
    """The host of one function as native code (`text`: LLVM dialect, kept as the `host` stage), the argv
    layout its calls fill, and `plan()` for a set of shapes. `why_not` is set instead when an op's host side
    is still Python."""

    def __init__(self, func_op: Operation, kernels: dict[int, Kernel], weight_only: set[int], cx: KernelContext,
                 refused: str | None = None, profile: bool = False):
        """`cx`: the context the kernels were built in (the HOSTED rules add kernels of their own to it);
        `refused`: why the function keeps the Python host whatever its ops (the caller's reason); `profile`:
        time each launch (argv's profile slots, from `profile_slot`)."""
        block = func_op.regions[0].block
        self.func_op = func_op
        self.profile_slot: int | None = profile  # (made a slot number by _layout)
        self.why_not: str | None = refused
        self.inputs = list(block.args)
        self.dtypes = [numpy_dtype(a.type.dtype) for a in self.inputs]
        self.returns = list(block.ops[-1].operands)
        self.places: dict[int, Place] = {}
        self.cx = cx
        self.launches: list[Launch] = []
        self.copies: list[tuple[int, Value, int]] = []  # (output index, value, argv slot of its bytes)
        self.zeroed: dict[int, int] = {}  # a Scratch zeroed before its kernel -> the argv slot of its bytes
        self.shapes: dict[int, Any] = {}  # op -> its HOSTED rule's result shapes
        self.ops = [op for op in block.ops[:-1] if id(op) not in weight_only]
        produced = {id(r): op for op in block.ops[:-1] if id(op) in weight_only for r in op.results}
        # what the kernels read from the call's cache: (cache key, index in its tuple, value or Scratch) - the
        # weight-only results by their op, weights packed by the Python host by their keys
        self.fixed: list[tuple[Any, int, Any]] = []
        for op in self.ops:
            for v in (v for inner in op.walk() for v in inner.operands):  # its regions' outer values too
                self._fix(produced, v)
        for v in self.returns:
            self._fix(produced, v)
        for v in self.inputs + [v for _, _, v in self.fixed]:
            self.places[id(v)] = Place(v, "arg", 0)
        self.padded: set[int] = set()  # values longer than their semantics (perm at its bound): MoE ops read them
        self.unmade: dict[int, str] = {}  # values of ops only the Python host runs -> why (an error if read)
        direct = {}  # a kernel's result returned: written straight into the output (its index)
        for i, v in enumerate(self.returns):
            if id(v) not in self.places and id(v) not in direct:
                direct[id(v)] = i
        for op in self.ops:
            if self.why_not:
                break
            self.why_not = self._place(op, kernels.get(id(op)), direct)
        # a saved forward's residuals may keep a dispatch's length at its bound: the backward reads them (as
        # the native host made them, or the Python host, whose ops take them as they take padding), nobody else
        residuals = func_op.attributes.get("residuals") == "saved"
        if not self.why_not and any((id(v) in self.padded and not residuals) or self.places[id(v)].kind == "virtual"
                                    for v in self.returns if id(v) in self.places):
            self.why_not = "it returns a value of a MoE dispatch's length or a transpose only packed weights read"
        if not self.why_not:
            self.why_not = next((self.unmade[id(v)] for v in self.returns if id(v) in self.unmade), None)
        if self.why_not:
            return
        self._layout()
        from sparsa.backends.cpu.host_text import program_text

        self.text = program_text(self)

    def _layout(self) -> None:
        """argv's slots: the pointers (inputs, cached arrays, outputs), then the plan's (dims and strides, split
        kernels, index checks, zeroed buffers, sums of parts, copied outputs, workspace offsets and planned
        arrays); the row bounds follow at `size`."""
        slot = HEADER
        for v in self.inputs + [v for _, _, v in self.fixed]:
            self.places[id(v)].ptr, slot = slot, slot + 1
        self.out_slots = list(range(slot, slot + len(self.returns)))
        self.pointers = slot + len(self.returns) - HEADER  # pointer slots after the header
        for place in self.places.values():
            if place.kind == "out":
                place.kind, place.ptr = "arg", self.out_slots[place.ptr]
        self.tail = slot = slot + len(self.returns)
        for place in self.places.values():
            place.dims, slot = slot, slot + 2 * place.rank
        for launch in self.launches:
            if launch.kernel.split != "none":
                launch.slot, slot = slot, slot + 4
            for i, (index, bounds, _) in enumerate(launch.checks):
                launch.checks[i], slot = (index, bounds, slot), slot + 3
            for zero in launch.zeroed:
                self.zeroed.setdefault(id(zero), slot)
                slot += 1 if self.zeroed[id(zero)] == slot else 0
            if launch.sum_parts:
                launch.sum_slot, slot = slot, slot + 2 * len(launch.sum_parts)
        for i, v in enumerate(self.returns):
            place = self.places[id(v)]
            if not (place.kind == "arg" and place.ptr == self.out_slots[i]):
                self.copies.append((i, v, slot))
                slot += 1
        if self.profile_slot:
            self.profile_slot, slot = slot, slot + len(self.launches)
        else:
            self.profile_slot = None
        self.temp = slot  # workspace offsets, one per temporary; addresses of planned arrays
        for place in self.places.values():
            if place.kind in ("temp", "planned"):
                place.ptr, slot = slot, slot + 1
        self.size = slot  # argv's length before the row bounds
        self.lifetimes = self._lifetimes()

    def _lifetimes(self) -> dict[int, tuple[int, int]]:
        """Each temporary's first and last launch (a view's reads count as its source's; what is copied out
        lives to the end): temporaries whose lifetimes do not meet may share workspace bytes."""
        live: dict[int, tuple[int, int]] = {}

        def use(v: Any, i: int) -> None:
            place = self.places.get(id(v))
            if place is None:
                return
            if place.kind == "view":
                use(place.source, i)
            elif place.kind == "temp":
                first, _ = live.get(id(v), (i, i))
                live[id(v)] = (first, i)

        end = len(self.launches)
        for i, launch in enumerate(self.launches):
            for v in [*launch.args, *[c[0] for c in launch.checks], *launch.zeroed,
                      *[v for pair in launch.sum_parts for v in pair]]:
                use(v, i)
        for _, v, _ in self.copies:
            use(v, end)
        return live

    def _fix(self, produced: dict[int, Operation], v: Value) -> None:
        op = produced.get(id(v))
        if op is not None and all(f[2] is not v for f in self.fixed):
            self.fixed.append((id(op), op.results.index(v), v))

    def _place(self, op: Operation, k: Kernel | None, direct: dict[int, int]) -> str | None:
        """Give op's results their places (None), or say why the function keeps the Python host. What reads a
        value at a dispatch's bound and has a length known only at run time is at that bound too: its rows past
        offsets[E] are padding, as the segments' own padding rows are (the grouped GEMMs zero them, perm is -1
        there), and the IR the MoE rules make never lets padding rows count (they are masked, zero or skipped)."""
        why = self._place_op(op, k, direct)
        if why is None and any(id(v) in self.padded for v in op.operands):
            self.padded.update(id(r) for r in op.results if None in r.type.shape)
        return why

    def _place_op(self, op: Operation, k: Kernel | None, direct: dict[int, int]) -> str | None:
        if k is None:
            if op.per_shape() and not op.operands and len(op.results) == 1:  # returned: copied out
                self.places[id(op.result)] = Place(op.result, "planned", 0)
                return None
            if isinstance(op, VIEWS) and id(op.operands[0]) not in self.unmade:
                self.places[id(op.result)] = Place(op.result, "view", 0, source=self._base(op.operands[0]))
                return None
        hosted = Hosted()
        if k is None or LAUNCHES.find(op) is not None or k.panels or k.hosted:
            rule = HOSTED.find(op)
            if rule is None and k is None:  # fine while no kernel reads its results (a decode reads no block map)
                self.unmade.update({id(r): f"'{op.NAME}' runs on the Python host" for r in op.results})
                return None
            hosted = rule(self.cx, op, k) if rule is not None else _panels_only(k) \
                if k.panels and not k.hosted and LAUNCHES.find(op) is None else \
                f"the host side of '{op.NAME}' is still Python (its LAUNCHES rule)"
            if isinstance(hosted, str):
                return hosted
        if hosted.virtual:
            for r in op.results:
                self.places[id(r)] = Place(r, "virtual", 0)
            return None
        if k is not None and list(k.outputs) != list(op.results):
            return f"the kernel of '{op.NAME}' takes more than its op's operands and results"
        if hosted.shapes is not None:
            self.shapes[id(op)] = hosted.shapes
        self.padded.update(id(v) for v in hosted.padded)
        for r in op.results:
            i = direct.pop(id(r), None)
            self.places[id(r)] = Place(r, "out", i) if i is not None else Place(r, "temp", 0)
        steps = [Launch(s, [*s.inputs, *s.outputs]) for s in hosted.before]
        if k is not None and not hosted.instead:  # else the kernels of `before` compute the results
            steps.append(Launch(k, hosted.args or [*k.inputs, *k.outputs], [(*c, 0) for c in hosted.checks],
                                hosted.zeroed, hosted.items, hosted.sum_parts))
        for launch in steps:
            if any(self.places[id(v)].kind == "virtual" for v in launch.args if id(v) in self.places):
                return f"a kernel of '{op.NAME}' reads a transpose that only packed weights are made from"
            for v in [*launch.args, *[c[0] for c in launch.checks]]:
                if id(v) in self.unmade:
                    return self.unmade[id(v)]
            for s in [*launch.args, *[src for src, _ in launch.sum_parts]]:
                if isinstance(s, Scratch) and id(s) not in self.places:
                    self._scratch(s)
            self.launches.append(launch)
        return None

    def _scratch(self, s: Scratch) -> None:
        """A place for a Scratch buffer: the workspace, an array the plan makes, or one the call's cache holds."""
        if s.cached is not None:
            self.fixed.append((s.cached, 0, s))
            self.places[id(s)] = Place(s, "arg", 0)
        elif s.alias is not None:
            self.places[id(s)] = Place(s, "view", 0, source=self._base(s.alias))
        else:
            self.places[id(s)] = Place(s, "temp" if s.data is None else "planned", 0)

    def _base(self, v: Value) -> Value:
        place = self.places[id(v)]
        return place.source if place.kind == "view" else v

    # ---- one call -----------------------------------------------------------------------------------
    def fixed_arrays(self, cache: dict) -> list[np.ndarray] | None:
        """The weight-only results and packed weights the kernels read, from the call's cache (None while one is
        not there yet: the Python host makes them at its first call)."""
        arrays = []
        for key, j, _ in self.fixed:
            if key not in cache:
                return None
            arrays.append(np.ascontiguousarray(cache[key][j]))
        return arrays

    def input_checker(self, inputs: Sequence[Any]) -> Any:
        """An interpreter whose `bind` checks and converts an input as a call does (its errors), its dims bound from
        every input first."""
        from sparsa.backends.reference.interpreter import Interpreter

        checker = Interpreter(self.func_op)
        bind_names([(v.type, np.shape(x)) for v, x in zip(self.inputs, inputs, strict=True)], checker.dims)
        return checker

    def argv(self, plan: Plan, threads: int, pool: int) -> list[int]:
        """The program's argv for `plan`: the header (the workspace and status 0, set by the caller), a slot for
        each pointer, then the plan's words."""
        return [threads, pool, 0, 0, *[0] * self.pointers, *plan.tail]

    # ---- one set of shapes ----------------------------------------------------------------------------
    def plan(self, shapes: Sequence[tuple[int, ...]], fixed_shapes: Sequence[tuple[int, ...]], threads: int,
             deterministic: bool) -> Plan:
        """argv past the pointers for inputs of these shapes (checked against the signature as the reference
        interpreter checks them) and weight-only results of `fixed_shapes`, split over `threads`."""
        dims: dict[str, int] = {}
        bind_names([(a.type, tuple(s)) for a, s in zip(self.inputs, shapes, strict=True)], dims)
        for a, shape in zip(self.inputs, shapes, strict=True):
            bind_shape(a.type, shape, dims, f"input '{a.name_hint or a.index}'")
        known = {id(a): tuple(s) for a, s in zip(self.inputs, shapes, strict=True)}
        for (_, _, v), shape in zip(self.fixed, fixed_shapes, strict=True):
            known[id(v)] = tuple(shape)
        ctx = _Shapes(dims, threads, deterministic)
        arrays = {}
        for op in self.ops:
            place = self.places.get(id(op.results[0])) if op.results else None
            if place is not None and place.kind == "planned":  # the op's data, for these sizes
                arrays[id(op.result)] = np.ascontiguousarray(op.reference(ctx), numpy_dtype(op.result.type.dtype))
                known[id(op.result)] = arrays[id(op.result)].shape
                continue
            rule = self.shapes.get(id(op))
            if rule is not None:
                shapes_ = rule(known, ctx)
            else:
                shapes_ = op.result_shapes(ctx, [_stand_in(known[id(v)], numpy_dtype(v.type.dtype))
                                                 for v in op.operands])
            for r, shape in zip(op.results, shapes_, strict=True):
                known[id(r)] = tuple(shape)
        for place in self.places.values():
            s = place.value
            if isinstance(s, Scratch) and s.cached is None:
                known[id(s)] = tuple(s.shape(known, ctx))
                if s.data is not None:
                    arrays[id(s)] = np.ascontiguousarray(s.data(known, ctx), numpy_dtype(s.type.dtype))
        tail = [0] * (self.size - self.tail)
        at = self.tail

        def put(slot: int, values: Sequence[int]) -> None:
            tail[slot - at:slot - at + len(values)] = values

        offsets, workspace = self._offsets(known)
        for place in self.places.values():
            shape = known[id(place.value)]
            strides = [int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape))]
            put(place.dims, [*shape, *strides])
            if place.kind == "temp":
                put(place.ptr, [offsets[id(place.value)]])
            elif place.kind == "planned":
                put(place.ptr, [address(arrays[id(place.value)])])
        bounds: list[int] = []
        for launch in self.launches:
            for index, limits, slot in launch.checks:
                put(slot, [math.prod(known[id(index)]), *limits(known)])
            for zero in launch.zeroed:
                put(self.zeroed[id(zero)], [math.prod(known[id(zero)]) * self.places[id(zero)].itemsize])
            for i, (src, _) in enumerate(launch.sum_parts):
                parts = known[id(src)]
                put(launch.sum_slot + 2 * i, [parts[0], math.prod(parts[1:])])
            if launch.kernel.split == "none":
                continue
            items, team, cut, axis = self._split(launch, known, threads, deterministic, ctx)
            put(launch.slot, [items, team, self.size + len(bounds), axis])
            bounds += cut
        for _, v, slot in self.copies:
            put(slot, [int(np.prod(known[id(v)], dtype=np.int64)) * self.places[id(v)].itemsize])
        outputs = [(known[id(v)], numpy_dtype(v.type.dtype)) for v in self.returns]
        return Plan(tail + bounds, outputs, workspace, list(arrays.values()))

    def _offsets(self, known: dict[int, tuple[int, ...]]) -> tuple[dict[int, int], int]:
        """Each temporary's offset in the workspace, and its bytes: in order of first use, each at the lowest
        aligned offset clear of every temporary placed so far whose lifetime meets its own (a buffer is reused
        once its value is dead, so a long function touches a few arrays' worth of memory, warm in cache,
        instead of fresh memory at every op)."""
        placed: list[tuple[int, int, int, int]] = []  # (first, last, offset, end)
        offsets = {}
        temps = [p for p in self.places.values() if p.kind == "temp"]
        for place in sorted(temps, key=lambda p: self.lifetimes.get(id(p.value), (-1, -1))):
            v = place.value
            size = -(-int(np.prod(known[id(v)], dtype=np.int64)) * place.itemsize // ALIGN) * ALIGN
            first, last = self.lifetimes.get(id(v), (-1, len(self.launches)))  # (never read: kept apart)
            at = 0
            for lo, hi in sorted((o, e) for f, la, o, e in placed if f <= last and first <= la):
                if at + size <= lo:
                    break
                at = max(at, hi)
            placed.append((first, last, at, at + size))
            offsets[id(v)] = at
        return offsets, max((e for *_, e in placed), default=0)

    def _split(self, launch: Launch, known: dict[int, tuple[int, ...]], threads: int,
               deterministic: bool, ctx: _Shapes) -> tuple[int, int, list[int], int]:
        """(work items, team size, row bounds, the dim they cut) of a split kernel, as `CpuFunction.run` splits it
        (dim 1 where dim 0 is 1 and the kernel allows it: `Kernel.rows_1`)."""
        k = launch.kernel
        op = k.op
        if launch.items is not None:
            items = launch.items(ctx)
            return items, min(items, threads), [], 0
        in_shapes = [known[id(v)] for v in launch.args[:len(k.inputs)]]
        out = known[id(launch.args[len(k.inputs)])]
        amount = work(k.work_op or op, in_shapes, out)
        if k.split == "parts":
            small = (one_part_below(op) or k.one_part_below) and amount < NATIVE_SPLIT_WORK
            return (1, 1, [], 0) if small else (threads, threads, [], 0)
        axis = 1 if out[0] == 1 and k.rows_1 is not None else 0
        m = out[axis]
        if threads == 1 or m < 2 * threads or amount < NATIVE_SPLIT_WORK:
            return 1, 1, [0, m], axis
        cut = row_bounds(m, threads, deterministic)
        return len(cut) - 1, min(len(cut) - 1, threads), cut, axis
