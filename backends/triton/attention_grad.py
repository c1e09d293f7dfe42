"""Attention's backward (ir/dialects/attn_grad.py) as two generated Triton kernels over the forward's block map.

- dQ: one program per (query block, batch x head); its row's FULL key blocks (no mask), then its PARTIAL ones.
- dK/dV: one program per (key block, batch x key/value head); for each query head that reads it, the FULL and
  PARTIAL query blocks of its column of the map (the transposed map's lists, built by `map_lists`).

The probabilities are recomputed per tile from the forward's log-sum-exp, in float32; the score modifier and
its derivative region are inlined. Each program writes only its own rows: no atomics, except for a learned value the
score modifier reads (a bias table): the dK/dV program adds each allowed element's ds * d score / d read at the
element it read (`tl.atomic_add`, float32), as FlexAttention's backward does for captured buffers.
"""

from __future__ import annotations

import textwrap

from sparsa.backends.triton.attention import head_block, list_loop, tiles
from sparsa.backends.triton.program import LOWERINGS, TORCH_DTYPES, TritonProgram, digest, dot_precision, loc_comment
from sparsa.backends.triton.regions import RegionEmitter
from sparsa.ir.dialects.attn_blocks import outer_values
from sparsa.ir.dialects.attn_grad import AttentionGradOp

HEAD = '''
@triton.jit
def {name}(
    Q, K, V, DO, LSE, DELTA, OUT1, OUT2, FULL_IDX, FULL_CNT, PART_IDX, PART_CNT, {data_params}
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sd_b, sd_h, sd_s, so1_b, so1_h, so1_s, so2_b, so2_h, so2_s,
    H, HKV, SQ, SK, NQB, NKB, MAPB, MAPH, scale, HD, HDV,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, PRECISION: tl.constexpr,
):
    # {op_line}
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
'''

# the (query block x key block) tile, from q, do, lse, delta, k, v in registers: p, and ds (the raw scores' cotangent)
TILE = '''
s0 = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
s = s0
{score}
keep = (k_idx < SK) & (q_idx < SQ)
if phase == 1:
{mask}
p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
dp = tl.dot(do, tl.trans(v), input_precision=PRECISION).to(tl.float32)
ds = p * (dp - delta[:, None])
{value_grad}
{score_grad}
ds = ds * scale
'''

LOAD_Q = '''
q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_s + offs_d[None, :],
            mask=(offs_m[:, None] < SQ) & (offs_d[None, :] < HD), other=0.0)
do = tl.load(DO + b * sd_b + h * sd_h + offs_m[:, None] * sd_s + offs_dv[None, :],
             mask=(offs_m[:, None] < SQ) & (offs_dv[None, :] < HDV), other=0.0)
lse = tl.load(LSE + (b * H + h) * SQ + offs_m, mask=offs_m < SQ, other=float("inf")).to(tl.float32)
delta = tl.load(DELTA + (b * H + h) * SQ + offs_m, mask=offs_m < SQ, other=0.0).to(tl.float32)
q_idx = offs_m[:, None].to(tl.int64)
'''

LOAD_KV = '''
k = tl.load(K + b * sk_b + hk * sk_h + offs_n[:, None] * sk_s + offs_d[None, :],
            mask=(offs_n[:, None] < SK) & (offs_d[None, :] < HD), other=0.0)
v = tl.load(V + b * sv_b + hk * sv_h + offs_n[:, None] * sv_s + offs_dv[None, :],
            mask=(offs_n[:, None] < SK) & (offs_dv[None, :] < HDV), other=0.0)
k_idx = offs_n[None, :].to(tl.int64)
'''

DQ = '''
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // (H // HKV)
    b_idx = b.to(tl.int64)
    h_idx = h.to(tl.int64)
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
{load_q}
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    row = ((b % MAPB) * MAPH + (h % MAPH)) * NQB + qb
{blocks}
            offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
{load_kv}
{tile}
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION).to(tl.float32)
    tl.store(OUT1 + b * so1_b + h * so1_h + offs_m[:, None] * so1_s + offs_d[None, :], dq.to(OUT1.dtype.element_ty),
             mask=(offs_m[:, None] < SQ) & (offs_d[None, :] < HD))
'''

