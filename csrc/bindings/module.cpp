// The only pybind11 code of edpairs: DLPack capsules -> views, argument validation, device
// dispatch (CPU / CUDA), GIL release around the kernels, error translation, build_info().
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "dlpack_view.h"
#include "edpairs/assign_knobs.h"
#include "edpairs/errors.h"
#include "edpairs/ops.h"

namespace py = pybind11;
using edpairs::Device;
using edpairs::DType;
using edpairs::fail;
using edpairs::TensorView;
using edpairs::bindings::ImportedArray;

namespace {

// The arrays a binding (or a plan, for its lifetime) imports, alive as long as it: take()
// imports one (None: an absent optional argument) and returns its view.
class Imports {
 public:
  TensorView take(py::handle obj, const char* name, bool writable) {
    held_.push_back(ImportedArray::from_capsule(obj, name, writable));
    return held_.back().view();
  }

 private:
  std::vector<ImportedArray> held_;
};

// ---- validation helpers -----------------------------------------------------------------

std::string dims_str(std::initializer_list<const char*> names) {
  std::string s = "(";
  size_t i = 0;
  for (const char* n : names) s += std::string(n) + (++i < names.size() ? ", " : "");
  return s + ")";
}

void expect_rank(const TensorView& v, const char* name, int ndim, const std::string& dims) {
  if (v.ndim != ndim)
    fail(std::string(name) + " must be " + std::to_string(ndim) + "-D " + dims + ", got shape " + v.shape_str());
}

void expect_shape(const TensorView& v, const char* name, std::initializer_list<int64_t> shape,
                  std::initializer_list<const char*> dims) {
  expect_rank(v, name, static_cast<int>(shape.size()), dims_str(dims));
  int i = 0;
  for (int64_t s : shape) {
    if (v.shape[i] != s) {
      std::string want;
      for (int64_t t : shape) want += (want.empty() ? "" : ", ") + std::to_string(t);
      fail(std::string(name) + " must have shape " + dims_str(dims) + " = (" + want + (shape.size() == 1 ? ",)" : ")") +
           ", got " + v.shape_str());
    }
    ++i;
  }
}

void expect_dtype(const TensorView& v, const char* name, DType want) {
  if (v.dtype != want)
    fail(std::string(name) + " must be " + edpairs::dtype_name(want) + ", got " + edpairs::dtype_name(v.dtype));
}

// The shape, then the dtype.
void expect_shape(const TensorView& v, const char* name, std::initializer_list<int64_t> shape,
                  std::initializer_list<const char*> dims, DType want) {
  expect_shape(v, name, shape, dims);
  expect_dtype(v, name, want);
}

void expect_input_dtype(const TensorView& v, const char* name) {
  if (!edpairs::is_floating(v.dtype))
    fail(std::string(name) + " dtype not supported: expected float32, float64, float16 or bfloat16, got " +
         edpairs::dtype_name(v.dtype));
}

void expect_contiguous(const TensorView& v, const char* name) {
  if (!v.is_contiguous()) fail(std::string(name) + " must be contiguous (row-major)");
}

// Each present array contiguous, named in the error.
void expect_contiguous_each(std::initializer_list<std::pair<const TensorView*, const char*>> arrays) {
  for (auto [v, name] : arrays)
    if (v->present) expect_contiguous(*v, name);
}

std::string device_str(const TensorView& v) {
  return v.device == Device::CPU ? std::string("cpu") : "cuda:" + std::to_string(v.device_id);
}

// All present arrays on the device of the first one.
void expect_same_device(std::initializer_list<std::pair<const TensorView*, const char*>> arrays) {
  const TensorView* first = nullptr;
  const char* first_name = nullptr;
  for (auto [v, name] : arrays) {
    if (!v->present) continue;
    if (!first) {
      first = v;
      first_name = name;
      continue;
    }
    if (v->device != first->device || (v->device == Device::CUDA && v->device_id != first->device_id))
      fail(std::string(name) + " is on " + device_str(*v) + " but " + first_name + " is on " + device_str(*first) +
           "; put all arrays on the same device");
  }
}

// The CUDA kernels read rows with unit element stride (the Python layer copies otherwise).
void expect_cuda_rows(const TensorView& x, const char* name) {
  if (x.device == Device::CUDA && x.numel() > 0 && x.shape[1] > 1 && x.strides[1] != 1)
    fail(std::string(name) + " on CUDA must have unit stride along its last dimension, got strides (" +
         std::to_string(x.strides[0]) + ", " + std::to_string(x.strides[1]) + ")");
}

[[noreturn]] void no_cuda() {
  throw edpairs::BackendUnavailable(
      "got CUDA arrays, but this build of edpairs has no CUDA kernels (edpairs.build_info()['cuda'] is False). "
      "Rebuild with the CUDA toolkit on PATH: EDPAIRS_CUDA=ON pip install --no-build-isolation --force-reinstall . "
      "(from a checkout of edpairs), or pass CPU arrays");
}

edpairs::Stream as_stream(uintptr_t s) { return reinterpret_cast<edpairs::Stream>(s); }

template <class Args>
using OpFn = void (*)(const Args&, edpairs::Stream);

#ifdef EDPAIRS_WITH_CUDA
#define EDPAIRS_CUDA_FN(f) (&edpairs::f)
#else
#define EDPAIRS_CUDA_FN(f) nullptr
#endif

// Runs the CPU or the CUDA implementation without the GIL.
template <class Args>
void dispatch(const Args& args, Device device, uintptr_t stream, OpFn<Args> cpu, OpFn<Args> cuda) {
  if (device == Device::CUDA && !cuda) no_cuda();
  OpFn<Args> fn = device == Device::CUDA ? cuda : cpu;
  py::gil_scoped_release nogil;
  fn(args, as_stream(stream));
}

// ---- ops --------------------------------------------------------------------------------

// "tf32" or "float32" (the names ops.py passes) -> AssignPrecision.
edpairs::AssignPrecision parse_precision(const std::string& precision) {
  if (precision == "tf32") return edpairs::AssignPrecision::TensorCore;
  if (precision != "float32") fail("precision must be 'tf32' or 'float32', got '" + precision + "'");
  return edpairs::AssignPrecision::Float32;
}

void assign(py::handle x_, py::handle c_, py::handle center_, py::handle row_scale_, py::handle col_scale_,
            py::handle labels_, py::handle scores_, py::handle sums_, py::handle counts_, bool check_finite,
            const std::string& precision, uintptr_t stream) {
  Imports in;
  edpairs::AssignArgs a;
  a.x = in.take(x_, "X", false);
  a.centroids = in.take(c_, "C", false);
  a.center = in.take(center_, "center", false);
  a.row_scale = in.take(row_scale_, "row_scale", false);
  a.col_scale = in.take(col_scale_, "col_scale", false);
  a.labels = in.take(labels_, "labels", true);
  a.scores = in.take(scores_, "scores", true);
  a.sums = in.take(sums_, "sums", true);
  a.counts = in.take(counts_, "counts", true);
  a.check_finite = check_finite;
  // "tf32-half" (assign only): the float16 rows of AssignPrecision::TensorCoreHalf.
  a.precision = precision == "tf32-half" ? edpairs::AssignPrecision::TensorCoreHalf : parse_precision(precision);

  expect_rank(a.x, "X", 2, "(N, D)");
  expect_input_dtype(a.x, "X");
  expect_rank(a.centroids, "C", 2, "(k, D)");
  const int64_t N = a.x.shape[0], D = a.x.shape[1], k = a.centroids.shape[0];
  if (D < 1) fail("X must have at least one column, got shape " + a.x.shape_str());
  if (k < 1) fail("C must hold at least one centroid, got shape " + a.centroids.shape_str());
  if (a.centroids.shape[1] != D)
    fail("C must have as many columns as X: X is " + a.x.shape_str() + ", C is " + a.centroids.shape_str());
  expect_dtype(a.centroids, "C", DType::Float32);
  expect_contiguous(a.centroids, "C");
  if (a.center.present) {
    expect_shape(a.center, "center", {D}, {"D"}, DType::Float32);
  }
  if (a.row_scale.present) {
    expect_shape(a.row_scale, "row_scale", {N}, {"N"}, DType::Float32);
  }
  if (a.col_scale.present) {
    expect_shape(a.col_scale, "col_scale", {k}, {"k"}, DType::Float32);
  }
  expect_shape(a.labels, "labels", {N}, {"N"}, DType::Int64);
  expect_shape(a.scores, "scores", {N}, {"N"}, DType::Float32);
  if (a.sums.present != a.counts.present) fail("sums and counts must be given together");
  if (a.sums.present) {
    expect_shape(a.sums, "sums", {k, D}, {"k", "D"}, DType::Float64);
    expect_shape(a.counts, "counts", {k}, {"k"}, DType::Int64);
  }
  for (const TensorView* v : {&a.center, &a.row_scale, &a.col_scale, &a.labels, &a.scores, &a.sums, &a.counts})
    if (v->present) expect_contiguous(*v, "an output or parameter array");
  expect_same_device({{&a.x, "X"}, {&a.centroids, "C"}, {&a.center, "center"}, {&a.row_scale, "row_scale"},
                      {&a.col_scale, "col_scale"}, {&a.labels, "labels"}, {&a.scores, "scores"}, {&a.sums, "sums"},
                      {&a.counts, "counts"}});
  expect_cuda_rows(a.x, "X");
  dispatch<edpairs::AssignArgs>(a, a.x.device, stream, &edpairs::assign_cpu, EDPAIRS_CUDA_FN(assign_cuda));
}

void normalize_centroids(py::handle sums_, py::handle counts_, py::handle previous_, py::handle out_, uintptr_t stream) {
  Imports in;
  edpairs::NormalizeArgs a;
  a.sums = in.take(sums_, "sums", false);
  a.counts = in.take(counts_, "counts", false);
  a.previous = in.take(previous_, "previous", false);
  a.out = in.take(out_, "out", true);
  expect_rank(a.sums, "sums", 2, "(k, D)");
  const int64_t k = a.sums.shape[0], D = a.sums.shape[1];
  expect_dtype(a.sums, "sums", DType::Float64);
  expect_shape(a.counts, "counts", {k}, {"k"}, DType::Int64);
  expect_shape(a.previous, "previous", {k, D}, {"k", "D"}, DType::Float32);
  expect_shape(a.out, "out", {k, D}, {"k", "D"}, DType::Float32);
  expect_contiguous(a.sums, "sums");
  expect_contiguous(a.counts, "counts");
  expect_contiguous(a.previous, "previous");
  expect_contiguous(a.out, "out");
  expect_same_device({{&a.sums, "sums"}, {&a.counts, "counts"}, {&a.previous, "previous"}, {&a.out, "out"}});
  dispatch<edpairs::NormalizeArgs>(a, a.sums.device, stream, &edpairs::normalize_centroids_cpu, EDPAIRS_CUDA_FN(normalize_centroids_cuda));
}

void moments(py::handle x_, py::handle mean_, py::handle m2_, bool check_finite, uintptr_t stream,
             const std::string& precision) {
  Imports in;
  edpairs::MomentsArgs a;
  a.x = in.take(x_, "X", false);
  a.mean = in.take(mean_, "mean", true);
  a.m2 = in.take(m2_, "m2", true);
  a.check_finite = check_finite;
  a.precision = parse_precision(precision);
  expect_rank(a.x, "X", 2, "(N, D)");
  expect_input_dtype(a.x, "X");
  const int64_t N = a.x.shape[0], D = a.x.shape[1];
  if (N < 1 || D < 1) fail("X must have at least one row and one column, got shape " + a.x.shape_str());
  expect_shape(a.mean, "mean", {D}, {"D"}, DType::Float64);
  expect_shape(a.m2, "m2", {D, D}, {"D", "D"}, DType::Float64);
  expect_contiguous(a.mean, "mean");
  expect_contiguous(a.m2, "m2");
  expect_same_device({{&a.x, "X"}, {&a.mean, "mean"}, {&a.m2, "m2"}});
  expect_cuda_rows(a.x, "X");
  dispatch<edpairs::MomentsArgs>(a, a.x.device, stream, &edpairs::moments_cpu, EDPAIRS_CUDA_FN(moments_cuda));
}

void signal_moments(py::handle x_, py::handle w_, py::handle b_, py::handle center_, py::handle count_,
                    py::handle sum_x_, py::handle sum_z_, py::handle sum_zz_, py::handle sum_xz_,
                    py::handle workspace_, bool check_finite, uintptr_t stream,
                    const std::string& precision) {
  Imports in;
  edpairs::SignalMomentsArgs a;
  a.x = in.take(x_, "X", false);
  a.w = in.take(w_, "W", false);
  a.b = in.take(b_, "b", false);
  a.center = in.take(center_, "center", false);
  a.count = in.take(count_, "count", true);
  a.sum_x = in.take(sum_x_, "sum_x", true);
  a.sum_z = in.take(sum_z_, "sum_z", true);
  a.sum_zz = in.take(sum_zz_, "sum_zz", true);
  a.sum_xz = in.take(sum_xz_, "sum_xz", true);
  a.workspace = in.take(workspace_, "workspace", true);
  a.check_finite = check_finite;
  a.precision = parse_precision(precision);
  expect_rank(a.x, "X", 2, "(N, D)");
  expect_input_dtype(a.x, "X");
  expect_rank(a.w, "W", 2, "(D, I)");
  const int64_t D = a.x.shape[1], I = a.w.shape[1];
  if (D < 1) fail("X must have at least one column, got shape " + a.x.shape_str());
  if (I < 1) fail("W must hold at least one concept (column), got shape " + a.w.shape_str());
  if (a.w.shape[0] != D)
    fail("W must be (D, I) with D = X.shape[1]: X is " + a.x.shape_str() + ", W is " + a.w.shape_str());
  expect_dtype(a.w, "W", DType::Float32);
  expect_contiguous(a.w, "W");
  expect_shape(a.b, "b", {I}, {"I"}, DType::Float32);
  if (a.center.present) {
    expect_shape(a.center, "center", {D}, {"D"}, DType::Float32);
  }
  expect_shape(a.count, "count", {I}, {"I"}, DType::Int64);
  expect_shape(a.sum_x, "sum_x", {I, D}, {"I", "D"});
  expect_shape(a.sum_xz, "sum_xz", {I, D}, {"I", "D"});
  expect_shape(a.sum_z, "sum_z", {I}, {"I"});
  expect_shape(a.sum_zz, "sum_zz", {I}, {"I"});
  for (auto [v, name] : {std::pair<TensorView*, const char*>{&a.sum_x, "sum_x"}, {&a.sum_xz, "sum_xz"},
                         {&a.sum_z, "sum_z"}, {&a.sum_zz, "sum_zz"}})
    expect_dtype(*v, name, DType::Float64);
  for (const TensorView* v : {&a.b, &a.center, &a.count, &a.sum_x, &a.sum_z, &a.sum_zz, &a.sum_xz, &a.workspace})
    if (v->present) expect_contiguous(*v, "an output or parameter array");
  expect_same_device({{&a.x, "X"}, {&a.w, "W"}, {&a.b, "b"}, {&a.center, "center"}, {&a.count, "count"},
                      {&a.sum_x, "sum_x"}, {&a.sum_z, "sum_z"}, {&a.sum_zz, "sum_zz"}, {&a.sum_xz, "sum_xz"},
                      {&a.workspace, "workspace"}});
  expect_cuda_rows(a.x, "X");
  if (a.x.device == Device::CUDA) {
    if (!a.workspace.present) fail("signal_moments on CUDA needs a workspace array of shape (R, 2*I)");
    expect_rank(a.workspace, "workspace", 2, "(R, 2*I)");
    if (a.workspace.shape[0] < 1 || a.workspace.shape[1] != 2 * I)
      fail("workspace must have shape (R, 2*I) with R >= 1 and I = " + std::to_string(I) + ", got " +
           a.workspace.shape_str());
    expect_dtype(a.workspace, "workspace", DType::Float32);
  }
  dispatch<edpairs::SignalMomentsArgs>(a, a.x.device, stream, &edpairs::signal_moments_cpu, EDPAIRS_CUDA_FN(signal_moments_cuda));
}

// ---- the library-product route's pieces (edpairs/_gemm.py) ---------------------------------
// The per-step kernels come as plans: the arrays are imported and checked once per call, and
// run() then costs a microsecond or two per block of rows, which matters when the route takes
// a million rows a few thousand at a time.

// v with its first dimension narrowed to [first, first + rows) (a view, no copy).
TensorView narrow_rows(TensorView v, int64_t first, int64_t rows) {
  if (v.present) {
    v.data = static_cast<char*>(v.data) + first * v.strides[0] * static_cast<int64_t>(element_size(v.dtype));
    v.shape[0] = rows;
  }
  return v;
}

void expect_step(int64_t first, int64_t rows, int64_t limit, const char* what) {
  if (first < 0 || rows < 0 || first + rows > limit)
    fail(std::string(what) + ": rows [" + std::to_string(first) + ", " + std::to_string(first + rows) +
         ") outside [0, " + std::to_string(limit) + ")");
}

class SignalMasksPlan {
 public:
  // out float32, or float16 with scale (I,) float32 (the half-precision operands); with shift
  // and alpha (I,) float32, z stands for z * alpha + shift (ops.h 3c).
  SignalMasksPlan(py::handle z, py::handle out, py::handle count, py::handle sum_z, py::handle sum_zz,
                  py::handle scale, py::handle shift, py::handle alpha) {
    a_.z = in_.take(z, "z", false);
    a_.out = in_.take(out, "out", true);
    a_.count = in_.take(count, "count", true);
    a_.sum_z = in_.take(sum_z, "sum_z", true);
    a_.sum_zz = in_.take(sum_zz, "sum_zz", true);
    a_.scale = in_.take(scale, "scale", false);
    a_.shift = in_.take(shift, "shift", false);
    a_.alpha = in_.take(alpha, "alpha", false);
    expect_rank(a_.z, "z", 2, "(R, I)");
    expect_dtype(a_.z, "z", DType::Float32);
    const int64_t R = a_.z.shape[0], I = a_.z.shape[1];
    expect_shape(a_.out, "out", {R, 2 * I}, {"R", "2*I"}, a_.scale.present ? DType::Float16 : DType::Float32);
    if (a_.scale.present) {
      expect_shape(a_.scale, "scale", {I}, {"I"}, DType::Float32);
    }
    if (a_.shift.present != a_.alpha.present) fail("signal_masks: shift and alpha come together");
    if (a_.shift.present) {
      expect_shape(a_.shift, "shift", {I}, {"I"}, DType::Float32);
      expect_shape(a_.alpha, "alpha", {I}, {"I"}, DType::Float32);
    }
    expect_shape(a_.count, "count", {I}, {"I"}, DType::Int64);
    expect_shape(a_.sum_z, "sum_z", {I}, {"I"}, DType::Float64);
    expect_shape(a_.sum_zz, "sum_zz", {I}, {"I"}, DType::Float64);
    expect_contiguous_each({{&a_.z, "z"}, {&a_.out, "out"}, {&a_.count, "count"}, {&a_.sum_z, "sum_z"},
                            {&a_.sum_zz, "sum_zz"}, {&a_.scale, "scale"}, {&a_.shift, "shift"}, {&a_.alpha, "alpha"}});
    expect_same_device({{&a_.z, "z"}, {&a_.out, "out"}, {&a_.count, "count"}, {&a_.sum_z, "sum_z"},
                        {&a_.sum_zz, "sum_zz"}, {&a_.scale, "scale"}, {&a_.shift, "shift"}, {&a_.alpha, "alpha"}});
  }
  // The first `rows` rows of z and out.
  void run(int64_t rows, uintptr_t stream) {
    expect_step(0, rows, a_.z.shape[0], "signal_masks");
    edpairs::SignalMasksArgs a = a_;
    a.z.shape[0] = rows;
    a.out.shape[0] = rows;
    dispatch<edpairs::SignalMasksArgs>(a, a.z.device, stream, &edpairs::signal_masks_cpu,
                                       EDPAIRS_CUDA_FN(signal_masks_cuda));
  }

