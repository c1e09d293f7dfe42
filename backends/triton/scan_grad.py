"""`scan.fused_grad` (ir/dialects/scan_grad.py) as a generated Triton kernel: the fused scan's reverse with its
states computed again chunk by chunk, never stored per step.

A program owns the forward kernel's tile of the state (BLOCK_O outer positions x the whole reduced axis). It runs
the forward once, keeping the state before each chunk of CHUNK steps in a scratch buffer of its own; then the
chunks from the last back: the chunk's states and decays again into scratch (L2-resident on a GPU: [CHUNK + 1,
BLOCK_O, BLOCK_N] floats a program), then its steps in reverse, the state's cotangent and the next step's decay in
registers, the derivative regions inlined. Each cotangent (a tile, the state's step shape) is added into its
input's float32 gradient with the input's strides broadcast to the state (zero on the axes it lacks), summed over
the reduced axis first where it lacks that one; inputs that do not vary over time are summed in registers and
added once at the end. Atomic adds make the axes an input lacks sum across programs.
"""

from __future__ import annotations

import hashlib
import textwrap

from sparsa.backends.triton.program import LOWERINGS, TORCH_DTYPES, TritonProgram
from sparsa.backends.triton.regions import RegionEmitter
from sparsa.backends.triton.scan import reduced_axis, tile_walk
from sparsa.ir.dialects.scan_grad import CHUNK, FusedScanGradOp

VIEWS = ("tensor.expand_dims", "tensor.squeeze", "tensor.broadcast_to")  # the same tile

KERNEL = '''
@triton.jit
def {name}(
    {input_params}DY, {dy_strides}
    {grad_params}CK, HS, AS,
    {outer_sizes}M, L, N, NCH,
    BLOCK_O: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    # {op_line}
    pid = tl.program_id(0)
    offs_o = pid * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_n = tl.arange(0, BLOCK_N)
    live = (offs_o[:, None] < M) & (offs_n[None, :] < N)
    row = offs_o < M
    tile = tl.arange(0, BLOCK_O)[:, None] * BLOCK_N + offs_n[None, :]
    TILE = BLOCK_O * BLOCK_N
    ck = CK + pid * NCH * TILE
    hs = HS + pid * (CHUNK + 1) * TILE
    at = AS + pid * CHUNK * TILE
{decompose}
{bases}
    # 1. the forward, keeping the state before each chunk
    h = tl.zeros([BLOCK_O, BLOCK_N], tl.float32)
    for c in range(0, NCH):
        tl.store(ck + c * TILE + tile, h)
        for t in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, L)):
{loads}
{producer}
            h = a_t * h + b_t
    # 2. the chunks from the last back
    lam = tl.zeros([BLOCK_O, BLOCK_N], tl.float32)
    later = tl.zeros([BLOCK_O, BLOCK_N], tl.float32)
{sums}
    for cr in range(0, NCH):
        c = NCH - 1 - cr
        t0 = c * CHUNK
        t1 = tl.minimum(t0 + CHUNK, L)
        tl.debug_barrier()
        h = tl.load(ck + c * TILE + tile)
        tl.store(hs + tile, h)
        for t in range(t0, t1):
{loads2}
{producer2}
            h = a_t * h + b_t
            tl.store(hs + (t - t0 + 1) * TILE + tile, h)
            tl.store(at + (t - t0) * TILE + tile, a_t)
        tl.debug_barrier()
        for s in range(0, t1 - t0):
            t = t1 - 1 - s
{loads2}
            h_t = tl.load(hs + (t - t0 + 1) * TILE + tile)
            h_p = tl.load(hs + (t - t0) * TILE + tile)
            a_t = tl.load(at + (t - t0) * TILE + tile)
{b_again}
            dy_t = tl.load(DY + dy_base + t * sdy_t, mask=row, other=0.0).to(tl.float32)[:, None]
{consumer_grad}
            lam = dh + later * lam
            later = a_t
            da = lam * h_p
{producer_grad}
{accumulate}
{finish}
'''


