"""Opt-in: replace Hugging Face-style MoE blocks with Sparsa-compiled equivalents that use the same weights.

The expert loop of a classic MoE block (`torch.where` per expert, `index_add_`) graph-breaks in Dynamo, so a
torch.compile backend only ever sees fragments of it. `swap_moe_blocks(model)` finds the blocks whose
structure it knows -- a top-k softmax router (`gate.weight` [E, D], `gate.top_k`, optional
`gate.norm_topk_prob`) and SwiGLU experts stored as 3-D tensors (`experts.gate_up_proj` [E, 2F, D],
`experts.down_proj` [E, D, F]), as transformers 5.x writes Mixtral, Qwen3-MoE and OLMoE -- and replaces
each with a module that runs the whole block (router, dispatch, grouped GEMMs, combine) as one compiled
Sparsa model: `triton` on CUDA tensors, `cpu` on float32 CPU tensors where torch-mlir is installed,
`reference` otherwise (or the `target` given). Inference only. The swapped module keeps the block's `gate` and
`experts` under their names, so the model's state_dict keys do not change and `load_state_dict` of the original
checkpoint works.

The parameters stay the one source of truth. By default the compiled model takes them as inputs at every
call, in PyTorch's own layout ([E, N, K]: the grouped GEMMs' weights are packed from them as they are read),
so any write is seen, writes through `.data` included. `freezing=True` (as Inductor's freezing) loads them
into the compiled model as constants instead, kept while the parameters are the same tensors at the same
version (`load_state_dict`, `copy_` and optimizer steps make a new version; writes through `.data` do not:
call `refresh()` after those). Use it before `torch.compile`; Dynamo leaves the swapped blocks alone (they run
as Sparsa calls) and compiles the rest. Under autograd (training), a swapped block's backward is Sparsa's
(`m.vjp`): gradients reach the hidden states and the block's parameters.

`FoldedBlocks` serves the torch.compile backend instead: the blocks of a training graph that it folded into
`sparsa::moe_swiglu` or `sparsa::moe_experts` (another activation, biases; frontend/torch_moe.py) run as their
experts compiled whole, the forward's residuals kept for the backward under a key the op returns.
"""

from __future__ import annotations

import operator
import weakref
from collections import Counter
from typing import Any

import torch

from sparsa.backends import base as backends
from sparsa.ir.diagnostics import SparsaError

_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
# transformers' layout: gate.weight [E, D], experts.gate_up_proj [E, 2F, D], experts.down_proj [E, D, F];
# the weights are the model's inputs (read at every call) or, with freezing, its parameters
MOE_SOURCE = """
model MoE(x: {dt}[T, {D}]{inputs}) -> {dt}[T, {D}] {{
{params}    p = softmax(x @ gate.T)
    w, idx = topk(p, k={K})
    {renorm}
    return {experts}
}}
"""
EXPERTS = "moe(x, idx, w) |e, h| {{ (silu(h @ w_gate_up[e][:{F}].T) * (h @ w_gate_up[e][{F}:].T)) @ w_down[e].T }}"
# the experts alone (a training graph's folded block: the router is the graph's), the same weights as inputs
EXPERTS_SOURCE = """
model MoEExperts(x: {dt}[T, {D}], idx: i64[T, {K}], w: {dt}[T, {K}], w_gate_up: {dt}[{E}, {F2}, {D}],
                 w_down: {dt}[{E}, {D}, {F}]) -> {dt}[T, {D}] {{
    return {experts}
}}
"""
WEIGHTS = (("gate", "[{E}, {D}]"), ("w_gate_up", "[{E}, {F2}, {D}]"), ("w_down", "[{E}, {D}, {F}]"))


