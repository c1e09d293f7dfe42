"""The pass manager: verify around every pass, print and dump IR as MLIR does, collect statistics."""

from __future__ import annotations

import os
import sys
from typing import TextIO

from sparsa.ir.core import Module
from sparsa.ir.diagnostics import SparsaError, VerifyError
from sparsa.ir.printer import print_module
from sparsa.ir.verifier import verify_module
from sparsa.knobs import DebugOptions
from sparsa.passes.base import Pass
from sparsa.passes.pipeline import format_pipeline, parse_pipeline


class PassError(SparsaError):
    """The IR failed verification before or after a pass; names the pass and carries the module text."""

    def __init__(self, pass_name: str, error: VerifyError, module_text: str):
        when = f"IR failed verification after pass '{pass_name}'" if pass_name else "the input IR failed verification"
        super().__init__(f"{when}: {error.message}", error.loc)
        self.pass_name = pass_name
        self.module_text = module_text

    def __str__(self) -> str:
        if not self.pass_name:  # the user's own input: the positioned message is enough
            return super().__str__()
        return f"{super().__str__()}\n// -----// IR that failed to verify //----- //\n{self.module_text}"


def header(when: str, name: str) -> str:
    return f"// -----// IR Dump {when} {name} //----- //"


class PassManager:
    """Runs a pipeline of passes over a module, with the debugging behaviour `options` asks for."""

    def __init__(self, pipeline: str | list[Pass], options: DebugOptions | None = None, out: TextIO | None = None):
        self.passes = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
        self.options = options or DebugOptions()
        self.out = out or sys.stderr
        self.snapshots: dict[str, str] = {}  # pass name -> IR text right after it (last run wins)

    @property
    def pipeline(self) -> str:
        return format_pipeline(self.passes)

    def run(self, module: Module) -> Module:
        """Run every pass in order on `module` (in place) and return it."""
        opts = self.options
        text = print_module(module)
        self._verify(module, "", text)
        self._dump(0, "input", text)
        for i, p in enumerate(self.passes, start=1):
            if p.NAME in opts.print_ir_before:
                self._print("Before", p.NAME, text)
            p.run(module)
            after = print_module(module)
            self._verify(module, p.NAME, after)
            changed = after != text
            if opts.print_ir_after_all or p.NAME in opts.print_ir_after or (opts.print_ir_after_change and changed):
                self._print("After", p.NAME, after)
            self._dump(i, p.NAME, after)
            self.snapshots[p.NAME] = after
            text = after
        if opts.pass_statistics:
            self.out.write(self.statistics_report())
        return module

    def _verify(self, module: Module, name: str, text: str) -> None:
        if self.options.no_verify:
            return
        try:
            verify_module(module)
        except VerifyError as e:
            raise PassError(name, e, text) from None

    def _print(self, when: str, name: str, text: str) -> None:
        self.out.write(f"{header(when, name)}\n{text}\n")
        self.out.flush()

    def _dump(self, index: int, name: str, text: str) -> None:
        if not self.options.dump_dir:
            return
        os.makedirs(self.options.dump_dir, exist_ok=True)
        path = os.path.join(self.options.dump_dir, f"{index:02d}_{name}.sir")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

    def statistics(self) -> dict[str, dict[str, int]]:
        """Counters of every pass, by pass name."""
        return {p.NAME: dict(p.stats) for p in self.passes}

    def statistics_report(self) -> str:
        lines = ["===" + "-" * 60 + "===", "  Pass statistics report", "===" + "-" * 60 + "==="]
        for p in self.passes:
            lines.append(str(p))
            lines.extend(f"  (S) {n:6d} {k}" for k, n in sorted(p.stats.items()))
        return "\n".join(lines) + "\n"
