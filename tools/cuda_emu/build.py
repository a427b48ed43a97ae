"""Build edpairs' CUDA sources for the CPU emulator and link them with the emulator's tests.

    python tools/cuda_emu/build.py [--out build/cuda_emu] [--sanitize thread|address] [--jobs N]

Each csrc/cuda source (but the opt-in TMA kernel's) is rewritten by translate.py into OUT/src
and compiled as C++ with the emulated CUDA headers (tools/cuda_emu/include) and
EDPAIRS_CUDA_EMU; the CPU ops (csrc/cpu) and tools/cuda_emu/tests/*.cpp link with them into
OUT/emu_tests. ninja rebuilds only what changed. Prints the path of the executable last.
"""
import argparse
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
import translate  # noqa: E402

SKIP = {"assign_wgmma_tma_cuda.cu"}  # TMA and clusters are not emulated (tma_stub.cpp)


MISSING_TOOLS = 3  # exit status when g++ or ninja is missing


def find_ninja():
    """ninja on PATH, beside the running Python (a virtual environment that is not activated),
    or the ninja package's own copy; None when there is none."""
    for candidate in (shutil.which("ninja"), pathlib.Path(sys.executable).parent / "ninja"):
        if candidate and pathlib.Path(candidate).is_file():
            return str(candidate)
    try:
        import ninja
    except ImportError:
        return None
    found = pathlib.Path(ninja.BIN_DIR) / "ninja"
    return str(found) if found.is_file() else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "build" / "cuda_emu"))
    ap.add_argument("--sanitize", choices=["thread", "address"], default=None)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    ninja = find_ninja()
    if shutil.which("g++") is None or ninja is None:
        print("cuda_emu: needs g++ and ninja (on PATH, beside this Python, or the ninja package)", file=sys.stderr)
        sys.exit(MISSING_TOOLS)
    out = pathlib.Path(args.out).resolve()
    src = out / "src"
    src.mkdir(parents=True, exist_ok=True)
    cuda = ROOT / "csrc" / "cuda"
    units = []
    for f in sorted(cuda.iterdir()):
        if f.name in SKIP or f.suffix not in (".cu", ".cuh"):
            continue
        text, _, _ = translate.translate(f.read_text())
        dst = src / (f.stem + ".cpp" if f.suffix == ".cu" else f.name)
        if not dst.exists() or dst.read_text() != text:  # keep ninja's timestamps where nothing changed
            dst.write_text(text)
        if f.suffix == ".cu":
            units.append(dst)
    units += sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))
    units += [HERE / "tma_stub.cpp"] + sorted((HERE / "tests").glob("*.cpp"))

    flags = ["-std=c++20", "-O1", "-g", "-pthread", "-DEDPAIRS_CUDA_EMU=1", "-DEDPAIRS_HAVE_WGMMA=1",
             "-Wno-unknown-pragmas", "-Wno-deprecated", "-I" + str(HERE / "include"), "-I" + str(ROOT / "csrc" / "include"),
             "-I" + str(HERE / "tests")]
    if args.sanitize:
        flags.append("-fsanitize=" + args.sanitize)
    q = lambda items: " ".join(shlex.quote(str(i)) for i in items)  # noqa: E731
    lines = [f"cxxflags = {q(flags)}",
             "rule cxx\n  command = g++ $cxxflags -MMD -MF $out.d -c $in -o $out\n  depfile = $out.d\n  deps = gcc",
             "rule link\n  command = g++ $cxxflags $in -o $out"]
    objs = []
    for u in units:
        o = out / "obj" / (u.parent.name + "_" + u.stem + ".o")
        objs.append(o)
        lines.append(f"build {q([o])}: cxx {q([u])}")
    exe = out / "emu_tests"
    lines.append(f"build {q([exe])}: link {q(objs)}")
    (out / "build.ninja").write_text("\n".join(lines) + "\n")
    r = subprocess.run([ninja, "-C", str(out), f"-j{args.jobs}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
    if r.returncode:
        sys.exit(r.stdout[-20000:] + "\ncuda_emu: build failed")
    print(exe)


if __name__ == "__main__":
    main()
