"""edpairs' CUDA kernels, compiled as C++ and run on the CPU emulator (tools/cuda_emu).

The machine that runs CI has no GPU; this is where its kernels run on every change: the
emulator's tests (tools/cuda_emu/tests) compare each CUDA op with the CPU op or a float64
reference. One pytest case per emulator test, after one build of them all.
"""
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMU = ROOT / "tools" / "cuda_emu"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulator needs g++")]
MISSING_TOOLS = 3  # build.py's exit status without g++ or ninja


def _names():
    return sorted(m.group(1) for f in (EMU / "tests").glob("*.cpp")
                  for m in re.finditer(r"^EMU_TEST\((\w+)\)", f.read_text(), re.M))


@pytest.fixture(scope="module")
def emu_tests():
    out = ROOT / "build" / "cuda_emu_pytest"
    r = subprocess.run([sys.executable, str(EMU / "build.py"), "--out", str(out)], capture_output=True, text=True,
                       timeout=1800)
    if r.returncode == MISSING_TOOLS:
        pytest.skip(r.stderr.strip())
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    exe = pathlib.Path(r.stdout.strip().splitlines()[-1])
    listed = subprocess.run([str(exe), "--list"], capture_output=True, text=True, check=True).stdout.split()
    assert sorted(listed) == _names(), "EMU_TEST names read from the sources differ from the executable's"
    return exe


@pytest.mark.parametrize("name", _names())
def test_kernel_on_emulator(emu_tests, name):
    r = subprocess.run([str(emu_tests), "=" + name], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and f"PASS {name} (" in r.stdout, \
        f"exit {r.returncode}\n{r.stdout[-8000:]}\n{r.stderr[-4000:]}"
