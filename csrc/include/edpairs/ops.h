// The kernel families of edpairs. Each op has a CPU and a CUDA implementation with the same
// signature and the same semantics; the bindings validate arguments and pick one.
//
// Conventions shared by every op:
//  * `x` (N, D) may be float32, float64, float16 or bfloat16; arithmetic is float32 with
//    float64 accumulation across blocks of rows (see each op). On CUDA, x.stride(1) == 1.
//  * Small parameter arrays (centroids, W, b, center, scales) are float32 and contiguous.
//  * Outputs are written, never accumulated into: each op overwrites its outputs.
//  * `stream` is a cudaStream_t for the CUDA implementation (work is queued on it, no
//    synchronisation); the CPU implementation ignores it.
//  * CPU implementations check x and the parameters for NaN/Inf while packing them when
//    `check_finite` is set and throw std::invalid_argument naming the argument. CUDA
//    implementations never check (a check needs a device->host synchronisation); the Python
//    layer does it there when asked.
#pragma once

#include <cstdint>
#include <string>

#include "edpairs/tensor_view.h"

namespace edpairs {

using Stream = void*;

// ---------------------------------------------------------------------------------------
// 1. Fused cosine assignment (+ accumulation).
//
// For row n let x~_n = x_n - center (center = 0 when absent) and
//   r_n = row_scale[n]                if given (must be >= 0),
//         1 / ||x~_n||                otherwise (0 when x~_n = 0),
//   s_j = col_scale[j]                if given,
//         1 / ||c_j||                 otherwise (0 for a zero centroid),
//   dot_nj = x~_n . c_j,  score_nj = r_n * s_j * dot_nj.
// labels[n] = the smallest j maximising s_j * dot_nj when r_n > 0, and 0 when r_n == 0;
// scores[n] = score_{n, labels[n]} (so a zero row gets label 0 and score 0, never NaN). An
// unchecked row holding NaN or Inf has no finite norm and computed r_n = 0: label 0, score 0, as
// a zero row. Unchecked non-finite centroids can leave a nonzero row without any score that is
// not NaN: label 0, score NaN.
// With the default scales score_nj is the cosine similarity of x~_n and c_j.
// When `sums` is present: sums[j] = sum over {n : labels[n] = j} of r_n * x~_n (float64) and
// counts[j] = #{n : labels[n] = j}; a zero row counts towards cluster 0 and adds nothing.
// X is read once; no N x k matrix is ever materialised.
//
// `precision` picks the arithmetic of the products x~_n . c_j on CUDA (the CPU is always
// exact float32 and ignores it):
//  * Float32: float32 FMAs on CUDA cores (any input dtype).
//  * TensorCore: tensor-core products with float32 accumulation: TF32 for float32 x (each
//    operand rounded to 10 mantissa bits), float16 / bfloat16 x in their own precision with
//    the centroids rounded to that dtype. The centering is applied after the product
//    (x~.c = x.c - center.c, the second term in float64), the row norms stay float32 on the
//    centred rows. Labels may differ from exact float32 where two centroids' scores differ by
//    less than about 1e-3 (TF32) or 1e-2 (bfloat16) of the row's score scale. float64 x always
//    takes the Float32 path.
//  * TensorCoreHalf (assign only; Python's EDPAIRS_ASSIGN_HALF=1): float32 x labelled from
//    float16 values of each row times a power of two of its own (those of 3e' half_rows, made
//    in shared memory by the kernel) against float16 centroids scaled the same way, float32
//    accumulation: TF32's 11 significant bits, rounded to nearest; scores from the norms of
//    the scaled float32 rows.
//    CUDA on compute capability 9.0 (a build with sm_90a) only, for float32 x with 16-byte
//    aligned rows, D <= 512, no center and no row_scale (col_scale is taken: s_j = col_scale_j
//    2^-e_j for centroid j's power of two); any other CUDA input with N >= 1 is refused. The
//    CPU, exact always, takes it as Float32.
enum class AssignPrecision : uint8_t { Float32, TensorCore, TensorCoreHalf };

// Limits that Python's dispatch (edpairs._gemm) must agree with; build_info()["limits"] hands
// them over, so the two languages cannot drift apart.
// The smallest k whose tensor-core labels go to the wgmma kernel on Hopper when
// EDPAIRS_ASSIGN_KERNEL is "auto" (below it the mma kernel; _gemm.TF32_MIN_K).
constexpr int64_t kWgmmaAutoMinK = 129;
// The widest rows TensorCoreHalf labels in one kernel: a 128-row tile of float16 rows stays in
// shared memory (_gemm.HALF_RESIDENT_MAX_D).
constexpr int kWgmmaResidentMaxD = 512;

struct AssignArgs {
  TensorView x;          // (N, D)
  TensorView centroids;  // (k, D) float32, k >= 1
  TensorView center;     // optional (D,) float32
  TensorView row_scale;  // optional (N,) float32, >= 0
  TensorView col_scale;  // optional (k,) float32
  TensorView labels;     // out (N,) int64
  TensorView scores;     // out (N,) float32
  TensorView sums;       // optional out (k, D) float64
  TensorView counts;     // optional out (k,) int64; present exactly when sums is
  bool check_finite = true;
  AssignPrecision precision = AssignPrecision::Float32;
};
void assign_cpu(const AssignArgs& args, Stream stream);
void assign_cuda(const AssignArgs& args, Stream stream);

// ---------------------------------------------------------------------------------------
// 2. Spherical centroid update.
// out[j] = sums[j] / ||sums[j]|| when counts[j] > 0 and ||sums[j]|| > 0; otherwise
// out[j] = previous[j] unchanged (an empty or degenerate cluster; the caller re-seeds it), and
// for non-finite sums. The norm does not overflow or underflow (sums of 1e200 or 1e-200).
struct NormalizeArgs {
  TensorView sums;      // (k, D) float64
  TensorView counts;    // (k,) int64
  TensorView previous;  // (k, D) float32
  TensorView out;       // out (k, D) float32
};
void normalize_centroids_cpu(const NormalizeArgs& args, Stream stream);
void normalize_centroids_cuda(const NormalizeArgs& args, Stream stream);

// ---------------------------------------------------------------------------------------
// 3a. Moments of one chunk: mean[d] = (1/N) sum_n x_nd (float64) and the centred scatter
// m2 = sum_n (x_n - mean)(x_n - mean)^T (float64, symmetric, both triangles written).
// Products are float32 on centred values, summed in float32 over blocks of at most 512 rows
// and in float64 across blocks. Chunks merge exactly in float64 (Chan et al.),
// which the Python layer does. N >= 1.
struct MomentsArgs {
  TensorView x;     // (N, D)
  TensorView mean;  // out (D,) float64
  TensorView m2;    // out (D, D) float64
  bool check_finite = true;
  // CUDA only: TensorCore computes the scatter with TF32 products of the centred rows (float32
  // x with 16-byte aligned rows; the exact float32 kernel otherwise), float32 within a block,
  // float64 across blocks. The CPU is always exact float32.
  AssignPrecision precision = AssignPrecision::Float32;
};
void moments_cpu(const MomentsArgs& args, Stream stream);
void moments_cuda(const MomentsArgs& args, Stream stream);

// ---------------------------------------------------------------------------------------
// 3b. Masked per-concept statistics (DESIGN 2, stage 4).
// z_ni = w_i . x_n - b_i (w_i = column i of W), positives P_i = {n : z_ni > 0};
// with x~_n = x_n - center (center = 0 when absent):
//   count[i]  = |P_i|               sum_z[i]  = sum_{P_i} z_ni
//   sum_x[i]  = sum_{P_i} x~_n      sum_zz[i] = sum_{P_i} z_ni^2
//   sum_xz[i] = sum_{P_i} x~_n z_ni
// computed as one masked product x~^T [M, M * Z] per block of rows (M = Z > 0), float32
// within a block, float64 across blocks.
struct SignalMomentsArgs {
  TensorView x;          // (N, D)
  TensorView w;          // (D, I) float32
  TensorView b;          // (I,) float32
  TensorView center;     // optional (D,) float32
  TensorView count;      // out (I,) int64
  TensorView sum_x;      // out (I, D) float64
  TensorView sum_z;      // out (I,) float64
  TensorView sum_zz;     // out (I,) float64
  TensorView sum_xz;     // out (I, D) float64
  TensorView workspace;  // CUDA only: (R, 2I) float32 scratch; rows are processed R at a time
  bool check_finite = true;
  // CUDA only: TensorCore computes x~^T [M, M * Z] with TF32 operands (float32 x with 16-byte
  // aligned rows and 2I % 4 == 0; exact otherwise); z and the masks stay exact float32.
  AssignPrecision precision = AssignPrecision::Float32;
};
void signal_moments_cpu(const SignalMomentsArgs& args, Stream stream);
void signal_moments_cuda(const SignalMomentsArgs& args, Stream stream);

// 3c. The detector epilogue of signal moments on its own, for the library-product route
// (edpairs/_gemm.py: Z = X~ W - b' and [M, M*Z]^T X~ through the array library's matrix
// product): for z (R, I) float32,
//   out[r] = [M_r, M_r * z_r] with M_ri = (z_ri > 0),  (R, 2I) float32
//   count[i] += |{r : z_ri > 0}|, sum_z[i] += sum of those z_ri, sum_zz[i] += their squares
// (float64; count int64). All arrays contiguous and on one device. With shift and alpha (I,)
// float32, z_r stands for z_in_r * alpha + shift (float32: the product of operands scaled per
// concept and the bias, applied here). With a float16 out and scale (I,) float32 (powers of two):
// out[r] = [M_r, float16(M_r * z_r * scale)], rounded to nearest even (the half-precision
// products' operands; the sums still of the float32 z).
struct SignalMasksArgs {
  TensorView z;       // (R, I) float32
  TensorView out;     // out (R, 2I) float32, or float16 with scale
  TensorView count;   // in/out (I,) int64
  TensorView sum_z;   // in/out (I,) float64
  TensorView sum_zz;  // in/out (I,) float64
  TensorView scale;   // (I,) float32 when out is float16, else absent
  TensorView shift;   // optional (I,) float32
  TensorView alpha;   // (I,) float32 with shift, else absent
};
void signal_masks_cpu(const SignalMasksArgs& args, Stream stream);
void signal_masks_cuda(const SignalMasksArgs& args, Stream stream);

// 3d. The assignment's pieces on the library-product route (edpairs/_gemm.py), where the
// library forms dots[n, j] = (x_n - center) . c_j for a block of rows (the rows centred first):
//  argmax_rows: with the score s_j dots[n, j] (s = col_scale, applied after the product as the
//    kernels do) and r_n = row_scale[n] when given, else 1 / ||x_n - center|| (0 for a zero
//    row): labels[n] = the lowest j maximising the score, best[n] = r_n times that score
//    (label 0 and best 0 where r_n == 0), rscale[n] = r_n. Rows of x may be strided.
//    With centroids (k, D) and cnorm (k,) = ||c_j|| given (the TF32 route), near ties are
//    re-scored: where the best and the runner-up score lie within 2^-9 ||x_n - center||
//    (|s_b| ||c_b|| + |s_r| ||c_r||) of each other (the bound of TF32 products of the centred
//    rows, both operands rounded or truncated), the two are recomputed as s_j (x_n - center) .
//    c_j in float64 and the better (tie rule) is taken, its score the recomputed one.
//  cluster_sums: sums[j] = sum of rscale[n] (x_n - center) over the rows labelled j (float64),
//    counts[j] = those rows (a row with rscale 0 counts and adds nothing); labels in [0, k).
struct ArgmaxRowsArgs {
  TensorView scores;     // (R, k) float32, contiguous: the dots
  TensorView col_scale;  // (k,) float32
  TensorView x;          // (R, D)
  TensorView center;     // optional (D,) float32
  TensorView row_scale;  // optional (R,) float32
  TensorView labels;     // out (R,) int64
  TensorView best;       // out (R,) float32
  TensorView rscale;     // out (R,) float32
  TensorView centroids;  // optional (k, D) float32, contiguous: re-score near ties
  TensorView cnorm;      // (k,) float32 with centroids: ||c_j||
};
void argmax_rows_cpu(const ArgmaxRowsArgs& args, Stream stream);
void argmax_rows_cuda(const ArgmaxRowsArgs& args, Stream stream);

struct ClusterSumsArgs {
  TensorView x;       // (N, D)
  TensorView labels;  // (N,) int64
  TensorView rscale;  // (N,) float32
  TensorView center;  // optional (D,) float32
  TensorView sums;    // out (k, D) float64
  TensorView counts;  // out (k,) int64
};
void cluster_sums_cpu(const ClusterSumsArgs& args, Stream stream);
void cluster_sums_cuda(const ClusterSumsArgs& args, Stream stream);

// 3e. The centring pass of the moments on the library-product route: for rows x (R, D) of any
// input dtype (strided rows), shift (D,) float32,
//   out[r] = x_r - shift  (float32, contiguous),  colsum[d] += sum_r out[r, d]  (float64,
//   optional)
// in one read of x, so that the library's Gram product and the mean come from one pass. With a
// float16 out and scale (D,) float32 (powers of two, so the scaling is exact):
//   out[r] = float16((x_r - shift) * scale), rounded to nearest even (+-Inf from 65520 on,
//            65504 in between),
// colsum still the sums of the unscaled float32 values: the half-precision products' operands;
// and, when given, colmax[d] = max(colmax[d], max_r |(x_rd - shift_d) * scale_d|) (float32, the
// values before the rounding; NaN values are passed over), from which the caller learns whether
// the scales suited every step (no overflow, no column left in float16's subnormals).
struct CentreRowsArgs {
  TensorView x;       // (R, D)
  TensorView shift;   // (D,) float32
  TensorView out;     // out (R, D) float32, or float16 with scale; contiguous
  TensorView colsum;  // optional in/out (D,) float64
  TensorView scale;   // (D,) float32 when out is float16, else absent
  TensorView colmax;  // optional in/out (D,) float32 >= 0, with scale only
};
void centre_rows_cpu(const CentreRowsArgs& args, Stream stream);
void centre_rows_cuda(const CentreRowsArgs& args, Stream stream);

// 3e'. Rows in float16 for cosine labels (the route's EDPAIRS_ASSIGN_HALF): for x (R, D)
// float32 (contiguous rows),
//   out[r] = float16(x_r * 2^e_r)  with e_r bringing max_d |x_rd| into [2^7, 2^8) (exact
//            scaling, rounded to nearest even),   rscale[r] = 1 / ||x_r|| (float32)
// A cosine does not change with a row's positive scale, so labels and scores of the float16
// rows are those of x at float16's 11 significant bits. A row whose 1 / ||x_r|| is not a
// finite float32 (zero, or norm below about 2.9e-39) is written as zeros with rscale 0: a
// zero row, as the CPU kernels count it (edpairs' CUDA kernels, which sum float32 squares,
// also count rows with norms below about 2.6e-23 as zero). Not finite rows (for callers that
// skip the finiteness check): max_d |x_rd| passes NaN over (a row of NaN and zeros is a zero
// row); a row with NaN beside non-zero values is written scaled with its NaN (the CPU's keeps
// the sign, 0x7e00 | sign; CUDA's conversion writes 0x7fff), rscale 0; a row
// with Inf takes the scale 2^8, so Inf and values of 256 or more become +-Inf, rscale 0.
struct HalfRowsArgs {
  TensorView x;       // (R, D) float32
  TensorView out;     // out (R, D) float16, contiguous
  TensorView rscale;  // out (R,) float32
};
void half_rows_cpu(const HalfRowsArgs& args, Stream stream);
void half_rows_cuda(const HalfRowsArgs& args, Stream stream);

// 3f. The centred Gram of float32 rows in one pass (the TF32 moments on Hopper's wgmma): for x
// (N, D) float32 with 16-byte aligned rows and D % 4 == 0, shift (D,) float32,
//   m2[d1][d2] += sum_n (x_nd1 - shift_d1)(x_nd2 - shift_d2)  for d1 <= d2 (others untouched),
//   colsum[d] += sum_n (x_nd - shift_d)                        (float64, contiguous)
// CUDA: TF32 products of the centred values, float32 within a block's rows, float64 across
// blocks; compute capability 9.0 with a build that has sm_90a only. CPU: float64 products of
// the float32 centred values (the reference the CUDA tests compare with).
struct CentredGramArgs {
  TensorView x;       // (N, D) float32
  TensorView shift;   // (D,) float32
  TensorView m2;      // in/out (D, D) float64
  TensorView colsum;  // in/out (D,) float64
};
void centred_gram_cpu(const CentredGramArgs& args, Stream stream);
void centred_gram_cuda(const CentredGramArgs& args, Stream stream);

// ---------------------------------------------------------------------------------------
// Runtime information.
int cpu_num_threads();               // threads the CPU kernels use
void cpu_set_num_threads(int n);     // 1 <= n <= kMaxCpuThreads
constexpr int kMaxCpuThreads = 1024;  // beyond it thread creation fails on common systems
std::string cpu_kernel_isa();        // "avx2+fma" or "generic", chosen at run time
int cuda_device_count();             // 0 when CUDA was not built, or no driver / GPU
std::string cuda_runtime_version();  // "" when CUDA was not built

}  // namespace edpairs
