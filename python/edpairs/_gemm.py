"""Moments and signal moments on CUDA through the array library's matrix product (cuBLAS).

The library-product route (``EDPAIRS_GEMM_ROUTE=gemm``, the default for torch CUDA tensors of
float32, float16 or bfloat16): the rows are taken ``rows`` at a time; per step the products run
as torch matrix products (cuBLAS: float32 accumulation, TF32 or exact float32 operands as the
call's precision asks, whatever the process-wide TF32 setting), and everything else is an
edpairs kernel or an elementwise step; the steps' results are added in float64.

* moments: a first read for the float64 column sums (the mean), then per step
  ``X~ = x - mean32`` (mean32 the float32 rounding of the mean) and ``X~^T X~``; the scatter
  about the float64 mean follows exactly from the one about mean32:
  ``sum (x - mean)(x - mean)^T = sum X~ X~^T - N d d^T`` with ``d = mean - mean32``.
* signal moments: per step ``Z = X~ W - b'`` (``b' = b - center . W`` in float64; z of the raw
  x, as the kernels form it), the detector epilogue (``lib().signal_masks``: ``[M, M * Z]``
  with ``M = Z > 0``, counts and the z sums in float64) and ``[M, M * Z]^T X~``.

``kernel`` (``EDPAIRS_GEMM_ROUTE=kernel``) keeps edpairs' own CUDA kernels (cupy arrays and
float64 data always take them). Why a route through the library: our tensor-core scatter and
masked product run at 11% and 5% of cuBLAS's rate on an H200 (benchmarks/results/h200), while
these products are plain GEMMs; the route keeps the float64 merging, the masks and the centring
of the kernels and hands the products to cuBLAS.

The precision switch sets torch's cuBLAS TF32 flag for the duration of the call and restores
it: not thread-safe against another thread that changes or relies on that flag meanwhile."""

from __future__ import annotations

import os
from contextlib import contextmanager

ROUTES = ("gemm", "kernel")
GEMM_DTYPES = ("float32", "float16", "bfloat16")


def route() -> str:
    """The CUDA route for moments and signal moments of torch tensors (EDPAIRS_GEMM_ROUTE)."""
    value = os.environ.get("EDPAIRS_GEMM_ROUTE", "gemm")
    if value not in ROUTES:
        raise ValueError(f"EDPAIRS_GEMM_ROUTE must be one of {ROUTES}, got {value!r}")
    return value


def applies(X, xp) -> bool:
    """Whether X takes the library-product route: a torch CUDA tensor of float32, float16 or
    bfloat16 with at least one row, unless EDPAIRS_GEMM_ROUTE=kernel."""
    return (xp.name == "torch" and xp.is_cuda(X) and xp.dtype_name(X) in GEMM_DTYPES and X.shape[0] > 0
            and route() == "gemm")


def knob_precision(precision: str, knob: str) -> str:
    """The precision of a call, with the kernels' environment knob (EDPAIRS_MOMENTS /
    EDPAIRS_SIGNAL_MOMENTS = "tf32") honoured the same way on this route."""
    return "tf32" if precision == "tf32" or os.environ.get(knob) == "tf32" else "float32"


def _tf32_flag(torch) -> bool:
    matmul = torch.backends.cuda.matmul
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # set through the newer fp32_precision API; reading the old flag refuses
        return getattr(matmul, "fp32_precision", "ieee") == "tf32"


@contextmanager
def matmul_precision(torch, precision: str):
    """torch's float32 matrix products in TF32 ("tf32") or exact float32 ("float32") inside
    the block; the previous setting afterwards."""
    before = _tf32_flag(torch)
    want = precision == "tf32"
    if want != before:
        torch.backends.cuda.matmul.allow_tf32 = want
    try:
        yield
    finally:
        if want != before:
            torch.backends.cuda.matmul.allow_tf32 = before


def _steps(n: int, rows: int):
    if rows < 1:
        raise ValueError(f"workspace_rows must be >= 1, got {rows}")
    for first in range(0, n, rows):
        yield first, min(n, first + rows)


def moments(X, *, precision: str, rows: int):
    """(mean (D,), m2 (D, D)) float64 of the rows of X (torch, N >= 1) on the route above."""
    import torch

    N, D = X.shape
    mean = X.sum(0, dtype=torch.float64) / N
    shift = mean.to(torch.float32)
    d = mean - shift.to(torch.float64)
    m2 = torch.zeros((D, D), dtype=torch.float64, device=X.device)
    step = min(rows, N)
    work = torch.empty((step, D), dtype=torch.float32, device=X.device)
    gram = torch.empty((D, D), dtype=torch.float32, device=X.device)
    with matmul_precision(torch, precision):
        for first, last in _steps(N, rows):
            xt = work[: last - first]
            torch.sub(X[first:last], shift, out=xt)
            torch.mm(xt.T, xt, out=gram)
            m2 += gram
    m2 -= N * torch.outer(d, d)
    # Both triangles come from one product; make them bit-for-bit equal.
    m2 = (m2 + m2.T) * 0.5
    return mean, m2


