"""tools/load_use.py on hand-written nvdisasm listings (the real ones need nvcc and nvdisasm)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "load_use.py")

# Kernel "serial": each load used right behind it (one in flight); kernel "batched": three loads
# before their uses, one a predicated 64-bit load used through its high register, one
# overwritten unused (by an atomic's result: written, not read); a cp.async (LDGSTS: global to
# shared memory) is no load into registers: R5 has 3 loads in flight, not 4.
# (The names' digits are the mangled length prefixes, which short_name drops.)
LISTING = """\
.text._ZN7edpairs11cuda_detail50_GLOBAL__N__899a53f0_17_assign_tc_cuda_cu_14791a1a6serialEv:
        /*0000*/                   LDG.E.CONSTANT R5, desc[UR8][R4.64] ;
        /*0010*/                   FADD R6, R5, -R7 ;
        /*0020*/                   LDG.E.CONSTANT R8, desc[UR8][R2.64] ;
        /*0030*/                   FADD R9, R8, -R7 ;
        /*0040*/                   EXIT ;
.text._ZN7edpairs11cuda_detail50_GLOBAL__N__899a53f0_17_assign_tc_cuda_cu_14791a1a7batchedEv:
        /*0000*/                   LDG.E.CONSTANT R5, desc[UR8][R4.64] ;
        /*0008*/                   LDGSTS.E.BYPASS.128 [R20+0x100], desc[UR8][R6.64] ;
        /*0010*/              @!P1 LDG.E.64.CONSTANT R10, desc[UR8][R2.64+0x8] ;
        /*0020*/                   LDG.E.CONSTANT R8, desc[UR8][R2.64] ;
        /*0028*/                   ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU PT, R8, desc[UR8][R12.64], R9 ;
        /*0030*/                   STS [R20], R5 ;
        /*0040*/                   DFMA R12, R11, R12, R14 ;
        /*0050*/                   MOV R8, RZ ;
        /*0060*/                   EXIT ;
"""


def test_load_use_counts_loads_in_flight_at_first_use(tmp_path):
    path = tmp_path / "k.sass"
    path.write_text(LISTING)
    out = subprocess.run([sys.executable, TOOL, str(path)], capture_output=True, text=True, check=True).stdout
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert set(lines) == {"serialEv", "batchedEv"}, out
    assert "LDG    2  used with 1 in flight    2  median in flight 1" in lines["serialEv"]
    # R5: 3 in flight at the STS (itself, R10:R11, R8); R10:R11: 2 at the DFMA (itself, R8);
    # R8: overwritten unused, not counted.
    assert "LDG    2  used with 1 in flight    0  median in flight 2" in lines["batchedEv"]
    only = subprocess.run([sys.executable, TOOL, str(path), "--kernel", "serial"], capture_output=True, text=True,
                          check=True).stdout
    assert only.split()[0] == "serialEv" and len(only.splitlines()) == 1
