"""Which opt-in candidates a device run says to make defaults: each candidate row against the
row of the default it would replace, in the same run (gpu_check.sh's result files).

    python3 benchmarks/decide.py RES_DIR [--json RES_DIR/decisions.json]

A candidate is "FLIP" only when all of these hold: every row it names was timed, it is at
least MARGIN (3%) faster than the default's row in every pairing it names, its accuracy is no
worse than the default's (k-means: the share of rows whose label agrees with float64 up to
near ties of 2e-3, at most 1e-4 lower; moments: the sampled relative error at most twice the
default's, or below 1e-5), and the CUDA tests of the new kernels passed in that run
(cuda_tests_new.xml without failures, pytest's exit status 0). Otherwise "keep", with the
reason. Each line names the knob and where its default lives; the change itself stays a
person's decision (NOTES.md of the card says what each candidate was meant to show)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NamedTuple, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import BIG, KMEANS_F32_FILES, SMALL, load_result, test_group  # noqa: E402

MARGIN = 0.03


class Decision(NamedTuple):
    knob: str
    verdict: str  # "FLIP", "keep" or "not measured"
    detail: str
    where: str


def new_kernel_tests_pass(res: str) -> tuple[bool, str]:
    """Whether the new kernels' test group ran clean, and what was seen."""
    group = test_group(res, "cuda_tests_new")
    if group is None:
        return False, "no cuda_tests_new.xml"
    n, _, bad, rc = group
    ok = n > 0 and bad == 0 and rc == "0"
    return ok, f"new-kernel tests: {n} run, {bad} failed, exit status {rc}"


def _kmeans_rows(res: str) -> dict:
    rows = {}
    for name in KMEANS_F32_FILES:
        for x in (load_result(res, name) or {}).get("results", []):
            if "median_s" in x:
                rows[(tuple(x["size"]), x["method"])] = x
    return rows


def _moments_rows(res: str) -> dict:
    return {(x["op"], x["method"]): x for x in (load_result(res, "moments_cuda.json") or {}).get("results", [])
            if "median_s" in x}


def _judge(knob: str, where: str, pairs, tests: tuple[bool, str], accurate) -> Decision:
    """pairs: (label, candidate row, default row); accurate(candidate, default) -> (ok, text)."""
    missing = [label for label, cand, base in pairs if cand is None or base is None]
    if missing:
        return Decision(knob, "not measured", "rows missing: " + ", ".join(missing), where)
    parts, fast, exact, alone = [], True, True, []
    for label, cand, base in pairs:
        gain = base["median_s"] / cand["median_s"]
        ok, text = accurate(cand, base)
        parts.append(f"{label}: {cand['median_s'] * 1e3:.2f} vs {base['median_s'] * 1e3:.2f} ms ({gain:.2f}x; {text})")
        fast &= gain >= 1 + MARGIN
        exact &= ok
        if gain >= 1 + MARGIN and ok:
            alone.append(label)
    why = [] if fast else [f"not {MARGIN:.0%} faster everywhere"]
    if not fast and len(pairs) > 1:  # which pairings would win alone (a knob one could split)
        why[-1] += f" (faster alone: {', '.join(alone) or 'none'})"
    why += [] if exact else ["less accurate"]
    why += [] if tests[0] else [tests[1]]
    verdict = "FLIP" if not why else "keep"
    return Decision(knob, verdict, "; ".join(parts) + ("" if not why else " -> " + ", ".join(why)), where)


def _labels_ok(cand, base):
    c, b = cand.get("label_agreement_2e-3"), base.get("label_agreement_2e-3")
    if c is None or b is None:
        return False, "label agreement not recorded"
    return c >= b - 1e-4, f"labels {c:.4f} vs {b:.4f}"


def _error_ok(cand, base):
    c, b = cand.get("rel_err_sample"), base.get("rel_err_sample")
    if c is None or b is None:
        return False, "error not recorded"
    return c <= max(2 * b, 1e-5), f"rel err {c:.1e} vs {b:.1e}"


