"""target="triton": every shared example and a spread of ops against the reference, under TRITON_INTERPRET=1
without a GPU (on the GPU where there is one); every kernel a compiled model launches builds to PTX for sm_80
and sm_90; golden files pin the emitted source of a few kernels and a launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from example_inputs import LINEAR_ATTENTION, OPS, SHAPES, SIZES, SPARSE_WEIGHTS, make_inputs  # noqa: E402, F401

import sparsa  # noqa: E402
from sparsa.ir.diagnostics import SparsaError  # noqa: E402

ROOT = Path(__file__).parent.parent
GOLDEN = Path(__file__).parent / "golden" / "triton"
GPU = torch.cuda.is_available()
TOL = 1e-4  # float32 dots run in full precision (input_precision="ieee") on the GPU too


@pytest.fixture(autouse=True)
def _kernel_cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("SPARSA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def check(src, inputs=None, model=None, seed=0, tol=TOL, **kw):
    ref = sparsa.compile(src, model=model, target="reference", **kw).init_weights(seed)
    tri = sparsa.compile(src, model=model, target="triton", **kw).init_weights(seed)
    inputs = make_inputs(ref, seed) if inputs is None else inputs
    want, got = ref(*inputs), tri(*inputs)
    want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
    for w, g in zip(want, got, strict=True):
        scale = max(1.0, float(np.abs(w).max())) if w.size else 1.0
        np.testing.assert_allclose(np.asarray(g, dtype=np.float64), w.astype(np.float64), rtol=tol, atol=tol * scale)
    return tri


EXAMPLES = [(p.name, None) for p in sorted((ROOT / "examples").glob("*.sp")) if p.name != "tiny_moe_decoder.sp"]
EXAMPLES += [("tiny_moe_decoder.sp", m) for m in ("Attention", "MoE", None)]


@pytest.mark.parametrize(("example", "model"), EXAMPLES)
def test_example_matches_reference(example, model):
    tri = check(str(ROOT / "examples" / example), model=model)
    source = tri.stage("source")
    assert f'from "{ROOT / "examples" / example}"' in source or "from \"" in source


def test_torch_tensors_stay_on_the_device_and_numpy_comes_back_as_numpy():
    m = sparsa.compile(str(ROOT / "examples" / "mixtral_moe.sp"), target="triton").init_weights(0)
    x = np.random.default_rng(1).standard_normal((5, m.input_types[0].shape[1])).astype(np.float32)
    y = m(x)
    assert isinstance(y, np.ndarray) and y.shape == x.shape
    device = "cuda" if GPU else "cpu"
    yt = m(torch.from_numpy(x).to(device))
    assert isinstance(yt, torch.Tensor) and yt.device.type == device
    np.testing.assert_allclose(yt.cpu().numpy(), y, rtol=1e-6, atol=1e-6)
    assert m(x[:0]).shape == (0, x.shape[1])  # no tokens at all


def test_elementwise_reductions_and_norms():
    tri = check(OPS)
    kernels = tri.stage("kernels")
    assert kernels.count("def fused_elementwise_") < 12  # chains are fused, not one kernel per op
    assert "tensor.silu" in kernels and "tensor.where" in kernels


def test_layout_ops_matmul_gather_topk():
    inputs = make_inputs(sparsa.compile(SHAPES, target="reference"))
    inputs[3] = np.array([0, 3, 7, -1, 2], dtype=np.int32)  # a negative index counts from the end
    check(SHAPES, inputs)


@pytest.mark.parametrize("router", ["mixtral", "qwen", "switch", "deepseek", "grouped"])
def test_moe_routers_and_capacity_match_reference(router):
    from test_moe_passes import BODIES, program

    tri = check(program(router, BODIES["swiglu" if router != "switch" else "relu"], 8, 2 if router != "switch" else 1,
                        1.25 if router in ("switch", "qwen") else None))
    assert "lib.moe_route[" in tri.stage("launcher")


def test_sparse_weights_small_blocks_and_nm():
    src = SPARSE_WEIGHTS
    tri = check(src)
    assert "lib.bsr_matmul" in tri.stage("launcher") and "lib.nm_matmul" in tri.stage("launcher")


def test_unsupported_op_is_refused_by_name_and_line():
    src = str(ROOT / "examples" / "mixtral_moe.sp")
    with pytest.raises(SparsaError, match=r"mixtral_moe.sp:\d+:\d+: error: 'moe.moe' is not supported by the triton "
                                          r"backend \(run the fuse-moe-gating"):
        sparsa.compile(src, target="triton", passes="canonicalize")


def test_without_a_gpu_the_interpreter_runs_the_kernels_and_says_so(tmp_path):
    if GPU:
        pytest.skip("a GPU is present")
    code = ("import sparsa, numpy as np\n"
            f"m = sparsa.compile({str(ROOT / 'examples' / 'unfused_attention.sp')!r}, target='triton')\n"
            "print(m(*[np.ones((1, 1, 16, 64), np.float32)] * 3).sum())\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) == 1024.0 and "runs its kernels in Triton's interpreter" in r.stderr


def test_cli_emit_triton_prints_kernels_and_launcher():
    r = subprocess.run([sys.executable, "-m", "sparsa.runtime.cli", "compile", str(ROOT / "examples" / "mixtral_moe.sp"),
                        "--target", "triton", "--emit", "triton"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "@triton.jit" in out and "def launch_" in out
    assert "# moe.grouped_matmul_combine from" in out and "lib.moe_route[" in out and "lib.moe_place[" in out
    r = subprocess.run([sys.executable, "-m", "sparsa.runtime.cli", "compile", str(ROOT / "examples" / "mixtral_moe.sp"),
                        "--target", "triton", "--emit", "launcher"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "@triton.jit" not in r.stdout and "def launch_" in r.stdout


@pytest.mark.parametrize(("decay", "chunk"), [("sigmoid(g)", 16), ("g", 5), ("(g * 0.0 + 1.0)", 64)])
def test_chunked_linear_attention(decay, chunk):
    """Matrix-state scans (gated linear attention) become scan.linear_attention: any decay sign, zeros, ragged
    chunks (L not a multiple of the chunk), both head dims not powers of two."""
    src = LINEAR_ATTENTION.replace("DECAY", decay)
    passes = f"canonicalize,fuse-scan{{chunk={chunk}}},cse,dce"
    sizes = {"B": 2, "L": 45}
    ref = sparsa.compile(src, passes=passes, target="reference")
    inputs = make_inputs(ref, sizes=sizes)
    inputs[3][0, 7] = 0.0  # a zero decay cuts the history
    tri = check(src, inputs, passes=passes)
    assert "lib.linear_attention[" in tri.stage("launcher")


# ---- golden files: the emitted source of a few kernels and one launcher --------------------------------------
GOLDEN_CASES = {
    "mixtral_launcher.py": ("mixtral_moe.sp", None, "launcher"),
    "document_block_map_builder.py": ("document_attention.sp", None, "attn_block_map_"),
    "selective_scan_kernel.py": ("selective_scan.sp", None, "fused_scan_"),  # its skip term after the sum
}


def _golden_text(example, model, what):
    m = sparsa.compile(f"examples/{example}", model=model, target="triton")
    if what == "launcher":
        return m.stage("launcher")
    return "\n\n".join(src.strip() for name, src in m.native.program.kernels.items() if name.startswith(what)) + "\n"


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_source(name, monkeypatch):
    """Regenerate on purpose after changing the emitter: SPARSA_UPDATE_GOLDEN=1 pytest tests/test_triton_target.py"""
    monkeypatch.chdir(ROOT)  # file names in the comments are relative to the repository
    text = _golden_text(*GOLDEN_CASES[name])
    path = GOLDEN / name
    if os.environ.get("SPARSA_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden file {path} (SPARSA_UPDATE_GOLDEN=1 writes it)"
    assert text == path.read_text(), f"{name} changed: review the diff, then SPARSA_UPDATE_GOLDEN=1 to accept it"


# ---- every kernel launched by every example builds for sm_80 and sm_90 --------------------------------------
PTX_COMPILE = r'''
import importlib, importlib.util, json, sys
import triton
from triton.backends.compiler import GPUTarget
for spec in json.loads(open(sys.argv[1]).read()):
    if spec["path"]:
        ms = importlib.util.spec_from_file_location("gen", spec["path"])
        mod = importlib.util.module_from_spec(ms)
        ms.loader.exec_module(mod)
    else:
        mod = importlib.import_module("sparsa.backends.triton.library")
    fn = getattr(mod, spec["name"])
    for cap in (80, 90):
        src = triton.compiler.ASTSource(fn=fn, signature=spec["sig"], constexprs=spec["constexprs"])
        k = triton.compile(src, target=GPUTarget("cuda", cap, 32))
        assert ".target sm_%d" % cap in k.asm["ptx"], (spec["name"], cap)
    print(spec["name"], "ok")
'''
_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
        torch.int64: "*i64", torch.int32: "*i32", torch.int8: "*i8", torch.bool: "*i1"}


def _record_launches(monkeypatch) -> list[dict]:
    """Run every example on the triton target with each kernel's launch recorded (argument types, constexprs)."""
    from sparsa.backends.triton import library

    seen: dict[str, dict] = {}

    class Recorder:
        def __init__(self, fn, path):
            self.fn, self.path = fn, path

        def __getitem__(self, grid):
            launch = self.fn[grid]

            def run(*args, **kw):
                names = self.fn.arg_names
                constexprs = {k: v for k, v in kw.items() if k in names}
                sig = {}
                for n, a in zip(names, args, strict=False):
                    if isinstance(a, torch.Tensor):
                        sig[n] = _PTR[a.dtype]
                    elif isinstance(a, bool):
                        sig[n] = "i1"
                    elif isinstance(a, int):
                        sig[n] = "i64" if abs(a) >= 2**31 else "i32"
                    else:
                        sig[n] = "fp32"
                sig.update({k: "constexpr" for k in constexprs})
                key = json.dumps([self.fn.__name__, sig, constexprs], sort_keys=True)
                seen.setdefault(key, {"name": self.fn.__name__, "path": self.path, "sig": sig,
                                      "constexprs": constexprs})
                return launch(*args, **kw)
            return run

    for name in [n for n in dir(library) if hasattr(getattr(library, n), "arg_names")]:
        monkeypatch.setattr(library, name, Recorder(getattr(library, name), None))
    programs = [(str(ROOT / "examples" / example), model) for example, model in EXAMPLES]
    programs += [(OPS, None), (SHAPES, None), (LINEAR_ATTENTION.replace("DECAY", "sigmoid(g)"), None)]
    for source, model in programs:
        m = sparsa.compile(source, model=model, target="triton").init_weights(0)
        launch = m.native.launcher()
        path = sys.modules[launch.__module__].__file__
        for kname in m.native.program.kernels:
            if not isinstance(launch.__globals__[kname], Recorder):
                monkeypatch.setitem(launch.__globals__, kname, Recorder(launch.__globals__[kname], path))
        m(*make_inputs(m))
    return list(seen.values())


