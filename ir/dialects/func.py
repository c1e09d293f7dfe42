"""`func` dialect: functions with named inputs, named weight parameters, return and region yield."""

from __future__ import annotations

from sparsa.ir import attrs as A
from sparsa.ir.core import Attr, Operand, Operation, RegionField, Result
from sparsa.ir.types import TensorType


class FuncOp(Operation):
    """A function: one block whose arguments are the named inputs, ending in `func.return`."""

    NAME = "func.func"
    STRUCTURAL = True
    PURE = False
    sym_name = Attr(A.STR)
    result_types = Attr(A.TYPES)
    # a backward function's (the differentiate pass's): how it has the forward's values, "recompute"
    residuals = Attr(A.STR, default=None)
    # a model's: the positions of float inputs its reverse mode takes no gradient of (a caller that needs none)
    no_grad = Attr(A.INTS, default=None)
    # a backward function's: the `.sp` names of the inputs and weights whose gradients it returns, in order (a
    # weight nothing reads, dropped before `differentiate`, is not among them: the runtime gives it zeros)
    grads = Attr(A.STRS, default=None)
    body = RegionField()

    @property
    def arg_types(self) -> list[TensorType]:
        return [a.type for a in self.body.block.args]

    def verify(self) -> None:
        if len(self.body.blocks) != 1:
            raise self.error("needs a body with exactly one block")
        term = self.body.block.terminator
        if not isinstance(term, ReturnOp):
            raise self.error("body must end in 'func.return'")
        got = [v.type for v in term.operands]
        from sparsa.ir.verifier import types_compatible

        if len(got) != len(self.result_types) or not all(
            types_compatible(g, w) for g, w in zip(got, self.result_types, strict=True)
        ):
            raise term.error(
                f"returns ({', '.join(map(str, got))}) but @{self.sym_name} declares "
                f"({', '.join(map(str, self.result_types))})"
            )


class ParamOp(Operation):
    """A named weight of the function, supplied by the weights file under its dotted name; with `shards`, split
    along its first axis into that many equal blocks over the ranks of a process group, and this is one rank's."""

    NAME = "func.param"
    STRUCTURAL = True
    name = Attr(A.STR)
    shards = Attr(A.INT, default=None)
    value = Result()


class ReturnOp(Operation):
    """Returns the function's results."""

    NAME = "func.return"
    STRUCTURAL = True
    TERMINATOR = True
    PURE = False
    values = Operand(variadic=True)

    def infer(self) -> list[TensorType]:
        return []


class YieldOp(Operation):
    """Ends the region of a `moe`, `attention` or other region-holding op with its values."""

    NAME = "func.yield"
    STRUCTURAL = True
    TERMINATOR = True
    PURE = False
    values = Operand(variadic=True)

    def infer(self) -> list[TensorType]:
        return []
