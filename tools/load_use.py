#!/usr/bin/env python3
"""How many global loads each kernel has in flight when it first uses one (no GPU needed).

    python3 tools/load_use.py csrc/cuda/assign_tc_cuda.cu [--arch sm_90] [--kernel REGEX]
    python3 tools/load_use.py listing.sass                  (nvdisasm's output, read as is)

A .cu file is compiled as tools/same_machine_code.sh compiles it (-O3, C++17, sm_90 with
EDPAIRS_HAVE_WGMMA=1, or sm_90a for the files of edpairs_cuda_sm90a) and disassembled with
nvdisasm (on PATH or $NVDISASM; the toolkit here has none: `pip download --no-deps
nvidia-cuda-nvdisasm` and unpack the wheel). For every LDG the listing is walked in text
order to the first instruction that reads its destination, counting the LDGs issued from it up
to there: a streaming loop whose loads show 1 there waits out a memory latency per load (the
owned-column sums of run 6b: the centring's FADD sat right behind each row's load, in the
row's branch). Text order is not execution order (branches, loop back-edges), so this is a
pointer to the machine code, not a verdict: read the kernel's listing next.

One line per kernel: its LDGs whose result is read, how many of them with only themselves in
flight, and the median count in flight at first use."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTRUCTION = re.compile(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)\s*(.*?)\s*;")
# Opcodes whose operands are all read (stores, reductions, branches, cp.async's global-to-shared
# copies).
READS_ALL = ("ST", "RED", "BRA", "LDGSTS")
# A global load into registers: LDG and its forms, not LDGSTS (cp.async: global to shared memory)
# or LDGDEPBAR.
GLOBAL_LOAD = re.compile(r"LDG(\.|$)")


def _registers(operand: str) -> list:
    return [int(r) for r in re.findall(r"\bR(\d+)\b", operand)]


def _reads_writes(opcode: str, parts: list) -> tuple:
    """(operands read, registers written) of an instruction: an atomic (ATOM, ATOMG, ATOMS)
    writes its result before the bracketed address and reads from there on."""
    if opcode.startswith(READS_ALL):
        return parts, []
    if opcode.startswith("ATOM"):
        at = next((j for j, q in enumerate(parts) if "[" in q), len(parts))
        return parts[at:], [r for q in parts[:at] for r in _registers(q)]
    return parts[1:], (_registers(parts[0]) if parts else [])


def _width(opcode: str) -> int:
    return 4 if ".128" in opcode else 2 if ".64" in opcode else 1


def kernels(listing: str) -> dict:
    """{kernel name: [(opcode, operands), ...]} of an nvdisasm listing."""
    out, name = {}, None
    for line in listing.splitlines():
        m = re.match(r"^\.text\.(\S+):", line)
        if m:
            name = m.group(1)
            out[name] = []
            continue
        m = INSTRUCTION.match(line)
        if m and name is not None:
            out[name].append((m.group(1), m.group(2)))
    return out


def in_flight(code: list) -> list:
    """For each LDG of ``code`` whose result is read, the LDGs issued from it (itself included) up to
    that first read."""
    counts = []
    for i, (opcode, operands) in enumerate(code):
        if not GLOBAL_LOAD.match(opcode):
            continue
        first = _registers(operands.split(",")[0])
        if not first:
            continue
        dest = set(range(first[0], first[0] + _width(opcode)))
        n = 1
        for op2, operands2 in code[i + 1:]:
            sources, written = _reads_writes(op2, [p.strip() for p in operands2.split(",")])
            if any(r in dest for s in sources for r in _registers(s)):
                counts.append(n)
                break
            if GLOBAL_LOAD.match(op2):
                n += 1
            if written and written[0] in dest:  # overwritten unused (in text order): not counted
                break
    return counts


def short_name(mangled: str) -> str:
    m = re.search(r"_cu_[0-9a-f]{8}\d+(.*)", mangled)
    return m.group(1) if m else mangled


def disassemble(source: str, arch: str) -> str:
    nvcc = shutil.which("nvcc")
    nvdisasm = os.environ.get("NVDISASM") or shutil.which("nvdisasm")
    if nvcc is None or nvdisasm is None:
        sys.exit("load_use: needs nvcc and nvdisasm (on PATH or $NVDISASM)")
    defines = [] if arch == "sm_90a" else ["-DEDPAIRS_HAVE_WGMMA=1"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        subprocess.run([nvcc, "-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-cubin", f"-arch={arch}",
                        *defines, "-I", os.path.join(ROOT, "csrc", "include"), "-I", os.path.join(ROOT, "csrc", "cuda"),
                        "-w", source, "-o", cubin], check=True)
        return subprocess.run([nvdisasm, cubin], check=True, capture_output=True, text=True).stdout


def default_arch(source: str) -> str:
    """sm_90a for the files CMakeLists.txt builds into edpairs_cuda_sm90a, else sm_90."""
    with open(os.path.join(ROOT, "CMakeLists.txt")) as f:
        cmake = f.read()
    m = re.search(r"add_library\(edpairs_cuda_sm90a(.*?)\)", cmake, re.S)
    return "sm_90a" if m and os.path.basename(source) in m.group(1) else "sm_90"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="a .cu file, or an nvdisasm listing")
    ap.add_argument("--arch", help="sm_80, sm_90 or sm_90a (default: as CMakeLists.txt builds the file)")
    ap.add_argument("--kernel", default="", help="only kernels whose name matches this regular expression")
    args = ap.parse_args(argv)
    if args.source.endswith(".cu"):
        listing = disassemble(args.source, args.arch or default_arch(args.source))
    else:
        with open(args.source) as f:
            listing = f.read()
    pattern = re.compile(args.kernel)
    for name, code in kernels(listing).items():
        counts = in_flight(code)
        short = short_name(name)
        if counts and pattern.search(short):
            print(f"{short[:72]:72s} LDG {len(counts):4d}  used with 1 in flight {counts.count(1):4d}  "
                  f"median in flight {statistics.median_low(counts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
