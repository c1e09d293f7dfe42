"""Every `.sir` file in the tests prints back to itself after parsing; types and dims print and read back."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsa.ir import Layout, TensorType, parse_module, print_module, verify_module
from sparsa.ir.dims import broadcast_shapes, evaluate, mul
from sparsa.ir.parser import Parser

ROOT = Path(__file__).parent
FILES = sorted(ROOT.rglob("*.sir"))
CASES = [(p, i, case) for p in FILES for i, case in enumerate(p.read_text().split("\n// -----\n"))]


@pytest.mark.parametrize("path,index,case", CASES, ids=[f"{p.name}-{i}" for p, i, _ in CASES])
def test_sir_file_round_trips(path, index, case):
    module = parse_module(case, str(path))
    verify_module(module)
    text = print_module(module)
    assert print_module(parse_module(text)) == text


@pytest.mark.parametrize("t", [
    TensorType("f32", ()), TensorType("i1", (4,)), TensorType("bf16", ("T", 512)),
    TensorType("f16", (None, "B*S", 3)), TensorType("f32", (1024, 4096), Layout("bsr", (32, 32))),
    TensorType("f32", (4096, 1024), Layout("nm", (2, 4))), TensorType("i64", ("(S+63)//64",)),
])
def test_type_round_trip(t):
    assert Parser(str(t)).type() == t


def test_dims():
    assert evaluate("(S+63)//64", {"S": 130}) == 3
    assert mul("B", "S") == "B*S" and mul(2, 3) == 6 and mul(1, "T") == "T"
    assert broadcast_shapes(("T", 1), (1, 8)) == ("T", 8)
    with pytest.raises(ValueError, match="dims {T} and {S} do not broadcast"):
        broadcast_shapes(("T",), ("S",))


def test_locations_survive_round_trip():
    text = (ROOT / "sir" / "mixtral_moe.sir").read_text()
    assert 'loc("mixtral.sp":12:20)' in print_module(parse_module(text))
