// Error types of the core. std::invalid_argument (bad shapes, dtypes, values) becomes ValueError
// in Python; CudaError and BackendUnavailable become edpairs.CudaError / edpairs.BackendUnavailable.
#pragma once

#include <stdexcept>
#include <string>

namespace edpairs {

// A CUDA runtime call or kernel launch failed; the message carries file:line and CUDA's string.
class CudaError : public std::runtime_error {
 public:
  explicit CudaError(const std::string& what) : std::runtime_error(what) {}
};

// The requested backend (CUDA) was not compiled into this build.
class BackendUnavailable : public std::runtime_error {
 public:
  explicit BackendUnavailable(const std::string& what) : std::runtime_error(what) {}
};

[[noreturn]] inline void fail(const std::string& what) { throw std::invalid_argument(what); }

}  // namespace edpairs
