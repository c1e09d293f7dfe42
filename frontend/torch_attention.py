"""SDPA's ATen forms imported as `attn.attention` (or `attn.attention_lse` where a training graph saves the
log-sum-exp): the mask a region of (b, h, q, k), recognized as index arithmetic where it can be."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

from sparsa.frontend.torch_import import Importer, Unsupported, _same_sizes
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


OPS: dict[str, Callable] = {
    "_scaled_dot_product_flash_attention_for_cpu.default": _sdpa,
    "_scaled_dot_product_efficient_attention.default": _sdpa_efficient,
    "_scaled_dot_product_flash_attention.default": _sdpa_flash,
}