DKV = '''
    kb = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    b_idx = b.to(tl.int64)
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
{load_kv}
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, DV], tl.float32)
    rep = H // HKV
    for r in range(0, rep):
        h = hk * rep + r
        h_idx = h.to(tl.int64)
        row = ((b % MAPB) * MAPH + (h % MAPH)) * NKB + kb  # the transposed map: a row per key block
{blocks}
                offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
{load_q}
{tile}
                dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION).to(tl.float32)
                dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION).to(tl.float32)
    tl.store(OUT1 + b * so1_b + hk * so1_h + offs_n[:, None] * so1_s + offs_d[None, :], dk.to(OUT1.dtype.element_ty),
             mask=(offs_n[:, None] < SK) & (offs_d[None, :] < HD))
    tl.store(OUT2 + b * so2_b + hk * so2_h + offs_n[:, None] * so2_s + offs_dv[None, :],
             dv.to(OUT2.dtype.element_ty), mask=(offs_n[:, None] < SK) & (offs_dv[None, :] < HDV))
'''


def kernel_source(op: AttentionGradOp, grad_q: bool) -> tuple[str, str, list]:
    """(name, source, data values in argument order) of op's dQ kernel (`grad_q`) or its dK/dV kernel."""
    data_values = list({id(v): v for r in (op.mask, op.score, op.score_grad) if not r.empty
                        for v in outer_values(r)}.values())
    data = {id(v): (f"data{i}", v) for i, v in enumerate(data_values)}
    params = "".join(f"data{i}, " + "".join(f"data{i}_d{d}, " for d in range(v.type.rank))
                     for i, v in enumerate(data_values))
    index = ["b_idx", "h_idx", "q_idx", "k_idx"]
    parts = {"score": "", "score_grad": "", "mask": "keep = keep", "value_grad": ""}
    learned = op.learned() if not grad_q else []
    params += "".join(f"DVALUE{i}, " for i in range(len(learned)))
    if learned:
        parts["value_grad"] = _value_grad_lines(op, index, data, learned)
    if not op.score.empty:
        em = RegionEmitter(op.score, ["s0", *index], data, "sc")
        value = em.emit()
        parts["score"] = "\n".join(em.lines + [f"s = ({value}).to(tl.float32)"])
        em = RegionEmitter(op.score_grad, ["s0", "ds", *index], data, "sg")
        value = em.emit()
        parts["score_grad"] = "\n".join(em.lines + [f"ds = ({value}).to(tl.float32)"])
    if not op.mask.empty:
        em = RegionEmitter(op.mask, index, data, "mk")
        value = em.emit()
        parts["mask"] = "\n".join(em.lines + [f"keep = keep & ({value} != 0)"])
    parts["mask"] = textwrap.indent(parts["mask"], " " * 4)
    tile = TILE.strip("\n").format(**parts)
    depth = 12 if grad_q else 16
    body = (DQ if grad_q else DKV).format(
        load_q=textwrap.indent(LOAD_Q.strip("\n"), " " * (4 if grad_q else 16)),
        load_kv=textwrap.indent(LOAD_KV.strip("\n"), " " * (12 if grad_q else 4)),
        tile=textwrap.indent(tile, " " * depth),
        blocks=list_loop("kb", "NKB", 4) if grad_q else list_loop("qb", "NQB", 8))
    fields = {"data_params": params, "op_line": loc_comment(op)}
    text = HEAD.format(name="_", **fields) + body
    name = f"attn_grad_{'q' if grad_q else 'kv'}_{digest(text)}"
    return name, HEAD.format(name=name, **fields) + body, data_values


