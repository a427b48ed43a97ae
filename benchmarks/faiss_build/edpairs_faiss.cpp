// A C interface to the parts of faiss's GPU library that benchmarks/bench_kmeans.py compares
// edpairs against, for machines where faiss's Python module with GPU support cannot be
// installed (the device: no network, 64 MiB of carry; PyPI's faiss GPU wheels are larger and
// built for CUDA 12). benchmarks/faiss_build/build.sh compiles faiss's own C++ library and this file
// into build/faiss/; bench_kmeans.py loads it with ctypes (benchmarks/_faiss_gpu.py).
//
// Two things are offered, the two ways a faiss user clusters on a GPU:
//   * edf_kmeans: faiss::Clustering with a GpuIndexFlatIP, as faiss.Kmeans(d, k, spherical=True,
//     gpu=True).train(x, init_centroids=C) does it: rows in host memory, the search on the GPU,
//     the centroid update on the CPU; faiss's own per-iteration times are returned.
//   * edf_flat_ip_*: a GpuIndexFlatIP searched with rows already on the GPU (faiss's fastest
//     assignment: no copies), on the caller's CUDA stream.
// A device below 0 takes faiss's CPU IndexFlatIP instead, so that the interface can be checked
// on a machine without a GPU (tests/test_faiss_shim.py).
// Every function returns 0 on success or -1 with faiss's message in err (no exception crosses
// the C boundary).

#include <faiss/Clustering.h>
#include <faiss/IndexFlat.h>
#include <faiss/gpu/GpuIndexFlat.h>
#include <faiss/gpu/StandardGpuResources.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>

namespace {

// faiss aborts the process on a failing CUDA call (FAISS_ASSERT), so the device is checked
// here first, as an exception with the reason.
void check_device(int device) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) throw std::runtime_error(std::string("no usable CUDA device: ") + cudaGetErrorString(e));
  if (device >= n) {
    throw std::runtime_error("CUDA device " + std::to_string(device) + " asked for; " + std::to_string(n) +
                             " visible");
  }
}

// An inner-product flat index: on the GPU `device`, or faiss's CPU index for device < 0.
faiss::Index* flat_ip(void* res, int device, int d) {
  if (device < 0) return new faiss::IndexFlatIP(d);
  check_device(device);
  faiss::gpu::GpuIndexFlatConfig config;
  config.device = device;
  return new faiss::gpu::GpuIndexFlatIP(static_cast<faiss::gpu::StandardGpuResources*>(res), d, config);
}

int fail(char* err, int errlen, const char* what) {
  if (err != nullptr && errlen > 0) {
    std::strncpy(err, what, static_cast<size_t>(errlen) - 1);
    err[errlen - 1] = '\0';
  }
  return -1;
}

template <class F>
int guarded(char* err, int errlen, F&& body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    return fail(err, errlen, e.what());
  } catch (...) {
    return fail(err, errlen, "unknown C++ exception");
  }
}

}  // namespace

extern "C" {

// Version of the faiss library this was built against ("1.7.3").
const char* edf_faiss_version() {
  static const std::string v = std::to_string(FAISS_VERSION_MAJOR) + "." + std::to_string(FAISS_VERSION_MINOR) +
                               "." + std::to_string(FAISS_VERSION_PATCH);
  return v.c_str();
}

// GPU resources (cuBLAS handle, temporary memory) for one device; stream 0 keeps faiss's own.
int edf_resources_new(int device, void* stream, void** out, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    if (device >= 0) check_device(device);
    auto* res = new faiss::gpu::StandardGpuResources();
    if (stream != nullptr) res->setDefaultStream(device, static_cast<cudaStream_t>(stream));
    *out = res;
  });
}

void edf_resources_free(void* res) { delete static_cast<faiss::gpu::StandardGpuResources*>(res); }

// niter iterations of faiss's spherical k-means over the host rows x (n x d, float32) from the
// k x d centroids in `centroids`, which receive the result. iteration_s[i] (niter entries) is
// faiss's time for iteration i (search, centroid update, renormalisation, index refill; the
// first also holds the index's first fill after the set-up).
int edf_kmeans(void* res, int device, int64_t n, int d, int k, const float* x, float* centroids, int niter,
               double* iteration_s, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    faiss::ClusteringParameters cp;
    cp.niter = niter;
    cp.spherical = true;
    cp.max_points_per_centroid = static_cast<int>(std::min<int64_t>(n, INT32_MAX));  // no subsampling
    cp.min_points_per_centroid = 1;
    cp.seed = 0;
    cp.verbose = false;
    std::unique_ptr<faiss::Index> index(flat_ip(res, device, d));
    faiss::Clustering clus(d, k, cp);
    clus.centroids.assign(centroids, centroids + static_cast<size_t>(k) * d);
    clus.train(n, x, *index);
    std::memcpy(centroids, clus.centroids.data(), sizeof(float) * static_cast<size_t>(k) * d);
    double before = 0.0;
    for (int i = 0; i < niter && i < static_cast<int>(clus.iteration_stats.size()); ++i) {
      iteration_s[i] = clus.iteration_stats[i].time - before;
      before = clus.iteration_stats[i].time;
    }
  });
}

// An inner-product flat index of d dimensions on `device` (the CPU's for device < 0).
int edf_flat_ip_new(void* res, int device, int d, void** out, char* err, int errlen) {
  return guarded(err, errlen, [&] { *out = flat_ip(res, device, d); });
}

void edf_flat_ip_free(void* index) { delete static_cast<faiss::Index*>(index); }

// The index holds exactly the k vectors c (k x d float32, host or device memory).
int edf_flat_ip_set(void* index, int64_t k, const float* c, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    auto* idx = static_cast<faiss::Index*>(index);
    idx->reset();
    idx->add(k, c);
  });
}

// For each of the n rows x (float32; host or device memory), the index of its largest inner
// product and that product (labels: int64). Device pointers are used in place.
int edf_flat_ip_search(void* index, int64_t n, const float* x, float* scores, int64_t* labels, char* err,
                       int errlen) {
  return guarded(err, errlen, [&] {
    static_cast<faiss::Index*>(index)->search(n, x, 1, scores, labels);
  });
}

}  // extern "C"
