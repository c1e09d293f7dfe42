"""FileCheck tests: each `tests/filecheck/*.sir` file holds cases split by `// -----`.

The first line, `// RUN: ARGS`, gives the `sparsa opt` arguments; each case's IR is run
through `sparsa opt` and its output is checked against the case's CHECK lines by the
`filecheck` package (a Python port of LLVM's FileCheck). Each case also runs on the
reference backend before and after the passes on random inputs, and must agree.
"""

from __future__ import annotations

import contextlib
import io
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sparsa.backends.reference import run_function
from sparsa.ir import parse_module
from sparsa.runtime.cli import main
from sparsa.runtime.weights import init_weights, weight_specs

HERE = Path(__file__).parent / "filecheck"


def cases() -> list[tuple[str, int, list[str], str]]:
    out = []
    for path in sorted(HERE.glob("*.sir")):
        text = path.read_text()
        first = text.splitlines()[0]
        assert first.startswith("// RUN:"), f"{path.name} must start with a // RUN: line"
        args = shlex.split(first[len("// RUN:"):])
        for i, case in enumerate(text.split("\n// -----\n")):
            out.append((path.name, i, args, case))
    return out


def random_array(t, rng: np.random.Generator, size: int = 3) -> np.ndarray:
    """Random data for a type: symbolic dims get `size`; integers are small (valid expert ids)."""
    shape = [d if isinstance(d, int) else size for d in t.shape]
    if t.dtype in ("i32", "i64"):
        return rng.integers(0, 2, size=shape)
    if t.dtype == "i1":
        return rng.random(shape) > 0.5
    return rng.standard_normal(shape).astype(np.float32)


def random_inputs(module, func, rng: np.random.Generator) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Random inputs, and weights that fit their sparse layouts (as the runtime makes them)."""
    inputs = [random_array(a.type, rng) for a in func.regions[0].block.args]
    return inputs, init_weights(weight_specs(module), int(rng.integers(1 << 30)))


@pytest.mark.parametrize("name,index,args,case", cases(), ids=[f"{c[0]}-{c[1]}" for c in cases()])
def test_filecheck_case(tmp_path, name, index, args, case):
    src = tmp_path / "input.sir"
    src.write_text(case)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([str(src), *args] if args[:1] == ["opt"] else ["opt", str(src), *args]) == 0
    result = tmp_path / "output.sir"
    result.write_text(out.getvalue())
    check = subprocess.run([sys.executable, "-m", "filecheck", str(src), "--input-file", str(result)],
                           capture_output=True, text=True)
    assert check.returncode == 0, f"{name} case {index}:\n{check.stderr}\n--- output ---\n{out.getvalue()}"

    before, after = parse_module(case), parse_module(out.getvalue())
    if any(op.NAME == "moe.exchange_plan" for op in after.walk()):
        return  # a function over several ranks: test_expert_parallel.py runs it on real processes against one
    rng = np.random.default_rng(index)
    for fb, fa in zip(before.funcs, after.funcs, strict=True):
        inputs, params = random_inputs(before, fb, rng)
        got = run_function(after, inputs, params, func=fa.attributes["sym_name"])
        want = run_function(before, inputs, params, func=fb.attributes["sym_name"])
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