def decisions(res: str) -> list[Decision]:
    tests = new_kernel_tests_pass(res)
    km, mo = _kmeans_rows(res), _moments_rows(res)

    def k(size, method) -> Optional[dict]:
        return km.get((size, method))

    out = [
        # The default labels TF32 float32 rows at k >= 129 on Hopper from float16 copies since
        # H200 run 6 (half_labels' "auto"); each alternative is judged against it.
        _judge("EDPAIRS_ASSIGN_HALF=1 (float16 rows in shared memory, k = 1024)",
               "python/edpairs/_gemm.py half_labels()' auto; README; the tests that pin the default",
               [("k=1024", k(BIG, "edpairs-half"), k(BIG, "edpairs"))], tests, _labels_ok),
        _judge("EDPAIRS_ASSIGN_HALF=0 (labels from the float32 rows, the default before run 6, k = 1024)",
               "python/edpairs/_gemm.py half_labels()' auto; README; the tests that pin the default",
               [("k=1024", k(BIG, "edpairs-tf32-rows"), k(BIG, "edpairs"))], tests, _labels_ok),
        *(_judge(f"EDPAIRS_ASSIGN_SEG_ROWS={rows} (segmented sums in blocks of {rows} sorted rows)",
                 "kSegRows (csrc/include/edpairs/assign_knobs.h)",
                 [(f"k={size[2]}", k(size, f"edpairs-seg{rows}"), k(size, "edpairs")) for size in (BIG, SMALL)],
                 tests, _labels_ok) for rows in (128, 64)),
        _judge("wgmma labels below k = 129 with the sorted sums (k = 64)",
               "kWgmmaAutoMinK (csrc/include/edpairs/ops.h)",
               [("k=64", k(SMALL, "edpairs-wgmma"), k(SMALL, "edpairs"))], tests, _labels_ok),
        _judge("wgmma labels below k = 129 + owned-column sums (k = 64)",
               "kWgmmaAutoMinK (csrc/include/edpairs/ops.h) and columns_apply's auto (csrc/cuda/assign_tc_cuda.cu)",
               [("k=64", k(SMALL, "edpairs-wgmma-columns"), k(SMALL, "edpairs"))], tests, _labels_ok),
        _judge("EDPAIRS_ASSIGN_HALF_SMALL_K=1 on wgmma (a fit below k = 129 labelled from float16 copies made once, k = 64)",
               "python/edpairs/_gemm.py _small_k_knob()'s default, and the kernel 16-bit rows take below "
               "kWgmmaAutoMinK (csrc/include/edpairs/ops.h)",
               [("k=64 fit", k(SMALL, "edpairs-fit5-half"), k(SMALL, "edpairs-fit5"))], tests, _labels_ok),
        _judge("EDPAIRS_ASSIGN_SUMS=fused on wgmma (k = 64)",
               "sums_mode()'s auto for k <= 64 (read in csrc/include/edpairs/assign_knobs.h, decided in "
               "launch_fused, csrc/cuda/assign_tc_cuda.cu)",
               [("k=64 vs default", k(SMALL, "edpairs-fused-wgmma"), k(SMALL, "edpairs")),
                ("k=64 vs wgmma-columns", k(SMALL, "edpairs-fused-wgmma"), k(SMALL, "edpairs-wgmma-columns"))],
               tests, _labels_ok),
        # The TF32 moments take float16 operands by default since version 19 (HALF_DEFAULT), the
        # signal moments TF32 ones: each alternative against its operation's default.
        _judge("EDPAIRS_GEMM_HALF=0 for the moments (TF32 operands, the default before version 19)",
               "python/edpairs/_gemm.py HALF_DEFAULT['moments']",
               [("moments", mo.get(("moments", "edpairs-tf32-nohalf")), mo.get(("moments", "edpairs-tf32")))],
               tests, _error_ok),
        _judge("EDPAIRS_GEMM_HALF=signal (TF32 signal moments from float16 operands)",
               "python/edpairs/_gemm.py HALF_DEFAULT['signal']",
               [("signal", mo.get(("signal_moments", "edpairs-tf32-half")), mo.get(("signal_moments", "edpairs-tf32")))],
               tests, _error_ok),
        _judge("EDPAIRS_GEMM_OVERLAP=1 (centring beside the products)",
               "python/edpairs/_gemm.py centre_overlap() default",
               [("moments tf32", mo.get(("moments", "edpairs-tf32-ov")), mo.get(("moments", "edpairs-tf32"))),
                ("moments exact", mo.get(("moments", "edpairs-ov")), mo.get(("moments", "edpairs"))),
                ("signal tf32", mo.get(("signal_moments", "edpairs-tf32-ov")), mo.get(("signal_moments", "edpairs-tf32")))],
               tests, _error_ok),
    ]
    # The Gram's default form is per precision (GRAM_DEFAULT): each precision is judged alone.
    # Exact float32 products form the triangle in blocks of 128 since H200 run 6: the full
    # product and the blocks of 256 are judged against it; TF32 ones the full product: the
    # triangle's blocks against it.
    where = "python/edpairs/_gemm.py GRAM_DEFAULT['{}'] and TRIANGLE_BLOCK"
    out.append(_judge("EDPAIRS_GEMM_GRAM=cublas (the full product), float32 products", where.format("float32"),
                      [("float32", mo.get(("moments", "edpairs-full")), mo.get(("moments", "edpairs")))],
                      tests, _error_ok))
    out.append(_judge("EDPAIRS_GEMM_TRIANGLE_BLOCK=256, float32 products", where.format("float32"),
                      [("float32", mo.get(("moments", "edpairs-tri256")), mo.get(("moments", "edpairs")))],
                      tests, _error_ok))
    for block in (128, 256):
        out.append(_judge(f"EDPAIRS_GEMM_GRAM=triangle, tf32 products, block {block}", where.format("tf32"),
                          [("tf32", mo.get(("moments", f"edpairs-tf32-tri{block}")), mo.get(("moments", "edpairs-tf32")))],
                          tests, _error_ok))
    return out


