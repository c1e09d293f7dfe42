"""The generated MoE grouped-GEMM Triton kernels (fused epilogue, fused combine) against the reference,
under TRITON_INTERPRET=1 without a GPU, on the GPU where there is one."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

import sparsa  # noqa: E402
from sparsa.backends.reference.interpreter import Interpreter  # noqa: E402
from sparsa.backends.triton.moe import GroupedMatmulKernel  # noqa: E402
from sparsa.ir.dialects.moe import DispatchOp, GroupedMatmulCombineOp, GroupedMatmulOp  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BODIES = {
    "swiglu": "(silu(h @ w1[e]) * (h @ w3[e])) @ w2[e]",
    "bias_tanh": "tanh(h @ w1[e] + b) @ w2[e]",
    "single": "gelu_tanh(h @ w2t[e])",
}


@pytest.mark.parametrize("body", sorted(BODIES))
def test_grouped_kernels_match_reference(body, monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSA_CACHE_DIR", str(tmp_path))
    src = f"""
model M(x: f32[T, 32]) -> f32[T, 32] {{
    param gate: f32[32, 4]
    param w1: f32[4, 32, 16]
    param w3: f32[4, 32, 16]
    param w2: f32[4, 16, 32]
    param w2t: f32[4, 32, 32]
    param b: f32[16]
    w, idx = topk(softmax(x @ gate), k=2)
    return moe(x, idx, w, capacity=1.5) |e, h| {{ {BODIES[body]} }}
}}
"""
    model = sparsa.compile(src, passes="canonicalize,fuse-moe-gating,fuse-moe-dispatch{block=16},cse,dce", target="reference")
    model.init_weights(1)
    x = np.random.default_rng(0).standard_normal((37, 32)).astype(np.float32)
    expected = model(x)
    func = model.module.funcs[-1]
    interp = Interpreter(func, model.weights)
    interp.run([x])
    dispatch = next(o for o in func.walk() if isinstance(o, DispatchOp))
    perm, offsets = (torch.from_numpy(interp.lookup(r)).to(DEVICE) for r in dispatch.results)
    stages = [o for o in func.walk() if isinstance(o, GroupedMatmulOp | GroupedMatmulCombineOp)]
    rows = torch.from_numpy(x).to(DEVICE)
    for op in stages:
        kernel = GroupedMatmulKernel.generate(op)
        assert f"# {op.NAME} from" in kernel.source
        weights = [torch.from_numpy(interp.lookup(w)).to(DEVICE)
                   for w in (op.weights if isinstance(op, GroupedMatmulOp) else [op.weight])]
        data = [interp.lookup(d) for d in kernel.data]
        gates = torch.from_numpy(interp.lookup(op.gates)).to(DEVICE) if kernel.combine else None
        rows = kernel(rows, perm, offsets, weights, gates, data, block_m=16, block_n=16, block_k=16,
                      num_tokens=x.shape[0])
    tol = 1e-5 if DEVICE == "cpu" else 1e-4  # float32 dots in full precision (input_precision="ieee")
    np.testing.assert_allclose(rows.cpu().numpy(), expected, rtol=tol * 10, atol=tol)


@pytest.mark.slow
def test_grouped_kernels_compile_to_ptx(tmp_path):
    from test_triton_attention import compile_for_nvidia

    model = sparsa.compile("model M(x: f32[T, 32], i: i64[T, 2], g: f32[T, 2]) -> f32[T, 32] {\n"
                           "    param w1: f32[4, 32, 16]\n    param w3: f32[4, 32, 16]\n    param w2: f32[4, 16, 32]\n"
                           "    return moe(x, i, g) |e, h| { (silu(h @ w1[e]) * (h @ w3[e])) @ w2[e] }\n}\n", target="reference")
    for op in [o for o in model.module.walk() if isinstance(o, GroupedMatmulOp | GroupedMatmulCombineOp)]:
        kernel = GroupedMatmulKernel.generate(op)
        types = {p: "*fp32" for p in ("ROWS", "OUT", "GATES", "W0", "W1")} | {"PERM": "*i64", "OFFSETS": "*i64"}
        constexprs = {"GATHER": kernel.gather, "COMBINE": kernel.combine, "BLOCK_M": 64, "BLOCK_N": 64,
                      "BLOCK_K": 32, "BLOCK_E": 4, "PRECISION": "ieee"}
        assert compile_for_nvidia(tmp_path, kernel.name, kernel.source, types, constexprs) == ["80", "90"]