 private:
  Imports in_;
  edpairs::SignalMasksArgs a_;
};

class ArgmaxRowsPlan {
 public:
  ArgmaxRowsPlan(py::handle scores, py::handle col_scale, py::handle x, py::handle center, py::handle row_scale,
                 py::handle labels, py::handle best, py::handle rscale, py::handle centroids, py::handle cnorm) {
    a_.scores = in_.take(scores, "scores", false);
    a_.col_scale = in_.take(col_scale, "col_scale", false);
    a_.x = in_.take(x, "X", false);
    a_.center = in_.take(center, "center", false);
    a_.row_scale = in_.take(row_scale, "row_scale", false);
    a_.labels = in_.take(labels, "labels", true);
    a_.best = in_.take(best, "best", true);
    a_.rscale = in_.take(rscale, "rscale", true);
    a_.centroids = in_.take(centroids, "centroids", false);
    a_.cnorm = in_.take(cnorm, "cnorm", false);
    expect_rank(a_.scores, "scores", 2, "(R, k)");
    expect_dtype(a_.scores, "scores", DType::Float32);
    expect_contiguous(a_.scores, "scores");
    expect_rank(a_.x, "X", 2, "(N, D)");
    expect_input_dtype(a_.x, "X");
    expect_cuda_rows(a_.x, "X");
    const int64_t N = a_.x.shape[0], D = a_.x.shape[1];
    if (a_.scores.shape[1] < 1) fail("scores must have at least one column, got " + a_.scores.shape_str());
    expect_shape(a_.col_scale, "col_scale", {a_.scores.shape[1]}, {"k"}, DType::Float32);
    if (a_.center.present) {
      expect_shape(a_.center, "center", {D}, {"D"}, DType::Float32);
    }
    if (a_.row_scale.present) {
      expect_shape(a_.row_scale, "row_scale", {N}, {"N"}, DType::Float32);
    }
    expect_shape(a_.labels, "labels", {N}, {"N"}, DType::Int64);
    expect_shape(a_.best, "best", {N}, {"N"}, DType::Float32);
    expect_shape(a_.rscale, "rscale", {N}, {"N"}, DType::Float32);
    if (a_.centroids.present != a_.cnorm.present) fail("argmax_rows: pass centroids and cnorm together, or neither");
    if (a_.centroids.present) {
      expect_shape(a_.centroids, "centroids", {a_.scores.shape[1], D}, {"k", "D"}, DType::Float32);
      expect_shape(a_.cnorm, "cnorm", {a_.scores.shape[1]}, {"k"}, DType::Float32);
    }
    for (const TensorView* v : {&a_.col_scale, &a_.center, &a_.row_scale, &a_.labels, &a_.best, &a_.rscale,
                                &a_.centroids, &a_.cnorm})
      if (v->present) expect_contiguous(*v, "an output or parameter array");
    expect_same_device({{&a_.scores, "scores"}, {&a_.col_scale, "col_scale"}, {&a_.x, "X"}, {&a_.center, "center"},
                        {&a_.row_scale, "row_scale"}, {&a_.labels, "labels"}, {&a_.best, "best"},
                        {&a_.rscale, "rscale"}, {&a_.centroids, "centroids"}, {&a_.cnorm, "cnorm"}});
  }
  // Rows [first, first + rows) of X against the first `rows` rows of scores.
  void run(int64_t first, int64_t rows, uintptr_t stream) {
    expect_step(first, rows, a_.x.shape[0], "argmax_rows");
    expect_step(0, rows, a_.scores.shape[0], "argmax_rows (scores)");
    edpairs::ArgmaxRowsArgs a = a_;
    a.scores.shape[0] = rows;
    a.x = narrow_rows(a_.x, first, rows);
    a.row_scale = narrow_rows(a_.row_scale, first, rows);
    a.labels = narrow_rows(a_.labels, first, rows);
    a.best = narrow_rows(a_.best, first, rows);
    a.rscale = narrow_rows(a_.rscale, first, rows);
    dispatch<edpairs::ArgmaxRowsArgs>(a, a.x.device, stream, &edpairs::argmax_rows_cpu,
                                      EDPAIRS_CUDA_FN(argmax_rows_cuda));
  }

