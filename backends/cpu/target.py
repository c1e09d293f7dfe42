"""The machine the cpu target compiles for: read from the host (LLVM's CPU name and features, sysfs caches,
cores) or named for ahead-of-time code (`cpu:x86-64-v3`, `cpu:x86-64-v4`, `cpu:aarch64`, any LLVM CPU name or
target triple). The kernels' register tiles follow from it, LLVM's code generator is given its CPU and
features, and it is part of the disk cache's key.

The register tile of a matmul is TILE_M rows x TILE_N columns of accumulators updated by one outer product
per step of k: TILE_M * TILE_N / lanes vector registers of accumulators, TILE_N / lanes for the row of B and
one for the broadcast element of A must fit the vector register file, or the accumulators spill (8 x 32 on
AVX2 is 32 accumulators for 16 ymm registers). TILE_M divides the 64-row blocks of the matmuls, attention
and grouped GEMMs, and TILE_N is a power-of-two number of vectors dividing a packed panel, so that no full
block leaves rows or columns to a scalar remainder loop. Among the tiles that fit, the one with the most
accumulators wins, then one with at most one load per multiply-add, then the one with more rows. That
gives 8x32 on AVX-512 (on one AVX-512 core, x @ w at 512x512x2048: 8x32 148 GFLOP/s, 4x64 127, 12x32
164, 6x64 196, but 12 and 6 rows leave remainders in 64-row blocks, and the MoE layers ran as fast with
8x32 as with 6x64), 4x16 on AVX2 (8 x 8 would need 9 loads per 8 multiply-adds) and 8x8 on NEON.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from sparsa.ir.diagnostics import SparsaError

ROW_BLOCK = 64  # rows of the matmuls' row blocks, the attention blocks and the grouped GEMMs' chunks
HIDE_FMA_LATENCY = 12  # accumulators that keep two FMA pipes busy through up to 6 cycles of latency
PANEL = 32  # columns of one panel of a packed expert weight ([E, K, N] is stored [E, ceil(N / PANEL), K, PANEL])
SCAN_ITEM_LANES = 64  # float32 channels a lane-vector scan item takes at least, where the vectors allow
SCAN_ITEM_VECTORS = 8  # vectors of channels it takes at most: where the channels make SCAN_ITEMS items of them
SCAN_ITEMS = 4


@dataclass(frozen=True)
class CpuTarget:
    """What the kernels are built for; `tile` and the cache key derive from it."""

    triple: str                 # LLVM target triple
    cpu: str                    # LLVM CPU name ("" : the triple's generic CPU)
    features: str               # LLVM feature string ("+avx2,+fma,..."; "" : the CPU's own)
    vector_bits: int            # widest vector register the kernels use
    vector_registers: int       # how many of them
    fma: bool
    caches: dict[int, int] = field(default_factory=dict, compare=False)  # level -> bytes (data or unified)
    cores: int = 0              # 0: not known (a named machine)
    host: bool = False          # read from this machine
    fixed_tile: tuple[int, int] | None = None  # a register tile chosen by the caller (the tuner's candidates)

    @property
    def arch(self) -> str:
        return self.triple.split("-", 1)[0]

    @property
    def isa(self) -> str:
        """The vector ISA in a word: avx512, avx2, sse, neon."""
        if self.arch in ("aarch64", "arm64"):
            return "sve" if "+sve" in self.features else "neon"
        return {512: "avx512", 256: "avx2"}.get(self.vector_bits, "sse")

    def lanes(self, bits: int = 32) -> int:
        return self.vector_bits // bits

    @property
    def tile(self) -> tuple[int, int]:
        """(TILE_M, TILE_N) of f32 matmuls: the tuned one on this machine (tune.py), else the derived one."""
        if self.fixed_tile is not None:
            return self.fixed_tile
        return _host_tile(self) if self.host else self.derived_tile

    @property
    def packed_rows(self) -> int:
        """Rows of the register tile of a matmul whose rows come packed by tile (the dense matmul's, matmul.py),
        where a tile's rows need not divide a 64-row block: the tile's rows, or more where its accumulators are
        fewer than HIDE_FMA_LATENCY and more fit the register file. AVX2: 6x16 (12 accumulators; 4x16's 8 are two
        FMA pipes' worth at 4 cycles of latency, with nothing to spare); AVX-512 and NEON keep 8x32 and 8x8 (16 and
        16). On a Zen 5 running AVX2 code, one thread, x @ w at 2048x1024x2048: 98-110 ms with 4x16, 89-97 with
        6x16. AVX-512 gained nothing from more rows (8x32 42-55 ms; 10, 12, 14 and 16 rows 50-85)."""
        vectors = self.tile[1] // self.lanes()
        fit = (self.vector_registers - vectors - 1) // vectors
        return max(self.tile[0], min(fit, -(-HIDE_FMA_LATENCY // vectors)))

    @property
    def block_k(self) -> int:
        """The k block of a matmul: a block_k x TILE_N slab of B fills a third of L1 (32 KiB where unknown),
        in multiples of 32 between 64 and 256 (128 on a 48 KiB L1 with 32 columns)."""
        l1 = self.caches.get(1, 32 << 10)
        return max(64, min(256, l1 // (3 * 4 * self.tile[1]) // 32 * 32))

    def weight_group(self, k: int, weights: int) -> int:
        """Panels of a grouped GEMM's weights one work item multiplies every row of an expert's segment by: as
        many as fill half of L2 (1 MiB where unknown) with `weights` [k, PANEL] panels each, at least one. The
        group is then read from L2 by every chunk of rows, instead of streaming from memory for each."""
        l2 = self.caches.get(2, 2 << 20)
        return max(1, l2 // 2 // (weights * k * PANEL * 4))

    @property
    def scan_item_vectors(self) -> int:
        """Vectors of channels one lane-vector scan item takes (backends/cpu/scan.py): 64 float32 lanes (each visit
        of a time step reads 4 cache lines of every channel input), at most 8 vectors (past that the exps of the
        item spill). AVX-512: 4; AVX2: 8 (Zen 4 running AVX2 code, Mamba's scan at D = 1024: 12.4 -> 10.4 ms
        against 4; 16 no better); 128-bit vectors: 8 (x86-64: 27.6 ms against 30.0 at 4 and 34.4 at 16)."""
        return max(1, min(SCAN_ITEM_VECTORS, SCAN_ITEM_LANES // self.lanes()))

    def scan_vectors(self, channels: int | None) -> int:
        """Vectors of channels a lane-vector scan item of `channels` (None: known only at run time) takes:
        SCAN_ITEM_VECTORS where the channels make at least SCAN_ITEMS items of that many (or are not known), else
        `scan_item_vectors`. Only AVX-512 differs: 8 vectors of 16 lanes, where 4 were. On Zen 5, Mamba's scan at
        D = 1024 (L = 2048, N = 16, two threads) went from 6.0-7.2 to 4.4-4.5 ms, and one thread's exps per cycle
        were half of what its FMA pipes allow at 4: the more independent vectors an item has, the more of each
        exp's latency is hidden. Fewer channels keep 64 lanes, so that the items still reach every thread."""
        most = max(self.scan_item_vectors, SCAN_ITEM_VECTORS if self.lanes() > 1 else 1)
        if channels is not None and -(-channels // (most * self.lanes())) < SCAN_ITEMS:
            return self.scan_item_vectors
        return most

    def with_tile(self, tile: tuple[int, int]) -> CpuTarget:
        """The same machine with the register tile fixed."""
        return dataclasses.replace(self, fixed_tile=tuple(tile))

    def fitting_tiles(self) -> list[tuple[int, int]]:
        """Every f32 register tile (TILE_M, TILE_N) that fits the register file and divides the row block and
        the packed panel (see the module docstring)."""
        lanes = self.lanes()
        return [(m, lanes * v) for m in (8, 4, 2, 1) for v in (1, 2, 4, 8)
                if m * v + v + 1 <= self.vector_registers and ROW_BLOCK % m == 0 and PANEL % (lanes * v) == 0]

    @functools.cached_property
    def derived_tile(self) -> tuple[int, int]:
        """(TILE_M, TILE_N) of f32 matmuls by the rule of the module docstring: the most accumulators, then at
        most one load (B's row, A's broadcasts) per multiply-add, then more rows."""
        lanes = self.lanes()

        def rank(tile: tuple[int, int]) -> tuple:
            m, vectors = tile[0], tile[1] // lanes
            return m * vectors, m + vectors <= m * vectors, m

        return max(self.fitting_tiles(), key=rank)

    def why_not_here(self) -> str | None:
        """Why code for this target cannot run on this machine ("for <machine>, which this machine ... cannot
        run"), or None."""
        if self.runs_here():
            return None
        here = host_target()
        return (f"for {self.cpu or self.triple} ({self.triple}, {self.isa}), which this machine "
                f"({here.cpu}, {here.triple}, {here.isa}) cannot run")

    def runs_here(self) -> bool:
        """Whether code for this target runs on this machine (same architecture; every feature present)."""
        here = host_target()
        if self.arch != here.arch:
            return False
        if self.host:
            return True
        have = set(here.features.split(","))
        return all(f in have for f in self.features.split(",") if f.startswith("+"))

    def key(self) -> str:
        """What the compiled code depends on, for the cache key."""
        return (f"{self.triple}|{self.cpu}|{self.features}|{self.vector_bits}x{self.vector_registers}|{self.tile}|"
                f"{self.block_k}|L2 {self.caches.get(2)}")

    def describe(self) -> str:
        """One line for people: CPU, ISA, vector registers, tile, caches, cores."""
        caches = ", ".join(f"L{level} {_size(b)}" for level, b in sorted(self.caches.items()))
        return (f"{self.cpu or 'generic'} ({self.triple}): {self.isa}, {self.vector_registers} x "
                f"{self.vector_bits}-bit vector registers{', FMA' if self.fma else ''}; "
                f"matmul register tile {self.tile[0]}x{self.tile[1]}"
                + (f" ({self.packed_rows}x{self.tile[1]} on packed rows)" if self.packed_rows != self.tile[0] else "")
                + (f"; {caches}" if caches else "") + (f"; {self.cores} core{'s' * (self.cores != 1)}"
                                                       if self.cores else ""))


_TUNED: dict[str, tuple[int, int]] = {}  # this process's host tile, by the host's key


def _host_tile(target: CpuTarget) -> tuple[int, int]:
    """The host's register tile: tuned once per machine (stored), unless SPARSA_AUTOTUNE=0."""
    from sparsa.backends.cpu import tune

    if not tune.enabled():
        return target.derived_tile
    name = f"{target.cpu}|{target.features}"
    if name not in _TUNED:
        _TUNED[name] = tune.stored(target) or tune.tune(target)
    return _TUNED[name]


def _size(b: int) -> str:
    return f"{b >> 20} MiB" if b >= 1 << 20 else f"{b >> 10} KiB"


def _caches() -> dict[int, int]:
    """Data and unified cache sizes by level, from sysfs (empty where there is none)."""
    out: dict[int, int] = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")) if base.is_dir() else []:
        try:
            kind = (index / "type").read_text().strip()
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction":
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        out[level] = int(text.rstrip("KMG")) * scale
    return out


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _vectors(arch: str, features: set[str]) -> tuple[int, int, bool]:
    """(vector bits, vector registers, FMA) of an architecture with these LLVM features."""
    if arch in ("aarch64", "arm64"):
        return 128, 32, True  # NEON (SVE's length is not known ahead of time: its NEON view)
    if arch not in ("x86_64", "i386", "i686"):
        raise SparsaError(f"cpu target: architecture '{arch}' is not supported (x86_64 and aarch64 are)")
    if "+avx512f" in features:
        return 512, 32, True
    if "+avx2" in features or "+avx" in features:
        return 256, 16, "+fma" in features
    return 128, 16, False


@functools.cache
def host_target() -> CpuTarget:
    """This machine, as LLVM sees it."""
    import llvmlite.binding as llvm

    triple = llvm.get_process_triple()
    features = llvm.get_host_cpu_features().flatten()
    bits, regs, fma = _vectors(triple.split("-", 1)[0], set(features.split(",")))
    return CpuTarget(triple, llvm.get_host_cpu_name(), features, bits, regs, fma, _caches(), _cores(), host=True)


# Named CPUs whose vector ISA the kernels need to know (LLVM knows every name; these say what each has).
# x86-64 micro-architecture levels as LLVM defines them, and the common server and desktop CPUs.
_X86_LEVELS = {
    "x86-64": "+sse2", "x86-64-v2": "+sse4.2,+popcnt", "x86-64-v3": "+avx,+avx2,+fma,+bmi2,+f16c",
    "x86-64-v4": "+avx,+avx2,+fma,+bmi2,+f16c,+avx512f,+avx512bw,+avx512cd,+avx512dq,+avx512vl"}
_X86_AVX512 = ("skylake-avx512", "cascadelake", "cooperlake", "icelake-server", "icelake-client", "tigerlake",
               "sapphirerapids", "emeraldrapids", "graniterapids", "rocketlake", "znver4", "znver5")
_X86_AVX2 = ("haswell", "broadwell", "skylake", "alderlake", "raptorlake", "meteorlake", "arrowlake", "znver1",
             "znver2", "znver3", "btver2")


def named_target(spec: str) -> CpuTarget:
    """The target `cpu:<spec>` names: an x86-64 level, an LLVM CPU name, `aarch64`, or an LLVM triple."""
    import llvmlite.binding as llvm

    spec = spec.strip()
    if not spec or spec == "host":
        return host_target()
    if re.fullmatch(r"(x86_64|aarch64|arm64|i[36]86)(-[\w.]+){1,3}", spec):  # a triple: its generic CPU
        triple, cpu = spec, ""
    elif spec in ("aarch64", "arm64"):
        triple, cpu = "aarch64-unknown-linux-gnu", "generic"
    else:
        arm = spec.startswith(("neoverse", "cortex-a", "apple-", "ampere", "graviton", "a64fx", "thunderx"))
        triple, cpu = ("aarch64-unknown-linux-gnu" if arm else "x86_64-unknown-linux-gnu"), spec
    arch = triple.split("-", 1)[0]
    try:
        llvm.initialize_all_targets()
        llvm.Target.from_triple(triple)
    except RuntimeError as e:
        raise SparsaError(f"cpu target '{spec}': LLVM does not know the triple {triple} ({e})") from None
    if arch in ("x86_64", "i386", "i686"):
        if cpu in _X86_LEVELS:
            features = _X86_LEVELS[cpu]
        elif cpu in _X86_AVX512:
            features = _X86_LEVELS["x86-64-v4"]
        elif cpu in _X86_AVX2:
            features = _X86_LEVELS["x86-64-v3"]
        elif cpu in ("", "generic"):
            features = _X86_LEVELS["x86-64"]
        else:
            raise SparsaError(f"cpu target '{spec}': unknown x86 CPU (use an x86-64 level, x86-64-v3 or x86-64-v4, "
                              f"or one of {', '.join(_X86_AVX2 + _X86_AVX512)})")
    else:
        features = "+neon" if cpu in ("", "generic") else ""
    bits, regs, fma = _vectors(arch, set(features.split(",")) if arch.startswith(("x86", "i")) else set())
    return CpuTarget(triple, cpu, features, bits, regs, fma)
