"""The transform-dialect schedule of a cpu module: the tagged dense ops (matmuls, elementwise maps and
reductions) tiled into register tiles, peeled, vectorized, bufferized and lowered to outer products."""

from __future__ import annotations

from sparsa.backends.cpu.target import ROW_BLOCK

# The register tile of a matmul (TILE_M x TILE_N accumulators updated by one outer product per step of k, kept
# in registers over the k loop) comes from the target (target.py: CpuTarget.tile).
# A matmul with more rows runs in blocks of BLOCK_M rows, each block's rows staying in cache while every
# TILE_N-wide column panel of B passes over them.
BLOCK_M = ROW_BLOCK


def tiles(kind: str, shape: tuple, tile: tuple[int, int], most_rows: int = 0) -> list[int]:
    """Tile sizes of a scheduled op's loops: the last two output dims by the register tile TILE_M x TILE_N (the
    last by TILE_N for a vector), 1 for leading dims, and 1 for a matmul's reduction. A last dim known to be
    narrower than TILE_N (a router's 8 experts) is one tile wide, and so are rows known to be fewer than TILE_M (a
    decode step's expert rows): peeled, they would all be the scalar remainder. A matmul's rows known to be at most
    `most_rows` (`CpuTarget.packed_rows`, which fit the register file with TILE_N columns: the tile of a matmul
    whose rows come packed by tile) are one tile too."""
    tile_m, tile_n = tile
    rank, last = len(shape), shape[-1] if shape else None
    width = last if isinstance(last, int) and 0 < last < tile_n else tile_n
    fit = max(tile_m - 1, most_rows if kind == "matmul" else 0)
    rows = shape[-2] if rank >= 2 and isinstance(shape[-2], int) and 0 < shape[-2] <= fit else tile_m
    out = [1] * max(0, rank - 2) + ([rows, width] if rank >= 2 else [width])
    return out + [1] if kind == "matmul" else out


def interchange(kind: str, rank: int) -> list[int]:
    """The order of a scheduled op's tile loops, outermost first. A matmul walks its column panels outside
    its row tiles: one TILE_N-wide panel of B (k x TILE_N) stays in cache while every row tile of A passes
    over it, instead of all of B streaming past each row tile."""
    order = list(range(rank + (kind == "matmul")))
    if kind == "matmul" and rank >= 2:
        order[rank - 2], order[rank - 1] = rank - 1, rank - 2
    return order


