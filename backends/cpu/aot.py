"""Ahead-of-time object code: the kernels' LLVM dialect translated to LLVM IR by MLIR (torch-mlir's bindings),
then compiled for the target's triple, CPU and features by LLVM's code generator (llvmlite's, which has every
LLVM target: x86-64 and AArch64 alike, whatever this machine is).

The two LLVMs are of different versions. torch-mlir's prints floating-point constants in the newer spelling
(`f0x42B17218` for a float's bit pattern, `-inf`, `nan`), which llvmlite's parser predates: those constants
are rewritten into the spelling both read (`0x...`, a double's bit pattern, for any floating-point type), and
nothing else is touched. A constant whose type is neither float nor double has no such spelling: a clear
error names it.
"""

from __future__ import annotations

import re
import struct

from sparsa.backends.cpu.target import CpuTarget
from sparsa.ir.diagnostics import SparsaError

# elf e_machine values of the architectures the cpu target emits
ELF_MACHINES = {62: "x86_64", 183: "aarch64"}
_SPECIAL = {"inf": float("inf"), "+inf": float("inf"), "-inf": float("-inf"), "nan": float("nan"),
            "+nan": float("nan"), "-nan": -float("nan")}
_NEW_FLOAT = re.compile(r"(?<![\w.%@\"$-])(?:f0x([0-9A-Fa-f]+)|([-+]?(?:inf|nan)))(?![\w.])")


def _double_hex(value: float) -> str:
    return f"0x{struct.unpack('<Q', struct.pack('<d', value))[0]:016X}"


def legacy_float_spelling(text: str) -> str:
    """LLVM IR text with the newer floating-point constant spellings written as `0x` + a double's bits."""

    def spell(m: re.Match) -> str:
        bits, word = m.groups()
        if word is not None:
            return _double_hex(_SPECIAL[word])
        if len(bits) == 16:  # a double's own bit pattern
            return "0x" + bits.upper()
        if len(bits) == 8:  # a float's: its value, as a double (exact)
            return _double_hex(struct.unpack("<f", struct.pack("<I", int(bits, 16)))[0])
        raise SparsaError(f"cpu target: LLVM IR constant f0x{bits} is neither a float nor a double")

    return _NEW_FLOAT.sub(spell, text)


def llvm_ir(llvm_dialect: str) -> str:
    """The LLVM IR of a module in MLIR's LLVM dialect (the `llvm` stage)."""
    from torch_mlir import ir
    from torch_mlir.dialects import llvm

    with ir.Context():
        return llvm.translate_module_to_llvmir(ir.Module.parse(llvm_dialect).operation)


def object_code(llvm_dialect: str, target: CpuTarget, opt_level: int = 2) -> bytes:
    """A relocatable object of the module for `target`."""
    import llvmlite.binding as llvm

    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    text = legacy_float_spelling(llvm_ir(llvm_dialect))
    try:
        module = llvm.parse_assembly(text)
        module.triple = target.triple
        module.verify()
    except RuntimeError as e:
        raise SparsaError(f"cpu target: LLVM {'.'.join(map(str, llvm.llvm_version_info))} cannot read the kernels' "
                          f"LLVM IR: {str(e).strip()}") from None
    machine = llvm.Target.from_triple(target.triple).create_target_machine(
        cpu=target.cpu if target.cpu != "generic" else "", features=target.features, opt=opt_level, reloc="pic",
        codemodel="default")
    module.data_layout = str(machine.target_data)
    return machine.emit_object(module)


def elf_machine(obj: bytes) -> str:
    """The architecture an ELF object is for (x86_64, aarch64), from its header."""
    if obj[:4] != b"\x7fELF":
        raise SparsaError("not an ELF object")
    little = obj[5] == 1
    (machine,) = struct.unpack("<H" if little else ">H", obj[18:20])
    return ELF_MACHINES.get(machine, f"machine {machine}")
