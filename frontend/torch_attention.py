"""SDPA's ATen forms imported as `attn.attention` (or `attn.attention_lse` where a training graph saves the
log-sum-exp): the mask a region of (b, h, q, k), recognized as index arithmetic where it can be."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

from sparsa.frontend.torch_import import Importer, Unsupported
from sparsa.ir import dialects as D
from sparsa.ir.core import Block, Region, Value
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.dialects.func import YieldOp
from sparsa.ir.types import scalar


def _sdpa_efficient(im: Importer, node: Any, q: Value, k: Value, v: Value, attn_bias: Any = None,
                    compute_log_sumexp: bool = False, dropout_p: float = 0.0, is_causal: bool = False,
                    scale: Any = None) -> tuple:
    """The CUDA lowering of SDPA with a mask (its bias padded for alignment, sliced back): the same op."""
    out, _ = _sdpa(im, node, q, k, v, dropout_p=dropout_p, is_causal=is_causal, attn_mask=attn_bias, scale=scale)
    return (out, None, None, None)


def _sdpa_flash(im: Importer, node: Any, q: Value, k: Value, v: Value, dropout_p: float = 0.0,
                is_causal: bool = False, return_debug_mask: bool = False, scale: Any = None) -> tuple:
    """The CUDA flash lowering of SDPA (no mask, or causal)."""
    out, _ = _sdpa(im, node, q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    return (out, *([None] * 8))


def _sdpa(im: Importer, node: Any, q: Value, k: Value, v: Value, *rest: Any, **kw: Any) -> tuple:
    """SDPA on the CPU (its flash form): attn.attention, or attn.attention_lse where the graph reads the
    log-sum-exp (a training forward saving it for the backward)."""
    q, k, v, mask, score, scale = sdpa_operands(im, q, k, v, *rest, **kw)
    lse = any(u.target is operator.getitem and u.args[1] == 1 for u in node.users)
    cls = D.attn_grad.AttentionLseOp if lse else D.attn.AttentionOp
    out = im.emit(cls, q, k, v, regions=[mask, score], scale=float(scale))
    return out if lse else (out, None)


def sdpa_operands(im: Importer, q: Value, k: Value, v: Value, *rest: Any, **kw: Any) -> tuple:
    """(q, k, v, mask region, score region, scale) of an SDPA call. A boolean mask, or a bias that is
    where(mask, 0, -inf), becomes a mask region of (b, h, q, k): index arithmetic where it is recognized, else
    the tensor read at (b, h, q, k). Any other bias (a backward graph's saved mask, say) is read there twice:
    added to the score, and disallowing where it is -inf."""
    from sparsa.ir.region_builder import NotRecognized, RegionBuilder

    if kw.get("dropout_p", rest[0] if rest else 0.0):
        raise Unsupported("attention dropout")
    is_causal = kw.get("is_causal", rest[1] if len(rest) > 1 else False)
    mask_value = kw.get("attn_mask")
    if set(kw) - {"dropout_p", "is_causal", "attn_mask", "scale", "return_debug_mask"}:
        raise Unsupported(f"attention with {sorted(kw)}")
    scale = kw.get("scale")
    if scale is None and not isinstance(q.type.shape[-1], int):
        # a symbolic head dim (dynamic=True on q, k, v as inputs): SDPA's 1/sqrt(Dh) is known only at run time
        q, scale = D.attn.scale_by_head_dim(q, im.emit), 1.0
    if scale is None:
        scale = 1.0 / math.sqrt(q.type.shape[-1])
    mask, score = Region(), Region()
    idx = scalar("i64")
    if is_causal or mask_value is not None:
        block = Block([idx] * 4, ["b", "h", "q", "k"])
        if is_causal:
            value = block.append(T.CmpOp.build(block.args[3], block.args[2], pred="le")).result
        else:
            m = im.tensor(mask_value)
            while isinstance(m.defining_op, S.BroadcastToOp):  # a mask expanded over batch and heads
                m = m.defining_op.x
            w = m.defining_op
            negate = False

            def const(v: Value) -> Any:
                d = v.defining_op
                return d.value if isinstance(d, T.ConstantOp) else None

            if m.type.dtype == "i1":
                pass
            elif isinstance(w, T.WhereOp) and const(w.a) == 0 and (const(w.b) or 0) <= -1e4:
                m = w.cond  # an additive mask: where(allowed, 0, -inf) is the boolean `allowed`
            elif isinstance(w, T.WhereOp) and const(w.b) == 0 and (const(w.a) or 0) <= -1e4:
                m, negate = w.cond, True  # where(blocked, -inf, 0), how SDPA makes a bias of a mask on CUDA
            else:
                if m.type.dtype != q.type.dtype:
                    raise Unsupported(f"a {m.type.dtype} attention bias for {q.type.dtype} queries")
                score = _bias_score(m)
                ninf = block.append(T.ConstantOp.build(value=float("-inf"), result_types=[scalar(m.type.dtype)]))
                m, value = None, block.append(T.CmpOp.build(_read_at(block, m, block.args), ninf.result,
                                                            pred="ne")).result
            if m is not None:
                try:
                    value = RegionBuilder(block, {}).value(m)
                except NotRecognized:  # a mask tensor: read at (b, h, q, k)
                    value = _read_at(block, m, block.args)
            if negate:
                value = block.append(T.NotOp.build(value)).result
        block.append(YieldOp.build([value]))
        mask = Region([block])
    k, v = _same_sizes(im, k, q, (0,)), _same_sizes(im, v, k, (0, 1, 2))
    return q, k, v, mask, score, scale


def _read_at(block: Block, m: Value, index: list[Value]) -> Value:
    """m[b, h, q, k] (m aligned right; index 0 on its size-1 axes) in a region of those index arguments."""
    if m.type.rank > 4:
        raise Unsupported("a materialized attention mask of rank above 4")
    zero = None
    indices = []
    for size, arg in zip(m.type.shape, index[4 - m.type.rank:], strict=True):
        if size == 1 and zero is None:
            zero = block.append(T.ConstantOp.build(value=0, result_types=[scalar("i64")])).result
        indices.append(zero if size == 1 else arg)
    return block.append(S.GatherOp.build(m, indices)).result


def _bias_score(bias: Value) -> Region:
    """The score region s + bias[b, h, q, k]."""
    idx = scalar("i64")
    block = Block([scalar(bias.type.dtype)] + [idx] * 4, ["s", "b", "h", "q", "k"])
    added = block.append(T.AddOp.build(block.args[0], _read_at(block, bias, block.args[1:]))).result
    block.append(YieldOp.build([added]))
    return Region([block])


def _same_sizes(im: Importer, x: Value, like: Value, axes: tuple[int, ...]) -> Value:
    """x with like's sizes on `axes` where they differ only by name: attention needs k's batch to be q's and v's
    batch, heads and length to be k's, which torch checks at run time but Dynamo may give separate symbols
    (flex_attention at a new shape). A reshape, which checks the sizes at run time too."""
    shape = list(x.type.shape)
    for a in axes:
        want = like.type.shape[a]
        if shape[a] != want and not (isinstance(shape[a], int) and isinstance(want, int)):
            shape[a] = want
    return x if tuple(shape) == x.type.shape else im.emit(S.ReshapeOp, x, shape=tuple(shape))


def flex_attention(im: Importer, node: Any, q: Value, k: Value, v: Value, score_gm: Any, block_mask: Any,
                    scale: float, kernel_options: Any, score_bufs: Any = (), mask_bufs: Any = ()) -> tuple:
    """flex_attention: mask_mod and score_mod become the attention op's mask and score regions (the block
    mask tensors traced from create_block_mask are not needed: sparsify-attention computes its own map)."""
    idx = scalar("i64")
    names = ["b", "h", "q", "k"]
    mask_gm = block_mask[-1] if isinstance(block_mask, tuple | list) and block_mask else None
    if q.type.shape[2] != k.type.shape[2] and mask_gm is None:
        raise Unsupported("flex_attention without a mask_mod")
    def captured(bufs: Any) -> list[Value]:
        # tensors the mods read, and sizes (a sequence length, symbolic at a new shape): 0-d tensors
        return [b if isinstance(b, Value) else im.splat(b, "i64", ()) if isinstance(b, int | str) else im.tensor(b)
                for b in bufs]

    score = Region()
    if score_gm is not None and _has_ops(score_gm):
        score = im.region_from_graph(score_gm, [scalar(q.type.dtype)] + [idx] * 4, ["s"] + names,
                                     captured(score_bufs), "score_mod")
    mask = Region()
    if mask_gm is not None and _has_ops(mask_gm):
        mask = im.region_from_graph(mask_gm, [idx] * 4, names, captured(mask_bufs), "mask_mod")
    if kernel_options and any(kernel_options.get(o) for o in ("OUTPUT_LOGSUMEXP", "OUTPUT_MAX")):
        raise Unsupported("flex_attention returning its log-sum-exp")
    k, v = _same_sizes(im, k, q, (0,)), _same_sizes(im, v, k, (0, 1, 2))
    out = im.emit(D.attn.AttentionOp, q, k, v, regions=[mask, score], scale=float(scale))
    return (out, None, None)


def _has_ops(gm: Any) -> bool:
    """Whether a mod subgraph does anything (an identity score_mod or an all-true mask_mod does not)."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    if nodes:
        return True
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return not (holders and out is holders[0])


OPS: dict[str, Callable] = {
    "_scaled_dot_product_flash_attention_for_cpu.default": _sdpa,
    "_scaled_dot_product_efficient_attention.default": _sdpa_efficient,
    "_scaled_dot_product_flash_attention.default": _sdpa_flash,
}
