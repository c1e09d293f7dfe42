"""`torch.compile(model, backend="sparsa")`: Dynamo's graph, via AOTAutograd (ATen ops, inference), split
into the parts Sparsa supports (imported into the IR, run through the target's passes) and the rest,
which runs in PyTorch. Each op that falls back is recorded with its reason (`sparsa.report()`), a summary
of each graph goes to the `sparsa` logger at INFO, and SPARSA_LOG=fallbacks says each fallback as it happens.

Registered through the `torch_dynamo_backends` entry point. Options:
`torch.compile(m, backend="sparsa", options={"target": "auto", "passes": "...", "dump_dir": "...",
"partitions": "worthwhile", "cuda_graphs": False, "freezing": False, "expert_parallel": None})`.

expert_parallel: a torch.distributed process group (`dist.group.WORLD`): each MoE a partition holds runs expert
parallel over its ranks (`shard-experts`): this rank's tokens in, its block of the experts (cut from the full
parameters each rank holds), tokens exchanged with all_to_all. Every rank must run the same model. (Training
graphs' folded MoE blocks do not yet: they run their PyTorch definitions, reported as fallbacks.)

Targets: "auto" (the default: partitions on CUDA tensors run on `triton`, partitions on CPU tensors on
`cpu`, native code through MLIR, or on `reference` where torch-mlir is not installed), or one of
"reference", "triton" (CPU tensors then run in Triton's interpreter) and "cpu" (a partition it cannot
lower, e.g. in bf16, stays in PyTorch).

Partitions: "worthwhile" (the default) compiles a partition only if, after the pipeline, it holds an op
Sparsa brings something to: a matmul, or an attention, MoE, scan or sparse-layout op. Pointwise, view and
reduction ops alone (the fragments a graph break leaves: a silu, a mask built from comparisons) run in
PyTorch, whose kernels are as fast one op at a time, without the hand-over to native code and back; they
are counted in `stats`, not as fallbacks. "all" compiles those too.

cuda_graphs: partitions on CUDA tensors replay their kernels from CUDA graphs (captured per input shape; the
counterpart of Inductor's mode="reduce-overhead"): the host's work per kernel launch, most of a small
call's time, is paid once. Inputs are copied into the captured buffers each call, except parameters, which
are read in place.
"""

from __future__ import annotations

import operator
import os
from collections import Counter
from typing import Any

import numpy as np
import torch

from sparsa import knobs
from sparsa.backends import base as backends
from sparsa.frontend.torch_import import SUPPORTED, Unsupported, import_graph, torch_dtype
from sparsa.frontend.torch_indexing import one_per_row, topk_indices_axis
from sparsa.frontend.torch_moe import FoldFailed, fold_before_autograd, fold_grouped_mm_moe
from sparsa.frontend.torch_padding import fold_pad_slices
from sparsa.frontend.torch_scan import fold_linear_scans
from sparsa.frontend.torch_types import traced_at
from sparsa.ir.diagnostics import SparsaError
from sparsa.passes import PassManager
from sparsa.passes.dce import DCE
from sparsa.passes.pipelines import expert_parallel_pipeline
from sparsa.runtime.report import LOG, REPORT, PartitionRecord
from sparsa.runtime.torch_moe import BlockCall, FoldedBlocks

# Dialects whose ops are what Sparsa is for; a partition with none of them (and none of GAINFUL_OPS) stays in
# PyTorch.
GAINFUL_DIALECTS = ("attn", "moe", "scan", "sparse")
GAINFUL_OPS = ("tensor.matmul", "tensor.solve_triangular")  # dense ops whose kernels are worth a partition


class NothingToGain(SparsaError):
    """A partition of ops PyTorch runs as well by itself (see the "partitions" option)."""