def best_rows(res: str) -> list[str]:
    """The fastest timed row of each kind, whatever its knobs (information)."""
    lines = []
    mo = _moments_rows(res)
    for op in ("moments", "signal_moments"):
        for kind, keep in (("tf32", lambda m: "tf32" in m), ("exact", lambda m: "tf32" not in m)):
            rows = [(x["median_s"], m) for (o, m), x in mo.items() if o == op and m.startswith("edpairs") and keep(m)]
            if rows:
                t, m = min(rows)
                lines.append(f"fastest {op} {kind} row: {m} {t * 1e3:.2f} ms")
    km = _kmeans_rows(res)
    for size in (BIG, SMALL):
        rows = [(x["median_s"], m) for (s, m), x in km.items() if s == size and m.startswith("edpairs")
                and m != "edpairs-labels"]
        if rows:
            t, m = min(rows)
            lines.append(f"fastest k-means step {','.join(map(str, size))}: {m} {t * 1e3:.2f} ms")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("res", help="folder of a gpu_check.sh run's result files")
    parser.add_argument("--json", help="write the decisions here too")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.res):
        parser.error(f"{args.res} is not a folder")
    found = decisions(args.res)
    print("candidates against the defaults they would replace (same run):")
    for d in found:
        print(f"  {d.verdict:12s} {d.knob}: {d.detail}")
        if d.verdict == "FLIP":
            print(f"  {'':12s} default lives in: {d.where}")
    for line in best_rows(args.res):
        print("  " + line)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"decisions": [d._asdict() for d in found], "best": best_rows(args.res)}, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
