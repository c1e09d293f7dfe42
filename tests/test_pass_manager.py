"""Pipelines, instrumentation (print/dump), statistics and verification around passes."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from sparsa.ir import ParseError, parse_module, print_module
from sparsa.ir.dialects.tensor import ConstantOp
from sparsa.knobs import DebugOptions
from sparsa.passes import PASS_REGISTRY, Option, Pass, PassError, PassManager, format_pipeline, parse_pipeline

SIR = Path(__file__).parent / "filecheck" / "pipeline.sir"


class _Tiled(Pass):
    """A pass with options, to test the pipeline syntax (not registered by name)."""

    NAME = ""
    block = Option(int, 64, "block size")
    fast = Option(bool, False, "go fast")

    def run(self, module):
        self.stats["runs"] += 1


class _BreakTypes(Pass):
    """Corrupts the IR on purpose: changes a constant's result type without updating its users."""

    NAME = ""

    def run(self, module):
        for op in module.walk():
            if isinstance(op, ConstantOp):
                from sparsa.ir import TensorType

                op.results[0].type = TensorType("f32", (7,))
                return


def module():
    return parse_module(SIR.read_text(), str(SIR))


@pytest.mark.parametrize("text", ["canonicalize", "canonicalize,cse,dce", "canonicalize{max_iterations=3},dce"])
def test_pipeline_round_trips(text):
    assert format_pipeline(parse_pipeline(text)) == text


def test_pipeline_whitespace_and_option_separators():
    passes = parse_pipeline(" canonicalize{max_iterations=2} , cse ")
    assert format_pipeline(passes) == "canonicalize{max_iterations=2},cse"
    assert passes[0].max_iterations == 2 and type(passes[1]).__name__ == "CSE"


@pytest.mark.parametrize("text,message,col", [
    ("canonicalize,frob", "unknown pass 'frob'", 14),
    ("canonicalize{depth=2}", "pass 'canonicalize' has no option 'depth' (it has: max_iterations)", 14),
    ("canonicalize{max_iterations=lots}", "option 'max_iterations' takes a int, got 'lots'", 29),
    ("cse dce", "expected ',' between passes", 5),
    ("", "expected a pass name", 1),
])
def test_pipeline_errors_are_positioned(text, message, col):
    with pytest.raises(ParseError) as info:
        parse_pipeline(text)
    assert message in info.value.message
    assert info.value.loc.col == col
    if text:
        assert str(info.value).splitlines()[-1] == " " * (col - 1) + "^"


def test_options_are_typed_fields():
    p = _Tiled(block=32, fast=True)
    assert (p.block, p.fast) == (32, True)
    assert _Tiled().block == 64
    assert str(p) == "{block=32 fast=true}"
    with pytest.raises(ValueError, match="has no option 'size'"):
        _Tiled(size=3)


def test_print_ir_after_all_has_mlir_headers():
    out = io.StringIO()
    PassManager("canonicalize,cse,dce", DebugOptions(print_ir_after_all=True), out).run(module())
    text = out.getvalue()
    headers = [line for line in text.splitlines() if line.startswith("// -----//")]
    assert headers == [f"// -----// IR Dump After {p} //----- //" for p in ("canonicalize", "cse", "dce")]


def test_print_before_after_and_after_change():
    out = io.StringIO()
    opts = DebugOptions(print_ir_before={"cse"}, print_ir_after={"dce"})
    PassManager("canonicalize,cse,dce", opts, out).run(module())
    headers = [line for line in out.getvalue().splitlines() if line.startswith("// -----//")]
    assert headers == ["// -----// IR Dump Before cse //----- //", "// -----// IR Dump After dce //----- //"]
    out = io.StringIO()
    PassManager("canonicalize,cse,dce", DebugOptions(print_ir_after_change=True), out).run(module())
    headers = [line for line in out.getvalue().splitlines() if line.startswith("// -----//")]
    assert headers == ["// -----// IR Dump After canonicalize //----- //", "// -----// IR Dump After cse //----- //"]