class SparsaBackend:
    """A torch.compile backend; keeps counters of what it compiled and what fell back (`stats`)."""

    def __init__(self, options: dict[str, Any] | None = None):
        self.options = dict(options or {})
        self.target = self.options.get("target", backends.AUTO)
        self.devices = backends.devices(self.target)  # an unknown target: SparsaError listing the known ones
        if self.target != backends.AUTO:  # torch.compile runs what it compiles: code for another machine cannot
            why = backends.get(self.target).cannot_run()
            if why is not None:
                raise SparsaError(f"target '{self.target}' cannot run here: {why}")
        for flag in ("cuda_graphs", "freezing"):
            if not isinstance(self.options.get(flag, False), bool):
                raise SparsaError(f"the {flag} option is true or false, got {self.options[flag]!r}")
        if self.options.get("partitions", "worthwhile") not in ("worthwhile", "all"):
            raise SparsaError(f"unknown partitions option '{self.options['partitions']}' (worthwhile or all)")
        group = self.options.get("expert_parallel")
        self.exchange = None
        if group is not None:
            from sparsa.runtime.expert_parallel import TorchExchange

            self.exchange = TorchExchange(group)
        self.stats: Counter[str] = Counter()
        self.fallbacks: Counter[str] = Counter()
        self.partitions: list[CompiledPartition] = []  # for inspection: each one's IR after the pipeline
        # training graphs' folded MoE blocks, compiled whole (runtime/torch_moe.py); `.models` for inspection
        self.moe_blocks = FoldedBlocks(self.target, group)

    def __call__(self, gm: Any, example_inputs: list[Any]) -> Any:
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.partitioners import min_cut_rematerialization_partition

        self.stats["graphs"] += 1
        # Training: the forward saves what is costly to make again, the backward makes the rest again (Inductor's
        # choice too); what the forward made from no input at all (a mask from positions) the backward makes
        # again here, so it imports as a mask region there too, never as a saved tensor.
        made: dict[str, list[Any]] = {}  # this graph's forward outputs made from no input, by name

        distinct: dict[str, int] = {}  # this graph's forward outputs that are a top-k's indices, by name

        def forward(fw: Any, inputs: list[Any]) -> Any:
            made.update(input_free_outputs(fw))
            distinct.update(topk_index_outputs(fw))
            meta = getattr(torch._guards.TracingContext.try_get(), "fw_metadata", None)
            # the outputs after the first `num_forward_returns` are saved for the backward, not returned
            return self.compile_aten(fw, inputs, getattr(meta, "num_forward_returns", None))

        def backward(bw: Any, inputs: list[Any]) -> Any:
            self.stats["saved tensors made again in the backward"] += make_again(bw, made)
            self.stats["top-k backward scatters as adds"] += scatters_as_adds(bw, distinct)
            return self.compile_aten(bw, inputs)

        # parallel prefix scans of a linear recurrence (transformers' Mamba) become one scan, forward and backward
        self.stats["parallel scans recognized"] += fold_linear_scans(gm)
        # MoE blocks are folded before AOTAutograd traces the joint graph: their backward is then Sparsa's
        try:
            gm, folded = fold_before_autograd(gm, example_inputs)
            self.stats["moe blocks recognized for training"] += folded
        except FoldFailed as e:  # compiled as Dynamo gave it: the blocks' ops then show in the report's fallbacks
            self.stats[f"training graphs not folded: {e}"] += 1
            LOG.info("a training graph was not traced for the MoE fold (%s); compiling it unfolded", e)
        return aot_autograd(fw_compiler=forward, bw_compiler=backward,
                            partition_fn=min_cut_rematerialization_partition)(gm, example_inputs)

    def compile_aten(self, gm: Any, example_inputs: list[Any], returned: int | None = None) -> Any:
        """An ATen graph (forward or backward) compiled as `partition_aten` does, as a boxed function (the
        calling convention AOTAutograd asks of its compilers), recorded for `sparsa.report()`."""
        from torch._functorch.aot_autograd import make_boxed_func

        self.record = REPORT.new_graph()
        fused = self.partition_aten(gm, example_inputs, returned)
        REPORT.finish(self.record)
        return make_boxed_func(fused)

    def partition_aten(self, gm: Any, example_inputs: list[Any], returned: int | None = None) -> Any:
        """Partition an ATen graph, compile each supported partition, leave the rest to PyTorch. `returned`: how
        many of the graph's outputs its caller sees (the rest a forward saves for its backward), None for all."""
        for name, target, func in self.moe_blocks.install(gm):  # a training graph's folded blocks, compiled whole
            self.stats["moe blocks compiled for training"] += 1
            self.record.partitions.append(PartitionRecord(name, target, Counter(
                op.NAME for op in func.walk() if not op.STRUCTURAL)))
        moe_blocks = fold_grouped_mm_moe(gm)
        self.stats["moe blocks recognized"] += moe_blocks
        if moe_blocks + fold_pad_slices(gm):
            gm.graph.eliminate_dead_code()  # what the folded parts computed, so it is not partitioned
            gm.recompile()
        from torch.fx.passes.operator_support import OperatorSupportBase

        devices, target = self.devices, self.target
        laid_out = {n.name for n in _layout_bound(gm)}
        # A node whose import fails (`Unsupported.node`) is left to PyTorch alone: the graph is partitioned
        # again without it, rather than its whole partition falling back. What each partition's code gave
        # (compiled, or why not) is kept across the attempts.
        excluded: dict[str, str] = {}
        built: dict[str, Any] = {}

        class Support(OperatorSupportBase):
            def is_node_supported(self, submodules: Any, node: Any) -> bool:
                return node.op == "call_function" and node.target in SUPPORTED and \
                    _type_problem(node, devices, target) is None and node.name not in laid_out | excluded.keys()

        while (outcome := self.fuse_and_compile(_graph_copy(gm), Support(), excluded, built)) is None:
            self.stats["nodes left out of their partition"] += 1
        fused, parts = outcome
        left: set[str] = set()  # partitions kept in PyTorch by choice (not fallbacks)
        failed: dict[str, str] = {}  # partitions Sparsa could not compile, and why
        for name, part in parts.items():
            if isinstance(part, NothingToGain):
                self.stats["partitions left to PyTorch (nothing to gain)"] += 1
                self.record.kept.append((name, part.message))
                left.add(name)
                continue
            if isinstance(part, SparsaError):  # not importable, or the target cannot lower it: it stays in PyTorch
                self.stats[f"partition not compiled: {part.message}"] += 1
                failed[name] = part.message.splitlines()[0]
                continue
            setattr(fused, name, part)
            self.partitions.append(part)
            self.record.partitions.append(PartitionRecord(name, part.target, Counter(
                op.NAME for op in part.func.walk() if not op.STRUCTURAL)))
            self.stats["partitions compiled"] += 1
            # Inputs the IR never reads (e.g. the block-mask tensors traced from create_block_mask, which
            # sparsify-attention replaces) are not passed, so PyTorch no longer computes them.
            call = next(n for n in fused.graph.nodes if n.op == "call_module" and n.target == name)
            call.args = tuple(None if i in part.unused_inputs else a for i, a in enumerate(call.args))
        fused.graph.eliminate_dead_code()
        # Sparsa's results are compact. Where PyTorch reads one traced in another layout (a transpose), a view of
        # it may be valid in that layout only: such a result leaves laid out as traced, and such an input (a
        # forward's result, saved for this backward) is laid out so before PyTorch reads it.
        for name, part in parts.items():
            if isinstance(part, CompiledPartition):
                part.laid_out = _read_by_pytorch(fused, name, part, returned)
                self.stats["results laid out as traced (PyTorch reads them)"] += len(part.laid_out)
        self.stats["inputs laid out as traced (PyTorch reads them)"] += _lay_out_inputs(fused)
        laid_out = _layout_bound(fused)  # the fused graph's own nodes, for the reasons below
        for node in fused.graph.nodes:  # what still runs in PyTorch
            if node.op != "call_function" or node.target in (operator.getitem, _in_order) or \
                    isinstance(node.target, BlockCall):
                continue
            if isinstance(node.meta.get("val"), torch.SymInt | torch.SymFloat | torch.SymBool | int | float | bool):
                self.stats["size arithmetic nodes"] += 1  # sizes of dynamic dims computed on the host: no op
                continue
            self.note_fallback(str(node.target), excluded.get(node.name) or
                               _why_not(node, devices, self.target, laid_out))
        for node in fused.graph.nodes:
            if node.op == "call_module" and not isinstance(getattr(fused, node.target), CompiledPartition) and \
                    node.target not in left:
                why = f"its partition did not compile: {failed.get(node.target, 'unknown reason')}"
                for inner in getattr(fused, node.target).graph.nodes:
                    if inner.op == "call_function" and inner.target is not operator.getitem:
                        self.note_fallback(str(inner.target), why)
        fused.recompile()
        return fused

    def fuse_and_compile(self, gm: Any, support: Any, excluded: dict[str, str], built: dict[str, Any]) -> Any:
        """Partition `gm` by `support` and build each partition: (the fused graph, each partition's
        `CompiledPartition` or the SparsaError it gave, by name); None where a node failed to import, which
        `excluded` then names with why, so that the caller partitions again. `built`: outcomes by code."""
        from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner

        partitioner = CapabilityBasedPartitioner(gm, support, allows_single_node_partition=True)
        fused = partitioner.fuse_partitions(partitioner.propose_partitions())
        calls = {n.target: n for n in fused.graph.nodes if n.op == "call_module"}
        parts: dict[str, Any] = {}
        for name, sub in list(fused.named_children()):
            if not name.startswith("fused_"):
                continue
            if sub.code not in built or any(built[sub.code] is p for p in parts.values()):  # one per partition
                # Partition inputs that are subgraphs (flex_attention's mask_mod / score_mod) by position.
                modules = {i: getattr(fused, a.target) for i, a in enumerate(calls[name].args)
                           if getattr(a, "op", None) == "get_attr"}
                try:
                    built[sub.code] = CompiledPartition(sub, self, modules)
                except SparsaError as e:  # kept without its traceback: its frames would hold this call's tensors
                    built[sub.code] = e.with_traceback(None)
                    node = getattr(e, "node", None)
                    if node is not None and not isinstance(e, NothingToGain) and node not in excluded:
                        excluded[node] = f"not imported: {e.message.splitlines()[0]}"
                        return None
            parts[name] = built[sub.code]
        return fused, parts

    def note_fallback(self, op: str, why: str) -> None:
        """One node left to PyTorch, and why (`sparsa.report()`; SPARSA_LOG=fallbacks says it as it happens)."""
        REPORT.fallback(self.record, op, why)
        self.fallbacks[op] += 1
        self.stats["fallback nodes"] += 1


