"""First-order linear scans that a PyTorch program writes as a parallel prefix scan, recognized in the graph
Dynamo hands over and folded into one call, `sparsa::linear_scan`, that the importer turns into `scan.scan`
(fuse-scan then fuses it with its producers and consumer).

transformers' Mamba, compiled, runs `associative_scan(combine, (a, b), dim)` with the combine
`(a_l, b_l), (a_r, b_r) -> (a_l * a_r, a_r * b_l + b_r)`: on CPU tensors, torch's generic algorithm, which Dynamo
traces into log2(L) levels of strided slices, vmapped combines, concatenations and interleavings. Run as written
that is O(L log L) passes over the [B, D, L, N] state; it computes h[t] = a[t] * h[t-1] + b[t].

`fold_linear_scans` proves it by following where each element goes (an abstract interpretation of the graph along
the scan dim): every element of a's input stands for the span [t, t] of the recurrence's decays, every element of
b's for the span's partial result; slices, concatenations, interleavings and moved dims move spans, and only the
combine's products and sums join them (a product of two adjacent decay spans, a decay span times the partial
result just before it plus its own partial result). A node whose element t is the partial result over [0, t] for
every t is the scan of a and b. Any other op reading an interpreted value, a join of spans that are not adjacent,
or an operand from outside, and nothing is folded: the graph runs as written. Any other parallel algorithm built
of these moves and this combine is proved the same way (one that starts from identity elements, a = 1 and b = 0,
as Blelloch's down-sweep does, is not: a constant is an operand from outside).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch


@torch.library.custom_op("sparsa::linear_scan", mutates_args=())
def linear_scan(a: torch.Tensor, b: torch.Tensor, dim: int, reverse: bool = False) -> torch.Tensor:
    """h[t] = a[t] * h[t-1] + b[t] along `dim` (h[-1] = 0); `reverse`: h[t] = a[t+1] * h[t+1] + b[t] from the last
    step back, the transposed recurrence (what its backward runs). The PyTorch meaning of the folded call: a loop
    over the steps (what runs where the backend does not compile it)."""
    a, b = torch.broadcast_tensors(a, b)
    am, bm = a.movedim(dim, 0), b.movedim(dim, 0)
    out, n = torch.empty_like(bm), bm.shape[0]
    h = torch.zeros_like(bm[0]) if n else None
    for t in range(n - 1, -1, -1) if reverse else range(n):
        if not reverse:
            decay = am[t]
        else:  # the step after's decay; none after the last
            decay = am[t + 1] if t + 1 < n else torch.zeros_like(am[0])
        h = decay * h + bm[t]
        out[t] = h
    return out.movedim(0, dim)


@linear_scan.register_fake
def _(a: torch.Tensor, b: torch.Tensor, dim: int, reverse: bool = False) -> torch.Tensor:
    return torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=b.dtype, device=b.device)


@torch.library.custom_op("sparsa::linear_scan_backward", mutates_args=())
def linear_scan_backward(a: torch.Tensor, h: torch.Tensor, dh: torch.Tensor, dim: int,
                         reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The cotangents of a and b (at their broadcast shape) given dh's of h = `linear_scan(a, b, dim, reverse)`
    (the states saved, as eager autograd's loop saves them: the read-out's own derivative reads them anyway).
    Forward: lam = the transposed scan of dh, db = lam, da[t] = lam[t] * h[t-1]; transposed: mu = the forward
    scan of dh, db = mu, da[t] = mu[t-1] * h[t] (t >= 1)."""
    n = h.shape[dim]
    lam = linear_scan(a, dh, dim, not reverse)
    if n == 0:
        da = torch.zeros_like(lam)
    elif reverse:
        da = torch.cat([torch.zeros_like(lam.narrow(dim, 0, 1)), lam.narrow(dim, 0, n - 1)], dim) * h
    else:
        da = lam * torch.cat([torch.zeros_like(h.narrow(dim, 0, 1)), h.narrow(dim, 0, n - 1)], dim)
    return da, lam


@linear_scan_backward.register_fake
def _(a: torch.Tensor, h: torch.Tensor, dh: torch.Tensor, dim: int, reverse: bool) -> tuple:
    # (two tensors: one given twice would read as an alias)
    return tuple(torch.empty(h.shape, dtype=dh.dtype, device=dh.device) for _ in range(2))


