"""`sparsa.compile` as users call it: weights from files and dicts, errors that name the weight, torch in and
out, symbolic dims bound per call, IR after a pass, and `sparsa run` / `sparsa compile` from the shell."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sparsa
from sparsa.runtime.weights import WeightError

EXAMPLES = Path(__file__).parent.parent / "examples"
FFN = """
model FFN(x: f32[T, 8]) -> f32[T, 8] {
    param up: f32[8, 16] sparse bsr(4, 4)
    param down: f32[16, 8] sparse nm(2, 4)
    return relu(x @ up) @ down
}
"""


def ffn():
    return sparsa.compile(FFN, target="reference")


def good_weights(seed=0):
    rng = np.random.default_rng(seed)
    up = rng.standard_normal((8, 16)).astype(np.float32)
    up[:4, :4] = 0
    down = rng.standard_normal((16, 8)).astype(np.float32)
    down[[0, 1, 6, 7, 8, 9, 14, 15]] = 0
    return {"up": up, "down": down}


@pytest.mark.parametrize("fmt", ["dict", "npz", "safetensors"])
def test_load_weights_formats(tmp_path, fmt):
    w = good_weights()
    m = ffn()
    if fmt == "dict":
        m.load_weights(w)
    elif fmt == "npz":
        np.savez(tmp_path / "w.npz", **w)
        m.load_weights(tmp_path / "w.npz")
    else:
        from safetensors.numpy import save_file

        save_file(w, str(tmp_path / "w.safetensors"))
        m.load_weights(str(tmp_path / "w.safetensors"))
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_allclose(m(x), np.maximum(x @ w["up"], 0) @ w["down"], rtol=1e-5, atol=1e-6)


def test_weight_errors_name_the_weight():
    w = good_weights()
    with pytest.raises(WeightError, match=r"missing weight 'down' \(f32\[16, 8\] sparse nm\(2, 4\)\)"):
        ffn().load_weights({"up": w["up"]})
    with pytest.raises(WeightError, match=r"unexpected weight 'extra' \(shape \[2\]\)"):
        ffn().load_weights({**w, "extra": np.zeros(2, np.float32)})
    with pytest.raises(WeightError, match=r"weight 'up' has shape \[8, 12\] but the model expects f32\[8, 16\]"):
        ffn().load_weights({**w, "up": np.zeros((8, 12), np.float32)})
    dense = np.ones((16, 8), np.float32)
    with pytest.raises(WeightError, match=r"weight 'down' does not fit its layout #nm<2:4>: group of rows 0..3 in "
                                          r"column 0 has 4 nonzeros, more than 2 of 4"):
        ffn().load_weights({**w, "down": dense})
    m = ffn().load_weights({**w, "down": np.arange(128, dtype=np.float32).reshape(16, 8)}, prune=True)
    kept = m.weights["down"].reshape(4, 4, 8)
    assert ((kept != 0).sum(1) == 2).all() and (kept[:, 2:] != 0).all()  # the two largest of each group


def test_init_weights_is_deterministic_and_fits_layouts():
    a, b = ffn().init_weights(5), ffn().init_weights(5)
    for k in a.weights:
        np.testing.assert_array_equal(a.weights[k], b.weights[k])
    assert ((a.weights["down"].reshape(4, 4, 8) != 0).sum(1) <= 2).all()
    with pytest.raises(WeightError, match="none are loaded"):
        ffn()(np.zeros((2, 8), np.float32))


def test_torch_in_torch_out_and_named_inputs():
    torch = pytest.importorskip("torch")
    m = sparsa.compile(str(EXAMPLES / "mixtral_moe.sp"), target="reference").init_weights(0)
    x = torch.randn(6, 512)
    y = m(x)
    assert isinstance(y, torch.Tensor) and y.shape == (6, 512)
    np.testing.assert_allclose(y.numpy(), m(x=x.numpy()), rtol=1e-6)


def test_symbolic_dims_bind_per_call_and_are_checked():
    m = sparsa.compile(str(EXAMPLES / "document_attention.sp"), target="reference")
    for S in (8, 33):
        q = np.zeros((1, 2, S, 64), np.float32)
        assert m(q, q, q, np.zeros(S, np.int32)).shape == (1, 2, S, 64)
    with pytest.raises(sparsa.ir.SparsaError, match=r"input 'doc': dim 0 is 9 but S = 8 from an earlier input"):
        q = np.zeros((1, 2, 8, 64), np.float32)
        m(q, q, q, np.zeros(9, np.int32))


def test_ir_after_a_pass_and_stats():
    m = sparsa.compile("model M(x: f32[T]) -> f32[T] {\n  return x * 1.0 + 0.0\n}\n", target="reference")
    assert "tensor.mul" in m.ir(after="input")
    assert "tensor.mul" not in m.ir(after="canonicalize") and "tensor.add" not in m.ir()
    with pytest.raises(sparsa.ir.SparsaError, match="no pass 'lower-everything' in this model's pipeline"):
        m.ir(after="lower-everything")
    assert m.stats()["passes"]["canonicalize"]["ElideIdentity"] == 2


def test_last_model_is_the_default():
    src = "model A(x: f32[4]) -> f32[4] {\n return x\n}\nmodel B(x: f32[4]) -> f32[4] {\n return A(x) * 2.0\n}\n"
    assert sparsa.compile(src, target="reference").name == "B"
    assert sparsa.compile(src, model="A", target="reference").name == "A"


def sparsa_cli(*args):
    return subprocess.run([sys.executable, "-m", "sparsa.runtime.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_run_mixtral(tmp_path):
    out = tmp_path / "o.npz"
    r = sparsa_cli("run", str(EXAMPLES / "mixtral_moe.sp"), "--random-weights", "--input", "x=randn:64,512",
                   "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "output 0: shape [64, 512] float32  checksum" in r.stdout and "run " in r.stdout
    assert np.load(out)["output0"].shape == (64, 512)


def test_cli_run_with_weights_file_and_int_inputs(tmp_path):
    np.savez(tmp_path / "w.npz", **good_weights())
    src = tmp_path / "ffn.sp"
    src.write_text(FFN)
    r = sparsa_cli("run", str(src), "--weights", str(tmp_path / "w.npz"), "--input", "x=randn:3,8")
    assert r.returncode == 0, r.stderr
    r = sparsa_cli("run", str(EXAMPLES / "tiny_moe_decoder.sp"), "--random-weights", "--input",
                   "tokens=randint:1024:1,8")
    assert r.returncode == 0 and "shape [1, 8, 1024]" in r.stdout, r.stderr


@pytest.mark.parametrize("args,message", [
    (["--input", "x=randn:64,512"], "has 4 weights: pass --weights FILE or --random-weights"),
    (["--random-weights"], "needs --input for x"),
    (["--random-weights", "--input", "x=randn:64,500"], "input 'x' must have shape"),
    (["--random-weights", "--input", "x=rand:64"], "expected randn:SHAPE"),
])
def test_cli_run_bad_input_exits_1(args, message):
    r = sparsa_cli("run", str(EXAMPLES / "mixtral_moe.sp"), *args)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_cli_compile_emits_ir_and_prints_passes(tmp_path):
    out = tmp_path / "m.sir"
    r = sparsa_cli("compile", str(EXAMPLES / "switch_capacity.sp"), "--emit", "ir", "--print-ir-after-all",
                   "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "// -----// IR Dump After canonicalize //----- //" in r.stderr
    assert "moe.grouped_matmul_combine" in out.read_text() and "capacity = 1.25" in out.read_text()
    bad = tmp_path / "bad.sp"
    bad.write_text("model M(x: f32[T, 8]) -> f32[T, 8] {\n    return x @ x\n}\n")
    r = sparsa_cli("compile", str(bad))
    assert r.returncode == 1 and "bad.sp:2:14: error: matmul of f32[T, 8] and f32[T, 8]" in r.stderr
    assert "Traceback" not in r.stderr


# ---- targets: the backend registry ------------------------------------------------------------------------
AUTO_SRC = "model M(x: f32[T, 8]) -> f32[T, 8] {\n    return silu(x) * 2.0\n}\n"


def test_auto_is_the_default_target_and_picks_the_best_that_runs_here():
    from sparsa.backends import base as backends

    m = sparsa.compile(AUTO_SRC)
    assert m.target == backends.choose().NAME
    if backends.get("cpu").unavailable() is None and backends.get("triton").unavailable() is not None:
        assert m.target == "cpu"  # native code by default on a machine without a GPU
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    np.testing.assert_allclose(m(x), sparsa.compile(AUTO_SRC, target="reference")(x), rtol=1e-5, atol=1e-6)


def test_auto_falls_back_to_the_reference_and_says_why(monkeypatch):
    from sparsa.backends.cpu.backend import CpuBackend
    from sparsa.backends.triton.backend import TritonBackend

    monkeypatch.setattr(CpuBackend, "unavailable", lambda self: "no bindings (test)")
    monkeypatch.setattr(TritonBackend, "unavailable", lambda self: "no GPU (test)")
    with pytest.warns(RuntimeWarning, match=r"reference interpreter.*triton: no GPU \(test\); cpu: no bindings"):
        m = sparsa.compile(AUTO_SRC)
    assert m.target == "reference"


def test_an_unknown_target_names_the_registered_ones():
    with pytest.raises(sparsa.ir.SparsaError,
                       match=r"unknown target 'gpu' \(available: auto, reference, cpu, triton, cpu:<cpu>\)"):
        sparsa.compile(AUTO_SRC, target="gpu")


def test_every_backend_declares_the_contract():
    from sparsa.backends import base as backends

    for name in backends.names():
        b = backends.get(name)
        assert b.NAME == name and b.PIPELINE and isinstance(b.STAGES, tuple)
        assert set(b.EMIT_ALIASES.values()) <= set(b.STAGES)
        assert b.OUTPUTS in ("numpy", "torch") and b.INPUTS in ("numpy", "any")


def test_sparsa_run_runs_native_code_by_default(tmp_path):
    from sparsa.backends import base as backends

    src = tmp_path / "m.sp"
    src.write_text(AUTO_SRC)
    r = subprocess.run([sys.executable, "-m", "sparsa.runtime.cli", "run", str(src), "--input", "x=randn:4,8"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"({backends.choose().NAME})" in r.stdout


def test_a_file_that_is_not_utf8_is_a_positioned_error(tmp_path):
    bad = tmp_path / "bad.sp"
    bad.write_bytes(b"model M(x: f32[4]) -> f32[4] {\n    # caf\xe9\n    return x\n}\n")
    with pytest.raises(sparsa.ir.SparsaError, match=r"bad.sp:2:10: error: the file is not UTF-8 text"):
        sparsa.compile(str(bad), target="reference")
    r = subprocess.run([sys.executable, "-m", "sparsa.runtime.cli", "run", str(bad), "--input", "x=randn:4"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "internal error" not in r.stderr and "^" in r.stderr


def test_explain_on_a_native_target_reports_the_same_ir(tmp_path):
    from sparsa.backends import base as backends

    if backends.get("cpu").unavailable() is not None:
        pytest.skip("no cpu target here")
    example = Path(__file__).parent.parent / "examples" / "mixtral_moe.sp"
    r = subprocess.run([sys.executable, "-m", "sparsa.runtime.cli", "explain", str(example), "--target", "cpu",
                        "--shape", "T=64"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "MixtralMoE on cpu: one call took" in r.stdout and "moe.grouped_matmul" in r.stdout


@pytest.mark.parametrize("target", ["reference", "cpu", "triton"])
def test_an_integer_input_that_does_not_fit_its_type_is_refused(target):
    """i64 values given for an i32 input used to wrap silently."""
    from sparsa.backends import base as backends

    if target == "triton":
        pytest.importorskip("triton")
    elif backends.get(target).unavailable() is not None:
        pytest.skip(f"no {target} target here")
    m = sparsa.compile("model M(i: i32[4]) -> i32[4] {\n    return i + 1\n}\n", target=target)
    ok = np.array([1, 2, 3, -4], np.int64)
    np.testing.assert_array_equal(np.asarray(m(ok)), ok + 1)
    with pytest.raises(sparsa.ir.SparsaError, match=r"input 'i' has values in \[1, 4294967296\], outside i32's range"):
        m(np.array([1, 2, 3, 1 << 32], np.int64))


def test_a_cache_directory_others_can_write_is_refused_once(tmp_path, monkeypatch):
    """Code found in a shared cache directory would run as this user: such a directory is not used (one warning),
    and the model still compiles and runs."""
    import os
    import warnings

    from sparsa.backends import base as backends

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    monkeypatch.setenv("SPARSA_CACHE_DIR", str(shared))
    target = "cpu" if backends.get("cpu").unavailable() is None else "reference"
    x = np.ones((3, 8), np.float32)
    with pytest.warns(RuntimeWarning, match=r"not caching compiled code in .*shared: it other users can write to it"):
        y = sparsa.compile(AUTO_SRC, target=target)(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        np.testing.assert_allclose(sparsa.compile(AUTO_SRC, target=target)(x), y)
    assert list(shared.iterdir()) == []


def test_nothing_is_unpickled_from_the_cache(tmp_path):
    """The parser's tables are built per process, not kept as a pickle (Lark's cache) under the cache directory,
    where a planted file would run arbitrary code the next time anyone compiles."""
    subprocess.run([sys.executable, "-c", "import sparsa; sparsa.compile('model M(x: f32[4]) -> f32[4] {\\n"
                    "    return x\\n}\\n', target='reference')"], check=True, timeout=300,
                   env={**__import__("os").environ, "SPARSA_CACHE_DIR": str(tmp_path)})
    assert not any(p.suffix == ".cache" or "lark" in p.name for p in tmp_path.rglob("*"))


def test_inputs_bind_symbols_their_dims_are_expressions_of() -> None:
    """A dim given as an expression of one unbound symbol (a graph's 2*s rows) binds it, brute force over small
    linear forms and sizes; a size no value gives, or one that disagrees with bound symbols, is an error."""
    from sparsa.ir.analysis import RuntimeShapeError, bind_shape
    from sparsa.ir.types import TensorType

    for a in range(1, 5):
        for b in range(0, 4):
            t = TensorType("f32", (f"{a}*s + {b}" if b else f"{a}*s", 3))
            for n in range(0, 25):
                dims: dict[str, int] = {}
                if n >= b and (n - b) % a == 0:
                    bind_shape(t, (n, 3), dims, "x")
                    assert dims == {"s": (n - b) // a}
                else:
                    with pytest.raises(RuntimeShapeError, match="for no s"):
                        bind_shape(t, (n, 3), dims, "x")
    with pytest.raises(RuntimeShapeError, match=r"dim 0 is 7 but \{2\*s\} = 6"):
        bind_shape(TensorType("f32", ("2*s",)), (7,), {"s": 3}, "x")
    dims = {}
    bind_shape(TensorType("f32", ("2*s", "s")), (8, 4), dims, "x")  # the plain symbol first, then checked
    assert dims == {"s": 4}


def test_the_names_a_call_binds_are_those_its_inputs_bind_or_solve_for() -> None:
    """`bindable` says which names a call binds from inputs of given shapes, as `bind_shape` binds them: plain
    names, then the one name an expression leaves unbound where it moves with it (again and again); not a name
    only a floor division by it, an expression of two unbound names or one that is not a line in it (a length padded
    to a multiple of 8) holds (the torch import leaves an op whose sizes need one in PyTorch, rather than fail at run
    time: JetMoe's `(s*t)//h`)."""
    from sparsa.ir.analysis import RuntimeShapeError, bind_shape, bindable
    from sparsa.ir.dims import evaluate
    from sparsa.ir.types import TensorType

    shapes = [("B", "2*L+1"), ("L+M",), ("(128//H)", "N*P"), ("Q*2", "Q//2"), ("s+(8-s%8)%8", "((t+7)//8)*8")]
    assert bindable(shapes) == {"B", "L", "M", "Q"}
    with pytest.raises(RuntimeShapeError, match="is for no s"):  # 16 columns: s = 9..16, which no line gives
        bind_shape(TensorType("f32", shapes[4][:1]), (16,), {}, "x")
    sizes = {"B": 2, "L": 3, "M": 4, "Q": 5}
    dims: dict[str, int] = {}
    for shape in (shapes[0], shapes[1], shapes[3]):
        bind_shape(TensorType("f32", shape), tuple(evaluate(d, sizes) for d in shape), dims, "x")
    assert dims == sizes


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_a_weight_sliced_by_a_size_is_sliced_per_call(target: str) -> None:
    """`pos[:L]` of a param reads only weights, but its size is the call's: it was taken for weight-only work, run
    once at weight load, where no input binds L ("dim {L} is not bound by the inputs"). It runs per call now."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    m = sparsa.compile("""model P(x: f32[L, 8]) -> f32[L, 8] {
    param pos: f32[64, 8]
    return x + pos[:L] * 2.0
}""", target=target).init_weights(0)
    for length in (5, 9, 3):
        x = np.random.default_rng(length).standard_normal((length, 8)).astype(np.float32)
        np.testing.assert_allclose(np.asarray(m(x)), x + m.weights["pos"][:length] * 2.0, rtol=1e-6, atol=1e-6)