def _emit(em: RegionEmitter) -> list[str]:
    """The region's yielded names after em.lines, its views (broadcasts of a tile) naming their operand's tile."""
    ops = em.region.block.ops
    for op in ops[:-1]:
        if op.NAME in VIEWS:
            em.names[id(op.results[0])] = em.value(op.operands[0])
        else:
            em.emit_ops([op])
    return [em.value(v) for v in ops[-1].operands]


def generate(op: FusedScanGradOp) -> tuple[str, str]:
    """(kernel name, source) for one scan.fused_grad op; the forward's kernel form (`FusedScanKernel`) is required
    of it (a consumer sum(h * x) over one state axis)."""
    rank, axis, r = len(op.state), op.axis, reduced_axis(op)
    outer = [d for d in range(rank) if d not in (axis, r)]
    xs, n = op.xs, op.num_producer_inputs
    input_params, outer_sizes, decompose, bases = tile_walk(len(xs), rank, axis, r, "dy", "sdy")
    grad_params = "".join(f"G{i}, " + "".join(f"sg{i}_{d}, " for d in range(rank)) for i in range(len(xs)))
    dy_strides = "".join(f"sdy_{d}, " for d in outer) + "sdy_t, "
    for i in range(len(xs)):
        rows = " + ".join(f"i{d} * sg{i}_{d}" for d in outer) or "0 * offs_o"
        bases.append(f"gbase{i} = {rows}")  # the gradient's row offsets; its reduced axis added where it has one

    def loads(indent: int) -> str:
        return textwrap.indent("\n".join(f"x{i} = tl.load(X{i} + base{i} + t * sx{i}_{axis}, mask=live, other=0.0)"
                                         f".to(tl.float32)" for i in range(len(xs))), " " * indent)

    prod = RegionEmitter(op.producer, [f"x{i}" for i in range(n)], {}, "p")
    a_val, b_val = _emit(prod)
    producer = prod.lines + [f"a_t = {a_val}", f"b_t = {b_val}"]
    b_used = bool(op.producer_grad.block.args[n + 1].uses)
    again = RegionEmitter(op.producer, [f"x{i}" for i in range(n)], {}, "q")
    b_again = again.lines + [f"b_t = {_emit(again)[1]}"] if b_used else ["b_t = 0.0"]
    cg = RegionEmitter(op.consumer_grad, ["h_t"] + [f"x{i}" for i in range(n, len(xs))] + ["dy_t"], {}, "cg")
    dh, *dc = _emit(cg)
    pg = RegionEmitter(op.producer_grad, [f"x{i}" for i in range(n)] + ["a_t", "b_t", "da", "lam"], {}, "pg")
    dp = _emit(pg)
    cotangents = [*dp, *dc]
    accumulate, sums, finish = [], [], []
    for i, (v, g) in enumerate(zip(xs, cotangents, strict=True)):
        p = axis - (rank - v.type.rank)
        timed = p >= 0 and v.type.shape[p] != 1
        q = r - (rank - v.type.rank)
        has_r = q >= 0 and v.type.shape[q] != 1
        tile = f"tl.where(live, ({g}) + tl.zeros([BLOCK_O, BLOCK_N], tl.float32), 0.0)"
        if has_r:
            where, value, mask = f"G{i} + gbase{i}[:, None] + offs_n[None, :] * sg{i}_{r}", "{}", "live"
        else:
            where, value, mask = f"G{i} + gbase{i}", "tl.sum({}, 1)", "row"
        if timed:
            accumulate.append(f"tl.atomic_add({where} + t * sg{i}_{axis}, {value.format(tile)}, mask={mask})")
        else:
            sums.append(f"acc{i} = tl.zeros([BLOCK_O, BLOCK_N], tl.float32)")
            accumulate.append(f"acc{i} += {tile}")
            finish.append(f"tl.atomic_add({where}, {value.format(f'acc{i}')}, mask={mask})")
    where = f' from "{op.loc.file}":{op.loc.line}' if op.loc else ""
    fields = {"input_params": input_params, "grad_params": grad_params, "dy_strides": dy_strides,
              "outer_sizes": outer_sizes, "op_line": f"scan.fused_grad{where}",
              "decompose": textwrap.indent("\n".join(decompose), " " * 4),
              "bases": textwrap.indent("\n".join(bases), " " * 4), "loads": loads(12), "loads2": loads(12),
              "producer": textwrap.indent("\n".join(producer), " " * 12),
              "producer2": textwrap.indent("\n".join(producer), " " * 12),
              "b_again": textwrap.indent("\n".join(b_again), " " * 12),
              "consumer_grad": textwrap.indent("\n".join(cg.lines + [f"dh = {dh}"]), " " * 12),
              "producer_grad": textwrap.indent("\n".join(pg.lines), " " * 12),
              "accumulate": textwrap.indent("\n".join(accumulate), " " * 12),
              "sums": textwrap.indent("\n".join(sums), " " * 4),
              "finish": textwrap.indent("\n".join(finish), " " * 4)}
    digest = hashlib.sha256(KERNEL.format(name="_", **fields).encode()).hexdigest()[:16]
    name = f"fused_scan_grad_{digest}"
    return name, KERNEL.format(name=name, **fields)


