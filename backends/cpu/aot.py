"""Ahead-of-time object code: the kernels' LLVM dialect translated to LLVM IR by MLIR (torch-mlir's bindings),
then compiled for the target's triple, CPU and features by LLVM's code generator (llvmlite's, which has every
LLVM target: x86-64 and AArch64 alike, whatever this machine is).

The two LLVMs are of different versions. torch-mlir's prints floating-point constants in the newer spelling
(`f0x42B17218` for a float's bit pattern, `-inf`, `nan`), which llvmlite's parser predates: those constants
are rewritten into the spelling both read (`0x...`, a double's bit pattern, for any floating-point type), and
nothing else is touched. A constant whose type is neither float nor double has no such spelling: a clear
error names it.

Such code runs where its machine is: `call_image` writes one call of a function (its buffers, its argv with the
plan for these shapes, and where the buffers' addresses go) and `runner.c`, linked with the object, makes the call
there and writes the outputs back for `read_results` (the tests run AArch64 code so, under qemu-aarch64).
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sparsa.backends.cpu.target import CpuTarget
from sparsa.ir.diagnostics import SparsaError

# elf e_machine values of the architectures the cpu target emits
ELF_MACHINES = {62: "x86_64", 183: "aarch64"}
_SPECIAL = {"inf": float("inf"), "+inf": float("inf"), "-inf": float("-inf"), "nan": float("nan"),
            "+nan": float("nan"), "-nan": -float("nan")}
_NEW_FLOAT = re.compile(r"(?<![\w.%@\"$-])(?:f0x([0-9A-Fa-f]+)|([-+]?(?:inf|nan)))(?![\w.])")
# a floating-point constant in decimal (LLVM writes them as 4.471500e-02); for a float, the newer LLVM writes one
# that reads back as the same float, the older reads it as a double and takes only those a float holds exactly
_DECIMAL = r"[-+]?\d+\.\d+[eE][-+]?\d+"
_ANY_DECIMAL = re.compile(rf"(?<![\w.%@\"$-])({_DECIMAL})(?![\w.])")
_FLOAT_DECIMAL = re.compile(rf"(?<=\bfloat )({_DECIMAL})(?![\w.])")


def _double_hex(value: float) -> str:
    return f"0x{struct.unpack('<Q', struct.pack('<d', value))[0]:016X}"


def legacy_float_spelling(text: str) -> str:
    """LLVM IR text with the newer floating-point constant spellings, and float constants in decimal, written
    as `0x` + a double's bits."""

    def spell(m: re.Match) -> str:
        bits, word = m.groups()
        if word is not None:
            return _double_hex(_SPECIAL[word])
        if len(bits) == 16:  # a double's own bit pattern
            return "0x" + bits.upper()
        if len(bits) == 8:  # a float's: its value, as a double (exact)
            return _double_hex(struct.unpack("<f", struct.pack("<I", int(bits, 16)))[0])
        raise SparsaError(f"cpu target: LLVM IR constant f0x{bits} is neither a float nor a double")

    def as_float(m: re.Match) -> str:
        return _double_hex(float(np.float32(m.group(1))))

    def line_of(line: str) -> str:  # an instruction names its type once (`fmul float %a, 4.471500e-02`)
        if "double" in line:  # of two types: only the constants that name theirs
            return _FLOAT_DECIMAL.sub(as_float, line)
        return _ANY_DECIMAL.sub(as_float, line) if "float" in line else line

    return "\n".join(map(line_of, _NEW_FLOAT.sub(spell, text).split("\n")))


def llvm_ir(llvm_dialect: str) -> str:
    """The LLVM IR of a module in MLIR's LLVM dialect (the `llvm` stage)."""
    from torch_mlir import ir
    from torch_mlir.dialects import llvm

    with ir.Context():
        return llvm.translate_module_to_llvmir(ir.Module.parse(llvm_dialect).operation)


def object_code(llvm_dialect: str, target: CpuTarget, opt_level: int = 2) -> bytes:
    """A relocatable object of the module for `target` (`optimized`)."""
    module, machine = optimized(llvm_dialect, target, opt_level)
    return machine.emit_object(module)


def optimized(llvm_dialect: str, target: CpuTarget, opt_level: int = 2) -> tuple[Any, Any]:
    """The module in LLVM, optimized as the JIT optimizes it (LLVM's default module pipeline at `opt_level`, with
    the tuning MLIR's ExecutionEngine sets: unrolling, interleaving, loop and SLP vectorization), and the target
    machine that emits it. (Code generation alone had left loop-invariant address arithmetic and scalar stores in
    the attention kernel's inner loops: causal attention's object ran 1.34-1.46x slower than the optimized one.)"""
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
    tuning = llvm.create_pipeline_tuning_options(opt_level)
    tuning.loop_unrolling = tuning.loop_interleaving = tuning.loop_vectorization = tuning.slp_vectorization = True
    passes = llvm.create_pass_builder(machine, tuning)
    passes.getModulePassManager().run(module, passes)
    return module, machine


