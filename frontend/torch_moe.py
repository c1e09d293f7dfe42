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
histogram and the two grouped matmuls become dead code. Graphs that differ in any checked step are left
alone (and run as before, with those ops falling back to PyTorch).
"""

from __future__ import annotations

import operator
from typing import Any

import torch


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


def _is(node: Any, target: Any) -> bool:
    return getattr(node, "op", None) == "call_function" and node.target is target


def _only_user(node: Any) -> Any:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def fold_grouped_mm_moe(gm: Any) -> int:
    """Fold every recognized transformers grouped_mm MoE block of an ATen graph; returns how many."""
    grouped = getattr(getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None), "default", None)
    if grouped is None:
        return 0
    aten = torch.ops.aten
    folded = 0
    for first in [n for n in gm.graph.nodes if _is(n, grouped)]:
        match = _match(first, grouped, aten)
        if match is None:
            continue
        end, args = match
        with gm.graph.inserting_before(end):
            call = gm.graph.call_function(moe_swiglu, args)
        call.meta["val"] = end.meta.get("val")
        end.replace_all_uses_with(call)
        folded += 1
    if folded:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return folded


def _match(first: Any, grouped: Any, aten: Any) -> tuple[Any, tuple] | None:
    """(the block's output node, (x, idx, w, gate_up_proj, down_proj)) when `first` starts a block."""
    rows, gate_up_t, offs = first.args[:3]
    if not (_is(rows, aten.index.Tensor) and _is(gate_up_t, aten.transpose.int)):
        return None
    x, (tok,) = rows.args[0], rows.args[1]
    if not _is(tok, aten.floor_divide.default):
        return None
    perm, k = tok.args
    sort = perm.args[0] if _is(perm, operator.getitem) and perm.args[1] == 1 else None
    if not (_is(sort, aten.sort.default) and _is(sort.args[0], aten.view.default)):
        return None
    idx = sort.args[0].args[0]
    split = _only_user(first)
    if not _is(split, aten.split.Tensor):
        return None
    parts = sorted(split.users, key=lambda n: n.args[1])
    if len(parts) != 2:
        return None
    act = _only_user(parts[0])
    mul = _only_user(act) if _is(act, aten.silu.default) else None
    if not (_is(mul, aten.mul.Tensor) and set(mul.args) == {act, parts[1]}):
        return None
    second = _only_user(mul)
    if not (_is(second, grouped) and second.args[2] is offs and _is(second.args[1], aten.transpose.int)):
        return None
    scaled = _only_user(second)
    if not _is(scaled, aten.mul.Tensor):
        return None
    gate_col = next((a for a in scaled.args if a is not second), None)
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
    return end, (x, idx, w, gate_up_t.args[0], second.args[1].args[0])
