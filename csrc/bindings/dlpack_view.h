// Turning a DLPack capsule into an edpairs::TensorView that stays valid while the owning
// ImportedArray lives (the producer's deleter runs when it is destroyed, with the GIL held).
#pragma once

#include <pybind11/pybind11.h>

#include <string>

#include "edpairs/tensor_view.h"

namespace edpairs::bindings {

class ImportedArray {
 public:
  ImportedArray() = default;
  ImportedArray(const ImportedArray&) = delete;
  ImportedArray& operator=(const ImportedArray&) = delete;
  ImportedArray(ImportedArray&& other) noexcept { *this = std::move(other); }
  ImportedArray& operator=(ImportedArray&& other) noexcept;
  ~ImportedArray() { release(); }

  // `obj` is None (an absent optional argument) or a capsule from __dlpack__().
  // `name` is used in error messages; `writable` rejects read-only exports.
  static ImportedArray from_capsule(pybind11::handle obj, const std::string& name, bool writable);

  const TensorView& view() const { return view_; }

 private:
  void release() noexcept;
  TensorView view_;
  void* managed_ = nullptr;
  bool versioned_ = false;
};

}  // namespace edpairs::bindings
