"""The cpu target's machine model: register tiles derived from the target (brute force over the rule), code
for named machines (x86-64-v3 and -v4 run here where the host has their features; aarch64 objects are emitted
and their architecture read back), the LLVM IR bridge between torch-mlir's LLVM and llvmlite's, the cache key,
and the probes the benchmark prints."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch_mlir")

sys.path.insert(0, str(Path(__file__).parent))
from cross_run import run_there, toolchain  # noqa: E402
from example_inputs import LINEAR_ATTENTION, OPS, SHAPES, SPARSE_WEIGHTS, make_inputs  # noqa: E402

import sparsa  # noqa: E402
from sparsa.backends.cpu import aot  # noqa: E402
from sparsa.backends.cpu.matmul import _pieces  # noqa: E402
from sparsa.backends.cpu.target import (  # noqa: E402
    HIDE_FMA_LATENCY,
    PANEL,
    ROW_BLOCK,
    CpuTarget,
    host_target,
    named_target,
)
from sparsa.ir.analysis import RuntimeShapeError  # noqa: E402
from sparsa.ir.diagnostics import SparsaError  # noqa: E402

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.sp"))
MACHINES = {"x86-64-v3": ("x86_64", "avx2", (4, 16), 6), "x86-64-v4": ("x86_64", "avx512", (8, 32), 8),
            "neoverse-n1": ("aarch64", "neon", (8, 8), 8), "aarch64": ("aarch64", "neon", (8, 8), 8),
            "x86-64": ("x86_64", "sse", (4, 8), 6)}


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_named_machines_and_their_register_tiles(name):
    arch, isa, tile, packed_rows = MACHINES[name]
    t = named_target(name)
    assert (t.arch, t.isa, t.tile, t.packed_rows) == (arch, isa, tile, packed_rows)


@pytest.mark.parametrize("bits,registers", [(128, 16), (128, 32), (256, 16), (256, 32), (512, 32)])
def test_the_tile_is_the_best_that_fits_by_brute_force(bits, registers):
    """Every (rows, vectors) pair: the chosen tile fits the register file (accumulators, B's row, A's broadcast),
    divides the row block and the panel, and none that does has more accumulators."""
    t = CpuTarget("x86_64-unknown-linux-gnu", "test", "", bits, registers, True)
    lanes = bits // 32
    m, n = t.tile
    fits = [(rm, v) for rm in range(1, 17) for v in range(1, 17)
            if rm * v + v + 1 <= registers and ROW_BLOCK % rm == 0 and PANEL % (v * lanes) == 0]
    assert (m, n // lanes) in fits
    assert m * (n // lanes) == max(rm * v for rm, v in fits)
    # a tile of packed rows (any number of rows): the tile's columns, the fewest rows from the tile's up whose
    # accumulators hide the FMA latency, or else the most that fit
    v = n // lanes
    rows = [rm for rm in range(m, 64) if rm * v + v + 1 <= registers]
    hiding = [rm for rm in rows if rm * v >= HIDE_FMA_LATENCY]
    assert t.packed_rows == (hiding[0] if hiding else rows[-1])


@pytest.mark.parametrize("m,lanes", [(m, lanes) for m in range(1, 17) for lanes in (4, 8, 16)])
def test_a_square_of_rows_is_stored_in_the_pieces_its_tiles_take(m, lanes):
    """By brute force: over a group of lcm(m, lanes) rows, each square's lanes are cut where a tile of m rows ends
    and nowhere else, and every row lands once, in its own tile."""
    group = math.lcm(m, lanes)
    seen = []
    for s in range(0, group, lanes):
        pieces = _pieces(s, lanes, m)
        assert [a for a, _ in pieces] == sorted(a for a, _ in pieces) and pieces[0][0] == 0
        assert sum(size for _, size in pieces) == lanes
        for a, size in pieces:
            rows = range(s + a, s + a + size)
            assert len({r // m for r in rows}) == 1  # within one tile
            assert (s + a) % m == 0 or a == 0  # cut only at a tile's start (or the square's)
            seen += rows
    assert seen == list(range(group))


def test_host_target_reads_this_machine():
    t = host_target()
    assert t.host and t.runs_here() and t.cores >= 1 and t.vector_bits in (128, 256, 512)
    assert t.isa in t.describe() and f"{t.tile[0]}x{t.tile[1]}" in t.describe()


def test_unknown_machines_are_clear_errors():
    with pytest.raises(SparsaError, match="unknown x86 CPU"):
        named_target("pentium9")
    with pytest.raises(SparsaError, match="takes no ':' suffix"):
        sparsa.compile(EXAMPLES[0].read_text(), target="reference:x")


@pytest.mark.parametrize("example", [*EXAMPLES, "ops"], ids=lambda p: getattr(p, "stem", p))
def test_every_example_compiles_to_objects_for_x86_and_aarch64(example):
    """The lowering assumes no x86: each example's kernels (and those of most dense ops: gelu's 0.044715 is a
    float constant LLVM writes in decimal) become an object for x86-64-v3, x86-64-v4 and an AArch64 CPU with
    NEON, and each object's ELF header names its architecture."""
    src = OPS if example == "ops" else example.read_text()
    for name in ("x86-64-v3", "x86-64-v4", "neoverse-n1"):
        obj = sparsa.compile(src, target=f"cpu:{name}").stage("obj")
        assert aot.elf_machine(obj) == MACHINES[name][0], name


