"""Rewrite a CUDA source into C++ for the CPU emulator (tools/cuda_emu).

Three rewrites, nothing else:
  kernel<<<grid, block[, smem[, stream]]>>>(args);
      -> ::emu::launch(::emu::key(kernel), dim3(grid), dim3(block), smem, [=]() mutable { kernel(args); });
  extern __shared__ [__align__(n)] T name[];
      -> T* name = reinterpret_cast<T*>(::emu::dyn_smem());
  __shared__ [__align__(n)] T name[dims];
      -> auto& name = ::emu::block_static<T[dims], n>(a key of the declaration);
         (fresh memory of each block, filled with 0xFF like the dynamic shared memory)
"""
import re
import sys

STATIC_SHARED = re.compile(r"(?<!extern )__shared__\s+(?:__align__\((\d+)\)\s+)?((?:(?:typename|unsigned|long)\s+)*[\w:]+)\s+(\w+)\s*((?:\[[^\]]+\])+)\s*;")
EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?((?:unsigned\s+)?[\w:]+)\s+(\w+)\s*\[\s*\]\s*;")


def split_top(text):
    """Split at the commas that are not inside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


def closing(text, start):
    """Index of the bracket closing the one at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError("unbalanced parentheses")


def translate(src):
    out, i, launches = [], 0, 0
    while True:
        j = src.find("<<<", i)
        if j < 0:
            out.append(src[i:])
            break
        stmt = max(src.rfind(";", 0, j), src.rfind("{", 0, j), src.rfind("}", 0, j)) + 1
        # The kernel: a name with optional template arguments ending the text before <<< (a
        # comment may come first).
        m = re.search(r"[\w:]+(<[^;{}/]*>)?\s*$", src[stmt:j])
        if m is None or "//" in src[stmt + m.start():j]:
            raise ValueError(f"cannot read the kernel of the launch at offset {j}: {src[stmt:j]!r}")
        start = stmt + m.start()
        kernel = src[start:j].strip()
        k = src.index(">>>", j)
        cfg = split_top(src[j + 3:k])
        if not 2 <= len(cfg) <= 4:
            raise ValueError(f"launch configuration of {kernel}: {cfg}")
        smem = cfg[2] if len(cfg) > 2 else "0"
        a0 = src.index("(", k)
        if src[k + 3:a0].strip():
            raise ValueError(f"text between >>> and the arguments of {kernel}")
        a1 = closing(src, a0)
        semi = src.index(";", a1)
        if src[a1 + 1:semi].strip():
            raise ValueError(f"text after the arguments of {kernel}")
        out.append(src[i:start])
        # The key finds the kernel's shared-memory attribute; a launch without dynamic shared
        # memory needs none (and a kernel whose template arguments are deduced has no address).
        key = "nullptr" if smem == "0" else f"::emu::key({kernel})"
        out.append(f"::emu::launch({key}, dim3({cfg[0]}), dim3({cfg[1]}), "
                   f"static_cast<size_t>({smem}), [=]() mutable {{ {kernel}({src[a0 + 1:a1]}); }});")
        i = semi + 1
        launches += 1
    text = "".join(out)
    text, shared = EXTERN_SHARED.subn(r"\1* \2 = reinterpret_cast<\1*>(::emu::dyn_smem());", text)
    text, statics = STATIC_SHARED.subn(
        lambda m: f"auto& {m.group(3)} = ::emu::block_static<{m.group(2)}{m.group(4)}, {m.group(1) or 0}>("
                  "[] { static const char key = 0; return &key; }());", text)
    if re.search(r"^[^/\n]*(?<!extern )__shared__", text, re.M):
        raise ValueError("a __shared__ declaration that translate.py cannot read")
    return text, launches, shared + statics


if __name__ == "__main__":
    text, launches, shared = translate(open(sys.argv[1]).read())
    with open(sys.argv[2], "w") as f:
        f.write(text)
