"""MoE blocks as transformers 5.x writes them, recognized in the ATen graph Dynamo hands over and folded
into one call that the importer turns into `moe.moe` (the passes then build the router, dispatch, grouped
matmuls and combine from it).

The "grouped_mm" experts of transformers give this graph per block (T tokens, K slots, E experts):
    perm = sort(idx.view(-1)).indices;  rows = x[perm // K]
    offs = cumsum(histc(sorted ids, E))
    h = grouped_mm(rows, gate_up_proj^T, offs);  g, u = split(h, F, -1);  a = silu(g) * u
    y = grouped_mm(a, down_proj^T, offs) * w.view(-1)[perm][:, None]
    out = y[inverse(perm)].view(T, K, D).sum(1)
`fold_grouped_mm_moe` replaces `out` by `moe_swiglu(x, idx, w, gate_up_proj, down_proj)`; the sort, the
histogram and the two grouped matmuls become dead code.

The "batched_mm" experts gather each assignment's weights and multiply them one row at a time:
    xr = x[:, None].expand(T, K, D).reshape(T*K, D);  ids = idx.view(-1)
    h = bmm(gate_up_proj[ids], xr[..., None]).squeeze(-1);  a = silu(h[:, :F]) * h[:, F:]
    y = bmm(down_proj[ids], a[..., None]).squeeze(-1) * w.view(-1)[:, None];  out = y.view(T, K, D).sum(1)
and are folded the same way (the [T*K, 2F, D] gathered weights are never built).

transformers before 5.23 also guards against expert-parallel sentinel ids (>= E) in both forms: the grouped
form zeroes the rows of those ids around each grouped matmul (`masked_fill(h, (sorted ids >= E)[:, None], 0)`),
the batched form clamps the ids to E - 1 before gathering weights (and, since 5.23, zeroes their gates).
The fills change nothing that `moe_swiglu` computes (it skips ids >= E); the clamp is accepted only for ids
from a top-k over E scores. transformers 5.23 and later write these guards under expert parallelism only.

Graphs that differ in any checked step are left alone (and run as before).
"""

from __future__ import annotations

import hashlib
import itertools
import operator
from typing import Any

import torch

from sparsa.frontend.torch_import import NUMBER_OPS, Importer, Unsupported
from sparsa.ir import dialects as D
from sparsa.ir.core import Block, Module, Region, Value
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.dialects.func import FuncOp, ReturnOp, YieldOp
from sparsa.ir.types import TensorType, scalar


def moe_swiglu(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gate_up: torch.Tensor,
               down: torch.Tensor) -> torch.Tensor:
    """y[t] = sum_j w[t, j] * (silu(x[t] @ G_e^T) * (x[t] @ U_e^T)) @ down_e^T, e = idx[t, j], with
    [G_e; U_e] = gate_up[e]; the PyTorch meaning of the folded call (what runs if it is not compiled)."""
    F = down.shape[-1]
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(gate_up.shape[0]):
        tok, slot = torch.where(idx == e)
        h = x[tok] @ gate_up[e].transpose(0, 1)
        a = torch.nn.functional.silu(h[:, :F]) * h[:, F:]
        y.index_add_(0, tok, ((a @ down[e].transpose(0, 1)) * w[tok, slot, None]).float())
    return y.to(x.dtype)


def moe_experts(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                act: Any, slices: list, b1: torch.Tensor | None = None, b2: torch.Tensor | None = None,
                captured: list | tuple = ()) -> torch.Tensor:
    """y[t] = sum_j w[t, j] * (act(*(h[:, s] for s in slices), *captured) @ w2[e] + b2[e]), h = x[t] @ w1[e] +
    b1[e], e = idx[t, j], with weights laid out [E, in, out] and optional biases [E, out]: an inference graph's
    grouped-matmul MoE block of any row-wise activation (`act`, a graph module of the column slices of h it
    reads, each (start, stop, step), then of the 0-d tensors it reads from outside: a module's float attribute
    Dynamo passes as one under dynamic shapes, GPT-OSS's alpha); what runs if it is not compiled."""
    y = torch.zeros(x.shape[0], w2.shape[-1], dtype=torch.float32, device=x.device)
    for e in range(w1.shape[0]):
        tok, slot = torch.where(idx == e)
        h = x[tok] @ w1[e] + (b1[e] if b1 is not None else 0)
        a = act(*(h[:, start:stop:step] for start, stop, step in slices), *captured)
        out = a @ w2[e] + (b2[e] if b2 is not None else 0)
        y.index_add_(0, tok, (out * w[tok, slot, None]).float())
    return y.to(x.dtype)


# The folded block as a PyTorch op, for training graphs: folded before AOTAutograd traces the joint graph
# (`fold_before_autograd`), its backward there is `moe_swiglu_backward`, instead of the graph of sorts, scatters
# and grouped matmuls PyTorch's autograd makes of the unfolded block. The torch.compile backend runs both as the
# block compiled by Sparsa (runtime/torch_moe.py `FoldedBlocks`): the forward keeps its residuals (the dispatch,
# the SwiGLU products) under the call's `key`, a fresh one-element tensor AOTAutograd saves for the backward, which
# reads them there. `no_grad`: the positions among (x, w, gate_up, down) that need no gradient (as the fold saw
# the graph's inputs), whose backward GEMMs the compiled block leaves out.
_KEYS = itertools.count(1)


