"""Block-sparse flash attention as a generated Triton kernel, driven by `sparsify-attention`'s block map.

Per (query block, batch x head) program: a loop over the FULL key blocks with no mask evaluation, then a
loop over the PARTIAL key blocks with the mask evaluated in registers; EMPTY blocks are never visited.
The score modifier is inlined in both loops; grouped heads read their key/value head without copies;
online softmax in float32; a query row with no allowed key gives zeros.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from typing import Any

import numpy as np

from sparsa.backends.triton.program import (
    LOWERINGS,
    Const,
    TritonProgram,
    digest,
    dot_precision,
    loc_comment,
    npow2,
)
from sparsa.backends.triton.regions import RegionEmitter
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dialects import attn as AT
from sparsa.ir.dialects.attn import AttentionOp
from sparsa.ir.dialects.attn_blocks import BlockMapOp, outer_values
from sparsa.ir.dialects.attn_grad import AttentionLseOp
from sparsa.knobs import cache_root, private_dir

KERNEL = '''
@triton.jit
def {name}(
    Q, K, V, O, LSE, FULL_IDX, FULL_CNT, PART_IDX, PART_CNT, {data_params}
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s,
    H, HKV, SQ, SK, NQB, NKB, MAPB, MAPH, scale, HD, HDV,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, PRECISION: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    # {op_line}
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // (H // HKV)
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_s + offs_d[None, :],
                mask=(offs_m[:, None] < SQ) & (offs_d[None, :] < HD), other=0.0)  # head dims padded to D, DV
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    row = ((b % MAPB) * MAPH + (h % MAPH)) * NQB + qb
    q_idx = offs_m[:, None].to(tl.int64)
    b_idx = b.to(tl.int64)
    h_idx = h.to(tl.int64)
{blocks}
            offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
            k_idx = offs_n[None, :].to(tl.int64)
            k = tl.load(k_base + offs_n[:, None] * sk_s + offs_d[None, :],
                        mask=(offs_n[:, None] < SK) & (offs_d[None, :] < HD), other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
{score}
            s = s * 1.4426950408889634  # log2(e): the softmax below uses exp2
            keep = k_idx < SK
            if phase == 1:
{mask}
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None] * sv_s + offs_dv[None, :],
                        mask=(offs_n[:, None] < SK) & (offs_dv[None, :] < HDV), other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
            m_i = m_new
    out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i[:, None] > 0, l_i[:, None], 1.0), 0.0)
    tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_s + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < SQ) & (offs_dv[None, :] < HDV))
    if WRITE_LSE:  # natural log-sum-exp of each row's allowed scores (+inf where none): the backward's residual
        lse = tl.where(l_i > 0, (m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0))) * 0.6931471805599453,
                       float("inf"))
        tl.store(LSE + bh * SQ + offs_m, lse.to(LSE.dtype.element_ty), mask=offs_m < SQ)
'''


# A block map row's FULL blocks (phase 0: no mask evaluated), then its PARTIAL ones (phase 1: the mask in registers)
LIST_LOOP = '''for phase in tl.static_range(2):
    if phase == 0:
        count = tl.load(FULL_CNT + row)
    else:
        count = tl.load(PART_CNT + row)
    for j in range(0, count):
        if phase == 0:
            {var} = tl.load(FULL_IDX + row * {n} + j)
        else:
            {var} = tl.load(PART_IDX + row * {n} + j)'''


def list_loop(var: str, n: str, indent: int) -> str:
    """LIST_LOOP over a row of `n` entries, each block's index in `var`, indented for its template."""
    return textwrap.indent(LIST_LOOP.format(var=var, n=n), " " * indent)


# Launch configuration from a sweep on an H100 (bf16, Dh=64, 64x64 tiles): 4 warps and a 3-stage pipeline
# beat 8 warps and 2 or 4 stages on causal and sliding-window masks.
NUM_WARPS, NUM_STAGES = 4, 3