def test_dump_dir_has_numbered_snapshots(tmp_path):
    m = module()
    PassManager("canonicalize,cse,dce", DebugOptions(dump_dir=str(tmp_path))).run(m)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00_input.sir", "01_canonicalize.sir", "02_cse.sir", "03_dce.sir"]
    assert (tmp_path / "03_dce.sir").read_text() == print_module(m)
    assert parse_module((tmp_path / "00_input.sir").read_text())


def test_statistics():
    pm = PassManager("canonicalize,cse,dce")
    pm.run(module())
    stats = pm.statistics()
    assert stats["canonicalize"]["ElideIdentity"] == 2
    assert stats["canonicalize"]["dead ops erased"] >= 3
    assert stats["cse"]["ops eliminated"] == 1
    out = io.StringIO()
    PassManager("canonicalize", DebugOptions(pass_statistics=True), out).run(module())
    assert "Pass statistics report" in out.getvalue() and "ElideIdentity" in out.getvalue()


def test_verification_failure_names_the_pass_and_prints_the_module():
    broken = _BreakTypes()
    broken.NAME = "break-types"
    with pytest.raises(PassError) as info:
        PassManager([broken]).run(module())
    err = info.value
    assert err.pass_name == "break-types"
    assert "IR failed verification after pass 'break-types'" in str(err)
    assert "func.func @cleanup" in str(err)


def test_every_registered_pass_has_a_docstring_and_kebab_name():
    for name, cls in PASS_REGISTRY.items():
        assert name == cls.NAME and name.replace("-", "").isalpha() and name.islower()
        assert (cls.__doc__ or "").strip()


def test_env_knobs():
    opts = DebugOptions.from_env({"SPARSA_PRINT_IR_AFTER": "cse,dce", "SPARSA_DUMP_DIR": "/tmp/x",
                                  "SPARSA_PRINT_IR_AFTER_ALL": "1"})
    assert opts.print_ir_after == {"cse", "dce"} and opts.dump_dir == "/tmp/x" and opts.print_ir_after_all


def test_greedy_driver_says_when_it_does_not_converge():
    """Patterns that undo each other stop at the rewrite budget with a warning and a statistic, not a hang."""
    from collections import Counter

    from sparsa.ir import parse_module
    from sparsa.ir.dialects.tensor import AddOp
    from sparsa.passes.rewrite import RewritePattern, apply_patterns_greedily

    class Swap(RewritePattern):
        ROOT = AddOp

        def match_and_rewrite(self, op, rewriter):
            a, b = op.operands
            rewriter.set_operand(op, 0, b)
            rewriter.set_operand(op, 1, a)
            return True

    module = parse_module("""module {
  func.func @f(%a: tensor<4xf32>, %b: tensor<4xf32>) -> (tensor<4xf32>) {
    %0 = tensor.add(%a, %b) : (tensor<4xf32>, tensor<4xf32>) -> tensor<4xf32>
    func.return(%0) : (tensor<4xf32>) -> ()
  }
}
""")
    stats: Counter[str] = Counter()
    with pytest.warns(RuntimeWarning, match="swap-forever: the rewrite patterns did not reach a fixpoint"):
        apply_patterns_greedily(module, [Swap()], stats, max_iterations=3, name="swap-forever")
    assert stats["did not converge"] == 1 and stats["Swap"] > 3


def test_greedy_driver_reaches_a_fixpoint_quietly():
    import warnings

    from sparsa.ir import parse_module
    from sparsa.passes import PassManager

    module = parse_module("""module {
  func.func @f(%a: tensor<4xf32>) -> (tensor<4xf32>) {
    %0 = tensor.neg(%a) : (tensor<4xf32>) -> tensor<4xf32>
    %1 = tensor.neg(%0) : (tensor<4xf32>) -> tensor<4xf32>
    func.return(%1) : (tensor<4xf32>) -> ()
  }
}
""")
    pm = PassManager("canonicalize")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm.run(module)
    assert "tensor.neg" not in str(module) and "did not converge" not in pm.statistics().get("canonicalize", {})
