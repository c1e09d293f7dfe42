"""`sparsa opt` as a user runs it: a real subprocess of the installed entry point."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SIR = Path(__file__).parent / "sir" / "mixtral_moe.sir"


def sparsa(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("sparsa")
    cmd = [exe] if exe else [sys.executable, "-m", "sparsa.runtime.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, input=stdin, timeout=120)


def test_opt_runs_cleanup_pipeline_with_headers():
    r = sparsa("opt", str(SIR), "--passes", "canonicalize,cse,dce", "--print-ir-after-all")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("module {")
    for p in ("canonicalize", "cse", "dce"):
        assert f"// -----// IR Dump After {p} //----- //" in r.stderr


def test_opt_reads_stdin_and_writes_file(tmp_path):
    out = tmp_path / "o.sir"
    r = sparsa("opt", "-", "--passes", "cse", "-o", str(out), stdin=SIR.read_text())
    assert r.returncode == 0, r.stderr
    assert out.read_text().startswith("module {")


@pytest.mark.parametrize("text,where", [
    ("module {\n  func.func @f(%x: tensor<4xf32>) -> (tensor<4xf32>) {\n    %y = tensor.exp(%q)", "bad.sir:3:21"),
    ("module {\n  func.func @f(%x: tensor<4xf32>) -> (tensor<4xf32>) {\n"
     "    %y = tensor.exp(%x) : (tensor<4xf32>) -> tensor<5xf32>\n"
     "    func.return(%y) : (tensor<5xf32>) -> ()\n  }\n}\n", "bad.sir:3:10"),
    ("garbage", "bad.sir:1:1"),
])
def test_malformed_input_exits_1_without_traceback(tmp_path, text, where):
    bad = tmp_path / "bad.sir"
    bad.write_text(text)
    r = sparsa("opt", str(bad), "--passes", "canonicalize")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    first = r.stderr.splitlines()[0]
    assert first.startswith(str(bad).replace("bad.sir", "") + where + ": error: ")
    assert r.stderr.splitlines()[-1].strip() == "^"


def test_unknown_pass_and_missing_file():
    r = sparsa("opt", str(SIR), "--passes", "canonicalise")
    assert r.returncode == 1 and "unknown pass 'canonicalise'" in r.stderr
    r = sparsa("opt", "/nonexistent.sir")
    assert r.returncode == 1 and "cannot read /nonexistent.sir" in r.stderr