def _graph_copy(gm: Any) -> Any:
    """A GraphModule with a copy of `gm`'s graph (nodes keep their names and meta), sharing its submodules:
    partitioning rewrites the graph it is given."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return torch.fx.GraphModule(gm, graph)


def input_free_outputs(gm: Any) -> dict[str, list[Any]]:
    """The outputs of a forward graph computed from none of its inputs (an attention mask built from positions),
    by name (the backward graph's placeholder for a saved one has that name): the nodes making each, in order,
    copied into a graph of their own (compiling the forward moves its nodes into partitions)."""
    import torch.fx

    free: dict[Any, bool] = {}
    for n in gm.graph.nodes:
        free[n] = n.op == "call_function" and all(free.get(a, False) for a in n.all_input_nodes)
    outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    made = {}
    for o in outputs if isinstance(outputs, tuple | list) else [outputs]:
        if getattr(o, "op", None) == "call_function" and free[o] and hasattr(o.meta.get("val"), "shape"):
            deps, stack = set(), [o]
            while stack:
                x = stack.pop()
                if x not in deps:
                    deps.add(x)
                    stack.extend(x.all_input_nodes)
            graph, env = torch.fx.Graph(), {}
            for n in (n for n in gm.graph.nodes if n in deps):
                env[n] = graph.node_copy(n, lambda a, env=env: env[a])
            made[o.name] = list(env.values())
    return made


def topk_index_outputs(gm: Any) -> dict[str, int]:
    """The outputs of a forward graph that are a top-k's indices, by name (the backward's placeholder for a saved
    one has that name), with the axis they are distinct along."""
    outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return {o.name: axis for o in outputs if (axis := topk_indices_axis(o)) is not None}


def scatters_as_adds(gm: Any, distinct: dict[str, int]) -> int:
    """A top-k's backward, scatter(zeros, dim, the top-k's indices, src), as scatter_add: the same where no index
    repeats along dim, as a top-k's do not (`distinct`: the saved ones, by placeholder name), nor one of a single
    entry along dim (a max's with keepdim); how many."""
    aten = torch.ops.aten
    zeros = (aten.new_zeros.default, aten.zeros.default, aten.zeros_like.default)
    count = 0
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not aten.scatter.src or n.kwargs:
            continue
        base, dim, index, _ = n.args
        axis = dim % len(n.meta["val"].shape)
        along = distinct.get(index.name) if index.op == "placeholder" else topk_indices_axis(index)
        if getattr(base, "target", None) in zeros and (along == axis or one_per_row(index, axis)):
            n.target = aten.scatter_add.default
            count += 1
    if count:
        gm.recompile()
    return count


def make_again(gm: Any, made: dict[str, list[Any]]) -> int:
    """In a backward graph, the saved tensors its forward made from no input are computed again from the same
    nodes (the placeholder stays, unread: the calling convention keeps its arguments); how many."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    count = 0
    for p in placeholders:
        if p.name not in made or not p.users:
            continue
        env: dict[Any, Any] = {}
        with gm.graph.inserting_before(first):
            for n in made[p.name]:
                env[n] = gm.graph.node_copy(n, lambda a, env=env: env[a])
        p.replace_all_uses_with(env[made[p.name][-1]])
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _type_problem(node: Any, devices: tuple[str, ...], target: str) -> str | None:
    """Why a node's values keep it from Sparsa (an element type not imported, a device the target does not run
    on), or None."""
    vals = node.meta.get("val")
    for v in vals if isinstance(vals, tuple | list) else [vals]:
        if hasattr(v, "dtype"):
            try:
                if v.dtype not in (torch.complex64, torch.complex128):  # complex: as pairs of real values
                    torch_dtype(v.dtype)
            except Unsupported:
                return f"element type {v.dtype} is not imported"
            if v.device.type not in devices:
                return f"tensors on {v.device.type}, where target '{target}' does not run"
    return None


def _why_not(node: Any, devices: tuple[str, ...], target: str, laid_out: set[Any]) -> str:
    """Why an ATen node was not given to Sparsa (`laid_out`: the graph's `_layout_bound` nodes)."""
    if "sparsa_why" in node.meta:
        return node.meta["sparsa_why"]
    if node.target not in SUPPORTED:
        return "no import into Sparsa's IR for this op"
    if node in laid_out:
        return "a view that as_strided reads through its storage (Sparsa's results are compact tensors)"
    return _type_problem(node, devices, target) or "not in a partition"


def _read_by_pytorch(fused: Any, name: str, part: CompiledPartition, returned: int | None) -> dict[int, tuple]:
    """The results of partition `name` whose traced layout is not row-major and that PyTorch reads (an op left to
    it, or the graph's caller: one of its first `returned` outputs), with that layout: a `view` of a transpose is
    valid or not by it."""
    if not any(part.orders):
        return {}
    call = next(n for n in fused.graph.nodes if n.op == "call_module" and n.target == name)
    results = {u.args[1]: u for u in call.users if u.target is operator.getitem} if part.tuple_output else {0: call}
    return {i: order for i, order in enumerate(part.orders)
            if order is not None and i in results and _pytorch_reads(fused, results[i], returned)}


def _pytorch_reads(fused: Any, value: Any, returned: int | None = None) -> bool:
    """Whether a node of the fused graph reads `value` other than a compiled partition or a folded MoE block: an
    op left to PyTorch, or the graph's output among its first `returned` (all if None)."""
    for u in value.users:
        if u.op == "output":
            outs = u.args[0] if isinstance(u.args[0], tuple | list) else [u.args[0]]
            if any(o is value for o in outs[:returned]):
                return True
        elif not _in_sparsa(fused, u):
            return True
    return False


def _in_sparsa(fused: Any, node: Any) -> bool:
    """Whether a node of the fused graph is a compiled partition's call or a folded MoE block's."""
    return node.op == "call_module" and isinstance(getattr(fused, node.target), CompiledPartition) or \
        node.op == "call_function" and isinstance(node.target, BlockCall)


def _lay_out_inputs(fused: Any) -> int:
    """Lay out as traced each input traced in a layout other than row-major that an op left to PyTorch reads: a
    forward's compact result, saved for its backward (as laid out already, no copy); how many."""
    inputs = [n for n in fused.graph.nodes if n.op == "placeholder"]
    count = 0
    for node in inputs:
        order = _memory_order(node.meta.get("val"))
        readers = [u for u in node.users if u.op != "output" and not _in_sparsa(fused, u)]
        if order is None or not readers:
            continue
        with fused.graph.inserting_after(inputs[-1]):
            laid = fused.graph.call_function(_in_order, (node, order))
        laid.meta = dict(node.meta)
        for u in readers:
            u.replace_input_with(node, laid)
        count += 1
    return count


def _layout_bound(gm: Any) -> set[Any]:
    """The nodes whose values must be PyTorch's own, storage and strides included: `as_strided` reads its
    input's storage, not its elements, so a view it reads (a slice of a larger tensor, say, as longformer's
    chunking does) cannot be a partition's output, which is a compact tensor of the same elements. Such a
    view stays in PyTorch, and so does every view between it and a tensor that owns its storage whole."""
    bound: set[Any] = set()
    for node in reversed(list(gm.graph.nodes)):
        if node.op != "call_function":
            continue
        read = any(u.op == "call_function" and "as_strided" in str(u.target) for u in node.users) or \
            any(u in bound and getattr(u.target, "is_view", False) for u in node.users)
        if read and not _owns_storage(node.meta.get("val")):
            bound.add(node)
    return bound


def _owns_storage(val: Any) -> bool:
    """Whether a tensor value is laid out as a fresh contiguous tensor: its whole storage, from offset 0."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if not isinstance(val, torch.Tensor):
        return True
    try:
        return val.is_contiguous() and statically_known_true(val.storage_offset() == 0) and statically_known_true(
            val.untyped_storage().nbytes() == val.numel() * val.element_size())
    except (RuntimeError, NotImplementedError):  # a tensor without storage to ask about (a subclass): not known
        return False  # to own it, so a view of it that as_strided reads stays PyTorch's


class CompiledPartition(torch.nn.Module):
    """A supported subgraph as IR, through the target's pipeline, run by the target for each call."""

    def __init__(self, sub: Any, backend: SparsaBackend, modules: dict[int, Any] | None = None):
        super().__init__()
        imported = import_graph(sub, name="partition", modules=modules)
        module, self.tensor_pos, self.scalar_pos = imported.module, imported.tensor_pos, imported.scalar_pos
        self.size_pos = imported.size_pos
        self.complex_pos, self.complex_out = imported.complex_pos, imported.complex_out
        self.tuple_output, self.output_dtypes = imported.tuple_output, imported.output_dtypes
        results = next(n for n in sub.graph.nodes if n.op == "output").args[0]
        # each result's traced layout where it is not row-major (a transpose), as the order of its dims in memory;
        # `laid_out` (set once the graph is partitioned) names the results PyTorch reads, given that layout
        self.orders = [_memory_order(r.meta.get("val")) for r in (results if self.tuple_output else [results])]
        self.laid_out: dict[int, tuple[int, ...]] = {}
        DCE().run(module)  # so that inputs only dead code read count as unused
        self.unused_inputs = _drop_unused_args(module, self.tensor_pos)
        self.tensor_pos = [p for p in self.tensor_pos if p not in self.unused_inputs]
        dump = backend.options.get("dump_dir")
        options = knobs.DebugOptions(dump_dir=os.path.join(dump, f"graph{backend.stats['graphs']}") if dump
                                     else None)
        if backend.target == backends.AUTO:  # by the device of the partition's tensors
            self.backend = backends.choose(("triton",) if _device(sub) == "cuda" else ("cpu", "reference"))
        else:
            self.backend = backends.get(backend.target)
        self.target = self.backend.label
        pipeline = backend.options.get("passes", self.backend.PIPELINE)
        self.exchange = backend.exchange
        if self.exchange is not None:
            pipeline = expert_parallel_pipeline(pipeline, self.exchange.size)
        self.module = PassManager(pipeline, options).run(module)
        self.func = self.module.funcs[-1]
        if backend.options.get("partitions", "worthwhile") == "worthwhile" and not any(
                op.NAME.split(".")[0] in GAINFUL_DIALECTS or op.NAME in GAINFUL_OPS for op in self.func.walk()):
            raise NothingToGain("only pointwise, view and reduction ops")
        # Freezing (opt-in, as Inductor's): parameters are taken as constants, and what only they feed is kept
        # between calls. Without it a parameter is an input like any other, read afresh at each call.
        self.freezing = backend.options.get("freezing", False)
        self.cache: dict = {}
        self.constants_seen: tuple = ()
        self.builds: dict[frozenset[int], Any] = {}  # by the inputs that are parameters
        self.native: Any = None
        self.graphs: Any = None
        self.backend.check(self.func)  # an op the target cannot lower: the partition stays in PyTorch
        if not self.backend.SPECIALIZES_ON_CONSTANTS:
            self.native = self.backend.compile(self.func, {"exchange": self.exchange})
            if backend.options.get("cuda_graphs", False):  # replayed per input signature, where the target can
                self.graphs = self.backend.graphs(self.native)

    def forward(self, *args: Any) -> Any:
        # sizes come in as 0-d values or as the shapes of empty tensors, and complex tensors as their real views;
        # complex results leave the same way
        if self.scalar_pos or self.complex_pos or self.size_pos:
            tensors = [torch.tensor(args[i]) if i in self.scalar_pos else torch.empty((args[i], 0), dtype=torch.int64)
                       if i in self.size_pos else torch.view_as_real(args[i]) if i in self.complex_pos else args[i]
                       for i in self.tensor_pos]
        else:
            tensors = [args[i] for i in self.tensor_pos]
        outs = self.run(tensors)
        if self.complex_out:
            outs = tuple(torch.view_as_complex(o.contiguous()) if i in self.complex_out else o
                         for i, o in enumerate(outs))
        if self.laid_out:  # dense, in the traced order of dims: a view that was valid when traced is valid here
            outs = tuple(_in_order(o, self.laid_out[i]) if i in self.laid_out else o for i, o in enumerate(outs))
        return outs if self.tuple_output else outs[0]

    def run(self, tensors: list[Any]) -> tuple:
        """The partition's results, as a tuple, for its tensor arguments."""
        # With freezing, the module's parameters (AOTAutograd passes them as inputs): what only they feed
        # (weight transposes, packed panels) is computed once and kept while the same tensors at the same
        # version come in. Writes through `.data` do not change the version, which is why it is opt-in.
        params = frozenset(j for j, t in enumerate(tensors) if isinstance(t, torch.nn.Parameter))
        constant = params if self.freezing else frozenset()
        if self.backend.INPUTS == "any":  # torch tensors in, torch tensors out, on their device
            if self.graphs is not None and all(t.is_cuda for t in tensors):  # parameters read in place
                outs = tuple(self.graphs(tensors, self.cache, params))
            else:
                outs = tuple(self.native(tensors, None, self.cache))
            return outs
        device = tensors[0].device if tensors else torch.device("cpu")
        arrays = [t.detach().cpu().numpy() if t.dtype != torch.bfloat16 else t.detach().float().cpu().numpy()
                  for t in tensors]
        seen = tuple((id(tensors[j]), tensors[j].data_ptr(), tensors[j]._version) for j in sorted(constant))
        if seen != self.constants_seen:
            self.cache.clear()
            self.constants_seen = seen
        if self.backend.SPECIALIZES_ON_CONSTANTS:
            # built knowing the parameters: what only they feed runs once on the host, and the grouped GEMMs
            # take their expert weights packed (once per parameter set; if that build fails, one without
            # constants serves, caching nothing across calls)
            if constant not in self.builds:
                try:
                    self.builds[constant] = self.backend.compile(self.func, {"constant_args": constant,
                                                                             "exchange": self.exchange})
                except SparsaError:
                    if not constant:
                        raise
                    if frozenset() not in self.builds:
                        self.builds[frozenset()] = self.backend.compile(self.func, {"exchange": self.exchange})
                    self.builds[constant] = self.builds[frozenset()]
            self.native = self.builds[constant]
            constant = constant if self.native.constant_args == constant else frozenset()
        outs = self.native(arrays, None, self.cache, constant)
        return tuple(torch.from_numpy(np.asarray(o, order="C")).to(device=device, dtype=dt)
                     for o, dt in zip(outs, self.output_dtypes, strict=True))


def _memory_order(val: Any) -> tuple[int, ...] | None:
    """A traced tensor's dims from outermost to innermost in memory, by their strides (at the sizes traced, for
    symbolic ones); None where it is row-major (dims of size 1 aside) or its strides are not known."""
    if not isinstance(val, torch.Tensor) or val.dim() < 2 or val.layout != torch.strided:
        return None
    sizes, strides = [traced_at(s) for s in val.shape], [traced_at(s) for s in val.stride()]
    if None in sizes or None in strides:
        return None
    expect, row_major = 1, True
    for size, stride in zip(reversed(sizes), reversed(strides), strict=True):
        row_major &= size == 1 or stride == expect
        expect *= size
    if row_major:
        return None
    return tuple(sorted(range(len(sizes)), key=lambda d: (-strides[d], d)))


def _in_order(x: Any, order: tuple[int, ...]) -> Any:
    """`x`'s elements in a dense tensor whose dims lie in memory in `order` (outermost first)."""
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return x.permute(order).contiguous().permute(inverse)


def _device(sub: Any) -> str:
    """The device type of a partition's tensors ("cpu" or "cuda"), from the example values Dynamo recorded."""
    for node in sub.graph.nodes:
        val = node.meta.get("val")
        if hasattr(val, "device"):
            return val.device.type
    return "cpu"


def _drop_unused_args(module: Any, tensor_pos: list[int]) -> set[int]:
    """Remove the function arguments nothing reads, but for one whose shape alone binds a symbol the others' types
    or the body's use (input_ids' length, where another input is padded to `s + (8 - s % 8) % 8`); returns their
    input positions."""
    from sparsa.ir.analysis import binders, sizes_of
    from sparsa.ir.core import Block
    from sparsa.ir.dims import symbols

    func = module.funcs[-1]
    old = func.regions[0].block
    keep = [i for i, a in enumerate(old.args) if a.uses]
    needed = {s for i in keep for d in old.args[i].type.shape for s in symbols(d)}
    needed |= {s for op in func.walk() for d in sizes_of(op) for s in symbols(d)}  # (a slice's bounds too)
    unread = [i for i in range(len(old.args)) if i not in keep]
    keep += [unread[j] for j in binders([getattr(old.args[i].type, "shape", ()) for i in unread],
                                        [old.args[i].type.shape for i in keep], needed)]
    keep.sort()
    if len(keep) == len(old.args):
        return set()
    new = Block([old.args[i].type for i in keep], [old.args[i].name_hint for i in keep])
    for i, arg in zip(keep, new.args, strict=True):
        old.args[i].replace_all_uses_with(arg)
    for op in list(old.ops):
        new.append(op)
    new.parent = func.regions[0]
    func.regions[0].blocks[0] = new
    return {p for i, p in enumerate(tensor_pos) if i not in keep}


def sparsa_backend(gm: Any, example_inputs: list[Any], options: dict[str, Any] | None = None) -> Any:
    """The entry point torch.compile finds by name ("sparsa")."""
    return SparsaBackend(options)(gm, example_inputs)
