#include "dlpack_view.h"

#include <stdexcept>

#include "dlpack.h"
#include "edpairs/errors.h"

namespace py = pybind11;

namespace edpairs::bindings {
namespace {

DType dtype_of(const DLDataType& t, const std::string& name) {
  if (t.lanes != 1) fail(name + " has a vector dtype (lanes=" + std::to_string(t.lanes) + "); expected scalars");
  switch (t.code) {
    case kDLFloat:
      if (t.bits == 32) return DType::Float32;
      if (t.bits == 64) return DType::Float64;
      if (t.bits == 16) return DType::Float16;
      break;
    case kDLBfloat:
      if (t.bits == 16) return DType::BFloat16;
      break;
    case kDLInt:
      if (t.bits == 64) return DType::Int64;
      if (t.bits == 32) return DType::Int32;
      break;
    case kDLUInt:
      if (t.bits == 8) return DType::UInt8;
      break;
    case kDLBool:
      return DType::Bool;
    default:
      break;
  }
  return DType::Other;
}

TensorView view_of(const DLTensor& t, const std::string& name) {
  TensorView v;
  v.present = true;
  if (t.ndim < 0 || t.ndim > kMaxDims)
    fail(name + " must have at most " + std::to_string(kMaxDims) + " dimensions, got " + std::to_string(t.ndim));
  v.ndim = t.ndim;
  v.dtype = dtype_of(t.dtype, name);
  switch (t.device.device_type) {
    case kDLCPU:
    case kDLCUDAHost:
      v.device = Device::CPU;
      break;
    case kDLCUDA:
    case kDLCUDAManaged:
      v.device = Device::CUDA;
      break;
    default:
      fail(name + " lives on an unsupported device (DLPack device type " + std::to_string(t.device.device_type) +
           "); edpairs takes CPU and CUDA arrays");
  }
  v.device_id = t.device.device_id;
  int64_t expected = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    v.shape[i] = t.shape[i];
    v.strides[i] = t.strides ? t.strides[i] : expected;
    expected *= t.shape[i];
  }
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  return v;
}

}  // namespace

ImportedArray& ImportedArray::operator=(ImportedArray&& other) noexcept {
  if (this != &other) {
    release();
    view_ = other.view_;
    managed_ = other.managed_;
    versioned_ = other.versioned_;
    other.managed_ = nullptr;
    other.view_ = TensorView{};
  }
  return *this;
}

void ImportedArray::release() noexcept {
  if (!managed_) return;
  if (versioned_) {
    auto* m = static_cast<DLManagedTensorVersioned*>(managed_);
    if (m->deleter) m->deleter(m);
  } else {
    auto* m = static_cast<DLManagedTensor*>(managed_);
    if (m->deleter) m->deleter(m);
  }
  managed_ = nullptr;
}

ImportedArray ImportedArray::from_capsule(py::handle obj, const std::string& name, bool writable) {
  ImportedArray out;
  if (obj.is_none()) return out;
  PyObject* cap = obj.ptr();
  if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
    auto* m = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(cap, "dltensor_versioned"));
    if (m->version.major != 1)
      fail(name + ": DLPack version " + std::to_string(m->version.major) + "." + std::to_string(m->version.minor) +
           " is not supported (edpairs reads 1.x)");
    // We own it from here: renaming stops the capsule's destructor from freeing it.
    PyCapsule_SetName(cap, "used_dltensor_versioned");
    out.managed_ = m;
    out.versioned_ = true;
    if (writable && (m->flags & DLPACK_FLAG_BITMASK_READ_ONLY)) fail(name + " is read-only but edpairs must write into it");
    out.view_ = view_of(m->dl_tensor, name);
  } else if (PyCapsule_IsValid(cap, "dltensor")) {
    auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
    PyCapsule_SetName(cap, "used_dltensor");
    out.managed_ = m;
    out.versioned_ = false;
    out.view_ = view_of(m->dl_tensor, name);
  } else {
    throw py::type_error(name + ": expected a DLPack capsule (from __dlpack__()) or None, got " +
                         std::string(py::str(py::type::of(obj))));
  }
  return out;
}

}  // namespace edpairs::bindings
