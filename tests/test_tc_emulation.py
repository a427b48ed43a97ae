"""A numpy replay of the tensor-core assignment kernel (csrc/cuda/assign_tc_cuda.cu) that runs
without a GPU: the kernel's own index arithmetic (cp.async chunk mapping into the padded shared
tiles, the 3-stage ring, the fragment loads, the epilogue's accumulator -> (row, centroid)
belief, the quad shuffles and the cross-warp merge, the row-norm split) against the operand
layouts of mma.sync as the PTX ISA defines them. A mistake in any of the kernel's index
formulas lands values in the wrong place and shows up as labels / scores that differ from
numpy. The products themselves are float64 here (the tensor cores round differently), on the
operands rounded exactly as the kernel rounds them (TF32 round-to-nearest-away, float16 and
bfloat16 round-to-nearest-even)."""

from __future__ import annotations

import numpy as np
import pytest

# Constants of assign_tc_cuda.cu.
ROWS, CENTS, STAGES = 128, 128, 3
WARPS_M, WARPS_N = 2, 2
WARPS = WARPS_M * WARPS_N
THREADS = 32 * WARPS
SLICE_BYTES, PITCH_WORDS = 128, 36
TILE_WORDS = (ROWS + CENTS) * PITCH_WORDS
WARP_ROWS, WARP_CENTS = ROWS // WARPS_M, CENTS // WARPS_N
MI, NJ = WARP_ROWS // 16, WARP_CENTS // 8
LOAD_ROWS = THREADS // 8
ITEM = {"float32": 4, "float16": 2, "bfloat16": 2}

LANE = np.arange(32)

