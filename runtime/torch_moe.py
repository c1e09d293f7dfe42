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
"""

from __future__ import annotations

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
    return moe(x, idx, w) |e, h| {{ (silu(h @ w_gate_up[e][:{F}].T) * (h @ w_gate_up[e][{F}:].T)) @ w_down[e].T }}
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
                                 renorm="w = w / sum(w, axis=-1, keepdim=true)" if renorm else "")

    def compiled(self, x: torch.Tensor) -> Any:
        """The compiled model for x's device and dtype (with freezing, its weights read from the block's
        parameters when they changed)."""
        import sparsa

        if x.dtype not in _DTYPES:
            raise SparsaError(f"swapped MoE block: dtype {x.dtype} is not supported (float32, bfloat16, float16)")
        target = self.target
        if target == backends.AUTO:  # the cpu target's kernels are float32; half precision on CPU runs on the reference
            cpu = ("cpu", "reference") if x.dtype == torch.float32 else ("reference",)
            target = backends.choose(("triton",) if x.device.type == "cuda" else cpu).NAME
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
