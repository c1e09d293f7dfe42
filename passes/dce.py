"""`dce`: erase pure ops whose results are never used, innermost and last first."""

from __future__ import annotations

from sparsa.ir.core import Block, Module
from sparsa.passes.base import Pass
from sparsa.passes.rewrite import is_trivially_dead


class DCE(Pass):
    """Erase pure ops with unused results (including unused weights and whole dead regions)."""

    NAME = "dce"

    def run(self, module: Module) -> None:
        for f in module.funcs:
            self._block(f.regions[0].block)

    def _block(self, block: Block) -> None:
        for op in reversed(list(block.ops)):
            if is_trivially_dead(op):
                op.erase()
                self.stats["ops erased"] += 1
                continue
            for r in op.regions:
                for b in r.blocks:
                    self._block(b)