def _value_grad_lines(op: AttentionGradOp, index: list[str], data: dict, learned: list) -> str:
    """Each read of a learned value: ds * d score / d read added at the element read, where the tile keeps it."""
    em = RegionEmitter(op.value_grad, ["s0", "ds", *index], data, "vg")
    values = em.emit_values()
    lines = list(em.lines)
    pos = 0
    for n, (which, rank) in enumerate(op.read_groups()):
        name = data[id(learned[which])][0]
        off = "0"
        for axis, i in enumerate(values[pos + 1:pos + 1 + rank]):
            dim = f"{name}_d{axis}"
            off = f"({off}) * {dim} + tl.where({i} < 0, {i} + {dim}, {i})"
        lines += [f"vg_off{n} = ({off}) + tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int64)",
                  f"tl.atomic_add(DVALUE{which} + vg_off{n}, ({values[pos]}).to(tl.float32) + "
                  "tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), mask=keep)"]
        pos += 1 + rank
    return "\n".join(lines)


@LOWERINGS.lowers(AttentionGradOp)
def attention_grad(p: TritonProgram, op: AttentionGradOp) -> None:
    """Two launches: dQ over the map's rows, then dK and dV over its columns."""
    p.note_dot(op, op.q.type.dtype)
    d, dv, bq, bk = tiles(op, "attention's backward")
    outs = [p.new(r) for r in op.results]
    for r, n, like in zip(op.results[:3], outs[:3], (op.q, op.k, op.v), strict=True):
        p.alloc(r, n, f"{p.name(like)}.shape")
    q, k, v, do = (f"last_contiguous({p.name(x)})" for x in (op.q, op.k, op.v, op.dout))
    p.lines += [f"_q, _k, _v, _do = {q}, {k}, {v}, {do}",
                f"_lse, _delta = contiguous({p.name(op.lse)}), contiguous({p.name(op.delta)})",
                "_B, _H, _SQ, _SK = _q.shape[0], _q.shape[1], _q.shape[2], _k.shape[2]",
                f"_nqb, _nkb = cdiv(_SQ, {bq}), cdiv(_SK, {bk})"]
    for n, like in zip(outs[3:], op.learned(), strict=True):  # float32, added into atomically
        p.lines.append(f"{n} = torch.zeros(tuple({p.name(like)}.shape), dtype=torch.float32, device=dev)")
    for grad_q, (o1, o2) in ((True, (outs[0], outs[0])), (False, (outs[1], outs[2]))):
        name, source, data_values = kernel_source(op, grad_q)
        p.kernel(name, source)
        if op.block_map is not None:
            p.lines.append(f"_fi, _fc, _pi, _pc, _mb, _mh = map_lists({p.name(op.block_map)}, {not grad_q})")
        else:
            rows = "_nqb, _nkb" if grad_q else "_nkb, _nqb"
            p.lines.append(f"_fi, _fc, _pi, _pc = dense_lists({rows}, {not op.mask.empty}, dev)")
            p.lines.append("_mb, _mh = 1, 1")
        data = "".join(f"contiguous({p.name(x)}), *{p.name(x)}.shape, " for x in data_values)
        data += "".join(f"{n}, " for n in ([] if grad_q else outs[3:]))
        grid = "(_nqb, _B * _H)" if grad_q else "(_nkb, _B * _k.shape[1])"
        p.lines.append(
            f"{name}[{grid}](_q, _k, _v, _do, _lse, _delta, {o1}, {o2}, _fi, _fc, _pi, _pc, {data}"
            "_q.stride(0), _q.stride(1), _q.stride(2), _k.stride(0), _k.stride(1), _k.stride(2), "
            "_v.stride(0), _v.stride(1), _v.stride(2), _do.stride(0), _do.stride(1), _do.stride(2), "
            f"{o1}.stride(0), {o1}.stride(1), {o1}.stride(2), {o2}.stride(0), {o2}.stride(1), {o2}.stride(2), "
            f"_H, _k.shape[1], _SQ, _SK, _nqb, _nkb, _mb, _mh, {op.scale!r}, {d}, {dv}, BLOCK_M={bq}, "
            f"BLOCK_N={bk}, D={head_block(d)}, DV={head_block(dv)}, "
            f"PRECISION={dot_precision(op.q.type.dtype)!r})")
    for r, n in zip(op.dvalues, outs[3:], strict=True):  # a learned value of a narrower type: its gradient too
        if r.type.dtype != "f32":
            p.lines.append(f"{n} = {n}.to({TORCH_DTYPES[r.type.dtype]})")