def elf_machine(obj: bytes) -> str:
    """The architecture an ELF object is for (x86_64, aarch64), from its header."""
    if obj[:4] != b"\x7fELF":
        raise SparsaError("not an ELF object")
    little = obj[5] == 1
    (machine,) = struct.unpack("<H" if little else ">H", obj[18:20])
    return ELF_MACHINES.get(machine, f"machine {machine}")


# ---- one call on another machine ------------------------------------------------------------------------------
RUNNER = Path(__file__).with_name("runner.c")  # links with an object's sparsa_main and makes the call of an image


def call_image(fn: Any, inputs: Sequence[np.ndarray], cache: dict, threads: int = 1
               ) -> tuple[bytes, list[tuple[tuple[int, ...], np.dtype]]]:
    """One call of a cpu function compiled for any machine (a `CpuFunction` with a native host) as the data
    RUNNER reads there: its buffers (the inputs, the weight-only results and packed weights its kernels read, the
    outputs, the plan's arrays, the workspace), its argv for `threads`, and the argv slots that take each buffer's
    address. `cache` holds the weight-only results as a model keeps them; a fixed weight's panels are packed into
    it here, as the Python host packs them at a function's first call. Returns the image and the outputs' shapes
    and dtypes (`read_results`)."""
    from sparsa.backends.cpu.host import HEADER, WORKSPACE, address
    from sparsa.backends.cpu.moe_pack import pack_panels

    host = fn.host
    if host.why_not is not None:
        raise SparsaError(f"cpu function: no native host to make a call image of: {host.why_not}")
    if len(inputs) != len(host.inputs):
        raise SparsaError(f"cpu function: takes {len(host.inputs)} inputs, got {len(inputs)}")
    values = {id(v): v for op in fn.func_op.walk() for v in op.results}
    for key, _, _ in host.fixed:
        if key not in cache and isinstance(key, tuple) and key[0] == "panels":
            w = values.get(key[1])
            if w is None or id(w.defining_op) not in cache:
                raise SparsaError("cpu function: a weight whose panels the kernels read is not in the cache (load "
                                  "the model's weights first)")
            a = cache[id(w.defining_op)][w.index]
            cache[key] = (pack_panels(a if a.ndim == 3 else a[None]),)
    fixed = host.fixed_arrays(cache)
    if fixed is None:
        raise SparsaError("cpu function: a weight-only result the kernels read is not in the cache (load the model's "
                          "weights first)")
    checker = host.input_checker(inputs)  # the inputs checked and converted as a call checks them
    ins = [np.ascontiguousarray(checker.bind(v, a, f"input '{v.name_hint or v.index}'"), dtype)
           for v, a, dtype in zip(host.inputs, inputs, host.dtypes, strict=True)]
    plan = host.plan([a.shape for a in ins], [a.shape for a in fixed], threads, False)
    buffers: list[bytes] = []
    relocations: list[tuple[int, int]] = []

    def place(slot: int, data: bytes) -> int:
        buffers.append(data)
        relocations.append((slot, len(buffers) - 1))
        return len(buffers) - 1

    argv = host.argv(plan, threads, 0)  # (the runner sets the pool: GOMP_parallel where it links libgomp)
    place(WORKSPACE, bytes(plan.workspace))
    for slot, a in enumerate([*ins, *fixed], HEADER):
        place(slot, a.tobytes())
    outputs = [place(slot, bytes(math.prod(shape) * np.dtype(dtype).itemsize))
               for slot, (shape, dtype) in enumerate(plan.outputs, HEADER + len(ins) + len(fixed))]
    arrays = {address(a): a for a in plan.arrays}
    for p in host.places.values():
        if p.kind == "planned":  # the plan's arrays (block maps of masks over positions): this process's address
            place(p.ptr, arrays[argv[p.ptr]].tobytes())
    image = bytearray(struct.pack("<q", len(buffers)))
    for b in buffers:
        image += struct.pack("<q", len(b)) + b
    image += struct.pack(f"<{1 + len(argv)}q", len(argv), *argv)
    image += struct.pack(f"<{1 + 2 * len(relocations)}q", len(relocations), *[x for r in relocations for x in r])
    image += struct.pack(f"<{1 + len(outputs)}q", len(outputs), *outputs)
    return bytes(image), plan.outputs


def read_results(data: bytes, outputs: Sequence[tuple[tuple[int, ...], np.dtype]]) -> list[np.ndarray]:
    """The outputs RUNNER wrote (`call_image`'s shapes and dtypes); a SparsaError where its status says an index
    tensor was out of range (the call itself, run here on the Python host, says which and where)."""
    (status,) = struct.unpack("<q", data[:8])
    if status:
        raise SparsaError(f"cpu function: an index tensor that launch {status - 1} of the native host reads is out "
                          "of range")
    results, at = [], 8
    for shape, dtype in outputs:
        n = math.prod(shape) * np.dtype(dtype).itemsize
        results.append(np.frombuffer(data[at:at + n], dtype).reshape(shape).copy())
        at += n
    if at != len(data):
        raise SparsaError(f"cpu function: the results are {len(data)} bytes, their shapes say {at}")
    return results