@dataclass
class AttentionKernel:
    """A compiled-on-demand Triton kernel for one attention op, with its readable source."""

    name: str
    source: str
    data: list  # the mask/score data values, in kernel-argument order
    block_q: int
    block_k: int
    scale: float

    @classmethod
    def generate(cls, op: AttentionOp) -> AttentionKernel:
        """Kernel source for `op` (which must carry a block map from sparsify-attention)."""
        data_values = list({id(v): v for r in (op.mask, op.score) if not r.empty for v in outer_values(r)}.values())
        data = {id(v): (f"data{i}", v) for i, v in enumerate(data_values)}
        params = "".join(f"data{i}, " + "".join(f"data{i}_d{d}, " for d in range(v.type.rank))
                         for i, v in enumerate(data_values))
        score = ""
        if not op.score.empty:
            em = RegionEmitter(op.score, ["s", "b_idx", "h_idx", "q_idx", "k_idx"], data, "sc")
            value = em.emit()
            score = "\n".join(em.lines + [f"s = ({value}).to(tl.float32)"])
        mask = "keep = keep"  # no mask: every tile FULL
        if not op.mask.empty:
            em = RegionEmitter(op.mask, ["b_idx", "h_idx", "q_idx", "k_idx"], data, "mk")
            value = em.emit()
            mask = "\n".join(em.lines + [f"keep = keep & ({value} != 0)"])
        where = f' from "{op.loc.file}":{op.loc.line}' if op.loc else ""
        fields = {"data_params": params, "op_line": f"attn.attention{where}", "blocks": list_loop("kb", "NKB", 4),
                  "score": textwrap.indent(score, " " * 12), "mask": textwrap.indent(mask, " " * 16)}
        # The name (and so the cached file) is a hash of the whole kernel text: a changed template or region
        # can never load a stale kernel.
        digest = hashlib.sha256(KERNEL.format(name="_", **fields).encode()).hexdigest()[:16]
        name = f"attn_block_sparse_{digest}"
        source = KERNEL.format(name=name, **fields)
        return cls(name, source, data_values, op.block_q, op.block_k, op.scale)

    def module_text(self) -> str:
        return "import triton\nimport triton.language as tl\n\n" + self.source

    def load(self) -> Any:
        """The @triton.jit function."""
        return load_kernel_module(self.name, self.module_text())

    def prepare(self, block_map: Any, device: Any) -> BlockLists:
        """The per-row lists of FULL and PARTIAL key blocks of a block map (built once per map, on `device`)."""
        return block_lists(block_map, device)

    def __call__(self, q: Any, k: Any, v: Any, block_map: Any, data: list[Any] = (), num_warps: int = NUM_WARPS,
                 num_stages: int = NUM_STAGES) -> Any:
        """Run on torch tensors q [B, H, Sq, D], k/v [B, Hkv, Sk, D]; block_map: int8 [NB, NH, NQB, NKB]
        or the BlockLists from `prepare` (reuse them across calls with the same map)."""
        import torch

        B, H, SQ, D = q.shape
        HKV, SK, DV = k.shape[1], k.shape[2], v.shape[3]
        lists = block_map if isinstance(block_map, BlockLists) else self.prepare(block_map, q.device)
        full_idx, full_cnt, part_idx, part_cnt = lists.full_idx, lists.full_cnt, lists.part_idx, lists.part_cnt
        nqb, nkb = lists.shape[2], lists.shape[3]
        out = torch.empty((B, H, SQ, DV), dtype=q.dtype, device=q.device)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        args: list[Any] = []
        for t in data:
            t = torch.as_tensor(t, device=q.device).contiguous()
            args += [t, *t.shape]
        grid = (nqb, B * H)
        self.load()[grid](
            q, k, v, out, out, full_idx, full_cnt, part_idx, part_cnt, *args,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            H, HKV, SQ, SK, nqb, nkb, lists.shape[0], lists.shape[1], self.scale, D, DV,
            BLOCK_M=self.block_q, BLOCK_N=self.block_k, D=head_block(D), DV=head_block(DV),
            PRECISION=precision(q.dtype), WRITE_LSE=False, num_warps=num_warps, num_stages=num_stages,
        )
        return out


@dataclass
class BlockLists:
    """A block map as the kernel reads it: per row, FULL and PARTIAL key-block indices and their counts."""

    full_idx: Any
    full_cnt: Any
    part_idx: Any
    part_cnt: Any
    shape: tuple[int, ...]


def tiles(op: Any, what: str) -> tuple[int, int, int, int]:
    """(head dim, value head dim, block_q, block_k) of an attention op or its backward: static head dims up to
    256 (a clear error otherwise), the block map's tiles or 64 x 64."""
    d, dv = op.q.type.shape[3], op.v.type.shape[3]
    for dim, n in (("head dim", d), ("value head dim", dv)):
        if not isinstance(n, int) or n > 256:
            raise SparsaError(f"{what} with {dim} {n} is not supported by the triton backend (needs a static size "
                              "<= 256)", op.loc)
    return (d, dv, op.block_q, op.block_k) if op.block_map is not None else (d, dv, 64, 64)


def head_block(d: int) -> int:
    """The head-dim extent a kernel uses: a power of two >= 16 (tl.dot's minimum); the rest is masked."""
    return max(16, 1 << max(0, (int(d) - 1).bit_length()))