def known_moe_block(module: torch.nn.Module) -> bool:
    """True for a block `swap_moe_blocks` can replace (see the module docstring)."""
    gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    if gate is None or experts is None or set(dict(module.named_children())) != {"gate", "experts"}:
        return False
    w = getattr(gate, "weight", None)
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not all(isinstance(t, torch.Tensor) for t in (w, gu, down)) or not isinstance(getattr(gate, "top_k", None), int):
        return False
    E, D = w.shape
    act = type(getattr(experts, "act_fn", None)).__name__.lower()
    return (gu.dim() == 3 and gu.shape[0] == E and gu.shape[2] == D and gu.shape[1] % 2 == 0
            and tuple(down.shape) == (E, D, gu.shape[1] // 2) and "silu" in act)


def block_target(target: str, x: torch.Tensor, what: str) -> str:
    """The target a compiled MoE block runs x on: `target`, or for "auto" triton on CUDA tensors, else cpu for
    float32 (the cpu target's kernels are float32) where it can run, else the reference."""
    if x.dtype not in _DTYPES:
        raise SparsaError(f"{what}: dtype {x.dtype} is not supported (float32, bfloat16, float16)")
    if target != backends.AUTO:
        return target
    cpu = ("cpu", "reference") if x.dtype == torch.float32 else ("reference",)
    return backends.choose(("triton",) if x.device.type == "cuda" else cpu).NAME


class SparsaMoEBlock(torch.nn.Module):
    """A known MoE block run as one compiled Sparsa model (its weights stay the original parameters)."""

    def __init__(self, block: torch.nn.Module, target: str = "auto", freezing: bool = False,
                 expert_parallel: Any = None):
        super().__init__()
        # the block's own children, under their names: state_dict keys, .to(device) and loading keep working
        self.gate, self.experts = block.gate, block.experts
        self.target = target
        self.freezing = freezing
        self.expert_parallel = expert_parallel
        self._models: dict[tuple, Any] = {}
        self._seen: dict[tuple, tuple] = {}  # per compiled model: the parameters it last read

    def _params(self) -> tuple[torch.Tensor, ...]:
        return self.gate.weight, self.experts.gate_up_proj, self.experts.down_proj

    def refresh(self) -> None:
        """With freezing: read the parameters again at the next call (after writes through `.data`, which
        PyTorch does not count as updates). Without it they are read at every call anyway."""
        self._seen.clear()

    def source(self, dtype: torch.dtype) -> str:
        """The `.sp` model this block compiles to."""
        gate, experts = self.gate, self.experts
        E, D = gate.weight.shape
        F = experts.down_proj.shape[2]
        dt = _DTYPES[dtype]
        decls = [(name, f"{dt}{shape.format(E=E, D=D, F=F, F2=2 * F)}") for name, shape in WEIGHTS]
        inputs = "" if self.freezing else "".join(f", {name}: {t}" for name, t in decls)
        params = "".join(f"    param {name}: {t}\n" for name, t in decls) if self.freezing else ""
        renorm = getattr(gate, "norm_topk_prob", True)
        return MOE_SOURCE.format(dt=dt, D=D, F=F, K=gate.top_k, inputs=inputs, params=params,
                                 renorm="w = w / sum(w, axis=-1, keepdim=true)" if renorm else "",
                                 experts=EXPERTS.format(F=F))

    def compiled(self, x: torch.Tensor) -> Any:
        """The compiled model for x's device and dtype (with freezing, its weights read from the block's
        parameters when they changed)."""
        import sparsa

        target = block_target(self.target, x, "swapped MoE block")
        key = (target, x.device.type, x.dtype)
        if key not in self._models:
            self._models[key] = sparsa.compile(self.source(x.dtype), target=target,
                                               expert_parallel=self.expert_parallel)
        if self.freezing:
            seen = tuple((id(p), p.data_ptr(), p._version) for p in self._params())
            if self._seen.get(key) != seen:  # first call, or a parameter changed: read them (again)
                self._models[key].load_weights(dict(zip((name for name, _ in WEIGHTS), self._weights(x),
                                                        strict=True)))
                self._seen[key] = seen
        return self._models[key]

    def _weights(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The parameters as the compiled model takes them: detached, in x's dtype and on its device."""
        return [p.detach().to(device=x.device, dtype=x.dtype) for p in self._params()]

    @torch._dynamo.disable
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        model = self.compiled(x)
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self._params())):
            # training: Sparsa's backward (the dispatch reused, weight gradients per expert segment)
            y = _SparsaMoE.apply(model, self.freezing, x, *self._params())
        else:
            y = model(x) if self.freezing else model(x, *self._weights(x))
        return y.to(hidden_states.dtype).reshape(shape)


class _SparsaMoE(torch.autograd.Function):
    """A swapped block under autograd: the forward is the compiled model's `vjp` (its saved residuals kept for
    the backward), the backward its pullback, whose gradients go to x and the block's parameters."""

    @staticmethod
    def forward(ctx: Any, model: Any, frozen: bool, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        weights = [p.detach().to(device=x.device, dtype=x.dtype) for p in params]
        y, ctx.pullback = model.vjp(x.detach()) if frozen else model.vjp(x.detach(), *weights)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        grads = ctx.pullback(dy.contiguous())
        return (None, None, grads["x"], *(grads[name].to(dy.dtype) for name, _ in WEIGHTS))


def swap_moe_blocks(model: torch.nn.Module, target: str = "auto", freezing: bool = False,
                    expert_parallel: Any = None) -> list[str]:
    """Replace every known MoE block of `model` in place; returns the names of the blocks replaced.
    `freezing`: load the parameters into the compiled blocks as constants (see the module docstring);
    `expert_parallel`: a torch.distributed process group the blocks split their experts over (each rank passes
    its own tokens; with freezing it keeps only its block of the expert weights)."""
    swapped = []
    for name, module in list(model.named_modules()):
        if not name or not known_moe_block(module):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SparsaMoEBlock(module, target, freezing, expert_parallel))
        swapped.append(name)
    return swapped


# (x, w, W1, W2): the block's float inputs, as the folded ops' `no_grad` counts them, their positions among the
# compiled experts' inputs, and their names there: (x, idx, w, w_gate_up, w_down) for `sparsa::moe_swiglu`,
# (x, idx, w, w1, w2) for `sparsa::moe_experts`
_FLOAT_POSITIONS = (0, 2, 3, 4)
_FLOAT_INPUTS = {False: ("x", "w", "w_gate_up", "w_down"), True: ("x", "w", "w1", "w2")}


def _all_but(wanted: frozenset[int]) -> tuple[int, ...]:
    """The `no_grad` of a model giving the gradients at the positions `wanted`."""
    return tuple(sorted(set(range(4)) - wanted))


def _split(rest: tuple) -> tuple[list, tuple, tuple[int, ...]]:
    """A folded op's arguments after its five tensors: its biases, its activation's description (the name, the
    column slices, which weights are stored transposed, which biases it has; none of these for SwiGLU) and its
    `no_grad`."""
    if len(rest) == 1:
        return [], (), tuple(rest[0])
    return list(rest[0]), tuple(tuple(a) if isinstance(a, list) else a for a in rest[1:-1]), tuple(rest[-1])


class BlockCall:
    """What a training graph calls in place of a folded op (forward) or its backward: the folded block
    compiled by Sparsa (`FoldedBlocks`). `wanted`: the backward's results the graph reads."""

    def __init__(self, blocks: FoldedBlocks, backward: bool, wanted: frozenset[int] = frozenset()):
        self.blocks, self.backward, self.wanted = blocks, backward, wanted
        self.__name__ = f"sparsa_moe_block_{'backward' if backward else 'forward'}"  # the generated code's name

    def __call__(self, *args: Any) -> Any:
        return self.blocks.backward(*args, wanted=self.wanted) if self.backward else self.blocks.forward(*args)

    def __repr__(self) -> str:
        return f"sparsa.moe_block.{'backward' if self.backward else 'forward'}"


class FoldedBlocks:
    """A torch.compile backend's MoE blocks folded for training (`sparsa::moe_swiglu`, `sparsa::moe_experts` and
    their backwards, frontend/torch_moe.py), each run as the experts compiled by Sparsa (SwiGLU's from a `.sp`
    model, the others' from the `moe.moe` the importer makes: `experts_module`): the forward is the model's `vjp`
    (its saved residuals: the dispatch and the expert products), whose pullback waits under the call's key until
    the backward calls it, so the backward neither sorts the tokens nor makes the products again. A key without a
    pullback (the forward ran elsewhere) makes the backward run the forward again. The inputs that need no gradient
    (as the fold saw them) get none: no dX GEMMs where x needs none."""

    def __init__(self, target: str = backends.AUTO, expert_parallel: Any = None):
        self.target, self.expert_parallel = target, expert_parallel
        self.models: dict[tuple, Any] = {}  # by target, device, dtype, sizes and the inputs given no gradient
        self.pullbacks: dict[int, tuple] = {}  # key -> (pullback, no_grad), while the key tensor lives
        self.stats: Counter[str] = Counter()

    def install(self, gm: Any) -> list[tuple[str, str, Any]]:
        """Make the graph's calls of the two ops calls of the compiled block; returns each one's name, target and
        function (the forward keeping residuals, or the backward). A block Sparsa cannot compile keeps the op (its
        PyTorch definition runs), the reason in its node's meta["sparsa_why"], and raises nothing here: the caller
        reports it as a fallback."""
        ops = torch.ops.sparsa
        fwd = (ops.moe_swiglu.default, ops.moe_experts.default)
        bwd = (ops.moe_swiglu_backward.default, ops.moe_experts_backward.default)
        done = []
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target not in fwd + bwd:
                continue
            backward = node.target in bwd
            inputs = node.args[2:7] if backward else node.args[:5]
            biases, act, no_grad = _split(node.args[7 if backward else 5:])
            wanted = frozenset(u.args[1] for u in node.users if u.target is operator.getitem) if backward \
                else frozenset()
            try:
                # the backward's own model where the forward's leaves out a gradient the graph reads
                vals = [a.meta["val"] for a in inputs] + [[b.meta["val"] for b in biases]]
                model = self.model(*vals, act=act, no_grad=no_grad)
                if wanted & set(no_grad):
                    self.model(*vals, act=act, no_grad=_all_but(wanted))
            except (SparsaError, KeyError) as e:
                why = e.message.splitlines()[0] if isinstance(e, SparsaError) else "no example value"
                node.meta["sparsa_why"] = f"the folded MoE block did not compile: {why}"
                continue
            node.target = BlockCall(self, backward, wanted)
            half = model._backward().module.funcs[-1 if backward else -2]
            done.append((f"moe_block_{'backward' if backward else 'forward'}", model.target, half))
        return done

    def model(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
              biases: list[torch.Tensor], act: tuple, no_grad: tuple[int, ...]) -> Any:
        """The compiled experts for these inputs (their example values: sizes, dtype, device) and activation (`act`:
        () for SwiGLU), made once, both halves of their reverse mode compiled now (not in a step)."""
        from sparsa.frontend.torch_moe import experts_module
        from sparsa.runtime.compiler import CompiledModel, compile_source

        target = block_target(self.target, x, "a folded MoE block")
        if self.expert_parallel is not None:  # its weight gradients would be this rank's blocks, the parameters whole
            raise SparsaError("a folded MoE block trained expert parallel (swap_moe_blocks trains it so)")
        sizes = (x.shape[-1], idx.shape[-1], *w1.shape, *w2.shape, *(d for b in biases for d in b.shape))
        if not all(isinstance(d, int) for d in sizes):
            raise SparsaError("a folded MoE block with symbolic expert sizes")
        key = (target, x.device.type, x.dtype, sizes, act, no_grad)
        if key not in self.models:
            if act:
                module, name = experts_module(_DTYPES[x.dtype], *sizes[:2], [t.shape for t in (w1, w2, *biases)],
                                              *act)
            else:
                D, K, E, F2 = sizes[:4]
                text = EXPERTS_SOURCE.format(dt=_DTYPES[x.dtype], D=D, K=K, E=E, F2=F2, F=F2 // 2,
                                             experts=EXPERTS.format(F=F2 // 2))
                module, name = compile_source(text, "<folded MoE block>", None)
            # the 0-d tensors an activation reads (after the weights and the biases) get no gradient
            module.funcs[-1].attributes["no_grad"] = [_FLOAT_POSITIONS[i] for i in no_grad] + list(
                range(5 + sum(act[-1]), 5 + len(biases)) if act else [])
            backend = backends.get(target)
            model = CompiledModel(module, name, backend, backend.PIPELINE, None, self.expert_parallel)
            model._backward()  # the forward keeping residuals and the backward, compiled now
            self.models[key] = model
        return self.models[key]

    def _inputs(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                biases: list[torch.Tensor]) -> list[torch.Tensor]:
        return [x.detach(), idx.to(torch.int64), *(t.detach().to(x.dtype) for t in (w, w1, w2, *biases))]

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                *rest: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded op's forward: its output and the key its pullback waits under (`rest`: the op's other
        arguments, the activation's description and `no_grad`)."""
        from sparsa.frontend.torch_moe import new_key

        biases, act, no_grad = _split(rest)
        y, pullback = self.model(x, idx, w, w1, w2, biases, act, no_grad).vjp(*self._inputs(x, idx, w, w1, w2,
                                                                                           biases))
        key = new_key()
        self.pullbacks[int(key)] = (pullback, no_grad)
        weakref.finalize(key, self.pullbacks.pop, int(key), None)  # freed with the key AOTAutograd saves
        return y, key

    def backward(self, dy: torch.Tensor, key: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                 w1: torch.Tensor, w2: torch.Tensor, *rest: Any, wanted: frozenset[int] = frozenset({0, 1, 2, 3})
                 ) -> tuple:
        """The cotangents of (x, w, w1, w2) at the positions `wanted` (None at the others), and a list of the
        biases' (where the op takes biases), from the pullback the forward left under `key`, or from the forward
        run again."""
        biases, act, _ = _split(rest)
        pullback, kept_out = self.pullbacks.get(int(key), (None, ()))
        if pullback is None or wanted & set(kept_out):  # the forward again, giving every gradient the graph reads
            self.stats["moe backward with the forward run again"] += 1
            model = self.model(x, idx, w, w1, w2, biases, act, _all_but(wanted))
            _, pullback = model.vjp(*self._inputs(x, idx, w, w1, w2, biases))
        else:
            self.stats["moe backward from saved residuals"] += 1
        grads = pullback(dy.detach().to(x.dtype).contiguous())
        inputs = (x, w, w1, w2)
        four = tuple(grads[name].to(inputs[i].dtype) if i in wanted else None
                     for i, name in enumerate(_FLOAT_INPUTS[bool(act)]))
        if not act:
            return four
        from sparsa.frontend.torch_moe import extra_names

        return (*four, [grads[name].to(b.dtype) if name in grads else torch.zeros_like(b)
                        for name, b in zip(extra_names(act[-1], len(biases)), biases, strict=True)])