@pytest.mark.skipif(not named_target("x86-64-v3").runs_here(), reason="needs an x86-64 host with AVX2 and FMA")
@pytest.mark.parametrize("example", ["mixtral_moe", "sliding_window_attention", "selective_scan"])
def test_a_named_machine_this_host_can_run_gives_the_reference_results(example):
    src = (Path(__file__).parent.parent / "examples" / f"{example}.sp").read_text()
    ref = sparsa.compile(src, target="reference").init_weights(0)
    m = sparsa.compile(src, target="cpu:x86-64-v3").init_weights(0)
    assert m.target == "cpu:x86-64-v3" and m.native.target.tile == (4, 16)
    assert 'target_cpu = "x86-64-v3"' in m.stage("llvm")
    inputs = make_inputs(ref)
    np.testing.assert_allclose(m(*inputs), ref(*inputs), rtol=2e-4, atol=2e-4)


def test_code_for_another_architecture_is_emitted_not_run(tmp_path):
    src = EXAMPLES[0].read_text()
    other = "neoverse-n1" if host_target().arch == "x86_64" else "x86-64-v3"
    m = sparsa.compile(src, target=f"cpu:{other}").init_weights(0)
    with pytest.raises(SparsaError, match="compiled ahead of time .* cannot run"):
        m(*make_inputs(m))
    out = tmp_path / "model.o"
    done = subprocess.run([sys.executable, "-m", "sparsa.runtime.cli", "compile", str(EXAMPLES[0]), "--target",
                           f"cpu:{other}", "--emit", "obj", "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert aot.elf_machine(out.read_bytes()) == MACHINES[other][0]


@pytest.mark.parametrize("name", ["x86-64-v3", "neoverse-n1"])
def test_objects_are_optimized_as_the_jit_optimizes(name):
    """An object is LLVM's optimized module, not code generation alone: the loop vectorizer (a pass of the module
    pipeline only) has marked the loops it vectorized. Without the pipeline, causal attention's object ran 1.46x
    slower than with it (AVX2, one thread)."""
    src = (Path(__file__).parent.parent / "examples" / "sliding_window_attention.sp").read_text()
    fn = sparsa.compile(src, target=f"cpu:{name}").native
    assert "llvm.loop.isvectorized" not in aot.llvm_ir(fn.stages["llvm"])
    module, _ = aot.optimized(fn.stages["llvm"], fn.target)
    assert "llvm.loop.isvectorized" in str(module)


def test_the_target_is_part_of_the_cache_key():
    from sparsa.backends.cpu import cache

    texts = ("the same kernels", "the same schedule")
    assert cache.key(*texts, host_target().key()) != cache.key(*texts, named_target("x86-64-v3").key())


def test_the_backend_code_is_part_of_the_cache_key(tmp_path, monkeypatch):
    """Another commit of the cpu backend with the same version number (what it does after the schedule is not in
    the key's texts) names other entries: its sources' digest is in the key."""
    from sparsa.backends.cpu import cache

    here = Path(cache.__file__).parent
    for p in here.iterdir():
        if p.suffix in (".py", ".c"):
            (tmp_path / p.name).write_bytes(p.read_bytes())
    digest = cache.code_digest.__wrapped__  # (not the process's cached one)
    assert digest(tmp_path) == digest(here) == cache.code_digest()
    (tmp_path / "jit.py").write_text((here / "jit.py").read_text() + "# another commit\n")
    assert digest(tmp_path) != digest(here)
    before = cache.key("the same kernels")
    monkeypatch.setattr(cache, "code_digest", lambda: digest(tmp_path))
    assert cache.key("the same kernels") != before


def test_newer_float_spellings_are_rewritten_for_llvmlite():
    text = ("%1 = fadd float %0, f0x42B17218\n  %2 = call <4 x float> @f(<4 x float> splat (float -inf))\n"
            "  %3 = fmul double %x, f0x3FF0000000000000\n  %nan = fadd float %inf, nan\n  @nanfoo = global i32 0\n"
            "  %4 = fmul contract <8 x float> %3, splat (float 4.471500e-02)\n  %5 = fadd double %y, 4.471500e-02\n"
            "  %6 = fadd float %x, -1.000000e+00\n  %7 = fptrunc double 4.471500e-02 to float\n"
            "  %8 = fmul contract float %7, 4.471500e-02\n  %9 = fadd double 1.000000e+00, 2.500000e-01")
    out = aot.legacy_float_spelling(text)
    assert float.fromhex("0x1.62e43p+6") == 88.72283935546875  # f0x42B17218 as a float
    assert "0x40562E4300000000" in out and "splat (float 0xFFF0000000000000)" in out
    assert "double %x, 0x3FF0000000000000" in out and "%nan = fadd float %inf, 0x7FF8000000000000" in out
    assert "@nanfoo" in out
    # a float in decimal that a float does not hold exactly (gelu's 0.044715): the float nearest it, as a double;
    # a double's decimals stay (the type named once by the instruction, or by the constant where a line has two)
    gelu = aot._double_hex(float(np.float32(0.044715)))
    assert f"splat (float {gelu})" in out and f"float %7, {gelu}" in out
    assert "double %y, 4.471500e-02" in out and "float %x, 0xBFF0000000000000" in out
    assert "fptrunc double 4.471500e-02 to float" in out
    assert "double 1.000000e+00, 2.500000e-01" in out


def test_probes_measure_something():
    from sparsa.backends.cpu.probe import copy_bandwidth_gbs, fma_peak_gflops

    peak = fma_peak_gflops(seconds=0.02)
    assert math.isfinite(peak) and peak > 0.1
    assert copy_bandwidth_gbs(mib=8) > 0.01


def test_the_tuner_times_the_candidates_once_per_machine_and_can_be_turned_off(tmp_path, monkeypatch, capsys):
    from sparsa.backends.cpu import target as T
    from sparsa.backends.cpu import tune

    monkeypatch.setenv("SPARSA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(T, "_TUNED", {})
    host = host_target()
    assert tune.candidates(host)[0] == host.derived_tile and len(tune.candidates(host)) <= tune.MAX_CANDIDATES
    assert tune.stored(host) is None
    tile = host.tile  # the first ask tunes, says so, and stores the winner
    assert tile in tune.candidates(host) and "tuning the cpu register tile" in capsys.readouterr().err
    assert tune.stored(host) == tile
    (path,) = (tmp_path / "cpu").glob("tile-*.json")
    assert set(json.loads(path.read_text())["ms"]) <= {f"{m}x{n}" for m, n in tune.candidates(host)}
    monkeypatch.setattr(T, "_TUNED", {})
    assert host.tile == tile and not capsys.readouterr().err  # read back: no tuning again
    path.write_text("{not json")
    assert tune.stored(host) is None  # a damaged record is ignored (and tuned again when asked)
    monkeypatch.setenv("SPARSA_AUTOTUNE", "0")
    monkeypatch.setattr(T, "_TUNED", {})
    assert host.tile == host.derived_tile and not capsys.readouterr().err
    assert tune.tune(host, budget_s=0.0, say=False) == host.derived_tile  # no time: the derived tile alone


def test_the_torch_backend_runs_a_named_machine_and_refuses_one_it_cannot_run():
    torch = pytest.importorskip("torch")
    from sparsa.runtime.torch_backend import SparsaBackend

    other = "neoverse-n1" if host_target().arch == "x86_64" else "x86-64-v3"
    with pytest.raises(SparsaError, match=f"target 'cpu:{other}' cannot run here"):
        SparsaBackend({"target": f"cpu:{other}"})
    if not named_target("x86-64-v3").runs_here():
        return
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    backend = SparsaBackend({"target": "cpu:x86-64-v3", "partitions": "all"})
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=backend)(x), model(x), rtol=1e-5, atol=1e-5)
    assert [p.target for p in backend.partitions] == ["cpu:x86-64-v3"]


# ---- object code run where its machine is (aot.call_image, runner.c) ----------------------------------------------
def _as_list(out):
    return list(out) if isinstance(out, tuple) else [out]


# most dense ops, sparse weights, shape ops and a matrix-state scan, beside the examples
PROGRAMS = {"ops": OPS, "sparse_weights": SPARSE_WEIGHTS, "shapes": SHAPES,
            "linear_attention": LINEAR_ATTENTION.replace("DECAY", "sigmoid(g)")}
NEEDS_AARCH64 = pytest.mark.skipif(toolchain("aarch64") is None, reason="needs an AArch64 C compiler and qemu-aarch64 "
                                   "(Debian: gcc-aarch64-linux-gnu, qemu-user) or an AArch64 host")


@NEEDS_AARCH64
@pytest.mark.parametrize("example", [*EXAMPLES, *PROGRAMS], ids=lambda p: getattr(p, "stem", p))
def test_aarch64_code_gives_the_reference_results(example, tmp_path):
    """Each example's NEON code (neoverse-n1), and that of programs of most dense ops, sparse weights, shape ops
    and a matrix-state scan, its native host and all, called on AArch64 (under qemu here) with libgomp's team of
    two: the reference's results."""
    src = PROGRAMS[example] if example in PROGRAMS else example.read_text()
    ref = sparsa.compile(src, target="reference").init_weights(0)
    m = sparsa.compile(src, target="cpu:neoverse-n1").init_weights(0)
    inputs = make_inputs(ref)
    got = run_there(m.native, inputs, m._cache, 2, tmp_path)
    for g, want in zip(got, _as_list(ref(*inputs)), strict=True):
        np.testing.assert_allclose(g, want, rtol=2e-4, atol=2e-4)


@NEEDS_AARCH64
@pytest.mark.parametrize("example", ["selective_scan", "mixtral_moe", "sliding_window_attention", "sparse_ffn"])
def test_aarch64_code_gives_the_reference_gradients(example, tmp_path):
    """`m.vjp` on AArch64 (generic NEON, one thread): the saved forward, then the backward on its residuals as that
    forward made them (a dispatch's at its bound), against the reference's gradients."""
    src = (Path(__file__).parent.parent / "examples" / f"{example}.sp").read_text()
    ref = sparsa.compile(src, target="reference").init_weights(0)
    m = sparsa.compile(src, target="cpu:aarch64").init_weights(0)
    inputs = make_inputs(ref)
    ys, pullback = ref.vjp(*inputs)
    ys = _as_list(ys)
    rng = np.random.default_rng(1)
    dys = [rng.standard_normal(np.shape(y)).astype(np.float32) for y in ys]
    want = pullback(*dys)
    grad = m._backward()
    saved = inputs
    if grad.forward is not None:
        both = run_there(grad.forward, inputs, grad.cache, 1, tmp_path / "fwd")
        for y, y_ref in zip(both[:len(ys)], ys, strict=True):
            np.testing.assert_allclose(y, y_ref, rtol=2e-4, atol=2e-4)
        saved = both[len(ys):]
    got = run_there(grad.native, [*saved, *dys], grad.cache, 1, tmp_path / "bwd")
    assert set(grad.produced) <= set(want) and grad.produced
    for name, g in zip(grad.produced, got, strict=True):
        np.testing.assert_allclose(g, want[name], rtol=2e-4, atol=2e-4 * float(np.max(np.abs(want[name]))), err_msg=name)


@pytest.mark.skipif(not named_target("x86-64-v3").runs_here() or toolchain("x86_64") is None,
                    reason="needs an x86-64 host with AVX2 and a C compiler")
def test_a_call_image_runs_in_the_runner_as_in_process(tmp_path, monkeypatch):
    """The runner and the call image on this machine: AVX2 object code of the Mixtral example linked with
    runner.c, a team of two, gives what the same function gives in this process. A function without a native host
    has no call image; results of the wrong length, or with a failed index check's status, are errors."""
    src = (Path(__file__).parent.parent / "examples" / "mixtral_moe.sp").read_text()
    m = sparsa.compile(src, target="cpu:x86-64-v3").init_weights(0)
    inputs = make_inputs(m)
    (got,) = run_there(m.native, inputs, m._cache, 2, tmp_path)
    np.testing.assert_allclose(got, m(*inputs), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeShapeError, match="input 'x' must have rank 2"):  # checked as a call checks it
        aot.call_image(m.native, [inputs[0][0]], m._cache)
    monkeypatch.setenv("SPARSA_NATIVE_HOST", "0")
    python = sparsa.compile(src, target="cpu:x86-64-v3").init_weights(0)
    with pytest.raises(SparsaError, match="no native host"):
        aot.call_image(python.native, inputs, python._cache)
    with pytest.raises(SparsaError, match="the results are 16 bytes, their shapes say 12"):
        aot.read_results(bytes(16), [((1,), np.float32)])
    with pytest.raises(SparsaError, match="launch 2 of the native host reads is out of range"):
        aot.read_results((3).to_bytes(8, "little") + bytes(4), [((1,), np.float32)])
