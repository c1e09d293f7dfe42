"""`sparsa.compile`: `.sp` source to a callable model on a target, with weights and IR at every step."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparsa.backends import base as backends
from sparsa.frontend import compile_source
from sparsa.ir.analysis import weight_only_ops
from sparsa.ir.core import Module
from sparsa.ir.diagnostics import Location, SparsaError
from sparsa.ir.printer import print_module
from sparsa.knobs import DebugOptions
from sparsa.passes import PassManager
from sparsa.passes.pipelines import expert_parallel_pipeline
from sparsa.runtime import expert_parallel as ep
from sparsa.runtime.weights import (
    WeightError,
    WeightSpec,
    check_weights,
    init_weights,
    read_weights,
    to_numpy,
    weight_specs,
)


def _read_source(path_or_source: str | os.PathLike) -> tuple[str, str]:
    """(text, filename): a path to an existing `.sp` file, or the source text itself."""
    text = os.fspath(path_or_source)
    if "\n" not in text and (text.endswith(".sp") or os.path.exists(text)):
        try:
            data = Path(text).read_bytes()
        except OSError as e:
            raise SparsaError(f"cannot read {text}: {e.strerror}") from None
        try:
            return data.decode("utf-8"), text
        except UnicodeDecodeError as e:  # where, in the file's own lines
            line = data.count(b"\n", 0, e.start) + 1
            col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
            raise SparsaError(f"the file is not UTF-8 text (byte 0x{data[e.start]:02x} is not UTF-8 here: "
                              f"{e.reason}): save it as UTF-8", Location(text, line, col),
                              data.decode("utf-8", errors="replace")) from None
    return text, "<source>"


@dataclass
class Backward:
    """A model's reverse mode: its module (the model, then `_fwd` and `_bwd`, or `_vjp`), the names of what it
    gives gradients of (every float input and weight), the model's result types (one cotangent each), the compiled
    backward, its weight-only results (both halves'), and the compiled forward that also returns the residuals
    (None: recomputed)."""

    module: Module
    names: list[str]
    results: list[Any]
    native: Any
    cache: dict
    forward: Any = None
    prepared: bool = False
    produced: list[str] = field(default_factory=list)  # the backward's results, by name (`names` less unread weights)


def grad_pipeline(pipeline: str) -> str:
    """A target pipeline with `differentiate` after the MoE layers are dispatched (their rules reuse the dispatch)
    and split over the ranks (the exchange's rules send cotangents back), and after attention is recognized and
    given its block map (its backward walks the same map), and after scans are fused (the rule of `scan.fused` is
    `scan.fused_grad`, which computes the states again instead of storing them; before their epilogues join
    them, which its rule does not take); or else after its first step (canonicalize). Then canonicalize again
    (the rules' constants and broadcasts folded), and the rest (clean-up) optimizes the backward function too.
    (After expand-pullbacks too: the rules it has put in are differentiated in turn.)"""
    steps = pipeline.split(",")
    after = ("shard-experts", "fuse-moe-dispatch", "sparsify-attention", "expand-pullbacks", "fuse-scan")
    found = [i for i, s in enumerate(steps) if s.split("{")[0] in after]
    at = max(found) if found else 0 if steps[0] == "canonicalize" else -1
    return ",".join([*steps[:at + 1], "differentiate", "canonicalize", *steps[at + 1:]])


class CompiledModel:
    """A model compiled for one target: load or init weights, call it, and read its IR after any pass."""

    def __init__(self, module: Module, name: str, backend: backends.Backend, pipeline: str,
                 options: DebugOptions | None = None, expert_parallel: Any = None):
        self.name = name
        self.backend = backend
        self.target = backend.label
        self.specs: dict[str, WeightSpec] = weight_specs(module)
        # a process group, or a number of ranks: compiled for them without one, to read its IR and code
        self.exchange = None if expert_parallel is None or isinstance(expert_parallel, int) \
            else ep.TorchExchange(expert_parallel)
        self.ranks = self.exchange.size if self.exchange is not None else expert_parallel
        if self.ranks is not None:
            pipeline = expert_parallel_pipeline(pipeline, self.ranks)
        self.input_names = [a.name_hint for a in module.funcs[-1].regions[0].block.args]
        self.input_types = [a.type for a in module.funcs[-1].regions[0].block.args]
        self._input_ir = print_module(module)
        self._pm = PassManager(pipeline, options or DebugOptions())
        self.module = self._pm.run(module)
        self.shards = ep.sharded_params(self.module)  # weight name -> ranks its experts are split over
        if self.ranks is not None:
            ep.check_sharded(self.module, self.ranks)
        from sparsa.runtime.explain import RecordingInterpreter

        # the reference target records what each op did (for `stats` and `sparsa explain`)
        self.native = backend.compile(self.module.funcs[-1], {"interpreter": RecordingInterpreter,
                                                              "exchange": self.exchange})
        if self._pm.options.dump_dir:
            self._dump_stages(self._pm.options.dump_dir)
        self._weights: dict[str, np.ndarray] | None = None
        self._cache: dict[int, tuple[np.ndarray, ...]] = {}  # weight-only results (packing), per loaded weights
        self._weight_only = weight_only_ops(self.module.funcs[-1])  # which ops those are: fixed at compile time
        self.last_report = None  # what the last call did, op by op (see runtime/explain.py)
        self._grad: Backward | None = None  # the backward function, built at the first vjp

    def _dump_stages(self, folder: str) -> None:
        """Each backend stage's text beside the pass snapshots: `<target>.<stage>.<suffix>`."""
        os.makedirs(folder, exist_ok=True)
        for stage, text in self.native.stages.items():
            Path(folder, f"{self.target}.{stage}.{self.backend.STAGE_SUFFIX}").write_text(text)

    # ---- weights ------------------------------------------------------------------------------------
    def load_weights(self, source: str | os.PathLike | Mapping[str, Any], prune: bool = False) -> CompiledModel:
        """Weights from a .safetensors or .npz file or a dict, by dotted name; checked against the model. With
        expert_parallel, an expert weight may come in full (this rank keeps its block) or as this rank's block."""
        arrays = read_weights(source)
        if self.shards:
            arrays = ep.shard_weights(arrays, self.specs, self.shards, self._rank())
        self._set_weights(check_weights(ep.block_specs(self.specs, self.shards), arrays, prune=prune))
        return self

    def init_weights(self, seed: int = 0) -> CompiledModel:
        """Deterministic random weights that fit every shape and sparse layout: the same full model on every rank
        of an expert-parallel group, each keeping its block of the experts."""
        weights = init_weights(self.specs, seed)
        if self.shards:
            weights = ep.shard_weights(weights, self.specs, self.shards, self._rank())
        self._set_weights(weights)
        return self

    def _rank(self) -> int:
        if self.exchange is None:
            raise SparsaError(f"model '{self.name}' was compiled for {self.ranks} ranks without a process group: its "
                              "IR and code can be read, but to load weights and run it pass the group "
                              "(expert_parallel=dist.group.WORLD)")
        return self.exchange.rank

    def _set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Install weights and run what depends only on them (packing sparse layouts) once, now."""
        from sparsa.backends.reference.interpreter import Interpreter

        self._weights = weights
        self._cache = {}
        self.native.reset()
        if self._grad is not None:  # the backward function's weight-only results: again, for these weights
            self._grad.native.reset()
            if self._grad.forward is not None:
                self._grad.forward.reset()
            self._grad.cache.clear()
            self._grad.prepared = False
        Interpreter(self.module.funcs[-1], weights, self._cache, self._weight_only).precompute()

    @property
    def weights(self) -> dict[str, np.ndarray]:
        if self._weights is None:
            if not self.specs:
                return {}
            raise WeightError(f"model '{self.name}' has {len(self.specs)} weights and none are loaded: call "
                              f"load_weights(...) or init_weights(seed)")
        return self._weights

    # ---- calling ----------------------------------------------------------------------------------------
    def __call__(self, *inputs: Any, **named: Any) -> Any:
        """Run on NumPy arrays or torch tensors (by position or input name); outputs come back the same kind."""
        args = self._arguments(inputs, named)
        if self.exchange is not None:
            self.exchange.begin_call()
        outs = self._run(self.native, args, self._cache)
        last = getattr(self.native, "last", None)
        self.last_report = getattr(last, "report", None)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _arguments(self, inputs: tuple, named: dict[str, Any]) -> list[Any]:
        """The inputs in order, from positional and named ones."""
        args = list(inputs)
        named = dict(named)
        for name in self.input_names[len(args):]:
            if name not in named:
                raise SparsaError(f"model '{self.name}' needs input '{name}' ({len(self.input_names)} inputs: "
                                  f"{', '.join(self.input_names)})")
            args.append(named.pop(name))
        if named:
            raise SparsaError(f"model '{self.name}' has no input '{next(iter(named))}'")
        if len(args) != len(self.input_names):
            raise SparsaError(f"model '{self.name}' takes {len(self.input_names)} inputs, got {len(args)}")
        return args

    def _run(self, native: Any, args: list[Any], cache: dict) -> list[Any]:
        """A compiled function on `args`: NumPy or torch in, the same kind out."""
        if all(type(a) is np.ndarray for a in args):  # (a small model's call: ~1 us less than the checks below)
            torch_like = None
        else:
            torch_like = next((a for a in args if hasattr(a, "detach")), None)
            if self.backend.INPUTS == "numpy":
                args = [to_numpy(a) for a in args]
        outs = native(args, self.weights, cache)
        if self.backend.OUTPUTS == "torch" and torch_like is None:
            outs = [_to_numpy(o) for o in outs]
        elif self.backend.OUTPUTS == "numpy" and torch_like is not None:
            import torch

            outs = [torch.from_numpy(np.asarray(o, order="C")).to(torch_like.device) for o in outs]
        return list(outs)

    # ---- reverse mode -----------------------------------------------------------------------------------
    def vjp(self, *inputs: Any, **named: Any) -> tuple[Any, Any]:
        """`y, pullback = m.vjp(*inputs)`: the outputs, and `pullback(dy)` (one cotangent per output) giving the
        gradient of every float input and weight, a dict by its `.sp` name. The forward that saves residuals and
        the backward (`ir(grad=True)`) are compiled for the target at the first call. With expert_parallel, an
        expert weight's gradient is this rank's block of it, and a replicated weight's (the router's) this
        rank's share: summed over the ranks, as data parallel sums them, it is one process's."""
        args = self._arguments(inputs, named)
        grad = self._backward()
        n = len(grad.results)
        if grad.forward is None:  # residuals recomputed: the model's own forward, then the forward again
            outs = self(*args)
            saved = list(args)
        else:  # the forward that also returns what the backward reads
            if self.exchange is not None:
                self.exchange.begin_call()
            both = self._run(grad.forward, args, grad.cache)
            outs, saved = (both[0] if n == 1 else tuple(both[:n])), both[n:]

        def pullback(*dys: Any) -> dict[str, Any]:
            if len(dys) != n:
                raise SparsaError(f"pullback takes one cotangent per output of '{self.name}' ({n}), got {len(dys)}")
            got = dict(zip(grad.produced, self._run(grad.native, [*saved, *dys], grad.cache), strict=True))
            # a weight nothing reads (dropped before differentiate) has a gradient of zeros
            return {name: got[name] if name in got else np.zeros_like(self.weights[name]) for name in grad.names}

        return outs, pullback

    def _backward(self) -> Backward:
        """The backward function, compiled for the target (once), its weight-only results prepared."""
        if self._grad is None:
            from sparsa.ir import parse_module
            from sparsa.ir.autodiff import grad_targets

            module = parse_module(self._input_ir)
            forward = module.funcs[-1]
            names = [name for _, name, _ in grad_targets(forward)]
            results = list(forward.attributes["result_types"])
            pm = PassManager(grad_pipeline(self._pm.pipeline), self._pm.options)
            grad_module = pm.run(module)
            saved = grad_module.funcs[-1].attributes.get("residuals") == "saved"
            options = {"exchange": self.exchange}
            forward = self.backend.compile(grad_module.funcs[-2], options) if saved else None
            native = self.backend.compile(grad_module.funcs[-1], options)
            produced = list(grad_module.funcs[-1].attributes["grads"])
            self._grad = Backward(grad_module, names, results, native, {}, forward, produced=produced)
        if self._weights is not None and not self._grad.prepared:
            from sparsa.backends.reference.interpreter import Interpreter

            for f in self._grad.module.funcs[1:]:  # both halves' weight-only results, in one cache (ops differ)
                Interpreter(f, self._weights, self._grad.cache, weight_only_ops(f)).precompute()
            self._grad.prepared = True
        return self._grad

    # ---- introspection ---------------------------------------------------------------------------------
    def profile(self) -> str:
        """Where the time of the calls so far went, kernel by kernel, largest first: the model's function, and
        the saved forward and the backward once `vjp` has run. The cpu target's native host times its kernels
        when SPARSA_PROFILE=1 was set as the model was compiled (each kernel with its index checks, zeroing and
        the sum of its parts); other targets and hosts say they have no profile."""
        fns = [(self.name, self.native)]
        if self._grad is not None:
            fns += [(f"{self.name}_fwd", self._grad.forward)] if self._grad.forward is not None else []
            fns.append((f"{self.name} backward", self._grad.native))
        lines = []
        for name, fn in fns:
            host = getattr(fn, "host", None)
            if host is None or host.why_not is not None or host.profile_slot is None:
                why = "not the cpu target" if host is None else f"no native host: {host.why_not}" \
                    if host.why_not is not None else "compiled without SPARSA_PROFILE=1"
                lines.append(f"{name}: no profile ({why})")
                continue
            rows, calls = fn.profile(), fn.calls["native"]
            total = sum(ms for *_, ms in rows)
            lines.append(f"{name}: {calls} native call(s), {total / max(calls, 1):.3f} ms a call in its kernels")
            for kernel, what, ms in sorted(rows, key=lambda r: -r[2]):
                lines.append(f"  {ms / max(calls, 1):9.3f} ms {100 * ms / (total or 1):5.1f}%  {kernel:30s} {what}")
        return "\n".join(lines)

    def stage(self, name: str, grad: bool = False) -> str | bytes:
        """A backend stage's text (cpu: "mlir" before lowering, "llvm" after; triton: "kernels", "launcher",
        and "source", the whole generated module): the backend's STAGES; or bytes for its BINARY_STAGES
        (cpu: "obj", the object code for the target). With `grad`, the backward function's."""
        native = self._backward().native if grad else self.native
        if name in self.backend.BINARY_STAGES:
            return native.binary(name)
        stages = native.stages
        name = self.backend.stage_name(name)
        if name not in stages:
            raise SparsaError(f"target '{self.target}' has no stage '{name}' (it has: ir"
                              f"{''.join(', ' + s for s in stages)})")
        return stages[name]

    def ir(self, after: str | None = None, grad: bool = False) -> str:
        """The final IR as text, or the IR right after pass `after` (or "input": as the frontend wrote it); with
        `grad`, the module with the backward function, after the target's pipeline."""
        if grad:
            return print_module(self._backward().module)
        if after is None:
            return print_module(self.module)
        if after == "input":
            return self._input_ir
        if after not in self._pm.snapshots:
            raise SparsaError(f"no pass '{after}' in this model's pipeline ({self._pm.pipeline}); "
                              f"use one of them or 'input'")
        return self._pm.snapshots[after]

    def stats(self) -> dict[str, Any]:
        """Weights and their bytes, pass counters, the op census, and for the last call: FLOPs done vs dense,
        attention block densities, tokens per expert, and the kernel each sparse op chose."""
        census: dict[str, int] = {}
        for op in self.module.walk():
            census[op.NAME] = census.get(op.NAME, 0) + 1
        packed = sum(a.nbytes for values in self._cache.values() for a in values if a is not None)
        out = {
            "model": self.name, "target": self.target, "pipeline": self._pm.pipeline,
            "weights": len(self.specs),
            "parameters": int(sum(np.prod(s.type.shape) for s in self.specs.values() if s.type.is_static())),
            "weight_bytes": int(sum(a.nbytes for a in (self._weights or {}).values())),
            "prepared_weight_bytes": int(packed),
            "passes": self._pm.statistics(), "ops": census,
        }
        if self.last_report is not None:
            out["last_call"] = self.last_report.summary()
        if self.exchange is not None:  # what the last call moved between ranks, this rank's view
            out["all_to_all"] = {"rank": self.exchange.rank, "ranks": self.exchange.size,
                                 **self.exchange.counters.as_dict()}
        return out

    def __repr__(self) -> str:
        sig = ", ".join(f"{n}: {t}" for n, t in zip(self.input_names, self.input_types, strict=True))
        return f"<CompiledModel {self.name}({sig}) target={self.target}>"


def _to_numpy(t: Any) -> np.ndarray:
    """A torch result as NumPy (bfloat16 and float16 widened to float32, as the reference returns them)."""
    import torch

    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.numpy()


def compile(path_or_source: str | os.PathLike, model: str | None = None, target: str = backends.AUTO,
            passes: str | None = None, options: DebugOptions | None = None,
            expert_parallel: Any = None) -> CompiledModel:
    """Compile a `.sp` file (path) or source text for `target` (`auto`: triton with an NVIDIA GPU, else cpu,
    else the reference interpreter with a warning saying why).

    With several models in the file and no `model`, the last one is compiled. `passes` overrides the
    target's default pipeline; `options` (knobs.DebugOptions) turns on IR printing and dumps.
    `expert_parallel` (a torch.distributed process group, e.g. `dist.group.WORLD`) splits the MoE experts into
    equal blocks over its ranks: each rank runs its own tokens and its block of the experts (shard-experts); a
    number of ranks instead compiles for them without a group, to read the IR and code (it cannot run).
    """
    backend = backends.get(target)
    text, filename = _read_source(path_or_source)
    module, name = compile_source(text, filename, model)
    return CompiledModel(module, name, backend, passes or backend.PIPELINE, options, expert_parallel)