@torch.library.custom_op("sparsa::moe_swiglu", mutates_args=())
def moe_swiglu_op(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gate_up: torch.Tensor,
                  down: torch.Tensor, no_grad: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`moe_swiglu` as an op of its own, and a fresh key (what runs where the backend does not replace it)."""
    return moe_swiglu(x, idx, w, gate_up, down), new_key()


def new_key() -> torch.Tensor:
    """A key no other call of the block has had."""
    return torch.tensor([next(_KEYS)], dtype=torch.int64)


@moe_swiglu_op.register_fake
def _(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
      no_grad: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty(1, dtype=torch.int64)


@torch.library.custom_op("sparsa::moe_swiglu_backward", mutates_args=())
def moe_swiglu_backward(dy: torch.Tensor, key: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                        gate_up: torch.Tensor, down: torch.Tensor, no_grad: list[int]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cotangents of x, w, gate_up and down given dy's of `moe_swiglu` (none to the expert ids); this
    definition computes all four from the inputs (the key and `no_grad` serve the compiled block)."""
    F = down.shape[-1]
    dx, dw, dgate_up, ddown = (torch.zeros_like(t) for t in (x, w, gate_up, down))
    for e in range(gate_up.shape[0]):
        tok, slot = torch.where(idx == e)
        rows, gate = x[tok], w[tok, slot, None]
        h = rows @ gate_up[e].transpose(0, 1)
        g, u = h[:, :F], h[:, F:]
        s = torch.sigmoid(g)
        a = g * s * u
        dout = dy[tok]
        dw[tok, slot] = (dout * (a @ down[e].transpose(0, 1))).sum(-1).to(w.dtype)
        dout = dout * gate
        ddown[e] = dout.transpose(0, 1) @ a
        da = dout @ down[e]
        dh = torch.cat([da * u * s * (1 + g * (1 - s)), da * g * s], -1)
        dgate_up[e] = dh.transpose(0, 1) @ rows
        dx.index_add_(0, tok, dh @ gate_up[e])
    return dx, dw, dgate_up, ddown


@moe_swiglu_backward.register_fake
def _(dy: torch.Tensor, key: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gate_up: torch.Tensor,
      down: torch.Tensor, no_grad: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.empty_like(t) for t in (x, w, gate_up, down))


# Experts of another row-wise activation, for training: `sparsa::moe_experts` takes the weights as stored (each
# transposed, [E, out, in], or not, [E, in, out]: `transposed`), the activation by name (a custom op's arguments are
# tensors, numbers and strings: `ACTIVATIONS` holds the graph modules by a hash of their code) and its column slices
# as a flat list of (start, stop, step).
ACTIVATIONS: dict[str, Any] = {}


def activation_name(act: Any) -> str:
    """The name `sparsa::moe_experts` knows the activation `act` (a graph module) by."""
    name = "act_" + hashlib.sha1(act.code.encode()).hexdigest()[:16]
    ACTIVATIONS.setdefault(name, act)
    return name


def experts_function(idx: torch.Tensor, act: str, slices: list[int], transposed: list[int], biased: list[int]
                     ) -> Any:
    """`moe_experts` as a function of (x, w, w1, w2, *biases, *captured), the weights as `sparsa::moe_experts`
    takes them (its tensor list: the biases `biased` has, then the 0-d tensors the activation reads)."""
    triples = _triples(slices)

    def f(x: torch.Tensor, w: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, *extra: torch.Tensor
          ) -> torch.Tensor:
        w1, w2 = (t.transpose(1, 2) if flip else t for t, flip in zip((w1, w2), transposed, strict=True))
        given = iter(extra)
        b1, b2 = (next(given) if has else None for has in biased)
        return moe_experts(x, idx, w, w1, w2, ACTIVATIONS[act], triples, b1, b2, list(given))
    return f


def _triples(flat: list[int]) -> list[tuple[int, ...]]:
    return [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]


@torch.library.custom_op("sparsa::moe_experts", mutates_args=())
def moe_experts_op(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                   biases: list[torch.Tensor], act: str, slices: list[int], transposed: list[int], biased: list[int],
                   no_grad: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`moe_experts` as an op of its own, and a fresh key (what runs where the backend does not replace it).
    `biases`: the first and the second matmul's, those `biased` has (GPT-OSS's experts have both), then the 0-d
    tensors the activation reads (`moe_experts`' `captured`), which get no gradient."""
    return experts_function(idx, act, slices, transposed, biased)(x, w, w1, w2, *biases), new_key()


@moe_experts_op.register_fake
def _(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
      biases: list[torch.Tensor], act: str, slices: list[int], transposed: list[int], biased: list[int],
      no_grad: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape[0], w2.shape[1 if transposed[1] else 2]), torch.empty(1, dtype=torch.int64)


@torch.library.custom_op("sparsa::moe_experts_backward", mutates_args=())
def moe_experts_backward(dy: torch.Tensor, key: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                         w1: torch.Tensor, w2: torch.Tensor, biases: list[torch.Tensor], act: str, slices: list[int],
                         transposed: list[int], biased: list[int], no_grad: list[int]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The cotangents of x, w, w1, w2 and the biases given dy's of `sparsa::moe_experts`, by torch.func's reverse
    mode of its definition, and zeros to the 0-d tensors the activation reads (the key and `no_grad` serve the
    compiled block)."""
    f = experts_function(idx, act, slices, transposed, biased)
    given, captured = biases[:sum(biased)], biases[sum(biased):]
    _, pullback = torch.func.vjp(lambda *args: f(*args, *captured), x, w, w1, w2, *given)
    grads = pullback(dy)
    return (*grads[:4], [*grads[4:], *(torch.zeros_like(c) for c in captured)])


@moe_experts_backward.register_fake
def _(dy: torch.Tensor, key: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, w1: torch.Tensor,
      w2: torch.Tensor, biases: list[torch.Tensor], act: str, slices: list[int], transposed: list[int],
      biased: list[int], no_grad: list[int]
      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    return (*(torch.empty_like(t) for t in (x, w, w1, w2)), [torch.empty_like(b) for b in biases])


def _differentiable(op: Any, backward: Any, listed: bool = False) -> None:
    """op's backward is `backward` (given dy, op's key and its inputs); its key is not differentiable.
    `listed`: op's sixth input is a list of tensors (the biases), whose cotangents the backward gives as a list."""
    def setup(ctx: Any, inputs: tuple, output: tuple) -> None:
        extra = list(inputs[5]) if listed else []
        ctx.save_for_backward(output[1], *inputs[:5], *extra)
        ctx.rest = inputs[6:] if listed else inputs[5:]
        ctx.mark_non_differentiable(output[1])

    def pullback(ctx: Any, dy: torch.Tensor, _dkey: Any) -> tuple:
        key, x, idx, w, w1, w2, *extra = ctx.saved_tensors
        lists = (extra,) if listed else ()
        dx, dw, dw1, dw2, *dlists = backward(dy, key, x, idx, w, w1, w2, *lists, *ctx.rest)
        # nothing to the other inputs; with a list input, PyTorch checks the structure: an empty list stays one
        return (dx, None, dw, dw1, dw2, *(list(d) for d in dlists)) + tuple(
            [] if listed and isinstance(a, list) and not a else None for a in ctx.rest)

    op.register_autograd(pullback, setup_context=setup)


_differentiable(moe_swiglu_op, moe_swiglu_backward)
_differentiable(moe_experts_op, moe_experts_backward, listed=True)


class FoldFailed(Exception):
    """Dynamo's graph could not be traced to ATen for the fold (the reason); it is compiled unfolded."""


def fold_before_autograd(gm: Any, example_inputs: list[Any]) -> tuple[Any, int]:
    """Dynamo's graph with its MoE blocks folded into `sparsa::moe_swiglu`, for AOTAutograd to trace (so that the
    backward graph calls `moe_swiglu_backward`), and how many; (gm, 0) where none is folded. Only graphs that
    compute gradients (an input requires one) and call transformers' grouped matmul or a bmm are traced to ATen
    here (functionalized, on the fake tensors and sizes Dynamo traced it with: dynamic sizes stay symbolic)."""
    if not torch.is_grad_enabled() or not any(getattr(t, "requires_grad", False) for t in example_inputs):
        return gm, 0
    if not any(n.op in ("call_function", "call_method") and ("grouped_mm" in str(n.target) or "bmm" in str(n.target))
               for n in gm.graph.nodes):
        return gm, 0
    from torch._dispatch.python import enable_python_dispatcher
    from torch._guards import TracingContext, detect_fake_mode
    from torch._ops import HigherOrderOperator
    from torch.func import functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    # vmap's levels inlined by Dynamo (an associative scan fold_linear_scans did not fold: a symbolic length) fail
    # an internal assert of functorch when traced here, and the failure leaves its interpreter stack such that
    # AOTAutograd then fails too (Jamba); so do higher-order ops: such graphs are not traced for the fold
    transform = next((n.target for n in gm.graph.nodes if isinstance(n.target, HigherOrderOperator) or
                      getattr(n.target, "__name__", "") == "_vmap_increment_nesting"), None)
    if transform is not None:
        raise FoldFailed(f"a functorch transform ({transform.__name__}) in the graph")

    fake_mode, context = detect_fake_mode(example_inputs), TracingContext.try_get()
    if fake_mode is None or context is None:
        return gm, 0
    fakes = []  # as AOTAutograd makes them (the same fake tensors: from_tensor keeps one per tensor)
    for t in example_inputs:
        if isinstance(t, torch.Tensor):
            symbolic = context.tensor_to_context.get(t)
            t = fake_mode.from_tensor(t, symbolic_context=symbolic,
                                      source=getattr(symbolic, "tensor_source", None))
        fakes.append(t)
    try:  # the Python dispatcher on, as AOTAutograd has it: ops' Python meta kernels take symbolic sizes (a pad by
        # a length-dependent amount, whose C++ one wants concrete ones)
        with fake_mode, torch.no_grad(), enable_python_dispatcher():
            traced = make_fx(functionalize(gm, remove="mutations"))(*fakes)
    except Exception as e:  # noqa: BLE001 - any tracing failure: the graph goes on as Dynamo gave it, and says so
        raise FoldFailed(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    traced.graph.eliminate_dead_code()  # functional: tracing leaves dead views (of h: the fold reads its users)
    folded = fold_grouped_mm_moe(traced, torch.ops.sparsa.moe_swiglu.default,
                                 _needing_grad(traced, example_inputs))
    if not folded:
        return gm, 0
    _differentiable_copies(traced)
    traced.graph.eliminate_dead_code()
    traced.recompile()
    return traced, folded


def _differentiable_copies(gm: Any) -> None:
    """Functionalization writes an assignment into a slice (`out[:, i] = y`) as aten.copy(out[:, i], y), which
    autograd has no formula for (AOTAutograd differentiates before it functionalizes, so it never meets one):
    copy's value is y in the destination's dtype and shape, written so."""
    aten = torch.ops.aten
    for node in [n for n in gm.graph.nodes if _is(n, aten.copy.default)]:
        dst, src = node.args[:2]
        want, have = dst.meta.get("val"), src.meta.get("val") if hasattr(src, "meta") else None
        if want is None or have is None:
            raise FoldFailed("a copy into a slice of unknown shape")
        value = src
        with gm.graph.inserting_before(node):
            if have.dtype != want.dtype:
                value = gm.graph.call_function(aten._to_copy.default, (value,), {"dtype": want.dtype})
                value.meta["val"] = have.to(want.dtype)
            if tuple(have.shape) != tuple(want.shape):
                if not all(isinstance(d, int) for d in want.shape):
                    raise FoldFailed("a broadcasting copy into a slice of symbolic shape")
                value = gm.graph.call_function(aten.expand.default, (value, list(want.shape)))
                value.meta["val"] = want
        node.replace_all_uses_with(value)
        gm.graph.erase_node(node)


def _is(node: Any, target: Any) -> bool:
    return getattr(node, "op", None) == "call_function" and node.target is target


def _only_user(node: Any) -> Any:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _needing_grad(gm: Any, example_inputs: list[Any]) -> set[Any]:
    """The nodes of a traced graph autograd will want a gradient of: float values computed from an input that
    requires one (not through a detach)."""
    aten = torch.ops.aten
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    need = {n for n, t in zip(placeholders, example_inputs, strict=False) if getattr(t, "requires_grad", False)}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is aten.detach.default:
            continue
        val = n.meta.get("val")
        vals = val if isinstance(val, tuple | list) else (val,)
        if any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in vals) and any(
                a in need for a in n.all_input_nodes):
            need.add(n)
    return need


def fold_grouped_mm_moe(gm: Any, into: Any = moe_swiglu, needing_grad: set[Any] | None = None) -> int:
    """Fold every recognized transformers MoE block (grouped_mm or batched_mm experts) of an ATen graph into a
    call of `into`; returns how many. The sort, histogram and grouped matmuls are left dead: the caller removes
    them. Grouped-matmul experts of another row-wise activation than SwiGLU fold into `moe_experts`. With
    `needing_grad` (a training graph's nodes that want a gradient) `into` is `sparsa::moe_swiglu`, and the others
    fold into `sparsa::moe_experts`: both also take the positions among their float inputs (x, w and the two
    weights) that need no gradient, and return the output and a key."""
    grouped = getattr(getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None), "default", None)
    aten = torch.ops.aten
    folded = 0
    for first in [n for n in gm.graph.nodes if _is(n, grouped) or _is(n, aten.bmm.default)]:
        if first.graph is not gm.graph or not first.users:  # folded away with an earlier block
            continue
        match = _match(first, grouped, aten) if _is(first, grouped) else _match_batched(first, aten)
        if match is None:
            continue
        end, args = match
        target = into
        if _is(first, grouped):  # SwiGLU on [E, N, K] weights as `into`; for inference, others as `moe_experts`
            x, idx, w, w1, w2, h, a, users, b1, b2 = args
            if _is(w1, aten.transpose.int) and _is(w2, aten.transpose.int) and _swiglu(h, aten) is a and \
                    set(a.users) <= users and b1 is b2 is None:
                args = (x, idx, w, w1.args[0], w2.args[0])
            elif (act := _activation(h, a, users, aten)) is None:
                continue
            elif needing_grad is None:
                target = moe_experts
                args = (x, idx, w, w1, w2, _submodule(gm, end, act[0]), act[1], b1, b2, act[2])
            elif needing_grad & set(act[2]):  # a 0-d tensor the activation reads wants a gradient: not folded
                continue
            else:  # training: the weights as stored, the activation by name, the 0-d tensors after the biases
                (w1, t1), (w2, t2) = _stored(w1, aten), _stored(w2, aten)
                target = torch.ops.sparsa.moe_experts.default
                args = (x, idx, w, w1, w2, [b for b in (b1, b2) if b is not None] + act[2], activation_name(act[0]),
                        [i for sl in act[1] for i in sl], [t1, t2], [int(b1 is not None), int(b2 is not None)])
        with gm.graph.inserting_before(end):
            if needing_grad is None:
                call = gm.graph.call_function(target, args)
            else:
                no_grad = [i for i, a in enumerate((args[0], *args[2:5])) if a not in needing_grad]
                both = gm.graph.call_function(target, (*args, no_grad))
                call = gm.graph.call_function(operator.getitem, (both, 0))
        call.meta["val"] = end.meta.get("val")
        end.replace_all_uses_with(call)
        folded += 1
    return folded


def _stored(weight: Any, aten: Any) -> tuple[Any, int]:
    """A weight as multiplied ([E, in, out]) as the tensor stored, and 1 if that is its transpose ([E, out, in])."""
    if _is(weight, aten.transpose.int) and sorted(d % 3 for d in weight.args[1:3]) == [1, 2]:
        return weight.args[0], 1
    return weight, 0


def _submodule(gm: Any, before: Any, module: Any) -> Any:
    """`module` made a submodule of gm under a fresh name, and the get_attr node reading it, before `before`."""
    n = 0
    while hasattr(gm, f"sparsa_moe_act_{n}"):
        n += 1
    gm.add_submodule(f"sparsa_moe_act_{n}", module)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(f"sparsa_moe_act_{n}")


def _match(first: Any, grouped: Any, aten: Any) -> tuple[Any, tuple] | None:
    """(the block's output node, (x, idx, w, W1, W2, h, a, consumers)) when `first` starts a block: W1 and W2
    the grouped matmuls' weights as multiplied ([E, in, out]: a transpose of a weight stored [E, out, in], or the
    weight), h the first's rows, a the second's input, consumers the nodes that may read a."""
    rows, w1, offs = first.args[:3]
    experts = w1.meta["val"].shape[0] if "val" in w1.meta else None
    rows = _unfilled(rows, experts, aten)
    if not _is(rows, aten.index.Tensor):
        return None
    x, (tok,) = rows.args[0], rows.args[1]
    if not _is(tok, aten.floor_divide.default):
        return None
    perm, k = tok.args
    sort = perm.args[0] if _is(perm, operator.getitem) and perm.args[1] == 1 else None
    if not (_is(sort, aten.sort.default) and _is(sort.args[0], aten.view.default)):
        return None
    idx = sort.args[0].args[0]
    h, b1 = _biased(_filled(first, experts, aten), sort, aten)
    second = [u for u in offs.users if u is not first and _is(u, grouped) and u.args[2] is offs]
    if len(second) != 1:
        return None
    second = second[0]
    a = _unfilled(second.args[0], experts, aten)
    down_out, b2 = _biased(_filled(second, experts, aten), sort, aten)
    scaled = _only_user(down_out)
    if not _is(scaled, aten.mul.Tensor):
        return None
    gate_col = next((a for a in scaled.args if a is not down_out), None)
    if not (_is(gate_col, aten.unsqueeze.default) and _is(gate_col.args[0], aten.index.Tensor)):
        return None
    gates_sorted = gate_col.args[0]
    if gates_sorted.args[1] != [perm] or not _is(gates_sorted.args[0], aten.view.default):
        return None
    w = gates_sorted.args[0].args[0]
    back = _only_user(scaled)
    view = _only_user(back) if _is(back, aten.index.Tensor) else None
    end = _only_user(view) if _is(view, aten.view.default) else None
    if not (_is(end, aten.sum.dim_IntList) and list(end.args[1]) == [1]):
        return None
    val = idx.meta.get("val")
    if val is None or val.dim() != 2 or val.shape[1] != k:
        return None
    return end, (x, idx, w, w1, second.args[1], h, a, {second, second.args[0]}, b1, b2)


def _biased(product: Any, sort: Any, aten: Any) -> tuple[Any, Any]:
    """(product + b[sorted ids], b) where that sum (GPT-OSS's expert biases, read by the sorted expert ids) is
    the product's only user; else (product, None)."""
    add = _only_user(product)
    if not _is(add, aten.add.Tensor) or len(add.args) != 2:
        return product, None
    rows = next((a for a in add.args if a is not product), None)
    ids = rows.args[1] if _is(rows, aten.index.Tensor) and len(rows.args[1]) == 1 else [None]
    if not (_is(ids[0], operator.getitem) and ids[0].args == (sort, 0)):
        return product, None
    return add, rows.args[0]


def _pointwise(node: Any) -> bool:
    """An op an expert activation may use besides column slices: one the importer takes as pointwise."""
    from sparsa.frontend.torch_import import POINTWISE

    return str(node.target).removeprefix("aten.") in POINTWISE


def _columns(node: Any, aten: Any) -> bool:
    """A slice or split along the last of two dims, or a getitem of one."""
    if _is(node, operator.getitem):
        return True
    if _is(node, aten.slice.Tensor):
        return (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) in (1, -1)
    if _is(node, aten.split.Tensor) or _is(node, aten.split_with_sizes.default):
        return (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) in (1, -1)
    return False


def _column_slices(node: Any, width: int, aten: Any) -> list[tuple[Any, tuple[int, int, int]]] | None:
    """For a user of h: the (node, (start, stop, step)) column slices it makes of h, or None if it is no slice."""
    if _is(node, aten.slice.Tensor) and _columns(node, aten):
        start, stop, step = (list(node.args[2:]) + [None, None, 1][len(node.args) - 2:])[:3]
        return [(node, slice(start, stop, step).indices(width))]
    if (_is(node, aten.split.Tensor) or _is(node, aten.split_with_sizes.default)) and _columns(node, aten):
        sizes = node.args[1]
        if isinstance(sizes, int):
            sizes = [min(sizes, width - s) for s in range(0, width, sizes)]
        bounds = list(itertools.accumulate(sizes, initial=0))
        if any(not _is(u, operator.getitem) for u in node.users):
            return None
        return [(u, (bounds[u.args[1]], bounds[u.args[1] + 1], 1)) for u in node.users]
    return None


def _activation(h: Any, a: Any, consumers: set[Any], aten: Any) -> tuple[Any, list, list] | None:
    """The row-wise ops from h (the first grouped matmul's rows) to a (the second's input) as a graph module of
    the column slices of h they read, then of the 0-d tensors from outside they read (a module's float attribute,
    which Dynamo passes as one under dynamic shapes: GPT-OSS's alpha and limit); those slices, and those 0-d
    tensors' nodes; None if anything else reads or feeds them."""
    import torch.fx

    cone, captured, stack = set(), [], [a]
    while stack:  # what a is computed from, back to h
        n = stack.pop()
        if n is h or n in cone or n in captured:
            continue
        if _outside_scalar(n, h):
            captured.append(n)
            continue
        if n.op != "call_function" or not (_pointwise(n) or _columns(n, aten) or _scalar_of(n, aten) or
                                           _is(n, aten._to_copy.default) and set(n.kwargs) <= {"dtype"}):
            return None
        cone.add(n)
        stack.extend(n.all_input_nodes)
    if any(u not in cone and u not in consumers for n in cone | {h} for u in n.users):
        return None
    width = h.meta["val"].shape[-1] if "val" in h.meta else None
    if not isinstance(width, int):
        return None
    graph = torch.fx.Graph()
    env: dict[Any, Any] = {}
    slices: list[tuple[int, int, int]] = []

    def column(sl: tuple[int, int, int]) -> Any:
        slices.append(sl)
        return graph.placeholder(f"h{len(slices) - 1}")

    for u in h.users:
        parts = _column_slices(u, width, aten) if u in cone else None
        for node, sl in parts or []:
            env[node] = column(sl)
        if parts is None and h not in env:
            env[h] = column((0, width, 1))
    for i, n in enumerate(captured):
        env[n] = graph.placeholder(f"c{i}")
    for n in h.graph.nodes:
        if n in cone and n not in env and not (_columns(n, aten) and not _is(n, operator.getitem) and
                                               all(u in env for u in n.users)):
            env[n] = graph.node_copy(n, lambda m: env[m])
    graph.output(env[a])
    return torch.fx.GraphModule(torch.nn.Module(), graph), slices, captured


_SCALAR_ARITHMETIC = (operator.neg, *NUMBER_OPS)  # what the importer reads of such floats (`_number`)


def _scalar_of(node: Any, aten: Any) -> bool:
    """A Python number made of a 0-d tensor (`.item()`) or of such numbers (`-limit`)."""
    return _is(node, aten._local_scalar_dense.default) or \
        node.target in _SCALAR_ARITHMETIC and type(node.meta.get("val")).__name__ in ("SymFloat", "float")


def _outside_scalar(node: Any, h: Any) -> bool:
    """A 0-d float tensor not computed from h."""
    val = node.meta.get("val")
    if not (isinstance(val, torch.Tensor) and val.dim() == 0 and val.is_floating_point()):
        return False
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is h:
            return False
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return True


def _is_sentinel_fill(node: Any, experts: int | None, aten: Any) -> bool:
    """node = masked_fill(x, (sorted ids >= experts)[:, None], 0): rows of sentinel ids zeroed."""
    if not (_is(node, aten.masked_fill.Scalar) and node.args[2] == 0 and experts is not None):
        return False
    mask = node.args[1]
    ge = mask.args[0] if _is(mask, aten.unsqueeze.default) and mask.args[1] == -1 else None
    ids = ge.args[0] if _is(ge, aten.ge.Scalar) and ge.args[1] == experts else None
    return _is(ids, operator.getitem) and ids.args[1] == 0 and _is(ids.args[0], aten.sort.default)


def _unfilled(node: Any, experts: int | None, aten: Any) -> Any:
    """The rows a sentinel fill zeroes, when `node` is one; else `node`."""
    return node.args[0] if _is_sentinel_fill(node, experts, aten) else node


def _filled(node: Any, experts: int | None, aten: Any) -> Any:
    """The sentinel fill that is `node`'s only user, when there is one; else `node`."""
    user = _only_user(node)
    return user if user is not None and user.args[0] is node and _is_sentinel_fill(user, experts, aten) else node


def _swiglu(h: Any, aten: Any) -> Any:
    """The node computing silu(h[:, :F]) * h[:, F:] from `split(h, F, -1)`, or None."""
    split = _only_user(h)
    if not (_is(split, aten.split.Tensor) and split.args[2:] in ((-1,), (1,))):
        return None
    parts = sorted(split.users, key=lambda n: n.args[1])
    if len(parts) != 2:
        return None
    act = _only_user(parts[0])
    mul = _only_user(act) if _is(act, aten.silu.default) else None
    return mul if _is(mul, aten.mul.Tensor) and set(mul.args) == {act, parts[1]} else None


def _match_batched(first: Any, aten: Any) -> tuple[Any, tuple] | None:
    """Like `_match`, for the batched_mm experts starting at their first bmm."""
    weights, col = first.args
    if not (_is(weights, aten.index.Tensor) and _is(col, aten.unsqueeze.default) and col.args[1] == -1):
        return None
    gate_up, (ids,) = weights.args
    rows = col.args[0]  # x[:, None].expand(T, K, D) made contiguous and viewed as [T*K, D]
    chain = [aten.view.default, aten.clone.default, aten.expand.default, aten.unsqueeze.default]
    for target in chain:
        if not _is(rows, target):
            return None
        rows = rows.args[0]
    x = rows
    experts = gate_up.meta["val"].shape[0] if "val" in gate_up.meta else None
    clamped = experts is not None and _is(ids, aten.clamp.default) and tuple(ids.args[1:]) == (0, experts - 1)
    view = ids.args[0] if clamped else ids
    if not _is(view, aten.view.default):
        return None
    idx = view.args[0]
    if clamped and not _top_k_of(idx, experts, aten):  # a clamp changes nothing only for ids < E
        return None
    squeeze = _only_user(first)
    mul = _swiglu(squeeze, aten) if _is(squeeze, aten.squeeze.dim) else None
    col2 = _only_user(mul) if mul is not None else None
    second = _only_user(col2) if _is(col2, aten.unsqueeze.default) else None
    if not (_is(second, aten.bmm.default) and second.args[1] is col2 and _is(second.args[0], aten.index.Tensor)
            and second.args[0].args[1] == [ids]):
        return None
    down = second.args[0].args[0]
    squeeze2 = _only_user(second)
    scaled = _only_user(squeeze2) if _is(squeeze2, aten.squeeze.dim) else None
    if not _is(scaled, aten.mul.Tensor):
        return None
    gate_col = next((a for a in scaled.args if a is not squeeze2), None)
    gates = gate_col.args[0] if _is(gate_col, aten.unsqueeze.default) else None
    if clamped and _is(gates, aten.masked_fill.Scalar) and gates.args[2] == 0 and \
            _is(gates.args[1], aten.ge.Scalar) and tuple(gates.args[1].args) == (view, experts):
        gates = gates.args[0]  # the gates of sentinel ids zeroed (transformers >= 5.23, expert parallel)
    if not _is(gates, aten.view.default):
        return None
    w = gates.args[0]
    view = _only_user(scaled)
    end = _only_user(view) if _is(view, aten.view.default) else None
    if not (_is(end, aten.sum.dim_IntList) and list(end.args[1]) == [1]):
        return None
    val = idx.meta.get("val")
    if val is None or val.dim() != 2:
        return None
    return end, (x, idx, w, gate_up, down)


def _top_k_of(idx: Any, experts: int, aten: Any) -> bool:
    """idx = topk(scores, k, dim).indices over a dim of `experts` scores (so every id is < experts)."""
    topk = idx.args[0] if _is(idx, operator.getitem) and idx.args[1] == 1 else None
    scores = topk.args[0].meta.get("val") if _is(topk, aten.topk.default) else None
    dim = topk.args[2] if scores is not None and len(topk.args) > 2 else -1
    return scores is not None and scores.shape[dim] == experts


# ---- the folded calls imported (frontend/torch_import.py's table) ----------------------------------------
def _moe_swiglu(im: Importer, node: Any, x: Value, idx: Value, w: Value, gate_up: Value, down: Value) -> Value:
    """A folded transformers MoE block (frontend/torch_moe.py) as `moe.moe` with a SwiGLU expert body; the
    fused [E, 2F, D] gate/up weight is viewed as two [E, D, F] weights so the passes see their usual form."""
    E, two_f, hidden_size = gate_up.type.shape
    F = down.type.shape[2]
    if not all(isinstance(d, int) for d in (E, two_f, hidden_size, F)) or two_f != 2 * F:
        raise Unsupported("a MoE block with symbolic expert sizes")

    def half(start: int) -> Value:
        part = im.emit(S.SliceOp, gate_up, starts=(0, start, 0), stops=(None, start + F, None), steps=(1, 1, 1))
        return im.emit(S.TransposeOp, part, perm=(0, 2, 1))

    w_gate, w_up = half(0), half(F)
    w_down = im.emit(S.TransposeOp, down, perm=(0, 2, 1))
    block = Block([scalar("i64"), TensorType(x.type.dtype, (None, hidden_size))], ["e", "h"])
    e, h = block.args

    def expert_matmul(rows: Value, weight: Value) -> Value:
        picked = block.append(S.GatherOp.build(weight, [e])).result
        return block.append(S.MatmulOp.build(rows, picked)).result

    gated = block.append(T.SiluOp.build(expert_matmul(h, w_gate))).result
    hidden = block.append(T.MulOp.build(gated, expert_matmul(h, w_up))).result
    block.append(YieldOp.build([expert_matmul(hidden, w_down)]))
    idx = idx if idx.type.dtype == "i64" else im.cast(idx, "i64")
    return im.emit(D.moe.MoeOp, x, idx, w, regions=[Region([block])], num_experts=E)


def _moe_experts(im: Importer, node: Any, x: Value, idx: Value, w: Value, w1: Value, w2: Value, act: Any,
                 slices: list, b1: Value | None = None, b2: Value | None = None, captured: list | tuple = ()
                 ) -> Value:
    """A folded grouped-matmul MoE block of any row-wise activation (frontend/torch_moe.py `moe_experts`) as
    `moe.moe`: each column slice of h = rows @ W1[e] (+ b1[e]) the activation reads is its own matmul by that
    slice of the weight (the gate and up halves of a fused or interleaved weight), plus that slice of the bias
    (sliced outside the body), so fuse-moe-dispatch finds its stages and expert vectors."""
    E, K, N = w1.type.shape
    if not all(isinstance(d, int) for d in (E, K, N, *w2.type.shape)):
        raise Unsupported("a MoE block with symbolic expert sizes")
    block = Block([scalar("i64"), TensorType(x.type.dtype, (None, K))], ["e", "h"])
    e, h = block.args

    def expert(weight: Value) -> Value:
        return block.append(S.GatherOp.build(weight, [e])).result

    def biased(product: Value, bias: Value | None) -> Value:
        if bias is None:
            return product
        return block.append(T.AddOp.build(product, expert(im.cast(bias, x.type.dtype)))).result

    def column(start: int, stop: int, step: int) -> Value:
        weight, bias = expert(w1), b1
        if (start, stop, step) != (0, N, 1):
            weight = block.append(S.SliceOp.build(weight, starts=(0, start), stops=(None, stop),
                                                  steps=(1, step))).result
            bias = None if b1 is None else im.emit(S.SliceOp, b1, starts=(0, start), stops=(None, stop),
                                                   steps=(1, step))
        return biased(block.append(S.MatmulOp.build(h, weight)).result, bias)

    out = im.inline_graph(act, block, [column(*sl) for sl in slices] + [im.tensor(c) for c in captured],
                          "a MoE block's activation")
    if out.type.rank != 2 or out.type.dtype != x.type.dtype:
        raise Unsupported(f"a MoE block's activation giving {out.type}")
    block.append(YieldOp.build([biased(block.append(S.MatmulOp.build(out, expert(w2))).result, b2)]))
    idx = idx if idx.type.dtype == "i64" else im.cast(idx, "i64")
    return im.emit(D.moe.MoeOp, x, idx, w, regions=[Region([block])], num_experts=E)


def extra_names(biased: list[int] | tuple[int, ...], count: int) -> list[str]:
    """The `.sp` names of a folded block's `count` tensors after its four: the biases it has (`biased`: flags for
    the first and the second matmul), b1 and b2, then the 0-d tensors its activation reads, c0, c1, ..."""
    biases = [name for name, has in zip(("b1", "b2"), biased, strict=True) if has]
    return biases + [f"c{i}" for i in range(count - len(biases))]


def experts_module(dtype: str, width: int, k: int, shapes: list[tuple[int, ...]], act: str, slices: list[int],
                   transposed: list[int], biased: list[int]) -> tuple[Module, str]:
    """The experts of a training graph's folded block (`sparsa::moe_experts`, the weights as stored) as a function
    of (x, idx, w, w1, w2, [b1], [b2], c0, c1, ...) (`shapes`: the weights', the biases' and those of the 0-d
    tensors the activation reads), T tokens of `width` with `k` experts each: what the torch.compile backend
    compiles and differentiates for the block (runtime/torch_moe.py `FoldedBlocks`)."""
    names = ["w1", "w2"] + extra_names(biased, len(shapes) - 2)
    types = [TensorType(dtype, ("T", width)), TensorType("i64", ("T", k)), TensorType(dtype, ("T", k))] + [
        TensorType(dtype, tuple(shape)) for shape in shapes]
    im = Importer(None)
    im.block = Block(types, ["x", "idx", "w", *names])
    x, idx, w, *weights = im.block.args
    w1, w2 = (im.emit(S.TransposeOp, t, perm=(0, 2, 1)) if flip else t
              for t, flip in zip(weights[:2], transposed, strict=True))
    given = dict(zip(names, weights, strict=True))
    y = _moe_experts(im, None, x, idx, w, w1, w2, ACTIVATIONS[act], _triples(slices), given.get("b1"),
                     given.get("b2"), [v for name, v in given.items() if name.startswith("c")])
    im.block.append(ReturnOp.build([y]))
    func = FuncOp([], [], {"sym_name": "MoEExperts", "result_types": (y.type,)}, [Region([im.block])])
    return Module([func]), "MoEExperts"


# The folded calls' importers, by the calls' functions.
IMPORTS = {moe_swiglu: _moe_swiglu, moe_experts: _moe_experts}
