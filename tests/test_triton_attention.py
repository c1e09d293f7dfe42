"""The generated block-sparse flash-attention Triton kernel: run under TRITON_INTERPRET=1 (no GPU needed)
against the reference, and compiled ahead of time to PTX for sm_80 and sm_90."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

import sparsa  # noqa: E402
from sparsa.backends.reference.interpreter import Interpreter  # noqa: E402
from sparsa.backends.triton.attention import AttentionKernel  # noqa: E402
from sparsa.ir.dialects.attn import AttentionOp  # noqa: E402

CASES = {
    "sliding_gqa": ("mask sliding(q, k) = k <= q and q - k < 40\n"
                    "model M(q: f32[2, 4, S, 32], k: f32[2, 2, S, 32], v: f32[2, 2, S, 32]) -> f32[2, 4, S, 32] {\n"
                    "    return attention(q, k, v, mask=sliding)\n}\n", 90),
    "document_softcap": ("mask doc(q, k; ids: i32[S]) = ids[q] == ids[k] and k <= q\n"
                         "score cap(s, q, k) = 5.0 * tanh(s / 5.0)\n"
                         "model M(q: f32[1, 2, S, 32], ids: i32[S]) -> f32[1, 2, S, 32] {\n"
                         "    return attention(q, q, q, mask=doc(ids=ids), score=cap)\n}\n", 70),
    "table_floordiv_mod": ("mask m(q, k; t: bool[5, 5]) = t[q // 16, k // 16] and ((q - k) % 3 != 1 or k <= q)\n"
                           "model M(q: f32[1, 1, S, 32], t: bool[5, 5]) -> f32[1, 1, S, 32] {\n"
                           "    return attention(q, q, q, mask=m(t=t))\n}\n", 70),
    "masked_rows_heads": ("mask m(b, h, q, k) = (k <= q + h) and not (q >= 20 and q < 36)\n"
                          "model M(q: f32[1, 2, S, 32]) -> f32[1, 2, S, 32] {\n"
                          "    return attention(q, q, q, mask=m)\n}\n", 50),
}


def setup(name: str):
    src, S = CASES[name]
    model = sparsa.compile(src.replace("S]", f"{S}]").replace("S,", f"{S},"),
                           passes="canonicalize,sparsify-attention{block_q=16 block_k=16}", target="reference")
    att = next(o for o in model.module.walk() if isinstance(o, AttentionOp))
    rng = np.random.default_rng(0)
    def make(t):
        if t.dtype == "f32":
            return rng.standard_normal(list(t.shape)).astype(np.float32)
        if t.dtype == "i1":
            return rng.random(t.shape) > 0.3
        return np.sort(rng.integers(0, 4, t.shape[0])).astype(np.int32)

    inputs = [make(a.type) for a in model.module.funcs[-1].regions[0].block.args]
    return model, att, inputs


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # conftest turns the interpreter on without a GPU


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_matches_reference(name, monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSA_CACHE_DIR", str(tmp_path))
    model, att, inputs = setup(name)
    expected = model(*inputs)
    interp = Interpreter(model.module.funcs[-1], {})
    interp.run(inputs)
    block_map = interp.lookup(att.block_map)
    kernel = AttentionKernel.generate(att)
    assert "# attn.attention from" in kernel.source and "tl.static_range(2)" in kernel.source
    q = torch.from_numpy(inputs[0]).to(DEVICE)
    k = torch.from_numpy(inputs[1]).to(DEVICE) if att.k is not att.q else q
    v = torch.from_numpy(inputs[2]).to(DEVICE) if att.v is not att.q else q
    data = [interp.lookup(d) for d in kernel.data]
    out = kernel(q, k, v, np.array(block_map), data).cpu()
    tol = 1e-5 if DEVICE == "cpu" else 1e-4  # float32 dots in full precision (input_precision="ieee")
    np.testing.assert_allclose(out.numpy(), expected, rtol=tol * 10, atol=tol)
    if name == "masked_rows_heads":
        assert (out[:, :, 20:36] == 0).all()


COMPILE = r'''
import importlib.util, json, sys
import triton
from triton.backends.compiler import GPUTarget
spec = json.loads(sys.argv[1])
mod_spec = importlib.util.spec_from_file_location("k", spec["path"])
mod = importlib.util.module_from_spec(mod_spec)
mod_spec.loader.exec_module(mod)
fn = getattr(mod, spec["name"])
sig = {p: spec["types"].get(p, "constexpr" if p in spec["constexprs"] else "i32") for p in fn.arg_names}
for cap in (80, 90):
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=spec["constexprs"])
    k = triton.compile(src, target=GPUTarget("cuda", cap, 32))
    assert ".target sm_%d" % cap in k.asm["ptx"], cap
    print(cap, len(k.asm["ptx"]))
'''


def compile_for_nvidia(tmp_path, name: str, text: str, types: dict, constexprs: dict) -> list[str]:
    """AOT-compile generated kernel text for sm_80 and sm_90 in a process without the interpreter."""
    path = tmp_path / f"{name}.py"
    path.write_text("import triton\nimport triton.language as tl\n\n" + text)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    spec = {"path": str(path), "name": name, "types": types, "constexprs": constexprs}
    r = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(spec)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.split()[0::2]


@pytest.mark.slow
def test_kernel_compiles_to_ptx_for_sm80_and_sm90(tmp_path):
    _, att, _ = setup("document_softcap")
    kernel = AttentionKernel.generate(att)
    types = {p: "*fp32" for p in ("Q", "K", "V", "O", "LSE")} | {p: "*i32" for p in (
        "FULL_IDX", "FULL_CNT", "PART_IDX", "PART_CNT", "data0")}
    types["scale"] = "fp32"
    constexprs = {"BLOCK_M": 64, "BLOCK_N": 64, "D": 64, "DV": 64, "PRECISION": "ieee", "WRITE_LSE": True}
    assert compile_for_nvidia(tmp_path, kernel.name, kernel.source, types, constexprs) == ["80", "90"]


@pytest.mark.slow
def test_backward_kernels_compile_to_ptx_for_sm80_and_sm90(tmp_path):
    """attention's dQ and dK/dV kernels (a data mask and a soft cap: every region inlined) for real GPUs."""
    from sparsa.backends.triton.attention_grad import kernel_source
    from sparsa.ir.dialects.attn_grad import AttentionGradOp

    model, _, _ = setup("document_softcap")
    module = model._backward().module
    ops = [o for o in module.walk() if isinstance(o, AttentionGradOp)]
    assert [o.NAME for o in ops] == ["attn.attention_grad"]
    for grad_q in (True, False):
        name, source, data = kernel_source(ops[0], grad_q)
        assert len(data) == 1
        types = {p: "*fp32" for p in ("Q", "K", "V", "DO", "LSE", "DELTA", "OUT1", "OUT2")} | {
            p: "*i32" for p in ("FULL_IDX", "FULL_CNT", "PART_IDX", "PART_CNT", "data0")} | {"scale": "fp32"}
        constexprs = {"BLOCK_M": 64, "BLOCK_N": 64, "D": 64, "DV": 64, "PRECISION": "ieee"}
        assert compile_for_nvidia(tmp_path, name, source, types, constexprs) == ["80", "90"], name