# ---- the PTX ISA's operand layouts (the truth the kernel must match) ----------------------
# In 32-bit words of an operand row (one TF32 element or two 16-bit elements):
#   A (16 x 8 words): reg r of lane l holds (row l//4 + 8 (r%2), word l%4 + 4 (r//2))
#   B (8 n x 8 words): reg r holds (n l//4, word l%4 + 4 r)
#   C (16 x 8): reg r holds (row l//4 + 8 (r//2), col 2 (l%4) + r%2)
_R4 = np.arange(4)
_R2 = np.arange(2)
A_ROW = LANE[:, None] // 4 + 8 * (_R4[None, :] % 2)
A_WORD = LANE[:, None] % 4 + 4 * (_R4[None, :] // 2)
B_N = np.broadcast_to(LANE[:, None] // 4, (32, 2))
B_WORD = LANE[:, None] % 4 + 4 * _R2[None, :]
C_ROW = LANE[:, None] // 4 + 8 * (_R4[None, :] // 2)
C_COL = 2 * (LANE[:, None] % 4) + _R4[None, :] % 2


def test_ptx_layouts_cover_each_element_once():
    assert len(set(zip(A_ROW.ravel(), A_WORD.ravel()))) == 16 * 8
    assert len(set(zip(B_N.ravel(), B_WORD.ravel()))) == 8 * 8
    assert len(set(zip(C_ROW.ravel(), C_COL.ravel()))) == 16 * 8


# ---- rounding as the kernel does it ---------------------------------------------------------


def round_tf32(v):
    """cvt.rna.tf32.f32: nearest, ties away from zero, 10 explicit mantissa bits."""
    b = np.asarray(v, np.float32).view(np.uint32).astype(np.uint64)
    b = ((b + 0x1000) & 0xFFFFE000).astype(np.uint32)
    return b.view(np.float32)


def round_bf16(v):
    b = np.asarray(v, np.float32).view(np.uint32).astype(np.uint64)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return b.view(np.float32)


def round_operand(v, dtype):
    v = np.asarray(v, np.float32)
    if dtype == "float32":
        return round_tf32(v)
    if dtype == "float16":
        return v.astype(np.float16).astype(np.float32)
    return round_bf16(v)


def better(v1, i1, v0, i0):
    return (v1 > v0) | ((v1 == v0) & (i1 < i0))


def prepare_centroids(C, dtype, k_pad, d_pad, center=None, col_scale=None):
    """What the kernels' prepare_centroids writes: the centroids rounded to the operand type and
    zero-padded to (k_pad, d_pad), s_j (col_scale or 1 / ||c_j||, 0 for padding) and
    o_j = center . c~_j."""
    k, d = C.shape
    cw = np.zeros((k_pad, d_pad), np.float32)
    cw[:k, :d] = round_operand(C, dtype)
    sq = (C.astype(np.float64) ** 2).sum(1)
    s = np.zeros(k_pad, np.float32)
    s[:k] = col_scale if col_scale is not None else np.where(sq > 0, 1 / np.sqrt(np.where(sq > 0, sq, 1)), 0)
    o = np.zeros(k_pad, np.float32)
    if center is not None:
        o[:k] = (cw[:k, :d].astype(np.float64) @ center.astype(np.float64)).astype(np.float32)
    return cw, s, o


# ---- the replay -----------------------------------------------------------------------------


def emulate(x_buf, n, d, x_stride, C, dtype, center=None, row_scale=None, col_scale=None, aligned=True):
    """labels, scores, row scales as assign_tc_kernel computes them. x_buf: flat float32 values
    of x (already representable in `dtype`), row n at x_buf[n * x_stride:]."""
    item = ITEM[dtype]
    elems = SLICE_BYTES // item          # BK
    chunk_elems = 16 // item
    epw = 4 // item                      # elements per 32-bit word
    k = C.shape[0]
    d_pad = -(-d // elems) * elems
    k_pad = -(-k // CENTS) * CENTS
    k_tiles = k_pad // CENTS
    k_steps = d_pad // elems

    cw, s, o = prepare_centroids(C, dtype, k_pad, d_pad, center, col_scale)

    labels = np.full(n, -1, np.int64)
    scores = np.full(n, np.nan, np.float32)
    rscale_all = np.full(n, np.nan, np.float32)
    tid = np.arange(THREADS)
    warp = np.arange(WARPS)
    warp_m, warp_n = warp // WARPS_N, warp % WARPS_N
    g, t = LANE // 4, LANE % 4

    for block in range(-(-n // ROWS)):
        row0 = block * ROWS
        rows = min(n - row0, ROWS)
        # shared memory in elements: stage words * epw
        smem = np.full(STAGES * TILE_WORDS * epw, np.nan)
        run_val = np.full((WARPS, 32, MI, 2), -np.inf)
        run_idx = np.zeros((WARPS, 32, MI, 2), np.int64)
        row_sq = np.zeros(THREADS, np.float32)

        def load_stage(stage, kt, j0):
            chunk = tid % 8
            col = kt * elems + chunk * chunk_elems
            for i in range(ROWS // LOAD_ROWS):
                r = tid // 8 + LOAD_ROWS * i
                dst_a = (stage + r * PITCH_WORDS + chunk * 4) * epw  # element offsets
                dst_c = (stage + (ROWS + r) * PITCH_WORDS + chunk * 4) * epw
                grow = row0 + r
                for th in range(THREADS):
                    if aligned:
                        valid = 0
                        if grow[th] < n:
                            rem = d - col[th]
                            valid = (rem if rem > 0 else 0) if rem < chunk_elems else chunk_elems
                        vals = np.zeros(chunk_elems)
                        base = grow[th] * x_stride + col[th]
                        vals[:valid] = x_buf[base:base + valid]
                    else:
                        vals = np.zeros(chunk_elems)
                        for e in range(chunk_elems):
                            if grow[th] < n and col[th] + e < d:
                                vals[e] = x_buf[grow[th] * x_stride + col[th] + e]
                    smem[dst_a[th]:dst_a[th] + chunk_elems] = vals
                    crow = j0 + r[th]
                    smem[dst_c[th]:dst_c[th] + chunk_elems] = cw[crow, col[th]:col[th] + chunk_elems]

        def words(flat_word_idx):
            """Register contents (..., epw) of the given word addresses."""
            idx = flat_word_idx[..., None] * epw + np.arange(epw)
            return smem[idx]

        for tile in range(k_tiles):
            j0 = tile * CENTS
            acc = np.zeros((WARPS, 32, MI, NJ, 4))  # warp, lane, mi, nj, r
            for s_ in range(STAGES - 1):
                if s_ < k_steps:
                    load_stage(s_ * TILE_WORDS, s_, j0)
            for kt in range(k_steps):
                nxt = kt + STAGES - 1
                if nxt < k_steps:
                    load_stage((nxt % STAGES) * TILE_WORDS, nxt, j0)
                xs = (kt % STAGES) * TILE_WORDS
                cs = xs + ROWS * PITCH_WORDS
                for ks in range(SLICE_BYTES // 4 // 8):
                    w = ks * 8 + t  # (32,)
                    # a[warp, mi, lane, reg] word addresses, as the kernel computes them
                    mi = np.arange(MI)
                    base_a = xs + (warp_m[:, None, None] * WARP_ROWS + mi[None, :, None] * 16 + g[None, None, :]) \
                        * PITCH_WORDS + w[None, None, :]
                    addr_a = np.stack([base_a, base_a + 8 * PITCH_WORDS, base_a + 4, base_a + 8 * PITCH_WORDS + 4], -1)
                    a = words(addr_a)  # (WARPS, MI, 32, 4, epw)
                    if dtype == "float32":
                        a = round_tf32(a).astype(np.float64)
                    nj = np.arange(NJ)
                    base_b = cs + (warp_n[:, None, None] * WARP_CENTS + nj[None, :, None] * 8 + g[None, None, :]) \
                        * PITCH_WORDS + w[None, None, :]
                    addr_b = np.stack([base_b, base_b + 4], -1)
                    b = words(addr_b)  # (WARPS, NJ, 32, 2, epw)
                    # Matrices per the PTX layouts.
                    A = np.full((WARPS, MI, 16, 8, epw), np.nan)
                    A[:, :, A_ROW, A_WORD] = a
                    B = np.full((WARPS, NJ, 8, 8, epw), np.nan)
                    B[:, :, B_N, B_WORD] = b
                    A = A.reshape(WARPS, MI, 16, 8 * epw)
                    B = B.reshape(WARPS, NJ, 8, 8 * epw)
                    D = np.einsum("wmik,wnjk->wmnij", A, B)  # (WARPS, MI, NJ, 16, 8)
                    acc += np.transpose(D[:, :, :, C_ROW, C_COL], (0, 3, 1, 2, 4))
                if row_scale is None and tile == 0:
                    for th in range(THREADS):  # thread th: row th, the whole slice in order
                        for e in range(elems):
                            col = kt * elems + e
                            if col < d:
                                v = np.float32(smem[(xs + th * PITCH_WORDS) * epw + e])
                                if center is not None:
                                    v = np.float32(v - center[col])
                                row_sq[th] = np.float32(row_sq[th] + np.float32(v * v))
            # epilogue of the tile: each thread's own 8 columns in increasing order (strict >)
            tile_val = np.full((WARPS, 32, MI, 2), -np.inf)
            tile_idx = np.full((WARPS, 32, MI, 2), np.iinfo(np.int32).max)
            for wp in range(WARPS):
                for ln in range(32):
                    tt = ln % 4
                    for m in range(MI):
                        for h in range(2):
                            bv, bi = -np.inf, np.iinfo(np.int32).max
                            for nj in range(NJ):
                                for e in range(2):
                                    col = j0 + warp_n[wp] * WARP_CENTS + nj * 8 + 2 * tt + e
                                    if col < k:
                                        v = np.float32(s[col] * np.float32(np.float32(acc[wp, ln, m, nj, 2 * h + e]) - o[col]))
                                        if v > bv:
                                            bv, bi = v, col
                            tile_val[wp, ln, m, h], tile_idx[wp, ln, m, h] = bv, bi
            # quad shuffles (xor 1, 2) with the tie rule, then the running best
            for wp in range(WARPS):
                for m in range(MI):
                    for h in range(2):
                        vals, idxs = tile_val[wp, :, m, h], tile_idx[wp, :, m, h]
                        for off in (1, 2):
                            ov, oi = vals[LANE ^ off], idxs[LANE ^ off]
                            take = better(ov, oi, vals, idxs)
                            vals, idxs = np.where(take, ov, vals), np.where(take, oi, idxs)
                        take = better(vals, idxs, run_val[wp, :, m, h], run_idx[wp, :, m, h])
                        run_val[wp, :, m, h] = np.where(take, vals, run_val[wp, :, m, h])
                        run_idx[wp, :, m, h] = np.where(take, idxs, run_idx[wp, :, m, h])
        # merge across warp_n and write
        red_val = np.full((WARPS_N, ROWS), np.nan)
        red_idx = np.full((WARPS_N, ROWS), -7)
        for wp in range(WARPS):
            for ln in range(32):
                if ln % 4 != 0:
                    continue
                for m in range(MI):
                    for h in range(2):
                        r = warp_m[wp] * WARP_ROWS + m * 16 + ln // 4 + 8 * h
                        red_val[warp_n[wp], r] = run_val[wp, ln, m, h]
                        red_idx[warp_n[wp], r] = run_idx[wp, ln, m, h]
        row_scale_s = np.full(ROWS, np.nan, np.float32)
        for th in range(THREADS):
            r = np.float32(0)
            if th < rows:
                if row_scale is not None:
                    r = np.float32(row_scale[row0 + th])
                else:
                    r = np.float32(1 / np.sqrt(np.float32(row_sq[th]))) if row_sq[th] > 0 else np.float32(0)
            row_scale_s[th] = r
        for th in range(rows):
            bv, bi = red_val[0, th], red_idx[0, th]
            for wn in range(1, WARPS_N):
                if better(red_val[wn, th], red_idx[wn, th], bv, bi):
                    bv, bi = red_val[wn, th], red_idx[wn, th]
            r = row_scale_s[th]
            label, score = 0, np.float32(0)
            if r > 0:
                label = bi if 0 <= bi < k else 0
                score = np.float32(r * bv)
            labels[row0 + th] = label
            scores[row0 + th] = score
            rscale_all[row0 + th] = r
    return labels, scores, rscale_all



def _case(rng, n, d, k, dtype, stride_pad=0, duplicates=0, zero_rows=0, center=False, scales=False):
    C = rng.standard_normal((k, d)).astype(np.float32)
    if duplicates:
        for j in rng.choice(np.arange(1, k), size=min(duplicates, k - 1), replace=False):
            C[j] = C[rng.integers(0, j)]
    X = (2.0 * C[rng.integers(0, k, n)] + rng.standard_normal((n, d))).astype(np.float32)
    if center:
        X += 3.0
    X[rng.choice(n, size=min(zero_rows, n), replace=False)] = 3.0 if center else 0.0
    X = round_operand(X, dtype) if dtype != "float32" else X
    stride = d + stride_pad
    # NaN between rows and nothing past the last one: a read outside the rows shows up.
    buf = np.full(n * stride, np.nan, np.float32)
    for i in range(n):
        buf[i * stride:i * stride + d] = X[i]
    kw = {}
    if center:
        kw["center"] = np.full(d, 3.0, np.float32)
    if scales:
        kw["row_scale"] = (rng.random(n) * (rng.random(n) > 0.2)).astype(np.float32)
        kw["col_scale"] = (rng.standard_normal(k) * 2).astype(np.float32)
    return X, C, buf, stride, kw


def _reference(X, C, dtype, center=None, row_scale=None, col_scale=None, x_round=round_tf32):
    """float64 scores of the rounded operands (what exact tensor-core products would give);
    x_round: how the kernel's tensor cores see float32 x."""
    Cr = round_operand(C, dtype).astype(np.float64)
    Xr = (x_round(X) if dtype == "float32" else X).astype(np.float64)
    Xc = X.astype(np.float64) - (center if center is not None else 0)
    dots = Xr @ Cr.T - (Cr @ center if center is not None else 0)
    r = row_scale.astype(np.float64) if row_scale is not None else np.where(
        (Xc ** 2).sum(1) > 0, 1 / np.sqrt(np.maximum((Xc ** 2).sum(1), 1e-300)), 0)
    s = col_scale.astype(np.float64) if col_scale is not None else 1 / np.sqrt((C.astype(np.float64) ** 2).sum(1))
    return r, dots * s[None, :]


SHAPES = [
    # n, d, k, dtype, stride_pad, extras
    (1, 1, 1, "float32", 0, {}),
    (5, 3, 2, "float32", 0, {}),
    (130, 37, 131, "float32", 0, dict(duplicates=20, zero_rows=4)),
    (129, 70, 129, "bfloat16", 0, dict(duplicates=10, zero_rows=3)),
    (70, 65, 40, "float16", 3, dict(zero_rows=2)),
    (140, 33, 260, "float32", 5, dict(center=True, zero_rows=3)),
    (60, 96, 20, "bfloat16", 0, dict(scales=True)),
    (100, 130, 7, "float32", 0, dict(scales=True, center=True)),
    (40, 300, 150, "float32", 1, dict(duplicates=5, zero_rows=1)),
    (50, 200, 30, "bfloat16", 2, dict(center=True)),
    (30, 513, 3, "float16", 0, {}),
]


@pytest.mark.parametrize("n,d,k,dtype,stride_pad,extras", SHAPES)
@pytest.mark.parametrize("aligned", [True, False])
def test_emulated_tensor_core_kernel_matches_numpy(n, d, k, dtype, stride_pad, extras, aligned):
    if not aligned and (n, d) != (130, 37) and (n, d) != (70, 65):
        pytest.skip("the unaligned loader is replayed on two shapes (slow in numpy)")
    rng = np.random.default_rng(n * 1000 + d * 10 + k)
    X, C, buf, stride, kw = _case(rng, n, d, k, dtype, stride_pad, **extras)
    labels, scores, r = emulate(buf, n, d, stride, C, dtype, aligned=aligned, **kw)
    _check_replay(labels, scores, r, _reference(X, C, dtype, **kw), C, kw)


def _check_replay(labels, scores, r, reference, C, kw):
    """A replay's labels, scores and row scales against `_reference` (r_ref, S)."""
    r_ref, S = reference
    n, k = S.shape
    # Every row written.
    assert (labels >= 0).all() and np.isfinite(scores).all()
    np.testing.assert_allclose(r, r_ref, rtol=1e-5, atol=0)
    live = r_ref > 0
    assert (labels[~live] == 0).all() and (scores[~live] == 0).all()
    best = S.max(axis=1)
    scale = np.abs(S).max(axis=1) + 1e-30
    chosen = S[np.arange(n), labels]
    # Labels: the best centroid up to float32 rounding of the epilogue (operands are rounded
    # exactly as the kernel rounds them, so no tensor-core tolerance is needed here) ...
    ok = chosen >= best - 1e-6 * scale
    assert ok[live].all(), (np.flatnonzero(live & ~ok)[:10], labels[live & ~ok][:10], np.argmax(S, 1)[live & ~ok][:10])
    # ... and among exact duplicate centroids (same row, same scale) the lowest index.
    key = [C[j].tobytes() + (kw["col_scale"][j].tobytes() if "col_scale" in kw else b"") for j in range(k)]
    first = {}
    lowest = np.array([first.setdefault(kk, j) for j, kk in enumerate(key)])
    assert (lowest[labels[live]] == labels[live]).all()
    np.testing.assert_allclose(scores[live], (r_ref * chosen)[live], rtol=1e-5, atol=1e-6)


# ---- the sorted cluster-sum pass (histogram, scan, scatter, segmented sums) -----------------
SCAN_THREADS, SEG_ROWS, SEG_THREADS, SEG_COLS = 1024, 256, 128, 4


def emulate_sorted_sums(x_buf, n, d, x_stride, labels, rscale, k, center=None):
    counts = np.bincount(labels, minlength=k).astype(np.int64)  # histogram_kernel
    # scan_kernel: thread tid sums counts[tid*per : ...], thread 0 scans the partials serially.
    per = (k + SCAN_THREADS - 1) // SCAN_THREADS
    part = np.zeros(SCAN_THREADS, np.int64)
    for tid in range(SCAN_THREADS):
        b, e = tid * per, min(tid * per + per, k)
        part[tid] = counts[b:e].sum() if b < e else 0
    part = np.concatenate([[0], np.cumsum(part)[:-1]])
    cursor = np.zeros(k, np.int64)
    for tid in range(SCAN_THREADS):
        run = part[tid]
        for l in range(tid * per, min(tid * per + per, k)):
            cursor[l] = run
            run += counts[l]
    # scatter_kernel, in an arbitrary order (the atomics' order is not defined)
    perm = np.full(n, -1)
    for i in np.random.default_rng(0).permutation(n):
        perm[cursor[labels[i]]] = i
        cursor[labels[i]] += 1
    assert (perm >= 0).all()
    sums = np.zeros((k, d))
    for block in range(-(-n // SEG_ROWS)):
        q0 = block * SEG_ROWS
        count = min(n - q0, SEG_ROWS)
        row_s = perm[q0:q0 + count]
        label_s = labels[row_s]
        r_s = rscale[row_s]
        for tid in range(SEG_THREADS):
            for c0 in range(0, d, SEG_THREADS * SEG_COLS):
                cols = [c0 + tid + SEG_THREADS * u for u in range(SEG_COLS)]
                acc = [0.0] * SEG_COLS
                anyl = False
                for q in range(count):
                    if r_s[q] > 0:
                        for u, c in enumerate(cols):
                            if c < d:
                                v = np.float32(x_buf[row_s[q] * x_stride + c] - (center[c] if center is not None else 0))
                                acc[u] += float(r_s[q]) * float(v)
                        anyl = True
                    if q + 1 == count or label_s[q + 1] != label_s[q]:
                        if anyl:
                            for u, c in enumerate(cols):
                                if c < d:
                                    sums[label_s[q], c] += acc[u]
                                acc[u] = 0.0
                        anyl = False
    return sums, counts


@pytest.mark.parametrize("n,d,k", [(1, 1, 1), (300, 5, 3), (600, 130, 1030), (257, 600, 40)])
def test_emulated_sorted_sums_match_numpy(n, d, k):
    rng = np.random.default_rng(n + d + k)
    X = rng.standard_normal((n, d)).astype(np.float32)
    labels = rng.integers(0, k, n) if k > 40 else np.minimum(rng.geometric(0.3, n) - 1, k - 1)
    rscale = (rng.random(n) * (rng.random(n) > 0.1)).astype(np.float32)
    center = rng.standard_normal(d).astype(np.float32)
    sums, counts = emulate_sorted_sums(X.ravel(), n, d, d, labels, rscale, k, center=center)
    ref = np.zeros((k, d))
    live = rscale > 0
    np.add.at(ref, labels[live], rscale[live, None].astype(np.float64) * (X - center)[live].astype(np.float64))
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=k))
    np.testing.assert_allclose(sums, ref, rtol=1e-12, atol=1e-12)


# ---- the owned-column cluster sums (column_sums_kernel + reduce_fused_partials) -------------
COL_MAX_WARPS, COL_MAX_ROWS, COL_MIN_ROWS = 16, 4096, 256


def column_blocks(n, resident):
    """launch_cluster_sums' partition: (blocks, rows per block)."""
    blocks = resident * -(-n // (resident * COL_MAX_ROWS))
    blocks = min(blocks, -(-n // COL_MIN_ROWS))
    rows = -(-n // blocks)
    return -(-n // rows), rows


def emulate_column_sums(x_buf, n, d, x_stride, labels, rscale, k, item, center=None, resident=132):
    """sums (float64) and counts as the owned-column pass computes them: per block, warp w's
    slices of 32 lanes x E columns (E = 4 / item bytes for 16-bit, else 1), rows in groups of
    16 / E loaded two at a time, float32 fma per (label, column) in row order; then the blocks'
    partials in block order in float64."""
    e_cols = 4 // item if item < 4 else 1
    group = 16 // e_cols
    slices = -(-d // (32 * e_cols))
    warps = min(slices, COL_MAX_WARPS)
    blocks, per = column_blocks(n, resident)
    sums = np.zeros((k, d))
    counts = np.zeros(k, np.int64)
    ctr = np.zeros(d, np.float32) if center is None else center.astype(np.float32)
    for block in range(blocks):
        part = np.zeros((k, d), np.float32)
        pcount = np.zeros(k, np.int64)
        begin, end = block * per, min(n, block * per + per)
        for warp in range(warps):
            for sl in range(warp, slices, warps):
                cols = sl * 32 * e_cols + np.arange(32 * e_cols)  # lane l: columns l*E .. l*E + E - 1
                on = cols < d
                cols = cols[on]
                seen = []

                def load(row0):
                    g = []
                    for u in range(group):
                        row = row0 + u
                        if row < end:
                            v = (x_buf[row * x_stride + cols].astype(np.float32) - ctr[cols]).astype(np.float32)
                            g.append((int(labels[row]), np.float32(rscale[row]), v))
                        else:
                            g.append((-1, np.float32(0), None))
                    return g

                def add(g):
                    for label, r, v in g:
                        if label < 0:
                            continue
                        seen.append(label)
                        if sl == 0:
                            pcount[label] += 1
                        if r > 0:  # fmaf: one rounding of r * v + acc
                            part[label, cols] = (np.float64(r) * v + part[label, cols]).astype(np.float32)

                a = load(begin)
                for row in range(begin, end, 2 * group):
                    b = load(row + group)
                    add(a)
                    a = load(row + 2 * group)
                    add(b)
                assert len(seen) == end - begin  # every row of the block, once per slice
        sums += part
        counts += pcount
    return sums, counts, blocks, per


@pytest.mark.parametrize("n,d,k,item", [(1, 1, 1, 4), (300, 5, 3, 4), (5000, 130, 40, 4), (257, 600, 7, 2),
                                        (9000, 64, 64, 2), (70_000, 33, 2, 4)])
def test_emulated_column_sums_match_numpy(n, d, k, item):
    rng = np.random.default_rng(n + d + k + item)
    X = rng.standard_normal((n, d)).astype(np.float32)
    labels = np.minimum(rng.geometric(0.3, n) - 1, k - 1)
    rscale = (rng.random(n) * (rng.random(n) > 0.1)).astype(np.float32)
    center = rng.standard_normal(d).astype(np.float32)
    sums, counts, blocks, per = emulate_column_sums(X.ravel(), n, d, d, labels, rscale, k, item, center=center,
                                                    resident=5)
    assert per <= COL_MAX_ROWS and (blocks - 1) * per < n <= blocks * per
    assert blocks <= -(-n // COL_MIN_ROWS)  # small inputs: few partials
    ref = np.zeros((k, d))
    absref = np.zeros((k, d))
    live = rscale > 0
    terms = rscale[live, None].astype(np.float64) * (X - center)[live].astype(np.float64)
    np.add.at(ref, labels[live], terms)
    np.add.at(absref, labels[live], np.abs(terms))
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=k))
    # float32 runs of at most `per` rows: within (run length) x 2^-24 of the sum of magnitudes
    assert np.all(np.abs(sums - ref) <= per * 2.0**-24 * absref + 1e-30)


# ---- the fused small-k kernel (assign_tc_fused_kernel + reduce_fused_partials) -------------
# A persistent block loops over 128-row tiles: phase 1 (8 warps of 16 rows x 64 centroids, the
# argmax), phase 2 (the rows streamed again through the ring, warp w adding rows w, w + 8, ..
# into the float32 shared sums of their labels with shared-memory atomics), then per-block
# partials added in block order.
F_CENTS, F_WARPS = 64, 8
F_THREADS = 32 * F_WARPS
F_WARP_ROWS = ROWS // F_WARPS
F_NJ = F_CENTS // 8
F_TILE_WORDS = (ROWS + F_CENTS) * PITCH_WORDS
F_LOAD_ROWS = F_THREADS // 8
F_PIPE_BYTES = STAGES * F_TILE_WORDS * 4
F2_STAGE_WORDS = ROWS * PITCH_WORDS  # phase 2: x slices only, as many as fit the ring memory
F2_STAGES = F_PIPE_BYTES // 4 // F2_STAGE_WORDS


def test_fused_kernel_constants():
    assert F_WARP_ROWS == 16 and F_PIPE_BYTES == 82944 and F2_STAGES == 4
    # k = 64, D = 512 float32 sums next to the pipeline and the static arrays fit Hopper's 227 KB.
    assert F_PIPE_BYTES + 64 * 512 * 4 + 4 * ROWS * 4 + F_CENTS * 4 <= 227 * 1024


def emulate_fused(x_buf, n, d, x_stride, C, dtype, center=None, row_scale=None, col_scale=None, grid=2):
    """labels, scores, sums (float64 after the reduction), counts, and how often each (row,
    column) was added (must be once for every live row) as the fused kernel computes them."""
    item = ITEM[dtype]
    elems = SLICE_BYTES // item
    chunk_elems = 16 // item
    epw = 4 // item
    k = C.shape[0]
    assert k <= F_CENTS and (x_stride * item) % 16 == 0
    d_pad = -(-d // elems) * elems
    k_steps = d_pad // elems
    cw, s, o = prepare_centroids(C, dtype, F_CENTS, d_pad, center, col_scale)
    n_tiles = -(-n // ROWS)
    grid = min(grid, n_tiles)
    labels = np.full(n, -1, np.int64)
    scores = np.full(n, np.nan, np.float32)
    cover = np.zeros((n, d), np.int64)
    part_sums = np.full((grid, k * d), np.nan, np.float32)
    part_counts = np.full((grid, k), -1, np.int64)
    tid = np.arange(F_THREADS)
    g, t = LANE // 4, LANE % 4

    for block in range(grid):
        smem = np.full(STAGES * F_TILE_WORDS * epw, np.nan)  # stale between tiles, as on the GPU
        sums_s = np.zeros(k * d, np.float32)
        counts_s = np.zeros(F_CENTS, np.int64)
        for tile in range(block, n_tiles, grid):
            row0 = tile * ROWS
            rows = min(n - row0, ROWS)

            def load(stage, kt, with_c):  # fused_load_stage
                chunk = tid % 8
                col = kt * elems + chunk * chunk_elems
                for i in range(ROWS // F_LOAD_ROWS):
                    r = tid // 8 + F_LOAD_ROWS * i
                    for th in range(F_THREADS):
                        grow = row0 + r[th]
                        valid = 0
                        if grow < n:
                            rem = d - col[th]
                            valid = (rem if rem > 0 else 0) if rem < chunk_elems else chunk_elems
                        vals = np.zeros(chunk_elems)
                        base = grow * x_stride + col[th]
                        vals[:valid] = x_buf[base:base + valid]
                        dst = (stage + r[th] * PITCH_WORDS + chunk[th] * 4) * epw
                        smem[dst:dst + chunk_elems] = vals
                if with_c:
                    for i in range(F_CENTS // F_LOAD_ROWS):
                        r = tid // 8 + F_LOAD_ROWS * i
                        for th in range(F_THREADS):
                            dst = (stage + (ROWS + r[th]) * PITCH_WORDS + chunk[th] * 4) * epw
                            smem[dst:dst + chunk_elems] = cw[r[th], col[th]:col[th] + chunk_elems]

            def words(idx):
                return smem[idx[..., None] * epw + np.arange(epw)]

            # phase 1
            acc = np.zeros((F_WARPS, 32, F_NJ, 4))
            # row norms: thread th sums its own chunk th % 8 of rows th // 8 + 32 i
            row_part = np.zeros((F_THREADS, ROWS // F_LOAD_ROWS), np.float32)
            for s_ in range(STAGES - 1):
                if s_ < k_steps:
                    load(s_ * F_TILE_WORDS, s_, True)
            for kt in range(k_steps):
                if kt + STAGES - 1 < k_steps:
                    load(((kt + STAGES - 1) % STAGES) * F_TILE_WORDS, kt + STAGES - 1, True)
                xs = (kt % STAGES) * F_TILE_WORDS
                cs = xs + ROWS * PITCH_WORDS
                for ks in range(SLICE_BYTES // 4 // 8):
                    w = ks * 8 + t
                    base_a = xs + (np.arange(F_WARPS)[:, None] * F_WARP_ROWS + g[None, :]) * PITCH_WORDS + w[None, :]
                    a = words(np.stack([base_a, base_a + 8 * PITCH_WORDS, base_a + 4, base_a + 8 * PITCH_WORDS + 4], -1))
                    if dtype == "float32":
                        a = round_tf32(a).astype(np.float64)
                    base_b = cs + (np.arange(F_NJ)[:, None] * 8 + g[None, :]) * PITCH_WORDS + w[None, :]
                    b = words(np.stack([base_b, base_b + 4], -1))  # (F_NJ, 32, 2, epw)
                    A = np.full((F_WARPS, 16, 8, epw), np.nan)
                    A[:, A_ROW, A_WORD] = a
                    B = np.full((F_NJ, 8, 8, epw), np.nan)
                    B[:, B_N, B_WORD] = b
                    D = np.einsum("wik,njk->wnij", A.reshape(F_WARPS, 16, -1), B.reshape(F_NJ, 8, -1))
                    acc += np.transpose(D[:, :, C_ROW, C_COL], (0, 2, 1, 3))
                if row_scale is None:
                    for i in range(ROWS // F_LOAD_ROWS):
                        for u in range(chunk_elems):
                            col = kt * elems + (tid % 8) * chunk_elems + u  # (F_THREADS,)
                            ok = col < d
                            v = smem[(xs + (tid // 8 + F_LOAD_ROWS * i) * PITCH_WORDS + (tid % 8) * 4) * epw + u]
                            v = v.astype(np.float32)
                            if center is not None:
                                v = (v - np.where(ok, center[np.minimum(col, d - 1)], 0)).astype(np.float32)
                            upd = (np.float64(v) * v + row_part[:, i]).astype(np.float32)
                            row_part[:, i] = np.where(ok, upd, row_part[:, i])
            for off in (1, 2, 4):  # butterfly over the 8 threads of a row
                row_part = (row_part + row_part[tid ^ off]).astype(np.float32)
            row_sq = np.zeros(ROWS, np.float32)
            for i in range(ROWS // F_LOAD_ROWS):
                row_sq[tid[::8] // 8 + F_LOAD_ROWS * i] = row_part[::8, i]
            best_val = np.full(ROWS, np.nan)
            best_idx = np.full(ROWS, -7)
            for wp in range(F_WARPS):
                for h in range(2):
                    vals = np.full(32, -np.inf)
                    idxs = np.full(32, np.iinfo(np.int32).max)
                    for ln in range(32):
                        for nj in range(F_NJ):
                            for e in range(2):
                                col = nj * 8 + 2 * (ln % 4) + e
                                if col < k:
                                    v = np.float32(s[col] * np.float32(np.float32(acc[wp, ln, nj, 2 * h + e]) - o[col]))
                                    if v > vals[ln]:
                                        vals[ln], idxs[ln] = v, col
                    for off in (1, 2):
                        ov, oi = vals[LANE ^ off], idxs[LANE ^ off]
                        take = better(ov, oi, vals, idxs)
                        vals, idxs = np.where(take, ov, vals), np.where(take, oi, idxs)
                    for ln in range(0, 32, 4):
                        r = wp * F_WARP_ROWS + ln // 4 + 8 * h
                        best_val[r], best_idx[r] = vals[ln], idxs[ln]
            rs = np.zeros(ROWS, np.float32)
            for th in range(rows):
                if row_scale is not None:
                    rs[th] = row_scale[row0 + th]
                else:
                    rs[th] = np.float32(1 / np.sqrt(row_sq[th])) if row_sq[th] > 0 else 0
            label_s = np.zeros(ROWS, np.int64)
            for th in range(rows):
                label, score = 0, np.float32(0)
                if rs[th] > 0:
                    label = best_idx[th] if 0 <= best_idx[th] < k else 0
                    score = np.float32(rs[th] * best_val[th])
                labels[row0 + th], scores[row0 + th] = label, score
                label_s[th] = label
            for th in range(rows):  # atomicAdd(counts_s + label, 1)
                counts_s[label_s[th]] += 1
            # phase 2 (its prologue was issued before the argmax: no data dependence on it)
            for s_ in range(F2_STAGES - 1):
                if s_ < k_steps:
                    load(s_ * F2_STAGE_WORDS, s_, False)
            for kt in range(k_steps):
                if kt + F2_STAGES - 1 < k_steps:
                    load(((kt + F2_STAGES - 1) % F2_STAGES) * F2_STAGE_WORDS, kt + F2_STAGES - 1, False)
                xs = (kt % F2_STAGES) * F2_STAGE_WORDS
                col0 = kt * elems + LANE * epw  # (32,)
                live_lane = col0 < d
                ctr = np.zeros((32, epw), np.float32)
                for e in range(epw):
                    ok = col0 + e < d
                    if center is not None:
                        ctr[ok, e] = center[col0[ok] + e]
                for wp in range(F_WARPS):  # rows wp, wp + 8, ..; shared atomics (float32)
                    for m in range(wp, rows, F_WARPS):
                        r = rs[m]
                        if r > 0:
                            v = (words(xs + m * PITCH_WORDS + LANE).astype(np.float32) - ctr).astype(np.float32)
                            add = (np.float32(r) * v).astype(np.float32)
                            for e in range(epw):
                                ok = live_lane & (col0 + e < d)
                                idx = label_s[m] * d + col0[ok] + e
                                sums_s[idx] = (sums_s[idx] + add[ok, e]).astype(np.float32)
                                cover[row0 + m, col0[ok] + e] += 1
        part_sums[block] = sums_s
        part_counts[block] = counts_s[:k]
    sums = part_sums.astype(np.float64).sum(0).reshape(k, d)
    counts = part_counts.sum(0)
    return labels, scores, sums, counts, cover


FUSED_SHAPES = [
    # n, d, k, dtype, stride_pad, extras, grid
    (1, 1, 1, "float32", 3, {}, 1),
    (300, 37, 5, "float32", 3, dict(duplicates=2, zero_rows=4), 2),
    (260, 70, 64, "bfloat16", 2, dict(duplicates=10, zero_rows=3), 2),
    (200, 65, 1, "float16", 7, {}, 1),
    (129, 33, 40, "float32", 3, dict(center=True, zero_rows=3), 2),
    (150, 96, 20, "bfloat16", 0, dict(scales=True), 3),
    (140, 130, 7, "float32", 2, dict(scales=True, center=True), 1),
]


@pytest.mark.parametrize("n,d,k,dtype,stride_pad,extras,grid", FUSED_SHAPES)
def test_emulated_fused_kernel_matches_numpy(n, d, k, dtype, stride_pad, extras, grid):
    rng = np.random.default_rng(n * 7 + d * 3 + k)
    X, C, buf, stride, kw = _case(rng, n, d, k, dtype, stride_pad, **extras)
    labels, scores, sums, counts, cover = emulate_fused(buf, n, d, stride, C, dtype, grid=grid, **kw)
    r_ref, S = _reference(X, C, dtype, **kw)
    assert (labels >= 0).all() and np.isfinite(scores).all()
    live = r_ref > 0
    assert (labels[~live] == 0).all() and (scores[~live] == 0).all()
    best = S.max(axis=1)
    scale = np.abs(S).max(axis=1) + 1e-30
    chosen = S[np.arange(n), labels]
    assert (chosen >= best - 1e-6 * scale)[live].all()
    np.testing.assert_allclose(scores[live], (r_ref * chosen)[live], rtol=1e-5, atol=1e-6)
    # Every live row added exactly once to every column, the others never.
    assert (cover[live] == 1).all() and (cover[~live] == 0).all()
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=k))
    Xc = X.astype(np.float64) - (kw["center"] if "center" in kw else 0)
    ref = np.zeros((k, d))
    np.add.at(ref, labels[live], r_ref[live, None].astype(np.float32).astype(np.float64) * Xc[live])
    np.testing.assert_allclose(sums, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


# ---- the opt-in TF32 "A^T B" of `moments` / `signal_moments` (gram_tf32_kernel, gram_tc.cuh) --
G_TILE, G_THREADS, G_SLICE, G_PITCH, G_STAGES = 128, 128, 32, 136, 3
G_STAGE_WORDS = 2 * G_SLICE * G_PITCH


def test_gram_tf32_fragment_loads_are_conflict_free():
    g, t = LANE // 4, LANE % 4
    for base in (0, 8, 4 * G_PITCH, 4 * G_PITCH + 8):
        assert len(set(((t * G_PITCH + g + base) % 32).tolist())) == 32


def emulate_gram_tf32(ops, n, rows_per_split, symmetric):
    """C (P x Q) as gram_tf32_kernel adds it, with every index formula of the kernel. ops: two
    (buf, ld, cols, offsets or None) operands (float32 flat buffers, float64 offsets); shared
    memory starts as NaN in every block so a read of an unwritten word shows."""
    assert rows_per_split % G_SLICE == 0
    P, Q = ops[0][2], ops[1][2]
    tiles_p, tiles_q = -(-P // G_TILE), -(-Q // G_TILE)
    out = np.zeros((P, Q))
    tid = np.arange(G_THREADS)
    chunk = tid % 32
    g, t = LANE // 4, LANE % 4
    for tile_p in range(tiles_p):
        for tile_q in range(tiles_q):
            if symmetric and tile_q < tile_p:
                continue
            shared = symmetric and tile_p == tile_q
            p0, q0 = tile_p * G_TILE, tile_q * G_TILE
            operands = 1 if shared else 2
            valid_cols, hi, lo = [], [], []
            for o in range(2):
                _, _, cols, off = ops[o]
                c0 = (p0 if o == 0 else q0) + 4 * chunk
                valid_cols.append(np.clip(cols - c0, 0, 4))
                m = np.array([[(off[c + e] if off is not None else 0.0) if e < v else 0.0 for e in range(4)]
                              for c, v in zip(c0, valid_cols[o])])
                h = m.astype(np.float32)
                hi.append(h)
                lo.append((m - h.astype(np.float64)).astype(np.float32))
            for split in range(-(-n // rows_per_split)):
                n_begin = split * rows_per_split
                n_end = min(n, n_begin + rows_per_split)
                steps = -(-(n_end - n_begin) // G_SLICE)
                smem = np.full(G_STAGES * G_STAGE_WORDS, np.nan, np.float32)
                acc = np.zeros((4, 32, 4, 8, 4))  # warp, lane, mi, nj, reg

                def load(step, stage):
                    r0 = n_begin + step * G_SLICE
                    for o in range(operands):
                        buf, ld = ops[o][0], ops[o][1]
                        c0 = (p0 if o == 0 else q0) + 4 * chunk
                        for i in range(G_SLICE // 4):
                            r = tid // 32 + 4 * i
                            for th in range(G_THREADS):
                                row = r0 + r[th]
                                valid = valid_cols[o][th] if row < n_end else 0
                                vals = np.zeros(4, np.float32)
                                vals[:valid] = buf[row * ld + c0[th]: row * ld + c0[th] + valid]
                                w = stage + (o * G_SLICE + r[th]) * G_PITCH + 4 * chunk[th]
                                smem[w:w + 4] = vals

                def centre(step, stage):
                    r0 = n_begin + step * G_SLICE
                    for o in range(operands):
                        for i in range(G_SLICE // 4):
                            r = tid // 32 + 4 * i
                            for th in range(G_THREADS):
                                if r0 + r[th] < n_end:
                                    w = stage + (o * G_SLICE + r[th]) * G_PITCH + 4 * chunk[th]
                                    v = (smem[w:w + 4] - hi[o][th]) - lo[o][th]
                                    v[np.arange(4) >= valid_cols[o][th]] = 0
                                    smem[w:w + 4] = round_tf32(v)

                for s_ in range(G_STAGES - 1):
                    if s_ < steps:
                        load(s_, s_ * G_STAGE_WORDS)
                for step in range(steps):
                    stage = (step % G_STAGES) * G_STAGE_WORDS
                    centre(step, stage)
                    if step + G_STAGES - 1 < steps:
                        load(step + G_STAGES - 1, ((step + G_STAGES - 1) % G_STAGES) * G_STAGE_WORDS)
                    as_, bs = stage, stage if shared else stage + G_SLICE * G_PITCH
                    for ks in range(G_SLICE // 8):
                        arow = as_ + (ks * 8 + t) * G_PITCH  # (32,)
                        brow = bs + (ks * 8 + t) * G_PITCH
                        for warp in range(4):
                            wm, wn = warp // 2, warp % 2
                            for mi in range(4):
                                pc = wm * 64 + mi * 16 + g
                                a = np.stack([smem[arow + pc], smem[arow + pc + 8], smem[arow + 4 * G_PITCH + pc],
                                              smem[arow + 4 * G_PITCH + pc + 8]], -1).astype(np.float64)
                                A = np.full((16, 8), np.nan)
                                A[A_ROW, A_WORD] = a
                                for nj in range(8):
                                    qc = wn * 64 + nj * 8 + g
                                    b = np.stack([smem[brow + qc], smem[brow + 4 * G_PITCH + qc]], -1).astype(np.float64)
                                    B = np.full((8, 8), np.nan)  # [n][k]
                                    B[B_N, B_WORD] = b
                                    acc[warp, :, mi, nj, :] += (A @ B.T)[C_ROW, C_COL]
                for warp in range(4):
                    wm, wn = warp // 2, warp % 2
                    for mi in range(4):
                        for nj in range(8):
                            for r in range(4):
                                pp = p0 + wm * 64 + mi * 16 + g + 8 * (r // 2)
                                qq = q0 + wn * 64 + nj * 8 + 2 * t + r % 2
                                ok = (pp < P) & (qq < Q)
                                np.add.at(out, (pp[ok], qq[ok]), acc[warp, ok, mi, nj, r])
    return out


def _padded_buffer(X, ld):
    buf = np.full(X.shape[0] * ld + 8, np.nan, np.float32)
    for i in range(X.shape[0]):
        buf[i * ld:i * ld + X.shape[1]] = X[i]
    return buf


def _tf32_centred(X, off):
    hi = off.astype(np.float32)
    lo = (off - hi.astype(np.float64)).astype(np.float32)
    return round_tf32((X - hi) - lo).astype(np.float64)


@pytest.mark.parametrize("n,d,stride_pad,rows_per_split", [(1, 1, 3, 32), (70, 5, 3, 32), (100, 130, 2, 64),
                                                           (40, 260, 0, 32)])
def test_emulated_moments_tf32_matches_numpy(n, d, stride_pad, rows_per_split):
    rng = np.random.default_rng(n + d)
    X = (rng.standard_normal((n, d)) + 50.0).astype(np.float32)  # offset data: centring matters
    stride = d + stride_pad
    buf = _padded_buffer(X, stride)
    mean = X.astype(np.float64).mean(0)
    op = (buf, stride, d, mean)
    m2 = emulate_gram_tf32([op, op], n, rows_per_split, symmetric=True)
    iu = np.triu_indices(d, 1)
    m2[iu[1], iu[0]] = m2[iu]  # mirror_upper_kernel
    Xr = _tf32_centred(X, mean)
    ref = Xr.T @ Xr
    assert np.isfinite(m2).all()
    np.testing.assert_allclose(m2, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    exact = (X - mean).T @ (X - mean)
    assert np.abs(m2 - exact).max() <= 2e-3 * np.abs(exact).max()


@pytest.mark.parametrize("n,d,concepts,stride_pad", [(1, 3, 2, 1), (90, 37, 70, 3), (70, 140, 2, 0)])
def test_emulated_signal_tf32_matches_numpy(n, d, concepts, stride_pad):
    """Kernel B of signal_moments: [M, M Z]^T x~ with the workspace (n, 2I) and x centred on a
    float32 centre; the output's first I rows are sum_x, the others sum_xz."""
    rng = np.random.default_rng(n * 3 + d + concepts)
    X = (rng.standard_normal((n, d)) + 2.0).astype(np.float32)
    center = rng.standard_normal(d).astype(np.float32)
    Z = rng.standard_normal((n, concepts)).astype(np.float32)
    M = (Z > 0).astype(np.float32)
    ws = np.concatenate([M, M * Z], 1)
    ws_ld = 2 * concepts + (-2 * concepts) % 4  # the kernel needs ld % 4 == 0; pad the emulation
    stride = d + stride_pad + (-(d + stride_pad)) % 4
    out = emulate_gram_tf32([(_padded_buffer(ws, ws_ld), ws_ld, 2 * concepts, None),
                             (_padded_buffer(X, stride), stride, d, center.astype(np.float64))],
                            n, 32, symmetric=False)
    ref = round_tf32(ws).astype(np.float64).T @ _tf32_centred(X, center.astype(np.float64))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-10 * max(np.abs(ref).max(), 1e-30))


# ---- the wgmma labelling kernel (assign_wgmma_cuda.cu, EDPAIRS_ASSIGN_KERNEL=wgmma) ----------
# Two warpgroups of 64 rows share centroid tiles of N = 64, 128 or 256 (wgmma_tile_cents: the
# narrowest that holds k, else 256); 128-byte slices of x and of the tile land through a
# cp.async ring (Ring<N>: 4 stages two iterations ahead for N = 64 and 256, 6 stages four ahead
# for N = 128), in the 128-byte swizzle that the wgmma operand descriptors read (K-major, 8-row
# groups 1024 bytes apart). The hardware's reading of a descriptor is modelled by
# `sw128_address`; the accumulator layout by `wgmma_d_layout`.
W_ROWS, W_CENTS, W_THREADS = 128, 256, 256
W_X_TILE = W_ROWS * SLICE_BYTES
W_LOAD_ROWS = W_THREADS // 8
W_WIDTHS = (64, 128, 256)


def w_tile_cents(k):
    """The kernel's wgmma_tile_cents."""
    return 64 if k <= 64 else (128 if k <= 128 else W_CENTS)


def w_ring(cents):
    """(stage bytes, stages, iterations ahead) of the kernel's Ring<cents>."""
    stages = 6 if cents == 128 else 4
    return W_X_TILE + cents * SLICE_BYTES, stages, stages - 2


def w_swizzled(r, c):
    """The kernel's `swizzled`: byte offset of chunk c (16 bytes) of row r in an operand tile."""
    return (r >> 3) * 1024 + (r & 7) * 128 + ((c ^ (r & 7)) << 4)


def sw128_address(start, m, kbyte):
    """Where the tensor cores read byte kbyte (of the K direction) of row m of a K-major operand
    whose descriptor starts at `start`, with the 128-byte swizzle and a stride byte offset of
    1024 (PTX ISA, "Shared memory matrix layout"): the address is formed without the swizzle,
    then its bits 4-6 are XORed with its bits 7-9."""
    logical = start + (m // 8) * 1024 + (m % 8) * 128 + kbyte
    return logical ^ (((logical >> 7) & 7) << 4)


def wgmma_d_layout(cents=W_CENTS):
    """(row, column) of accumulator register i of lane l of warp v of a warpgroup, m64n<cents>."""
    v = np.arange(4)[:, None, None]
    lane = np.arange(32)[None, :, None]
    i = np.arange(cents // 2)[None, None, :]
    return np.broadcast_arrays(16 * v + lane // 4 + 8 * ((i // 2) % 2), 8 * (i // 4) + 2 * (lane % 4) + i % 2)


def _w_loader(cents=W_CENTS):
    """(tid, pass) -> (row, chunk) of the kernel's load_iteration, for x (4 passes) and C
    (cents / 32)."""
    tid = np.arange(W_THREADS)
    rows_x = tid[:, None] // 8 + W_LOAD_ROWS * np.arange(W_ROWS // W_LOAD_ROWS)[None, :]
    rows_c = tid[:, None] // 8 + W_LOAD_ROWS * np.arange(cents // W_LOAD_ROWS)[None, :]
    return rows_x, rows_c, tid % 8


@pytest.mark.parametrize("cents", W_WIDTHS)
def test_wgmma_layouts_and_ring(cents):
    row, col = wgmma_d_layout(cents)
    assert len(set(zip(row.ravel(), col.ravel()))) == 64 * cents and row.max() == 63 and col.max() == cents - 1
    stage_bytes, stages, ahead = w_ring(cents)
    rows_x, rows_c, chunk = _w_loader(cents)
    for rows, tile in ((rows_x, W_X_TILE), (rows_c, cents * SLICE_BYTES)):
        off = w_swizzled(rows, chunk[:, None])
        assert len(set(off.ravel())) == off.size and off.max() + 16 <= tile and (off % 16 == 0).all()
        # Each quarter warp (8 consecutive threads) copies 128 contiguous bytes of one row into 8
        # distinct 16-byte bank groups (and reads them back so for the row norms).
        q = off.reshape(W_THREADS // 8, 8, -1)
        assert (np.sort((q // 16) % 8, axis=1) == np.arange(8)[None, :, None]).all()
        assert (rows.reshape(W_THREADS // 8, 8, -1) == rows.reshape(W_THREADS // 8, 8, -1)[:, :1]).all()
    assert stage_bytes % 1024 == 0 and W_X_TILE // 2 % 1024 == 0  # descriptor bases stay 1024-aligned
    # The ring: iteration it reads stage it % S while the batch of it - 1 may still be in flight,
    # and the copies of it + 1 .. it + ahead - 1 are in flight or landed; the copies issued in it
    # go to (it + ahead) % S, which must be none of them.
    for it in range(64):
        w = (it + ahead) % stages
        assert all(w != (it + j) % stages for j in range(-1, ahead))
    # Shared memory: the ring (+ 1 KB to align it) and the static arrays, blocks per SM.
    blocks = 2 if cents == 64 else 1
    assert blocks * (stages * stage_bytes + 1024 + 2048) <= 228 * 1024


@pytest.mark.parametrize("cents", W_WIDTHS)
def test_wgmma_descriptors_read_what_the_loader_wrote(cents):
    """Tag every 16-byte chunk the loader stores with its (row, chunk), then read each wgmma step's
    operands through the descriptor model: row m, K byte b of step s must be chunk 2 s + b // 16
    of the warpgroup's row (x) or of centroid m (C)."""
    rows_x, rows_c, chunk = _w_loader(cents)
    size = max(W_X_TILE, cents * SLICE_BYTES) // 16
    for rows, ops_rows, starts in ((rows_x, 64, [0, W_X_TILE // 2]), (rows_c, cents, [0])):
        tag_row = np.full(size, -1)
        tag_chunk = np.full(size, -1)
        off = w_swizzled(rows, chunk[:, None]) // 16
        tag_row[off] = rows
        tag_chunk[off] = np.broadcast_to(chunk[:, None], rows.shape)
        m = np.arange(ops_rows)[:, None]
        b = np.arange(32)[None, :]
        for wg, start in enumerate(starts):
            for s in range(SLICE_BYTES // 32):
                addr = sw128_address(start + 32 * s, m, b)
                assert (tag_row[addr // 16] == wg * 64 * (len(starts) == 2) + m).all()
                assert (tag_chunk[addr // 16] == 2 * s + b // 16).all()
                assert (addr % 16 == b % 16).all()


def round_tf32_truncate(v):
    """What the tensor cores use of a float32 operand read as TF32: the low 13 bits dropped."""
    b = np.asarray(v, np.float32).view(np.uint32) & np.uint32(0xFFFFE000)
    return b.view(np.float32)


def emulate_wgmma(x_buf, n, d, x_stride, C, dtype, center=None, row_scale=None, col_scale=None):
    """labels, scores, row scales as assign_wgmma_kernel computes them (prepare_centroids as in
    `emulate`, with k padded to the tile width w_tile_cents(k))."""
    item = ITEM[dtype]
    elems = SLICE_BYTES // item
    chunk_elems = 16 // item
    k = C.shape[0]
    cents = w_tile_cents(k)
    stage_bytes, n_stages, ahead = w_ring(cents)
    d_pad = -(-d // elems) * elems
    k_pad = -(-k // cents) * cents
    k_steps = d_pad // elems
    total = (k_pad // cents) * k_steps
    cw, s_col, o_col = prepare_centroids(C, dtype, k_pad, d_pad, center, col_scale)
    rows_x, rows_c, chunk = _w_loader(cents)
    d_row, d_col = wgmma_d_layout(cents)
    lane = np.arange(32)
    t = lane % 4
    labels = np.full(n, -1, np.int64)
    scores = np.full(n, np.nan, np.float32)
    rscale_all = np.full(n, np.nan, np.float32)

    for block in range(-(-n // W_ROWS)):
        row0 = block * W_ROWS
        smem = np.full(n_stages * stage_bytes // item, np.nan)  # in elements of x's dtype

        def load(stage, it):
            tile, kt = divmod(it, k_steps)
            col = kt * elems + chunk * chunk_elems  # (THREADS,)
            e = np.arange(chunk_elems)
            for rows, base, src in ((rows_x, 0, None), (rows_c, W_X_TILE, cw)):
                dst = (stage * stage_bytes + base + w_swizzled(rows, chunk[:, None])) // item
                cols = col[:, None, None] + e[None, None, :]
                if src is None:  # x: zero-filled past row n and column d
                    grow = row0 + rows[:, :, None]
                    ok = (grow < n) & (cols < d)
                    vals = np.where(ok, x_buf[np.where(ok, grow * x_stride + cols, 0)], 0.0)
                else:
                    vals = src[tile * cents + rows[:, :, None], cols]
                smem[dst[:, :, None] + e[None, None, :]] = vals

        row_sq = np.zeros((W_THREADS, W_ROWS // W_LOAD_ROWS), np.float32)
        run_val = np.full((2, 4, 32, 2), -np.inf, np.float32)  # wg, warp, lane, h
        run_idx = np.zeros((2, 4, 32, 2), np.int64)
        acc = np.zeros((2, 64, cents))  # per warpgroup, as a matrix (float64 products)
        for it in range(min(ahead, total)):
            load(it % n_stages, it)
        for it in range(total):
            stage = it % n_stages
            tile, kt = divmod(it, k_steps)
            if row_scale is None and tile == 0:  # own chunks, element order, float32 fma
                for i in range(W_ROWS // W_LOAD_ROWS):
                    base = (stage * stage_bytes + w_swizzled(rows_x[:, i], chunk)) // item
                    for u in range(chunk_elems):
                        col = kt * elems + chunk * chunk_elems + u
                        v = smem[base + u].astype(np.float32)
                        if center is not None:
                            v = (v - np.where(col < d, center[np.minimum(col, d - 1)], 0)).astype(np.float32)
                        upd = (np.float64(v) * v + row_sq[:, i]).astype(np.float32)
                        row_sq[:, i] = np.where(col < d, upd, row_sq[:, i])
            if it + ahead < total:
                load((it + ahead) % n_stages, it + ahead)
            kk = np.arange(32 // item)
            for s in range(SLICE_BYTES // 32):
                cstart = stage * stage_bytes + W_X_TILE + 32 * s
                B = smem[sw128_address(cstart, np.arange(cents)[:, None], kk[None, :] * item) // item]
                for wg in range(2):
                    A = smem[sw128_address(stage * stage_bytes + wg * (W_X_TILE // 2) + 32 * s,
                                           np.arange(64)[:, None], kk[None, :] * item) // item]
                    if dtype == "float32":
                        A = round_tf32_truncate(A).astype(np.float64)
                    prod = A @ B.T
                    acc[wg] = prod if (kt == 0 and s == 0) else acc[wg] + prod
            if kt == k_steps - 1:  # epilogue: registers per the D layout
                j0 = tile * cents
                for wg in range(2):
                    regs = acc[wg][d_row, d_col].astype(np.float32)  # (4, 32, cents / 2)
                    bv = np.full((4, 32, 2), -np.inf, np.float32)
                    bi = np.full((4, 32, 2), np.iinfo(np.int32).max, np.int64)
                    for j in range(cents // 8):
                        for e in range(2):
                            col = j0 + 8 * j + 2 * t + e  # (32,)
                            live = col < k
                            for h in range(2):
                                v = (s_col[col] * (regs[:, :, 4 * j + 2 * h + e] - o_col[col])).astype(np.float32)
                                take = live[None, :] & (v > bv[:, :, h])
                                bv[:, :, h] = np.where(take, v, bv[:, :, h])
                                bi[:, :, h] = np.where(take, col[None, :], bi[:, :, h])
                    for off in (1, 2):
                        ov, oi = bv[:, lane ^ off], bi[:, lane ^ off]
                        take = better(ov, oi, bv, bi)
                        bv, bi = np.where(take, ov, bv), np.where(take, oi, bi)
                    take = better(bv, bi, run_val[wg], run_idx[wg])
                    run_val[wg] = np.where(take, bv, run_val[wg])
                    run_idx[wg] = np.where(take, bi, run_idx[wg])
        # row scales: butterfly over the 8 threads of a row (xor 1, 2, 4), float32
        tot = row_sq.copy()
        tid = np.arange(W_THREADS)
        for off in (1, 2, 4):
            tot = (tot + tot[tid ^ off]).astype(np.float32)
        row_scale_s = np.full(W_ROWS, np.nan, np.float32)
        for i in range(W_ROWS // W_LOAD_ROWS):
            r = rows_x[::8, i]
            sq_r = tot[::8, i]
            if row_scale is not None:
                rs = np.where(row0 + r < n, row_scale[np.minimum(row0 + r, n - 1)], 0)
            else:
                rs = np.where(sq_r > 0, 1 / np.sqrt(np.where(sq_r > 0, sq_r, 1)), 0)
            row_scale_s[r] = np.where(row0 + r < n, rs, 0).astype(np.float32)
        for wg in range(2):
            for v in range(4):
                for ln in range(0, 32, 4):
                    for h in range(2):
                        r = wg * 64 + v * 16 + ln // 4 + 8 * h
                        if row0 + r >= n:
                            continue
                        rs = row_scale_s[r]
                        label, score = 0, np.float32(0)
                        if rs > 0:
                            b = run_idx[wg, v, ln, h]
                            label = b if 0 <= b < k else 0
                            score = np.float32(rs * run_val[wg, v, ln, h])
                        labels[row0 + r], scores[row0 + r], rscale_all[row0 + r] = label, score, rs
    return labels, scores, rscale_all


W_SHAPES = [
    # n, d, k, dtype, stride_pad, extras: ragged against 128 rows, 256 centroids, 128-byte slices
    (1, 1, 1, "float32", 0, {}),
    (130, 37, 300, "float32", 3, dict(duplicates=20, zero_rows=4)),
    (129, 70, 257, "bfloat16", 0, dict(duplicates=10, zero_rows=3)),
    (70, 65, 40, "float16", 5, dict(zero_rows=2, center=True)),
    (200, 100, 520, "float32", 0, dict(scales=True, center=True)),
    (40, 300, 150, "float32", 1, dict(duplicates=5, zero_rows=1, center=True)),
    # the 64- and 128-centroid tiles, full and ragged
    (150, 64, 64, "float32", 0, dict(duplicates=4, zero_rows=2)),
    (131, 96, 100, "bfloat16", 2, dict(zero_rows=1, center=True, scales=True)),
    (60, 40, 128, "float32", 0, dict(duplicates=3, center=True)),
    (129, 33, 9, "float16", 0, dict(scales=True)),
]


@pytest.mark.parametrize("n,d,k,dtype,stride_pad,extras", W_SHAPES)
def test_emulated_wgmma_kernel_matches_numpy(n, d, k, dtype, stride_pad, extras):
    rng = np.random.default_rng(n * 997 + d * 13 + k)
    X, C, buf, stride, kw = _case(rng, n, d, k, dtype, stride_pad, **extras)
    # 16-byte aligned rows, as the kernel requires: pad the stride to 16 bytes.
    item = ITEM[dtype]
    stride16 = -(-stride * item // 16) * 16 // item
    buf = np.full(n * stride16, np.nan, np.float32)
    for i in range(n):
        buf[i * stride16:i * stride16 + d] = X[i]
    labels, scores, r = emulate_wgmma(buf, n, d, stride16, C, dtype, **kw)
    _check_replay(labels, scores, r, _reference(X, C, dtype, x_round=round_tf32_truncate, **kw), C, kw)


# ---- the centred Gram on wgmma (gram_wgmma_cuda.cu, EDPAIRS_GEMM_GRAM=wgmma) ----------------
# Tiles of 128 x 128 features on or above the diagonal; slices of 32 rows go through registers
# (lane = row, a warp's float4 feature groups q = warp + 8 j) into K-major swizzled tiles (row =
# feature, K = the slice's row), A for the tile's row features, B for its column features.
G2_TILE, G2_SLICE, G2_THREADS = 128, 32, 256
G2_A = G2_TILE * SLICE_BYTES
G2_STAGE = 2 * G2_A
G2_GROUPS_PER_WARP = (2 * G2_TILE // 4) // (G2_THREADS // 32)


def g2_element_offset(r, k):
    """The kernel's element_offset: element (row r, K column k) of a swizzled float32 tile."""
    return w_swizzled(r, k >> 2) + (k & 3) * 4


def g2_tiles(D):
    n_t = -(-D // G2_TILE)
    return [(ti, tj) for ti in range(n_t) for tj in range(ti, n_t)]


def test_centred_gram_stores_are_conflict_free_and_cover_the_tiles():
    lane = np.arange(32)
    for r in range(G2_TILE):  # one feature: the 32 lanes (rows) fill the 32 words of its 128 bytes
        off = g2_element_offset(r, lane)
        assert sorted((off // 4) % 32) == list(range(32)) and len(set(off // 128)) == 1
    warp = np.arange(8)[:, None]
    q = warp + 8 * np.arange(G2_GROUPS_PER_WARP)[None, :]
    assert sorted(q.ravel()) == list(range(2 * G2_TILE // 4))  # every feature group, once
    assert [len(g2_tiles(D)) for D in (4, 128, 132, 512)] == [1, 1, 3, 10]


def emulate_centred_gram(X, shift, splits=2):
    """(upper m2 (D, D) with NaN below the diagonal where nothing was written, colsum) as the
    kernel computes them: the loads, the transposed stores, the descriptors' reads, the D layout,
    the epilogue's indices; products in float64 of the centred values rounded to TF32 on their
    way into shared memory (which the tensor cores' truncation then leaves as they are); column
    sums of the unrounded values in each thread's float32 slots, a feature's 32 lanes added in
    float64 at the end."""
    N, D = X.shape
    m2 = np.full((D, D), np.nan)
    m2[np.triu_indices(D)] = 0.0
    colsum = np.zeros(D)
    d_row, d_col = wgmma_d_layout()
    d_row, d_col = d_row[:, :, :64], d_col[:, :, :64]  # m64n128: the first 64 registers' layout
    assert d_col.max() == 127
    lane = np.arange(32)
    slices = -(-N // G2_SLICE)
    for ti, tj in g2_tiles(D):
        for split in range(splits):
            s_begin, s_end = slices * split // splits, slices * (split + 1) // splits
            if s_end == s_begin:
                continue
            acc = np.zeros((2, 64, 128))
            slots = np.zeros((4 * (G2_GROUPS_PER_WARP // 2), 256), np.float32)  # [slot][tid]
            for sl in range(s_begin, s_end):
                smem = np.full(G2_STAGE // 4, np.nan)
                row = sl * G2_SLICE + lane
                for warp in range(8):
                    for j in range(G2_GROUPS_PER_WARP):
                        qq = warp + 8 * j
                        in_a = qq < G2_TILE // 4
                        r0 = 4 * qq if in_a else 4 * (qq - G2_TILE // 4)
                        f = (ti if in_a else tj) * G2_TILE + r0
                        for u in range(4):
                            ok = (row < N) & (f < D)
                            v = np.where(ok, X[np.minimum(row, N - 1), min(f + u, D - 1)] - shift[min(f + u, D - 1)], 0)
                            off = (0 if in_a else G2_A) + g2_element_offset(r0 + u, lane)
                            smem[off // 4] = round_tf32(v.astype(np.float32))
                            if ti == 0 and not in_a:
                                slots[(j - G2_GROUPS_PER_WARP // 2) * 4 + u, warp * 32 + lane] += v.astype(np.float32)
                kk = np.arange(8)[None, :]
                for s in range(4):
                    B = smem[sw128_address(G2_A + 32 * s, np.arange(G2_TILE)[:, None], kk * 4) // 4]
                    for wg in range(2):
                        A = smem[sw128_address(wg * (G2_A // 2) + 32 * s, np.arange(64)[:, None], kk * 4) // 4]
                        acc[wg] += round_tf32_truncate(A).astype(np.float64) @ round_tf32_truncate(B).astype(np.float64).T
            for wg in range(2):
                regs = acc[wg][d_row, d_col]
                v = np.arange(4)[:, None, None]
                g, t4 = (lane // 4)[None, :, None], (lane % 4)[None, :, None]
                i = np.arange(64)[None, None, :]
                d1 = ti * G2_TILE + 64 * wg + 16 * v + g + 8 * ((i // 2) % 2)
                d2 = tj * G2_TILE + 8 * (i // 4) + 2 * t4 + i % 2
                d1, d2 = np.broadcast_arrays(d1, d2)
                keep = (d1 < D) & (d2 < D) & (d2 >= d1)
                np.add.at(m2, (d1[keep], d2[keep]), regs[keep].astype(np.float32))
            if ti == 0:  # thread t < 128: feature t of B, group q = 32 + t // 4 of warp q % 8
                col_acc = np.zeros(G2_TILE)
                for t in range(G2_TILE):
                    q = G2_TILE // 4 + t // 4
                    slot = (q // 8 - G2_GROUPS_PER_WARP // 2) * 4 + t % 4
                    col_acc[t] = slots[slot, (q % 8) * 32:(q % 8) * 32 + 32].astype(np.float64).sum()
                f = tj * G2_TILE + np.arange(G2_TILE)
                colsum[f[f < D]] += col_acc[f < D]
    return m2, colsum


@pytest.mark.parametrize("N,D,splits", [(1, 4, 1), (70, 12, 2), (100, 132, 3), (65, 256, 2)])
def test_emulated_centred_gram_matches_numpy(N, D, splits):
    rng = np.random.default_rng(N + D)
    X = (rng.standard_normal((N, D)) * 2 + 30).astype(np.float32)
    shift = (X[: min(N, 40)].astype(np.float64).mean(0)).astype(np.float32)
    m2, colsum = emulate_centred_gram(X, shift, splits)
    Xc = (X - shift).astype(np.float32)
    T = round_tf32(Xc).astype(np.float64)
    iu = np.triu_indices(D)
    assert np.isnan(m2[np.tril_indices(D, -1)]).all()  # below the diagonal: untouched
    ref = T.T @ T
    np.testing.assert_allclose(m2[iu], ref[iu], rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(colsum, Xc.astype(np.float64).sum(0), rtol=1e-5, atol=1e-4)


# ---- the wgmma-tma kernel's mbarrier protocol (assign_wgmma_tma_cuda.cu) ---------------------
def test_wgmma_tma_barrier_protocol_never_deadlocks_or_overwrites():
    """A step-by-step model of two blocks of a cluster: each producer, before refilling stage
    it % S for iteration it >= S, waits for phase it // S - 1 of its `empty` barrier (4 arrivals:
    2 consumer warpgroups x 2 blocks); each consumer waits for phase it // S of `full` (the own
    producer's arrive plus the bytes of both producers' copies), and after iteration it releases
    the stage of it - 1 on both blocks. Random interleavings must finish, never refill a stage
    a consumer still reads, and never let a consumer read a stage not yet filled for it."""
    S, total = 4, 23
    rng = np.random.default_rng(5)
    for _ in range(200):
        prod = [0, 0]                          # next iteration each producer issues
        cons = [[0, 0], [0, 0]]                # [block][warpgroup]: next iteration to consume
        empty_arrivals = [[0] * total for _ in range(2)]   # per block, per iteration released
        filled = [[set() for _ in range(S)] for _ in range(2)]  # (iteration, source) landed
        steps = 0
        while any(p < total for p in prod) or any(c < total for b in cons for c in b):
            steps += 1
            assert steps < 10_000, "deadlock"
            actors = [("p", b) for b in range(2) if prod[b] < total]
            actors += [("c", b, w) for b in range(2) for w in range(2) if cons[b][w] < total]
            a = actors[rng.integers(len(actors))]
            if a[0] == "p":
                b = a[1]
                it = prod[b]
                s = it % S
                if it >= S and empty_arrivals[b][it - S] < 4:
                    continue                   # waiting on empty (phase it // S - 1)
                # The refill is safe: every consumer of both blocks is past iteration it - S.
                assert all(cons[x][w] > it - S for x in range(2) for w in range(2)) or it < S
                for x in range(2):             # own x tile + own half of C into both blocks
                    filled[x][s] = {e for e in filled[x][s] if e[0] == it}
                    filled[x][s] |= {(it, b)}
                prod[b] += 1
            else:
                _, b, w = a
                it = cons[b][w]
                s = it % S
                if {(it, 0), (it, 1)} - filled[b][s] or prod[b] <= it:
                    continue                   # waiting on full (phase it // S)
                if it > 0:
                    for x in range(2):
                        empty_arrivals[x][it - 1] += 1
                cons[b][w] += 1


# ---- the fused wgmma kernel's hand-over (assign_wgmma_sums_kernel) ----------------------------
@pytest.mark.parametrize("tiles", range(0, 8))
def test_wgmma_sums_handover_never_deadlocks_or_overwrites(tiles):
    """A step-by-step model of the two thread groups of assign_wgmma_sums_kernel and their named
    barriers (each completes when both groups have arrived; `sync` waits for that, `arrive` does
    not). Labellers, per tile j: wait at EMPTY_b if j >= 2, fill buffer b = j % 2, arrive at
    FULL_b. Summers: wait at FULL_b, read buffer b, arrive at EMPTY_b if tile j + 2 exists.
    Random interleavings must finish, read every tile's own labels, never refill a buffer the
    summers still read, and leave no barrier half-arrived at the end."""
    rng = np.random.default_rng(tiles)
    for _ in range(300):
        arrived = {}                                # barrier -> groups arrived in the open phase
        waiting = {"L": None, "S": None}            # barrier a group waits on
        program = {"L": [], "S": []}
        for j in range(tiles):
            b = j % 2
            program["L"] += ([("sync", ("empty", b))] if j >= 2 else []) + [("fill", j), ("arrive", ("full", b))]
            program["S"] += [("sync", ("full", b)), ("read", j)] + ([("arrive", ("empty", b))] if j + 2 < tiles else [])
        pc = {"L": 0, "S": 0}
        buf = [None, None]
        reading = [False, False]
        steps = 0
        while pc["L"] < len(program["L"]) or pc["S"] < len(program["S"]) or any(waiting.values()):
            steps += 1
            assert steps < 10_000, "deadlock"
            ready = [g for g in "LS" if waiting[g] is None and pc[g] < len(program[g])]
            if not ready:
                raise AssertionError(f"deadlock: both groups wait ({waiting})")
            g = ready[rng.integers(len(ready))]
            op, arg = program[g][pc[g]]
            pc[g] += 1
            if op in ("sync", "arrive"):
                arrived[arg] = arrived.get(arg, 0) + 1
                if op == "sync":
                    waiting[g] = arg
                if arrived[arg] == 2:               # the phase completes: its waiters go on
                    arrived[arg] = 0
                    for h in "LS":
                        if waiting[h] == arg:
                            waiting[h] = None
            elif op == "fill":
                assert not reading[arg % 2], f"tile {arg} refills a buffer still being read"
                buf[arg % 2] = arg
            else:  # read: the summers add tile `arg` from buffer arg % 2
                assert buf[arg % 2] == arg, f"tile {arg} read {buf[arg % 2]}"
                reading[arg % 2] = True             # until the summers arrive at EMPTY_b
            if op == "arrive" and arg[0] == "empty":
                reading[arg[1]] = False
        assert all(v == 0 for v in arrived.values()), arrived


@pytest.mark.parametrize("cents", W_WIDTHS)
@pytest.mark.parametrize("row_tiles,k_tiles,k_steps,prefetch", [(1, 4, 16, 4), (5, 1, 16, 4), (3, 2, 3, 0),
                                                                 (7, 1, 1, 16), (2, 3, 5, 2)])
def test_wgmma_label_tiles_schedule(cents, row_tiles, k_tiles, k_steps, prefetch):
    """label_tiles' schedule over (row tile, centroid tile, slice): each iteration's copies land
    in the stage it is read from, issued before it and never overwritten before its wgmma batch
    (which may run on through the next iteration) is done; every row tile's done() comes after
    its last centroid tile, in order; the L2 prefetches name exactly the centroid-tile-0 slices
    of the iterations kAhead .. kAhead + prefetch - 1 beyond the one being issued."""
    _, stages, ahead = w_ring(cents)
    per = k_tiles * k_steps
    total = row_tiles * per

    def split(it):
        j = it // per
        tile = (it - j * per) // k_steps
        return j, tile, it - j * per - tile * k_steps

    holds = {}                                       # stage -> iteration whose copies it holds
    prefetched = []
    for s in range(min(ahead, total)):
        holds[s % stages] = s
    prefetched += [s for s in range(ahead, ahead + prefetch) if s < total and split(s)[1] == 0]
    dones = []
    for it in range(total):
        assert holds.get(it % stages) == it          # the copies of it are where it reads them
        nxt = it + ahead
        if nxt < total:                              # after the barrier: batches <= it - 2 are done
            assert holds.get(nxt % stages, -total) <= it - 2  # (an empty stage is free)
            holds[nxt % stages] = nxt
        if prefetch > 0 and it + ahead + prefetch < total and split(it + ahead + prefetch)[1] == 0:
            prefetched.append(it + ahead + prefetch)
        j, tile, kt = split(it)
        if kt == k_steps - 1 and tile == k_tiles - 1:
            dones.append(j)
    assert dones == list(range(row_tiles))
    want = [it for it in range(ahead, total) if split(it)[1] == 0] if prefetch > 0 else []
    assert prefetched == want                        # each centroid-tile-0 slice once, in order


# ---- float16 rows made in shared memory (assign_wgmma_resident_cuda.cu, EDPAIRS_ASSIGN_HALF=1) --
# A persistent block converts each 128-row tile of float32 rows once into float16 (times a power
# of two per row, half_rows.cuh) and keeps it in shared memory as d_pad / 64 slices of 16 KB in
# the 128-byte swizzle; centroid tiles of 128 float16 rows stream past it through a cp.async
# ring of 6 stages of 16 KB, 4 iterations ahead, one sequence of (centroid tile, slice)
# iterations across the block's row tiles.
R_SLICE = W_ROWS * SLICE_BYTES
R_CENTS, R_STAGES, R_AHEAD, R_MAX_D, R_GROUPS = 128, 6, 4, 512, 4


def r_smem_bytes(d_pad):
    """The kernel's resident_smem_bytes (dynamic), without its 512 static bytes of row factors."""
    return d_pad // 64 * R_SLICE + R_STAGES * R_CENTS * SLICE_BYTES + 1024


def half_row_scale(big):
    """half_rows.cuh's half_row_scale: 2^e bringing big into [2^7, 2^8), e clamped."""
    e = np.frexp(np.float32(big))[1]
    return np.float32(np.ldexp(1.0, int(np.clip(8 - e, -126, 127))))


def emulate_resident_convert(X, d_pad):
    """convert_tile's stores of a tile of 128 rows (X: (rows <= 128, d) float32; rows past it
    are zeros): the byte image of the resident tile, how often each byte was written, the score
    factors 1 / ||x_s|| and (warp, row, m) -> the 32 lanes' byte offsets of each store."""
    slices = d_pad // 64
    n, d = X.shape
    image = np.zeros(slices * R_SLICE, np.uint8)
    writes = np.zeros(slices * R_SLICE, np.int64)
    fac = np.zeros(W_ROWS, np.float32)
    stores = {}
    lane = np.arange(32)
    for warp in range(W_THREADS // 32):
        for g in range(0, 16, 8):
            for i in range(8):
                r = warp * 16 + g + i
                row = np.zeros(R_GROUPS * 128, np.float32)
                if r < n:
                    row[:d] = X[r]
                k = half_row_scale(np.abs(row).max())
                scaled = row * k
                ss = np.float32(np.sum(scaled.astype(np.float64) ** 2))
                fac[r] = 1 / np.sqrt(ss) if r < n and ss > 0 else 0
                for m in range(R_GROUPS):
                    vals = scaled[128 * m + 4 * lane[:, None] + np.arange(4)[None, :]].astype(np.float16)
                    sl = 2 * m + lane // 16
                    off = sl * R_SLICE + w_swizzled(r, (lane % 16) // 2) + 8 * (lane % 2)
                    keep = sl < slices
                    stores[warp, r, m] = off[keep]
                    for o, v in zip(off[keep], vals[keep]):
                        image[o:o + 8] = np.frombuffer(v.tobytes(), np.uint8)
                        writes[o:o + 8] += 1
    return image, writes, fac, stores


@pytest.mark.parametrize("n,d", [(128, 512), (5, 45), (128, 64), (100, 130), (128, 1)])
def test_resident_tile_stores_are_what_the_descriptors_read(n, d, rng):
    """Every byte of the resident tile written once (padding columns and rows as zeros); each
    store instruction fills one row's 128-byte slice line per half warp (two wavefronts for 256
    bytes, the minimum); the wgmma descriptors of slice kt, warpgroup wg, step s read row
    64 wg + m, columns 64 kt + 16 s .. + 15 of float16(x * 2^e_row); the factors 1 / ||x_s||
    make the scores cosines."""
    X = (rng.standard_normal((n, d)) * np.exp(rng.uniform(-20, 20, (n, 1)))).astype(np.float32)
    d_pad = -(-d // 64) * 64
    image, writes, fac, stores = emulate_resident_convert(X, d_pad)
    assert (writes == 1).all()
    for off in stores.values():
        for half in (off[:16], off[16:]):
            if len(half):
                banks = (half[:, None] + np.arange(0, 8, 4)[None, :]) // 4 % 32
                assert sorted(banks.ravel()) == list(range(32))
    want = np.zeros((W_ROWS, d_pad), np.float16)
    for r in range(n):
        want[r, :d] = (X[r] * half_row_scale(np.abs(X[r]).max())).astype(np.float16)
    got = np.zeros((W_ROWS, d_pad), np.float16)
    halves = image.view(np.float16)
    m = np.arange(64)[:, None]
    b = np.arange(0, 32, 2)[None, :]
    for kt in range(d_pad // 64):
        for wg in range(2):
            for s in range(SLICE_BYTES // 32):
                addr = sw128_address(kt * R_SLICE + wg * R_SLICE // 2 + 32 * s, m, b)
                got[wg * 64 + m, 64 * kt + 16 * s + b // 2] = halves[addr // 2]
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    scales = np.array([half_row_scale(np.abs(x).max()) for x in X], np.float32)
    np.testing.assert_allclose(fac[:n], 1 / np.linalg.norm((X * scales[:, None]).astype(np.float64), axis=1), rtol=1e-6)
    x0 = X[0].astype(np.float64)
    cos = want[0, :d].astype(np.float64) @ x0 * fac[0] / np.linalg.norm(x0)
    assert abs(cos - 1) < 2e-3  # a row against itself, through its float16 values


def test_resident_kernel_constants():
    """The resident tile at D = 512 and the ring fit a block's 227 KB with the static row
    factors; tiles and stages stay 1024-aligned for the descriptors; the ring is the 128-wide
    one of assign_wgmma_kernel (4 ahead of 6: the stage a copy overwrites is two behind)."""
    assert r_smem_bytes(R_MAX_D) + 4 * W_ROWS <= 227 * 1024
    assert R_SLICE % 1024 == 0 and (R_CENTS * SLICE_BYTES) % 1024 == 0
    assert (R_STAGES, R_AHEAD) == w_ring(R_CENTS)[1:]


@pytest.mark.parametrize("tiles,k_tiles,slices", [(1, 8, 8), (3, 2, 1), (4, 3, 5), (2, 2, 2), (5, 1, 3)])
def test_resident_schedule_across_row_tiles(tiles, k_tiles, slices):
    """The kernel's loop: the prologue's and each iteration's copies name centroid slice
    (it + ahead) % per_tile of the next row tiles too, so iteration it finds the slice
    (tile, kt) it multiplies in stage it % 6, never overwritten before its batch is done; each
    row tile's rows are written after its last centroid tile."""
    per = k_tiles * slices
    total = tiles * per
    holds = {}                                       # stage -> (iteration, slice index q)
    for s in range(min(R_AHEAD, total)):
        holds[s % R_STAGES] = (s, s % per)
    it, written = 0, []
    for j in range(tiles):
        for q in range(per):
            tile, kt = divmod(q, slices)
            assert holds[it % R_STAGES] == (it, tile * slices + kt)
            if it + R_AHEAD < total:
                w = (it + R_AHEAD) % R_STAGES
                assert w not in holds or holds[w][0] <= it - 2
                holds[w] = (it + R_AHEAD, (it + R_AHEAD) % per)
            if kt == slices - 1 and tile == k_tiles - 1:
                written.append(j)
            it += 1
    assert written == list(range(tiles))


@pytest.mark.parametrize("d", [1, 31, 32, 33, 64, 100, 127, 128, 129, 500, 512])
def test_resident_prefetch_names_every_line_of_a_row(d):
    """prefetch_rows: lines q, q + per_tile, .. < ceil(d / 32) + 1 at min(32 line, d - 1) floats
    name every 128-byte line that a row of d float32 starting on any 16-byte boundary touches."""
    lines = -(-d // 32) + 1
    for per in (1, 2, 3, 64):
        named = [line for q in range(per) for line in range(q, lines, per)]
        assert sorted(named) == list(range(lines))  # each once
        for start in range(0, 128, 16):
            touched = set(range(start // 128, (start + 4 * d - 1) // 128 + 1))
            hit = {(start + 4 * min(32 * line, d - 1)) // 128 for line in named}
            assert hit == touched


def prepare_half_centroids(C, d_pad):
    """prepare_centroids<__half, true>: each centroid times half_row_scale of its largest
    magnitude, rounded to float16 (zero-padded to d_pad), and s_j = 1 / ||c~_j|| (0 for a zero
    centroid)."""
    k, d = C.shape
    cw = np.zeros((k, d_pad), np.float16)
    s = np.zeros(k, np.float32)
    for j in range(k):
        v = C[j] * half_row_scale(np.abs(C[j]).max())
        cw[j, :d] = v.astype(np.float16)
        sq = np.sum(v.astype(np.float64) ** 2)
        s[j] = 1 / np.sqrt(sq) if sq > 0 else 0
    return cw, s


@pytest.mark.parametrize("x_scale,c_scale", [(1.0, 1.0), (2.0**-100, 1e-20), (1e30, 2.0**100), (1e-5, 1e5)])
def test_resident_scores_are_cosines_at_any_scale(x_scale, c_scale, rng):
    """The resident kernel's arithmetic, replayed: rows through convert_tile, centroids through
    prepare_centroids<__half, true>, float32-accumulated products (float64 here), the score
    s_j (x_h . c~_j) / ||x_s||: cosines within float16's rounding of the float64 reference and
    the reference's label wherever the best two differ by more than that, for rows and
    centroids of magnitudes float16 cannot hold."""
    n, d, k = 128, 100, 150
    C = rng.standard_normal((k, d))
    X = 3 * C[rng.integers(0, k, n)] + rng.standard_normal((n, d))
    Xf, Cf = (X * x_scale).astype(np.float32), (C * c_scale).astype(np.float32)
    d_pad = 128
    image, _, fac, _ = emulate_resident_convert(Xf, d_pad)
    xh = np.zeros((W_ROWS, d_pad))
    halves = image.view(np.float16)
    for r in range(W_ROWS):
        for col in range(d_pad):
            xh[r, col] = halves[(col // 64 * R_SLICE + w_swizzled(r, col % 64 // 8) + 2 * (col % 8)) // 2]
    cw, s = prepare_half_centroids(Cf, d_pad)
    assert np.isfinite(cw.astype(np.float64)).all() and (np.abs(cw.astype(np.float64)).max(axis=1) >= 128).all()
    scores = s[None, :] * (xh[:n] @ cw.astype(np.float64).T) * fac[:n, None]
    Xd, Cd = Xf.astype(np.float64), Cf.astype(np.float64)
    cos = (Xd / np.linalg.norm(Xd, axis=1, keepdims=True)) @ (Cd / np.linalg.norm(Cd, axis=1, keepdims=True)).T
    assert np.abs(scores - cos).max() < 2e-3
    top2 = np.sort(cos, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 4e-3
    assert clear.mean() > 0.9 and (scores.argmax(axis=1)[clear] == cos.argmax(axis=1)[clear]).all()