 private:
  Imports in_;
  edpairs::ArgmaxRowsArgs a_;
};

class CentreRowsPlan {
 public:
  // out float32, or float16 with scale (D,) float32 (the half-precision operands, ops.h 3e).
  CentreRowsPlan(py::handle x, py::handle shift, py::handle out, py::handle colsum, py::handle scale,
                 py::handle colmax) {
    a_.x = in_.take(x, "X", false);
    a_.shift = in_.take(shift, "shift", false);
    a_.out = in_.take(out, "out", true);
    a_.colsum = in_.take(colsum, "colsum", true);
    a_.scale = in_.take(scale, "scale", false);
    a_.colmax = in_.take(colmax, "colmax", true);
    expect_rank(a_.x, "X", 2, "(N, D)");
    expect_input_dtype(a_.x, "X");
    expect_cuda_rows(a_.x, "X");
    const int64_t D = a_.x.shape[1];
    expect_shape(a_.shift, "shift", {D}, {"D"}, DType::Float32);
    expect_rank(a_.out, "out", 2, "(R, D)");
    const DType out_dtype = a_.scale.present ? DType::Float16 : DType::Float32;
    expect_shape(a_.out, "out", {a_.out.shape[0], D}, {"R", "D"}, out_dtype);
    if (a_.scale.present) {
      expect_shape(a_.scale, "scale", {D}, {"D"}, DType::Float32);
    }
    if (a_.colsum.present) {
      expect_shape(a_.colsum, "colsum", {D}, {"D"}, DType::Float64);
    }
    if (a_.colmax.present) {
      if (!a_.scale.present) fail("centre_rows: colmax (the largest scaled values) needs scale");
      expect_shape(a_.colmax, "colmax", {D}, {"D"}, DType::Float32);
    }
    expect_contiguous_each({{&a_.shift, "shift"}, {&a_.out, "out"}, {&a_.colsum, "colsum"}, {&a_.scale, "scale"},
                            {&a_.colmax, "colmax"}});
    expect_same_device({{&a_.x, "X"}, {&a_.shift, "shift"}, {&a_.out, "out"}, {&a_.colsum, "colsum"},
                        {&a_.scale, "scale"}, {&a_.colmax, "colmax"}});
  }
  // Rows [first, first + rows) of X into the first `rows` rows of out.
  void run(int64_t first, int64_t rows, uintptr_t stream) {
    expect_step(first, rows, a_.x.shape[0], "centre_rows");
    expect_step(0, rows, a_.out.shape[0], "centre_rows (out)");
    edpairs::CentreRowsArgs a = a_;
    a.x = narrow_rows(a_.x, first, rows);
    a.out.shape[0] = rows;
    dispatch<edpairs::CentreRowsArgs>(a, a.x.device, stream, &edpairs::centre_rows_cpu,
                                      EDPAIRS_CUDA_FN(centre_rows_cuda));
  }