def schedule(ops: list[tuple[str, str, tuple, str, tuple]], tile: tuple[int, int], block_k: int = 128,
             most_rows: int = 0) -> str:
    """The transform-dialect script run on the lowered module (kept as the `schedule` stage), for the
    target's register tile and k block.

    Matmuls, elementwise ops and reductions are tiled (`tiles`); where a tiled dim is not a known multiple of its tile,
    the loop is peeled so that every full tile has a static shape (the remainder runs as scalar loops).
    The full tiles (matched by their static result type) are vectorized, the accumulators are hoisted out
    of the k loop so they stay in registers, the module is bufferized and contractions become outer
    products. Other ops stay loops for now: vectorizing a whole untiled op would unroll it into one huge
    vector.
    """
    lines = ["module attributes {transform.with_named_sequence} {",
             "  transform.named_sequence @__transform_main(%root: !transform.any_op {transform.consumed}) {"]
    loop = '!transform.op<"scf.for">'
    for i, (tag, kind, shape, _, _) in enumerate(ops):
        kind = kind.partition(":")[0]
        sizes = tiles(kind, shape, tile, most_rows)
        lines.append(f"    %op{i} = transform.structured.match attributes{{{tag}}} in %root "
                     f": (!transform.any_op) -> !transform.any_op")
        order = interchange(kind, len(shape))
        target, rows = f"%op{i}", len(shape) - 2 if len(shape) >= 2 else None
        blocked = kind == "matmul" and rows is not None and (shape[rows] is None or shape[rows] > BLOCK_M)
        if kind == "matmul" and rows is not None:
            # row blocks of BLOCK_M (where there are more rows) and k blocks of block_k first, the register
            # tiles inside each: a k-block of a column panel of B (block_k x TILE_N) stays in L1 while the row
            # tiles of a block pass over it (x @ w at 512x512x2048 on one AVX-512 core: 56 GFLOP/s with the
            # whole k, 100 with k blocks of 128)
            outer = [0] * (len(shape) + 1)
            outer[rows] = BLOCK_M if blocked else 0
            outer[len(shape)] = block_k
            n = sum(1 for o in outer if o)
            lines.append(f"    %b{i}, %bl{i}:{n} = transform.structured.tile_using_for %op{i} tile_sizes "
                         f"[{', '.join(map(str, outer))}] : (!transform.any_op) -> "
                         f"(!transform.any_op{f', {loop}' * n})")
            target = f"%b{i}"
        lines.append(f"    %t{i}, %l{i}:{len(sizes)} = transform.structured.tile_using_for {target} tile_sizes "
                     f"[{', '.join(map(str, sizes))}] interchange = [{', '.join(map(str, order))}] "
                     f": (!transform.any_op) -> (!transform.any_op{f', {loop}' * len(sizes)})")
        for axis in sorted(range(max(0, len(shape) - 2), len(shape)), key=order.index, reverse=True):
            extent = shape[axis]
            if blocked and axis == rows:  # a block's rows: BLOCK_M, or fewer in the last block
                extent = BLOCK_M if extent is not None and extent % BLOCK_M == 0 else None
            if extent is None or extent % sizes[axis]:  # inner loops first: peeling clones them
                lines.append(f"    %p{i}_{axis}, %r{i}_{axis} = transform.loop.peel %l{i}#{order.index(axis)} "
                             f": ({loop}) -> (!transform.any_op, !transform.any_op)")
    lines += [
        "    %f = transform.structured.match ops{[\"func.func\"]} in %root : (!transform.any_op) -> !transform.any_op",
        "    transform.apply_patterns to %f { transform.apply_patterns.canonicalization } : !transform.any_op"]
    for i, (tag, kind, shape, dtype, out_dims) in enumerate(ops):
        kind, _, reads = kind.partition(":")  # "reduction:<input dims>;...": a fused chain's inputs, broadcast
        sizes = tiles(kind, shape, tile, most_rows)
        full = "x".join(str(sizes[d]) if d >= 0 else "1" for d in out_dims)  # a full tile's result shape
        # a reduction's result does not show whether its reduced dim is a full tile: its operands do (each input's
        # tile: the tiled dims it has, 1 where it is broadcast)
        inputs = ["x".join(str(sizes[int(d)]) if int(d) >= 0 else "1" for d in r.split(",") if d) for r in
                  reads.split(";")] if reads else ["x".join(map(str, sizes))]
        operands = "" if kind != "reduction" else (
            " filter_operand_types = [" + ", ".join(f"tensor<{t + 'x' if t else ''}{dtype}>" for t in inputs)
            + f", tensor<{full}x{dtype}>]")
        lines += [f"    %v{i} = transform.structured.match attributes{{{tag}}} filter_result_type = "
                  f"tensor<{full}x{dtype}>{operands} in %root : (!transform.any_op) -> !transform.any_op",
                  f"    transform.structured.vectorize %v{i} : !transform.any_op"]
    lines += [
        "    transform.apply_patterns to %f {",
        "      transform.apply_patterns.vector.reduction_to_contract",
        "      transform.apply_patterns.vector.transfer_permutation_patterns",
        "      transform.apply_patterns.canonicalization",
        "    } : !transform.any_op",
        # the accumulator tile's read and write out of the k loop, on tensors (after bufferization the
        # tile is a subview, a view the buffer hoisting refuses to move): it stays in registers
        "    %loops = transform.structured.match ops{[\"scf.for\"]} in %root "
        ": (!transform.any_op) -> !transform.any_op",
        "    transform.foreach %loops : !transform.any_op {",
        "    ^bb0(%lp: !transform.any_op):",
        "      transform.loop.hoist_loop_invariant_subsets %lp : !transform.any_op",
        "    }",
        # then the k loop still carries the accumulator's tensor and its slice unchanged; folding those
        # iter_args away lets bufferization write the tile in place (else: a copy in and out per tile)
        "    transform.apply_patterns to %f { transform.apply_patterns.canonicalization } : !transform.any_op",
        # a result computed into a fresh tensor and then stored into the output buffer is computed there
        "    transform.bufferization.eliminate_empty_tensors %f : !transform.any_op",
        "    %b = transform.bufferization.one_shot_bufferize %root {"
        "memcpy_op = \"linalg.copy\", allow_return_allocs_from_loops = true} "
        ": (!transform.any_op) -> !transform.any_op",
        "    %f2 = transform.structured.match ops{[\"func.func\"]} in %b : (!transform.any_op) -> !transform.any_op",
        "    transform.apply_cse to %f2 : !transform.any_op  // then a tile written back in place is no copy",
        "    transform.apply_patterns to %f2 {",
        '      transform.apply_patterns.vector.lower_contraction lowering_strategy = "outerproduct"',
        "      transform.apply_patterns.vector.transfer_permutation_patterns",
        "      transform.apply_patterns.canonicalization",
        "    } : !transform.any_op",
        "    %f3 = transform.structured.match ops{[\"func.func\"]} in %b : (!transform.any_op) -> !transform.any_op",
        "    transform.apply_patterns to %f3 {",
        "      transform.apply_patterns.vector.lower_outerproduct",
        '      transform.apply_patterns.vector.reorder_multi_reduction_dims lowering_strategy = "innerreduction"',
        '      transform.apply_patterns.vector.multi_reduction_flattening lowering_strategy = "innerreduction"',
        '      transform.apply_patterns.vector.multi_reduction_unrolling lowering_strategy = "innerreduction"',
        "      transform.apply_patterns.vector.lower_transfer max_transfer_rank = 1",
        "      transform.apply_patterns.vector.lower_transpose",
        "      transform.apply_patterns.vector.lower_broadcast",
        "      transform.apply_patterns.vector.lower_masks",
        "    } : !transform.any_op  // canonicalized by the pipeline: with these patterns it can cycle",
        "    transform.yield",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"