@pytest.mark.slow
def test_every_launched_kernel_compiles_to_ptx(monkeypatch, tmp_path):
    if GPU:
        pytest.skip("checked on the GPU by running the kernels")
    specs = _record_launches(monkeypatch)
    names = {s["name"] for s in specs}
    assert {"moe_route", "moe_count", "moe_place", "bsr_matmul", "nm_matmul", "norm_rows", "reduce_rows",
            "softmax_rows", "cumsum_rows", "topk_rows", "linear_attention", "copy_strided"} <= names
    assert any(n.startswith("attn_block_map_") for n in names) and any(n.startswith("fused_scan_") for n in names)
    path = tmp_path / "specs.json"
    path.write_text(json.dumps(specs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", PTX_COMPILE, str(path)], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count(" ok") == len(specs)


def test_dump_dir_has_the_backend_stages(tmp_path):
    from sparsa.knobs import DebugOptions

    sparsa.compile(str(ROOT / "examples" / "sparse_ffn.sp"), target="triton",
                   options=DebugOptions(dump_dir=str(tmp_path)))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert {"triton.kernels.py", "triton.launcher.py", "triton.source.py"} <= set(names)
    assert any(n.endswith("_lower-sparse-weights.sir") for n in names)
    assert "lib.bsr_matmul[" in (tmp_path / "triton.launcher.py").read_text()


HALF = """
mask sliding(q, k) = k <= q and q - k < 24
model M(x: DT[T, 64], q: DT[1, 2, T, 32]) -> DT[T, 64] {
    param gate: DT[64, 4]
    param w1: DT[4, 64, 32]
    param w2: DT[4, 32, 64]
    param g: DT[64]
    w, idx = topk(softmax(x @ gate), k=2)
    h = rmsnorm(x, g) + reshape(transpose(attention(q, q, q, mask=sliding), [0, 2, 1, 3]), [T, 64])
    return moe(h, idx, w) |e, r| { silu(r @ w1[e]) @ w2[e] } + sum(exp(h * 0.1), axis=-1, keepdim=true)
}
"""


@pytest.mark.parametrize(("dtype", "tol"), [("bf16", 3e-2), ("f16", 5e-3)])
def test_half_precision_models(dtype, tol):
    """bf16 and f16 storage with float32 accumulation: within the dtype's rounding of the reference (which
    rounds every op's result to the storage type)."""
    src = HALF.replace("DT", dtype)
    if dtype == "bf16" and not GPU:
        tri = sparsa.compile(src, target="triton").init_weights(0)
        with pytest.raises(SparsaError, match=r":8:\d+: error: Triton's interpreter cannot run bfloat16 dots"):
            tri(np.zeros((4, 64), np.float32), np.zeros((1, 2, 4, 32), np.float32))
        pytest.skip("bfloat16 dots need a GPU (the interpreter refuses them, checked above)")
    ref = sparsa.compile(src, target="reference").init_weights(0)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((40, 64)).astype(np.float32), rng.standard_normal((1, 2, 40, 32)).astype(np.float32)]
    tri = sparsa.compile(src, target="triton").init_weights(0)
    device = "cuda" if GPU else "cpu"
    torch_dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[dtype]
    got = tri(*[torch.from_numpy(a).to(device, torch_dtype) for a in inputs])
    assert got.dtype == torch_dtype
    want = ref(*inputs)
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got.float().cpu().numpy(), want, rtol=tol, atol=tol * scale)


