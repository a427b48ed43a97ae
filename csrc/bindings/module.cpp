// The only pybind11 code of edpairs: DLPack capsules -> views, argument validation, device
// dispatch (CPU / CUDA), GIL release around the kernels, error translation, build_info().
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "dlpack_view.h"
#include "edpairs/errors.h"
#include "edpairs/ops.h"

namespace py = pybind11;
using edpairs::Device;
using edpairs::DType;
using edpairs::fail;
using edpairs::TensorView;
using edpairs::bindings::ImportedArray;

namespace {

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

void expect_input_dtype(const TensorView& v, const char* name) {
  if (!edpairs::is_floating(v.dtype))
    fail(std::string(name) + " dtype not supported: expected float32, float64, float16 or bfloat16, got " +
         edpairs::dtype_name(v.dtype));
}

void expect_contiguous(const TensorView& v, const char* name) {
  if (!v.is_contiguous()) fail(std::string(name) + " must be contiguous (row-major)");
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
  auto x = ImportedArray::from_capsule(x_, "X", false);
  auto c = ImportedArray::from_capsule(c_, "C", false);
  auto center = ImportedArray::from_capsule(center_, "center", false);
  auto row_scale = ImportedArray::from_capsule(row_scale_, "row_scale", false);
  auto col_scale = ImportedArray::from_capsule(col_scale_, "col_scale", false);
  auto labels = ImportedArray::from_capsule(labels_, "labels", true);
  auto scores = ImportedArray::from_capsule(scores_, "scores", true);
  auto sums = ImportedArray::from_capsule(sums_, "sums", true);
  auto counts = ImportedArray::from_capsule(counts_, "counts", true);

  edpairs::AssignArgs a;
  a.x = x.view();
  a.centroids = c.view();
  a.center = center.view();
  a.row_scale = row_scale.view();
  a.col_scale = col_scale.view();
  a.labels = labels.view();
  a.scores = scores.view();
  a.sums = sums.view();
  a.counts = counts.view();
  a.check_finite = check_finite;
  a.precision = parse_precision(precision);

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
    expect_shape(a.center, "center", {D}, {"D"});
    expect_dtype(a.center, "center", DType::Float32);
  }
  if (a.row_scale.present) {
    expect_shape(a.row_scale, "row_scale", {N}, {"N"});
    expect_dtype(a.row_scale, "row_scale", DType::Float32);
  }
  if (a.col_scale.present) {
    expect_shape(a.col_scale, "col_scale", {k}, {"k"});
    expect_dtype(a.col_scale, "col_scale", DType::Float32);
  }
  expect_shape(a.labels, "labels", {N}, {"N"});
  expect_dtype(a.labels, "labels", DType::Int64);
  expect_shape(a.scores, "scores", {N}, {"N"});
  expect_dtype(a.scores, "scores", DType::Float32);
  if (a.sums.present != a.counts.present) fail("sums and counts must be given together");
  if (a.sums.present) {
    expect_shape(a.sums, "sums", {k, D}, {"k", "D"});
    expect_dtype(a.sums, "sums", DType::Float64);
    expect_shape(a.counts, "counts", {k}, {"k"});
    expect_dtype(a.counts, "counts", DType::Int64);
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
  auto sums = ImportedArray::from_capsule(sums_, "sums", false);
  auto counts = ImportedArray::from_capsule(counts_, "counts", false);
  auto previous = ImportedArray::from_capsule(previous_, "previous", false);
  auto out = ImportedArray::from_capsule(out_, "out", true);
  edpairs::NormalizeArgs a;
  a.sums = sums.view();
  a.counts = counts.view();
  a.previous = previous.view();
  a.out = out.view();
  expect_rank(a.sums, "sums", 2, "(k, D)");
  const int64_t k = a.sums.shape[0], D = a.sums.shape[1];
  expect_dtype(a.sums, "sums", DType::Float64);
  expect_shape(a.counts, "counts", {k}, {"k"});
  expect_dtype(a.counts, "counts", DType::Int64);
  expect_shape(a.previous, "previous", {k, D}, {"k", "D"});
  expect_dtype(a.previous, "previous", DType::Float32);
  expect_shape(a.out, "out", {k, D}, {"k", "D"});
  expect_dtype(a.out, "out", DType::Float32);
  expect_contiguous(a.sums, "sums");
  expect_contiguous(a.counts, "counts");
  expect_contiguous(a.previous, "previous");
  expect_contiguous(a.out, "out");
  expect_same_device({{&a.sums, "sums"}, {&a.counts, "counts"}, {&a.previous, "previous"}, {&a.out, "out"}});
  dispatch<edpairs::NormalizeArgs>(a, a.sums.device, stream, &edpairs::normalize_centroids_cpu, EDPAIRS_CUDA_FN(normalize_centroids_cuda));
}

void moments(py::handle x_, py::handle mean_, py::handle m2_, bool check_finite, uintptr_t stream,
             const std::string& precision) {
  auto x = ImportedArray::from_capsule(x_, "X", false);
  auto mean = ImportedArray::from_capsule(mean_, "mean", true);
  auto m2 = ImportedArray::from_capsule(m2_, "m2", true);
  edpairs::MomentsArgs a;
  a.x = x.view();
  a.mean = mean.view();
  a.m2 = m2.view();
  a.check_finite = check_finite;
  a.precision = parse_precision(precision);
  expect_rank(a.x, "X", 2, "(N, D)");
  expect_input_dtype(a.x, "X");
  const int64_t N = a.x.shape[0], D = a.x.shape[1];
  if (N < 1 || D < 1) fail("X must have at least one row and one column, got shape " + a.x.shape_str());
  expect_shape(a.mean, "mean", {D}, {"D"});
  expect_dtype(a.mean, "mean", DType::Float64);
  expect_shape(a.m2, "m2", {D, D}, {"D", "D"});
  expect_dtype(a.m2, "m2", DType::Float64);
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
  auto x = ImportedArray::from_capsule(x_, "X", false);
  auto w = ImportedArray::from_capsule(w_, "W", false);
  auto b = ImportedArray::from_capsule(b_, "b", false);
  auto center = ImportedArray::from_capsule(center_, "center", false);
  auto count = ImportedArray::from_capsule(count_, "count", true);
  auto sum_x = ImportedArray::from_capsule(sum_x_, "sum_x", true);
  auto sum_z = ImportedArray::from_capsule(sum_z_, "sum_z", true);
  auto sum_zz = ImportedArray::from_capsule(sum_zz_, "sum_zz", true);
  auto sum_xz = ImportedArray::from_capsule(sum_xz_, "sum_xz", true);
  auto workspace = ImportedArray::from_capsule(workspace_, "workspace", true);
  edpairs::SignalMomentsArgs a;
  a.x = x.view();
  a.w = w.view();
  a.b = b.view();
  a.center = center.view();
  a.count = count.view();
  a.sum_x = sum_x.view();
  a.sum_z = sum_z.view();
  a.sum_zz = sum_zz.view();
  a.sum_xz = sum_xz.view();
  a.workspace = workspace.view();
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
  expect_shape(a.b, "b", {I}, {"I"});
  expect_dtype(a.b, "b", DType::Float32);
  if (a.center.present) {
    expect_shape(a.center, "center", {D}, {"D"});
    expect_dtype(a.center, "center", DType::Float32);
  }
  expect_shape(a.count, "count", {I}, {"I"});
  expect_dtype(a.count, "count", DType::Int64);
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
  info["cpu_kernel"] = edpairs::cpu_kernel_isa();
  info["num_threads"] = edpairs::cpu_num_threads();
  info["compiler"] = EDPAIRS_CXX_COMPILER;
  return info;
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
  m.def("build_info", &build_info);
  m.def("cuda_device_count", &cuda_device_count);
  m.def("num_threads", [] { return edpairs::cpu_num_threads(); });
  m.def("set_num_threads", [](int n) {
    if (n < 1) fail("num_threads must be >= 1, got " + std::to_string(n));
    py::gil_scoped_release nogil;
    edpairs::cpu_set_num_threads(n);
  });
}