def _setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    a, b, dim, reverse = inputs
    ctx.save_for_backward(a, output)
    ctx.dim, ctx.reverse, ctx.b_shape = dim, reverse, b.shape


def _backward(ctx: Any, dh: torch.Tensor) -> tuple:
    a, h = ctx.saved_tensors
    da, db = linear_scan_backward(a, h, dh, ctx.dim, ctx.reverse)
    return da.sum_to_size(a.shape), db.sum_to_size(ctx.b_shape), None, None


linear_scan.register_autograd(_backward, setup_context=_setup)


# ---- the fold -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spans:
    """What a node holds along the scan dim (`dim`, its position in the node's dims; None inside a vmap over it):
    per element, kind "a" a span (i, j) of decays (their product), "b" the recurrence's result over (i, j) from
    zero, "ab" a decay span times a result span ((p, q), (i, j)); "stacked" two lists stacked on a new dim after
    the scan dim, waiting to be interleaved by a flatten."""

    kind: str
    items: tuple  # (None: a zero of a pad)
    dim: int | None
    stacked: tuple | None = None


class NotAScan(Exception):
    """The interpreted nodes do something other than a linear scan's combine and moves."""


def _arg(node: Any, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _rank(node: Any) -> int:
    value = node.meta.get("example_value")
    if not isinstance(value, torch.Tensor):
        raise NotAScan("a value without a known rank")
    return value.dim()


def _is(node: Any, *names: str) -> bool:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return node.op in ("call_function", "call_method") and name in names


def _step(node: Any, spans: dict[Any, Spans]) -> Spans:
    """The spans node holds, from its interpreted operands' (NotAScan where it is not a move or a combine)."""
    ins = [a for a in node.all_input_nodes if a in spans]
    if _is(node, "slice"):  # aten.slice(x, dim, start, end, step)
        x = spans[node.args[0]]
        d = _arg(node, 1, "dim", 0)
        if x.dim is None or x.stacked or d % _rank(node.args[0]) != x.dim:
            raise NotAScan("a slice across the scan dim")
        start, end, step = _arg(node, 2, "start"), _arg(node, 3, "end"), _arg(node, 4, "step", 1)
        return Spans(x.kind, x.items[slice(start, end, step)], x.dim)
    if _is(node, "_add_batch_dim"):  # vmap over the scan dim: the combine sees one element at a time
        x = spans[node.args[0]]
        if x.stacked or node.args[1] % _rank(node.args[0]) != x.dim:
            raise NotAScan("a vmap over another dim")
        return Spans(x.kind, x.items, None)
    if _is(node, "_remove_batch_dim"):
        x = spans[node.args[0]]
        if x.dim is not None:
            raise NotAScan("a vmap's batch dim that is not the scan dim")
        return Spans(x.kind, x.items, node.args[3] % _rank(node))
    if _is(node, "movedim"):
        x = spans[node.args[0]]
        rank = _rank(node)
        src, dst = _arg(node, 1, "source") % rank, _arg(node, 2, "destination") % rank
        order = [d for d in range(rank) if d != src]
        order.insert(dst, src)
        if x.stacked or x.dim is None:
            raise NotAScan("a moved stack")
        return Spans(x.kind, x.items, order.index(x.dim))
    if _is(node, "pad"):  # zeros after the last element (to interleave one fewer), sliced off after
        x, widths = spans[node.args[0]], list(_arg(node, 1, "pad"))
        at = (_rank(node) - 1 - (x.dim if x.dim is not None else 0)) * 2
        if x.dim is None or x.stacked or _arg(node, 2, "mode", "constant") != "constant" or any(
                w for i, w in enumerate(widths) if i not in (at, at + 1)) or len(widths) < at + 2:
            raise NotAScan("a pad across other dims")
        return Spans(x.kind, (None,) * widths[at] + x.items + (None,) * widths[at + 1], x.dim)
    if _is(node, "cat"):
        parts, d = _arg(node, 0, "tensors"), _arg(node, 1, "dim", 0)
        if not all(p in spans for p in parts) or len({spans[p].kind for p in parts}) != 1:
            raise NotAScan("a concatenation with other values")
        first = spans[parts[0]]
        if first.dim is None or any(spans[p].dim != first.dim or spans[p].stacked for p in parts) or \
                d % _rank(node) != first.dim:
            raise NotAScan("a concatenation across the scan dim")
        return Spans(first.kind, tuple(i for p in parts for i in spans[p].items), first.dim)
    if _is(node, "stack"):
        parts, d = _arg(node, 0, "tensors"), _arg(node, 1, "dim", 0)
        if len(parts) != 2 or not all(p in spans for p in parts) or spans[parts[0]].kind != spans[parts[1]].kind:
            raise NotAScan("a stack of other values")
        x, y = spans[parts[0]], spans[parts[1]]
        if x.dim is None or x.dim != y.dim or d % _rank(node) != x.dim + 1 or len(x.items) != len(y.items):
            raise NotAScan("a stack that does not interleave")
        return Spans(x.kind, (), x.dim, (x.items, y.items))
    if _is(node, "flatten"):
        x = spans[node.args[0]]
        start, end = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
        if x.stacked is None or start != x.dim or end % _rank(node.args[0]) != x.dim + 1:
            raise NotAScan("a flatten that is not an interleaving")
        return Spans(x.kind, tuple(i for pair in zip(*x.stacked, strict=True) for i in pair), x.dim)
    if _is(node, "mul", "add") and len(ins) == 2 and len(node.args) == 2 and any(
            None in spans[x].items for x in node.args):
        raise NotAScan("a pad's zeros combined")
    if _is(node, "mul") and len(ins) == 2 and len(node.args) == 2:
        x, y = spans[node.args[0]], spans[node.args[1]]
        if x.dim != y.dim or len(x.items) != len(y.items) or x.stacked or y.stacked:
            raise NotAScan("a product of misaligned values")
        if x.kind == y.kind == "a":
            return Spans("a", tuple(_join(p, q) for p, q in zip(x.items, y.items, strict=True)), x.dim)
        if {x.kind, y.kind} == {"a", "b"}:
            decays, results = (x, y) if x.kind == "a" else (y, x)
            items = []
            for (p, q), (i, j) in zip(decays.items, results.items, strict=True):
                if p != j + 1:
                    raise NotAScan("decays joined to a result they do not follow")
                items.append(((p, q), (i, j)))
            return Spans("ab", tuple(items), x.dim)
        raise NotAScan("a product the combine does not make")
    if _is(node, "add") and len(ins) == 2 and len(node.args) == 2:
        x, y = spans[node.args[0]], spans[node.args[1]]
        if {x.kind, y.kind} != {"ab", "b"} or x.dim != y.dim or len(x.items) != len(y.items):
            raise NotAScan("a sum the combine does not make")
        carried, own = (x, y) if x.kind == "ab" else (y, x)
        items = []
        for ((p, q), (i, _)), span in zip(carried.items, own.items, strict=True):
            if span != (p, q):
                raise NotAScan("a result added to another span's")
            items.append((i, q))
        return Spans("b", tuple(items), x.dim)
    raise NotAScan(f"'{node.target}' reads a scanned value")


def _join(p: tuple[int, int], q: tuple[int, int]) -> tuple[int, int]:
    """Two adjacent spans as one (either order: a product of decays commutes)."""
    (i, j), (k, m) = sorted((p, q))
    if k != j + 1:
        raise NotAScan("decays of spans that are not adjacent")
    return (i, m)


def _seeds(gm: Any) -> list[Any]:
    """The nodes sliced into their even and odd elements (the parallel scan's first level), in graph order."""
    halves: dict[Any, set] = {}
    for n in gm.graph.nodes:
        if _is(n, "slice") and _arg(n, 4, "step", 1) == 2:
            halves.setdefault(n.args[0], set()).add(_arg(n, 2, "start"))
    return [x for x, starts in halves.items() if starts >= {0, 1} and isinstance(x, torch.fx.Node)]


def _interpret(gm: Any, a: Any, b: Any) -> tuple[dict[Any, Spans], list[Any]] | None:
    """The spans of every node computed from a (decays) and b (inputs), and the nodes read by anything else (the
    results); None where they are not a scan's."""
    try:
        da, db = _scan_dim(a), _scan_dim(b)
        n = a.meta["example_value"].shape[da]
        if not isinstance(n, int) or b.meta["example_value"].shape != a.meta["example_value"].shape or da != db:
            return None
        spans = {a: Spans("a", tuple((t, t) for t in range(n)), da), b: Spans("b", tuple((t, t) for t in range(n)), db)}
        exits = []
        for node in gm.graph.nodes:
            if node in spans or not any(x in spans for x in node.all_input_nodes):
                continue
            try:
                spans[node] = _step(node, spans)
            except NotAScan:  # a reader of the results (checked to be whole scans by the caller)
                exits.extend(x for x in node.all_input_nodes if x in spans and x not in exits)
        return spans, exits
    except (NotAScan, LookupError, TypeError, AttributeError, ValueError):  # (whatever else: not folded)
        return None


def _scan_dim(x: Any) -> int:
    """The dim x's even and odd slices take."""
    for u in x.users:
        if _is(u, "slice") and _arg(u, 4, "step", 1) == 2:
            return _arg(u, 1, "dim", 0) % _rank(x)
    raise NotAScan("no strided slice")


_VIEWS = ("transpose", "permute", "movedim", "to", "float", "contiguous")


def _products_as_sums(gm: Any, h: Any) -> None:
    """Each matmul of the scan's states (through transposes) by a column, `X @ c` with c [..., K, 1] (Mamba's
    read-out `h @ C[..., None]`), written `sum(X * c^T, -1, keepdim)`: the form fuse-scan fuses into the scan."""
    work = [h]
    while work:
        x = work.pop()
        for u in list(x.users):
            if _is(u, *_VIEWS) and u.args[0] is x and (not _is(u, "to", "float") or _same_dtype(u, x)):
                work.append(u)
                continue
            c = u.args[1] if _is(u, "matmul") and len(u.args) == 2 and u.args[0] is x else None
            value = c.meta.get("example_value") if isinstance(c, torch.fx.Node) else None
            if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[-1] != 1:
                continue
            with gm.graph.inserting_before(u):
                row = gm.graph.call_method("transpose", (c, -1, -2))
                product = gm.graph.call_function(operator.mul, (x, row))
                total = gm.graph.call_method("sum", (product, -1), {"keepdim": True})
            total.meta.update(u.meta)
            u.replace_all_uses_with(total)


def _same_dtype(u: Any, x: Any) -> bool:
    """A `.to(...)` or `.float()` that changes nothing of x (its dtype as it is)."""
    a, b = u.meta.get("example_value"), x.meta.get("example_value")
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype


def fold_linear_scans(gm: Any) -> int:
    """Dynamo's graph with each parallel prefix scan of the linear recurrence (module docstring) replaced by
    `sparsa::linear_scan` of its inputs; how many. The scans' other nodes become dead code (removed here)."""
    folded = 0
    seeds = _seeds(gm)
    while len(seeds) >= 2:
        a, b = seeds[0], seeds[1]
        found = _interpret(gm, a, b)
        if found is None:
            a, b = b, a
            found = _interpret(gm, a, b)
        if found is None:
            seeds = seeds[1:]
            continue
        spans, exits = found
        n = len(spans[a].items)
        whole = tuple((0, t) for t in range(n))
        results = [x for x in exits if spans[x].kind == "b" and spans[x].items == whole and spans[x].dim is not None]
        if not results or len(results) != len(exits):
            seeds = seeds[2:]
            continue
        for out in results:
            with gm.graph.inserting_before(out):
                d, ins = spans[out].dim, []
                for x in (a, b):
                    if spans[x].dim != d:
                        x = gm.graph.call_function(torch.movedim, (x, spans[x].dim, d))
                    ins.append(x)
                new = gm.graph.call_function(torch.ops.sparsa.linear_scan.default, (ins[0], ins[1], d))
            new.meta.update(out.meta)
            out.replace_all_uses_with(new)
            _products_as_sums(gm, new)
        folded += 1
        seeds = [s for s in seeds[2:] if s not in spans]
    if folded:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return folded