@LOWERINGS.lowers(FusedScanGradOp)
def fused_scan_grad(p: TritonProgram, op: FusedScanGradOp) -> None:
    """The kernel on the inputs (strides broadcast to the state), dy, float32 gradients (zeroed) and the programs'
    scratch; each gradient then cast to its input's dtype."""
    name, source = generate(op)
    p.kernel(name, source)
    r = reduced_axis(op)
    rank, axis = len(op.state), op.axis
    outer = [d for d in range(rank) if d not in (axis, r)]
    xs = [p.name(v) for v in op.xs]
    dy = p.name(op.dy)
    state = "(" + "".join(f"{p.dim(d)}, " for d in op.state) + ")"
    grads = [p.new(g) for g in op.grads]
    p.lines += [f"_state = {state}",
                f"_gs = [torch.zeros(_x.shape, dtype=torch.float32, device=dev) for _x in ({', '.join(xs)},)]",
                f"_M = math.prod(_state[d] for d in {outer})",
                "_BN = npow2(_state[" + str(r) + "])",
                f"_NCH = cdiv(_state[{axis}], {CHUNK})",
                "_grid = max(1, cdiv(_M, 32))",
                "_ck = torch.empty((_grid, _NCH, 32, _BN), dtype=torch.float32, device=dev)",
                f"_hs = torch.empty((_grid, {CHUNK + 1}, 32, _BN), dtype=torch.float32, device=dev)",
                f"_as = torch.empty((_grid, {CHUNK}, 32, _BN), dtype=torch.float32, device=dev)",
                "_args = []",
                f"for _x in ({', '.join(xs)},):",
                "    _args += [_x, *bstrides(_x, _state)]",
                f"_args += [{dy}] + [{dy}.stride(d - (d > {r})) for d in {outer}] + [{dy}.stride({axis - (axis > r)})]",
                "for _g in _gs:",
                "    _args += [_g, *bstrides(_g, _state)]",
                f"_args += [_ck, _hs, _as] + [_state[d] for d in {outer}] + [_M, _state[{axis}], _state[{r}], _NCH]",
                "if _M and _state[" + str(axis) + "]:",
                f"    {name}[(_grid,)](*_args, BLOCK_O=32, BLOCK_N=_BN, CHUNK={CHUNK})"]
    for i, (g, v) in enumerate(zip(grads, op.xs, strict=True)):
        p.lines.append(f"{g} = _gs[{i}].to({TORCH_DTYPES[v.type.dtype]})")