def precision(dtype: Any) -> str:
    """tl.dot's input precision: float32 operands multiply in full precision (as PyTorch's default matmul),
    not TF32; half types use the tensor cores' native path."""
    import torch

    return "ieee" if dtype == torch.float32 else "tf32"


def block_lists(block_map: Any, device: Any) -> BlockLists:
    """A block map [NB, NH, NQB, NKB] as the attention kernel reads it: per row, FULL and PARTIAL key blocks."""
    import torch

    bm = torch.as_tensor(np.array(block_map, dtype=np.int8), device=device)
    from sparsa.backends.triton.host import select_lists

    return BlockLists(*select_lists(bm == 2), *select_lists(bm == 1), tuple(bm.shape))


def load_kernel_module(name: str, text: str) -> Any:
    """Import generated kernel source and return its function `name`.

    Triton reads a kernel's source from its file, so the text is written (atomically, under
    SPARSA_CACHE_DIR) to a file named by the kernel (a hash of its text) and imported from there.
    """
    tag = "interp" if os.environ.get("TRITON_INTERPRET") == "1" else "jit"
    mod_name = f"sparsa_triton_{name}_{tag}"
    if mod_name in sys.modules:  # every call after the first: no file system work on the launch path
        return getattr(sys.modules[mod_name], name)
    if not text.startswith("import triton"):
        text = "import triton\nimport triton.language as tl\n\n" + text
    root = cache_root()
    base = (root if root is not None else private_dir()) / "triton"
    base.mkdir(parents=True, exist_ok=True)
    path = base / f"{name}_{tag}.py"
    if not path.exists() or path.read_text() != text:  # written whole under a unique name, then renamed
        fd, tmp = tempfile.mkstemp(dir=base, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    if mod_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[mod_name] = module
    return getattr(sys.modules[mod_name], name)


# ---- launcher lines ---------------------------------------------------------------------------------
BUILDER = '''
@triton.jit
def {name}(
    FULL_IDX, FULL_CNT, PART_IDX, PART_CNT, {data_params}
    SQ, SK, NQB, NKB, H, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BQP: tl.constexpr, BKP: tl.constexpr,
):
    # {op_line}: classified per call, one program per (batch, head, query block), exact (every pair);
    # BQP x BKP is the block padded to powers of two (tl.arange's extents)
    row = tl.program_id(0)
    qb = row % NQB
    b = row // NQB // H
    h = row // NQB % H
    in_q = tl.arange(0, BQP)
    offs_q = qb * BLOCK_Q + in_q
    q_idx = offs_q[:, None].to(tl.int64)
    b_idx = b.to(tl.int64)
    h_idx = h.to(tl.int64)
    n_full = 0
    n_part = 0
    for kb in range(0, NKB):
        in_k = tl.arange(0, BKP)
        offs_k = kb * BLOCK_K + in_k
        k_idx = offs_k[None, :].to(tl.int64)
        live = (offs_q[:, None] < SQ) & (offs_k[None, :] < SK) & (in_q[:, None] < BLOCK_Q) & (in_k[None, :] < BLOCK_K)
{mask}
        keep = (keep != 0) & live
        any_kept = tl.max(tl.max(keep.to(tl.int32), 1), 0)
        any_dropped = tl.max(tl.max((live & (keep == 0)).to(tl.int32), 1), 0)
        is_full = (any_kept == 1) & (any_dropped == 0)
        is_part = (any_kept == 1) & (any_dropped == 1)
        tl.store(FULL_IDX + row * NKB + n_full, kb, mask=is_full)
        tl.store(PART_IDX + row * NKB + n_part, kb, mask=is_part)
        n_full += is_full.to(tl.int32)
        n_part += is_part.to(tl.int32)
    tl.store(FULL_CNT + row, n_full)
    tl.store(PART_CNT + row, n_part)
'''


# ---- attention ------------------------------------------------------------------------------------
@LOWERINGS.lowers(BlockMapOp)
def block_map(p: TritonProgram, op: BlockMapOp) -> None:
    if op.map is not None:  # classified at compile time: a launcher constant
        p.names[id(op.result)] = f"C[{len(p.consts)}]"
        p.consts.append(Const("lists", op))
        if id(op.result) in p.returned:
            p.lines.append(f"{p.new(op.result)} = dense_map(*C[{len(p.consts) - 1}])")
        return
    out = p.new(op.result)
    data_values = outer_values(op.mask)
    data = {id(v): (f"data{i}", v) for i, v in enumerate(data_values)}
    params = "".join(f"data{i}, " + "".join(f"data{i}_d{d}, " for d in range(v.type.rank))
                     for i, v in enumerate(data_values))
    em = RegionEmitter(op.mask, ["b_idx", "h_idx", "q_idx", "k_idx"], data, "mk")
    value = em.emit()
    mask = "\n".join(em.lines + [f"keep = {value}"])
    fields = {"data_params": params, "op_line": loc_comment(op), "mask": textwrap.indent(mask, " " * 8)}
    name = f"attn_block_map_{digest(BUILDER.format(name='_', **fields))}"
    p.kernel(name, BUILDER.format(name=name, **fields))
    nb, nh = p.dim(op.batch), p.dim(op.heads)
    nqb = f"cdiv({p.dim(op.sq)}, {op.block_q})"
    nkb = f"cdiv({p.dim(op.sk)}, {op.block_k})"
    args = "".join(f"contiguous({p.name(v)}), *{p.name(v)}.shape, " for v in data_values)
    p.lines += [
        f"_nqb, _nkb, _rows = {nqb}, {nkb}, {nb} * {nh} * {nqb}",
        "_fi = torch.empty((_rows, _nkb), dtype=torch.int32, device=dev)",
        "_pi = torch.empty((_rows, _nkb), dtype=torch.int32, device=dev)",
        "_fc = torch.empty((_rows,), dtype=torch.int32, device=dev)",
        "_pc = torch.empty((_rows,), dtype=torch.int32, device=dev)",
        f"{name}[(_rows,)](_fi, _fc, _pi, _pc, {args}{p.dim(op.sq)}, {p.dim(op.sk)}, _nqb, _nkb, {nh}, "
        f"BLOCK_Q={op.block_q}, BLOCK_K={op.block_k}, BQP={npow2(op.block_q)}, BKP={npow2(op.block_k)})",
        f"{out} = (_fi, _fc, _pi, _pc, {nb}, {nh}, _nqb, _nkb)",
    ]
    if id(op.result) in p.returned:  # the op's value: the map itself, not the kernel's lists
        p.lines.append(f"{out} = dense_map(*{out})")


@LOWERINGS.lowers(AT.AttentionOp)
def attention(p: TritonProgram, op: AT.AttentionOp) -> None:
    p.note_dot(op, op.q.type.dtype)
    kern = AttentionKernel.generate(op)
    p.kernel(kern.name, kern.source)
    q, k, v = (f"last_contiguous({p.name(x)})" for x in (op.q, op.k, op.v))
    d, dv, bq, bk = tiles(op, "attention")
    out = p.new(op.result)
    p.alloc(op.result, out, f"{p.name(op.q)}.shape[:3] + ({dv},)")
    lse = out  # attn.attention_lse also writes each row's log-sum-exp
    if isinstance(op, AttentionLseOp):
        lse = p.new(op.results[1])
        p.alloc(op.results[1], lse, f"{p.name(op.q)}.shape[:3]")
    p.lines += [f"_q, _k, _v = {q}, {k}, {v}",
                   "_B, _H, _SQ, _SK = _q.shape[0], _q.shape[1], _q.shape[2], _k.shape[2]"]
    if op.block_map is not None:
        p.lines += [f"_fi, _fc, _pi, _pc, _mb, _mh = map_lists({p.name(op.block_map)}, False)",
                    f"_nqb, _nkb = cdiv(_SQ, {bq}), cdiv(_SK, {bk})"]
    else:
        p.lines += [f"_nqb, _nkb, _mb, _mh = cdiv(_SQ, {bq}), cdiv(_SK, {bk}), 1, 1",
                       f"_fi, _fc, _pi, _pc = dense_lists(_nqb, _nkb, {not op.mask.empty}, dev)"]
    data = "".join(f"contiguous({p.name(x)}), *{p.name(x)}.shape, " for x in kern.data)
    p.lines.append(
        f"{kern.name}[(_nqb, _B * _H)](_q, _k, _v, {out}, {lse}, _fi, _fc, _pi, _pc, {data}"
        f"_q.stride(0), _q.stride(1), _q.stride(2), _k.stride(0), _k.stride(1), _k.stride(2), "
        f"_v.stride(0), _v.stride(1), _v.stride(2), {out}.stride(0), {out}.stride(1), {out}.stride(2), "
        f"_H, _k.shape[1], _SQ, _SK, _nqb, _nkb, _mb, _mh, {op.scale!r}, {d}, {dv}, BLOCK_M={bq}, BLOCK_N={bk}, "
        f"D={head_block(d)}, DV={head_block(dv)}, PRECISION={dot_precision(op.q.type.dtype)!r}, "
        f"WRITE_LSE={lse != out}, num_warps={NUM_WARPS}, num_stages={NUM_STAGES})")