 private:
  Imports in_;
  edpairs::CentreRowsArgs a_;
};

void half_rows(py::handle x_, py::handle out_, py::handle rscale_, uintptr_t stream) {
  Imports in;
  edpairs::HalfRowsArgs a;
  a.x = in.take(x_, "X", false);
  a.out = in.take(out_, "out", true);
  a.rscale = in.take(rscale_, "rscale", true);
  expect_rank(a.x, "X", 2, "(N, D)");
  expect_dtype(a.x, "X", DType::Float32);
  expect_cuda_rows(a.x, "X");
  const int64_t N = a.x.shape[0], D = a.x.shape[1];
  expect_shape(a.out, "out", {N, D}, {"N", "D"}, DType::Float16);
  expect_shape(a.rscale, "rscale", {N}, {"N"}, DType::Float32);
  expect_contiguous_each({{&a.out, "out"}, {&a.rscale, "rscale"}});
  expect_same_device({{&a.x, "X"}, {&a.out, "out"}, {&a.rscale, "rscale"}});
  dispatch<edpairs::HalfRowsArgs>(a, a.x.device, stream, &edpairs::half_rows_cpu, EDPAIRS_CUDA_FN(half_rows_cuda));
}

void centred_gram(py::handle x_, py::handle shift_, py::handle m2_, py::handle colsum_, uintptr_t stream) {
  Imports in;
  edpairs::CentredGramArgs a;
  a.x = in.take(x_, "X", false);
  a.shift = in.take(shift_, "shift", false);
  a.m2 = in.take(m2_, "m2", true);
  a.colsum = in.take(colsum_, "colsum", true);
  expect_rank(a.x, "X", 2, "(N, D)");
  expect_dtype(a.x, "X", DType::Float32);
  expect_cuda_rows(a.x, "X");
  const int64_t D = a.x.shape[1];
  expect_shape(a.shift, "shift", {D}, {"D"}, DType::Float32);
  expect_shape(a.m2, "m2", {D, D}, {"D", "D"}, DType::Float64);
  expect_shape(a.colsum, "colsum", {D}, {"D"}, DType::Float64);
  expect_contiguous_each({{&a.shift, "shift"}, {&a.m2, "m2"}, {&a.colsum, "colsum"}});
  expect_same_device({{&a.x, "X"}, {&a.shift, "shift"}, {&a.m2, "m2"}, {&a.colsum, "colsum"}});
  dispatch<edpairs::CentredGramArgs>(a, a.x.device, stream, &edpairs::centred_gram_cpu,
                                     EDPAIRS_CUDA_FN(centred_gram_cuda));
}

void cluster_sums(py::handle x_, py::handle labels_, py::handle rscale_, py::handle center_, py::handle sums_,
                  py::handle counts_, uintptr_t stream) {
  Imports in;
  edpairs::ClusterSumsArgs a;
  a.x = in.take(x_, "X", false);
  a.labels = in.take(labels_, "labels", false);
  a.rscale = in.take(rscale_, "rscale", false);
  a.center = in.take(center_, "center", false);
  a.sums = in.take(sums_, "sums", true);
  a.counts = in.take(counts_, "counts", true);
  expect_rank(a.x, "X", 2, "(N, D)");
  expect_input_dtype(a.x, "X");
  expect_cuda_rows(a.x, "X");
  const int64_t N = a.x.shape[0], D = a.x.shape[1];
  expect_rank(a.sums, "sums", 2, "(k, D)");
  const int64_t k = a.sums.shape[0];
  expect_shape(a.sums, "sums", {k, D}, {"k", "D"}, DType::Float64);
  expect_shape(a.counts, "counts", {k}, {"k"}, DType::Int64);
  expect_shape(a.labels, "labels", {N}, {"N"}, DType::Int64);
  expect_shape(a.rscale, "rscale", {N}, {"N"}, DType::Float32);
  if (a.center.present) {
    expect_shape(a.center, "center", {D}, {"D"}, DType::Float32);
  }
  for (const TensorView* v : {&a.labels, &a.rscale, &a.center, &a.sums, &a.counts})
    if (v->present) expect_contiguous(*v, "an output or parameter array");
  expect_same_device({{&a.x, "X"}, {&a.labels, "labels"}, {&a.rscale, "rscale"}, {&a.center, "center"},
                      {&a.sums, "sums"}, {&a.counts, "counts"}});
  dispatch<edpairs::ClusterSumsArgs>(a, a.x.device, stream, &edpairs::cluster_sums_cpu,
                                     EDPAIRS_CUDA_FN(cluster_sums_cuda));
}

py::dict build_info() {
  py::dict info;
  info["version"] = EDPAIRS_VERSION;
#ifdef EDPAIRS_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = EDPAIRS_CUDA_VERSION;
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
#endif
  info["cuda_mode"] = EDPAIRS_CUDA_MODE;
  std::vector<std::string> archs;
  std::string item;
  for (const char* c = EDPAIRS_CUDA_ARCHS;; ++c) {
    if (*c == ',' || *c == '\0') {
      if (!item.empty()) archs.push_back(item);
      item.clear();
      if (*c == '\0') break;
    } else {
      item += *c;
    }
  }
#ifdef EDPAIRS_WITH_CUDA
  info["archs"] = archs;
#else
  info["archs"] = std::vector<std::string>{};
#endif
#ifdef EDPAIRS_HAVE_WGMMA
  info["wgmma"] = true;
#else
  info["wgmma"] = false;
#endif
  info["cpu_kernel"] = edpairs::cpu_kernel_isa();
  info["num_threads"] = edpairs::cpu_num_threads();
  info["compiler"] = EDPAIRS_CXX_COMPILER;
  py::dict limits;  // what Python's dispatch must agree with (ops.h)
  limits["wgmma_auto_min_k"] = edpairs::kWgmmaAutoMinK;
  limits["half_resident_max_d"] = edpairs::kWgmmaResidentMaxD;
  info["limits"] = limits;
  return info;
}

// The CUDA assignment's knobs as the library reads them (edpairs/assign_knobs.h; ValueError for a
// bad value): what edpairs._gemm decides by, so that Python and the kernels follow one rule.
py::dict assign_knobs() {
  namespace kn = edpairs::knobs;
  const kn::SortedKnobs sorted = kn::sorted_knobs();
  py::dict d;
  d["kernel"] = kn::name(kn::label_kernel());
  d["sums"] = kn::name(kn::sums_mode());
  d["overlap"] = kn::overlap_chunks();
  d["prefetch"] = kn::wgmma_prefetch();
  d["seg_rows"] = sorted.seg_rows;
  d["counting"] = sorted.shared_counting ? "auto" : "global";
  return d;
}

int cuda_device_count() {
#ifdef EDPAIRS_WITH_CUDA
  py::gil_scoped_release nogil;
  return edpairs::cuda_device_count();
#else
  return 0;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "edpairs compiled kernels (private; use edpairs.ops)";
  // C++ errors become the Python classes of edpairs.errors (std::invalid_argument -> ValueError).
  py::register_exception_translator([](std::exception_ptr p) {
    auto raise = [](const char* cls, const char* what) {
      py::object type = py::module_::import("edpairs.errors").attr(cls);
      PyErr_SetString(type.ptr(), what);
    };
    try {
      if (p) std::rethrow_exception(p);
    } catch (const edpairs::CudaError& e) {
      raise("CudaError", e.what());
    } catch (const edpairs::BackendUnavailable& e) {
      raise("BackendUnavailable", e.what());
    }
  });

  m.def("assign_knobs", &assign_knobs);
  m.def("assign", &assign, py::arg("x"), py::arg("c"), py::arg("center"), py::arg("row_scale"), py::arg("col_scale"),
        py::arg("labels"), py::arg("scores"), py::arg("sums"), py::arg("counts"), py::arg("check_finite"),
        py::arg("precision"), py::arg("stream"));
  m.def("normalize_centroids", &normalize_centroids, py::arg("sums"), py::arg("counts"), py::arg("previous"),
        py::arg("out"), py::arg("stream"));
  m.def("moments", &moments, py::arg("x"), py::arg("mean"), py::arg("m2"), py::arg("check_finite"), py::arg("stream"),
        py::arg("precision") = "float32");
  m.def("signal_moments", &signal_moments, py::arg("x"), py::arg("w"), py::arg("b"), py::arg("center"),
        py::arg("count"), py::arg("sum_x"), py::arg("sum_z"), py::arg("sum_zz"), py::arg("sum_xz"),
        py::arg("workspace"), py::arg("check_finite"), py::arg("stream"), py::arg("precision") = "float32");
  py::class_<SignalMasksPlan>(m, "SignalMasks")
      .def(py::init<py::handle, py::handle, py::handle, py::handle, py::handle, py::handle, py::handle,
                    py::handle>(),
           py::arg("z"), py::arg("out"), py::arg("count"), py::arg("sum_z"), py::arg("sum_zz"),
           py::arg("scale") = py::none(), py::arg("shift") = py::none(), py::arg("alpha") = py::none())
      .def("run", &SignalMasksPlan::run, py::arg("rows"), py::arg("stream"));
  py::class_<ArgmaxRowsPlan>(m, "ArgmaxRows")
      .def(py::init<py::handle, py::handle, py::handle, py::handle, py::handle, py::handle, py::handle, py::handle,
                    py::handle, py::handle>(),
           py::arg("scores"), py::arg("col_scale"), py::arg("x"), py::arg("center"), py::arg("row_scale"),
           py::arg("labels"), py::arg("best"), py::arg("rscale"), py::arg("centroids") = py::none(),
           py::arg("cnorm") = py::none())
      .def("run", &ArgmaxRowsPlan::run, py::arg("first"), py::arg("rows"), py::arg("stream"));
  py::class_<CentreRowsPlan>(m, "CentreRows")
      .def(py::init<py::handle, py::handle, py::handle, py::handle, py::handle, py::handle>(), py::arg("x"),
           py::arg("shift"), py::arg("out"), py::arg("colsum"), py::arg("scale") = py::none(),
           py::arg("colmax") = py::none())
      .def("run", &CentreRowsPlan::run, py::arg("first"), py::arg("rows"), py::arg("stream"));
  m.def("half_rows", &half_rows, py::arg("x"), py::arg("out"), py::arg("rscale"), py::arg("stream"));
  m.def("centred_gram", &centred_gram, py::arg("x"), py::arg("shift"), py::arg("m2"), py::arg("colsum"),
        py::arg("stream"));
  m.def("cluster_sums", &cluster_sums, py::arg("x"), py::arg("labels"), py::arg("rscale"), py::arg("center"),
        py::arg("sums"), py::arg("counts"), py::arg("stream"));
  m.def("build_info", &build_info);
  m.def("cuda_device_count", &cuda_device_count);
  m.def("num_threads", [] { return edpairs::cpu_num_threads(); });
  m.def("set_num_threads", [](int n) {
    if (n < 1 || n > edpairs::kMaxCpuThreads)
      fail("num_threads must be from 1 to " + std::to_string(edpairs::kMaxCpuThreads) + ", got " + std::to_string(n));
    py::gil_scoped_release nogil;
    edpairs::cpu_set_num_threads(n);
  });
}
