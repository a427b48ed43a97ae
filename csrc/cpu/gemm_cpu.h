// Building blocks shared by the CPU kernels: a register-blocked float32 micro-kernel
// (AVX2+FMA when the CPU has it, portable C++ otherwise, chosen at run time) and the packing
// routines that copy slices of the operands into the micro-kernel's panel layout. Packing is
// where inputs are converted to float32, centred, and checked for NaN/Inf, so every kernel
// gets those for free in the one read of its input.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

#include "edpairs/tensor_view.h"

namespace edpairs::cpu {

constexpr int MR = 6;   // rows of a micro-tile (A panel height)
constexpr int NR = 16;  // columns of a micro-tile (B panel width): two AVX vectors

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
inline int64_t ceil_div(int64_t v, int64_t m) { return (v + m - 1) / m; }

// C[MR x NR] (row stride ldc) = (accumulate ? C : 0) + A(MR x kc) * B(kc x NR), where the A
// panel stores column p of the tile at A[p*MR .. p*MR+MR) and the B panel row p at
// B[p*NR .. p*NR+NR). B must be 32-byte aligned. Every column j sums over p in the same
// order, so equal columns of B give bit-equal results (exact ties stay exact).
using MicroKernel = void (*)(int64_t kc, const float* A, const float* B, float* C, int64_t ldc,
                             bool accumulate);
MicroKernel micro_kernel();
const char* micro_kernel_isa();

// A 2-D operand: element (r, c) lives at data + (r*s0 + c*s1) elements, of type dtype.
struct Matrix {
  const void* data;
  DType dtype;
  int64_t rows, cols, s0, s1;
};
inline Matrix matrix_of(const TensorView& v) {
  return Matrix{v.data, v.dtype, v.shape[0], v.shape[1], v.strides[0], v.strides[1]};
}

// Packers. Out-of-range rows/columns are written as zeros; `center` (may be null) is
// subtracted along the operand's columns. Each returns a value that is NaN iff a packed
// element was NaN or +-Inf (or overflowed float32): `finite_check(...)` tests it.
//   pack_a_rows: Ap[p*MR + i] = M[r0+i, c0+p] - center[c0+p],  i < MR, p < kc
//   pack_b_rows: Bp[p*NR + j] = M[r0+j, c0+p] - center[c0+p],  j < NR
//   pack_b_cols: Bp[p*NR + j] = M[r0+p, c0+j] - center[c0+j]
// pack_a_rows also adds each packed row's sum of squares into row_sumsq[i] when given.
float pack_a_rows(const Matrix& m, const float* center, int64_t r0, int64_t c0, int64_t kc, float* Ap,
                  double* row_sumsq = nullptr);
float pack_b_rows(const Matrix& m, const float* center, int64_t r0, int64_t c0, int64_t kc, float* Bp);
float pack_b_cols(const Matrix& m, const float* center, int64_t r0, int64_t c0, int64_t kc, float* Bp);

inline bool finite_check(float flag) { return flag == flag; }

// NaN iff some v[i] is NaN or +-Inf. Eight independent lanes: the loop vectorises without
// reassociating floating-point sums.
inline float nonfinite_flag(const float* v, int64_t n) {
  float lanes[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) lanes[j] += v[i + j] * 0.f;
  float flag = 0.f;
  for (; i < n; ++i) flag += v[i] * 0.f;
  for (float l : lanes) flag += l;
  return flag;
}

// Sum of squares in float64, four independent lanes.
inline double sum_squares(const float* v, int64_t n) {
  double lanes[4] = {};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int j = 0; j < 4; ++j) lanes[j] += static_cast<double>(v[i + j]) * v[i + j];
  double s = 0;
  for (; i < n; ++i) s += static_cast<double>(v[i]) * v[i];
  return s + lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

// Folds v_j = scale[j] * c[j], j < n, into a running argmax: when max_j v_j > best, sets
// best to it and best_j to j0 + (the first j attaining it). NaN values never win.
using ArgmaxFold = void (*)(const float* c, const float* scale, int64_t n, int64_t j0, float& best, int64_t& best_j);
ArgmaxFold argmax_fold();

// Rows [r0, r0 + rows) of m, centred, into column panels, reading each row once: the A panel
// of columns [q*MR, q*MR + MR) sits at Ap + q*MR*ld with element (row r0+p, column q*MR+i) at
// (p0 + p)*MR + i; B panels likewise with NR (either pointer may be null). Columns beyond
// m.cols are zero. `row` is scratch of column_panels_row(m.cols) floats (the last A panel and
// the last B panel read up to their own widths past m.cols). Returns the finite flag.
inline int64_t column_panels_row(int64_t cols) { return std::max(round_up(cols, MR), round_up(cols, NR)); }
float pack_column_panels(const Matrix& m, const float* center, int64_t r0, int64_t rows, int64_t p0,
                         int64_t ld, float* Ap, float* Bp, float* row);

// Macro-tiles of products of column panels (moments, signal moments).
constexpr int64_t TM = 96;   // macro-tile rows (a multiple of MR)
constexpr int64_t TN = 128;  // macro-tile columns (a multiple of NR)

// out[i0+i, j0+j] += sum_{p < depth} A[p, i0+i] * B[p, j0+j] over the macro-tile at (i0, j0),
// i < rows - i0, j < cols - j0, from column panels as pack_column_panels lays them out (stride
// ld): float32 micro-tiles summed over the depth, then added into float64 `out` (row stride
// ldo). `acc` is TM x TN scratch.
void add_macro_tile(int64_t depth, const float* Ap, const float* Bp, int64_t ld, int64_t i0, int64_t j0,
                    int64_t rows, int64_t cols, double* out, int64_t ldo, float* acc);

// Row r of m, columns [c0, c0+n), converted to float32 (and centred) into out.
void load_row(const Matrix& m, const float* center, int64_t r, int64_t c0, int64_t n, float* out);

// 64-byte aligned scratch buffers.
struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
template <class T>
using Buffer = std::unique_ptr<T[], AlignedFree>;
template <class T>
Buffer<T> aligned_buffer(int64_t n) {
  size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(n, 1) * sizeof(T), 64));
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  return Buffer<T>(static_cast<T*>(p));
}

}  // namespace edpairs::cpu