def signal_moments(X, W, b, center, *, precision: str, rows: int, lib):
    """(count, sum_x, sum_z, sum_zz, sum_xz) of ops.signal_moments for a torch X (N >= 1) on the
    route above; W (D, I), b (I,), center (D,) or None are float32 on X's device."""
    import torch

    from ._arrays import Namespace

    N, D = X.shape
    I = W.shape[1]
    dev = X.device
    if center is not None:
        bias = (b.to(torch.float64) - center.to(torch.float64) @ W.to(torch.float64)).to(torch.float32)
    else:
        bias = b
    neg_bias = -bias
    step = min(rows, N)
    # X~ needs its own rows where x is shifted or converted; float32 x without a center is used
    # in place.
    copy = center is not None or X.dtype != torch.float32
    work = torch.empty((step, D), dtype=torch.float32, device=dev) if copy else None
    z = torch.empty((step, I), dtype=torch.float32, device=dev)
    masks = torch.empty((step, 2 * I), dtype=torch.float32, device=dev)
    prod = torch.empty((2 * I, D), dtype=torch.float32, device=dev)
    acc = torch.zeros((2 * I, D), dtype=torch.float64, device=dev)
    count = torch.zeros((I,), dtype=torch.int64, device=dev)
    sum_z = torch.zeros((I,), dtype=torch.float64, device=dev)
    sum_zz = torch.zeros((I,), dtype=torch.float64, device=dev)
    xp = Namespace("torch")
    c = xp.capsule
    stream = xp.stream(X)
    epilogue = lib.SignalMasks(c(z), c(masks), c(count), c(sum_z), c(sum_zz))
    with matmul_precision(torch, precision):
        for first, last in _steps(N, rows):
            r = last - first
            if copy:
                xt = work[:r]
                if center is not None:
                    torch.sub(X[first:last], center, out=xt)
                else:
                    xt.copy_(X[first:last])
            else:
                xt = X[first:last]
            zt, mt = z[:r], masks[:r]
            torch.addmm(neg_bias, xt, W, out=zt)
            epilogue.run(r, stream)
            torch.mm(mt.T, xt, out=prod)
            acc += prod
    return count, acc[:I].contiguous(), sum_z, sum_zz, acc[I:].contiguous()


def assign_rows() -> int:
    """Rows per step of the assignment on this route (EDPAIRS_GEMM_ASSIGN_ROWS, default 16384):
    the step's (rows, k) float32 scores should stay in L2 between the product and the argmax."""
    value = os.environ.get("EDPAIRS_GEMM_ASSIGN_ROWS", "16384")
    try:
        rows = int(value)
    except ValueError:
        rows = 0
    if rows < 1:
        raise ValueError(f"EDPAIRS_GEMM_ASSIGN_ROWS must be a positive integer, got {value!r}")
    return rows


def assign_applies(X, xp) -> bool:
    """Whether ops.assign takes this route: a torch CUDA float32 X with at least one row, unless
    EDPAIRS_GEMM_ROUTE=kernel (16-bit X keeps the tensor-core kernel, which already runs at the
    bf16 product's rate)."""
    return xp.name == "torch" and xp.is_cuda(X) and xp.dtype_name(X) == "float32" and X.shape[0] > 0 \
        and route() == "gemm"


def assign(X, C, center, row_scale, col_scale, labels, scores, sums, counts, *, precision: str, rows: int, lib):
    """ops.assign on the route: per step of ``rows`` rows, cuBLAS forms the (rows, k) scores
    ``x . (s_j c_j) - center . (s_j c_j)`` (the centre's term in float64, after the product, as
    the tensor-core kernel does), then ``ArgmaxRows`` takes each row's first maximum and its
    norm; the cluster sums follow in one sorted pass over X (``cluster_sums``). Fills labels,
    scores and, when given, sums and counts in place."""
    import torch

    from ._arrays import Namespace

    N = X.shape[0]
    k = C.shape[0]
    C64 = C.to(torch.float64)
    if col_scale is None:
        norms = torch.linalg.vector_norm(C64, dim=1)
        s = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
    else:
        s = col_scale.to(torch.float64)
    Cs64 = C64 * s[:, None]
    Cs = Cs64.to(torch.float32)
    neg_o = None if center is None else (-(Cs64 @ center.to(torch.float64))).to(torch.float32)
    step = min(rows, N)
    block = torch.empty((step, k), dtype=torch.float32, device=X.device)
    rscale = torch.empty((N,), dtype=torch.float32, device=X.device)
    xp = Namespace("torch")
    c = xp.capsule
    stream = xp.stream(X)
    argmax = lib.ArgmaxRows(c(block), c(X), c(center), c(row_scale), c(labels), c(scores), c(rscale))
    CsT = Cs.T
    with matmul_precision(torch, precision):
        for first, last in _steps(N, rows):
            r = last - first
            bt = block[:r]
            if neg_o is None:
                torch.mm(X[first:last], CsT, out=bt)
            else:
                torch.addmm(neg_o, X[first:last], CsT, out=bt)
            argmax.run(first, r, stream)
    if sums is not None:
        lib.cluster_sums(c(X), c(labels), c(rscale), c(center), c(sums), c(counts), stream)