def test_functions_that_differ_only_in_their_parameter_order_get_their_own_launchers():
    """A(x, y) = x - y and B(y, x) = x - y in one process: each its own launcher, not the other's."""
    a = sparsa.compile("model A(x: f32[4], y: f32[4]) -> f32[4] {\n    return x - y\n}\n", target="triton")
    b = sparsa.compile("model B(y: f32[4], x: f32[4]) -> f32[4] {\n    return x - y\n}\n", target="triton")
    one, two = np.arange(4, dtype=np.float32), np.ones(4, np.float32)
    np.testing.assert_array_equal(a(one, two), one - two)
    np.testing.assert_array_equal(b(one, two), two - one)


def test_slices_from_the_end_and_unknown_dims_as_on_the_other_targets():
    """x[:, -1:] of a symbolic axis is one column, broadcast; a dim of unknown size (?) that would broadcast is the
    reference's and the cpu target's error here too (the kernels here would broadcast it: another answer)."""
    from sparsa.ir.analysis import RuntimeShapeError

    x = np.random.default_rng(0).standard_normal((3, 7)).astype(np.float32)
    check("model M(x: f32[B, L]) -> f32[B, L] {\n    c = cumsum(x, axis=1)\n    return c - c[:, -1:]\n}", [x])
    src = ("model M(x: f32[B, L], y: f32[L, 4, 3], w: f32[L, 3, 2]) -> (f32[B, L], f32[L, 4, 2]) {\n"
           "    return x - x[:, -5:1], y[-5:1] @ w\n}")
    m = sparsa.compile(src, target="triton")
    args = [np.ones(s, np.float32) for s in ((2, 5), (5, 4, 3), (5, 3, 2))]
    with pytest.raises(RuntimeShapeError, match=r":2:14: error: 'tensor.sub': operand 1 \(tensor<\{B\}x\?xf32>\) has "
                       r"1 at dim 1, .* against 5 in the result; a dim of unknown size does not broadcast"):
        m(*args)
    m = sparsa.compile(src.replace("x - x[:, -5:1]", "x"), target="triton")
    with pytest.raises(RuntimeShapeError, match=r":2:\d+: error: 'tensor.matmul': operand 0 \(tensor<\?x4x3xf32>\) "
                       r"has 1 at dim 0, .* against 5 in the result"):
        m(*args)
    # inside a fused kernel (the add is computed in exp's): checked at the launch, as the op it is
    m = sparsa.compile(src.replace("x - x[:, -5:1]", "exp(x[:, -5:1] + x)"), target="triton")
    with pytest.raises(RuntimeShapeError, match=r":2:\d+: error: 'tensor.add': operand 0 \(tensor<\{B\}x\?xf32>\) has "
                       r"1 at dim 1, .* against 5 in the result"):
        m(*args)
    one = m(*[np.ones(s, np.float32) for s in ((2, 1), (1, 4, 3), (1, 3, 2))])[0]
    np.testing.assert_allclose(one, np.full((2, 1), np.e ** 2, np.float32), rtol=1e-6)
