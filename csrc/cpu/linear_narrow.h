// The forward GEMM of a narrow layer (a few output features: a classifier's last Linear, the
// seed MLP's 256 -> 10), z = x W^T + b, by the engine itself at the vector levels. MKL's sgemm
// runs such shapes at about half its rate (1024x256->10: 67 GFLOP/s on one Xeon core capped
// to AVX2, against 117 at 1024x784->512): its micro-kernel tiles the output in wide column
// panels, mostly padding here. With N this small the whole of W fits in L1 (10 x 256 floats:
// 10 KB), so each output is a dot product of an x row with a W row along K, in vector lanes,
// with one horizontal sum at the end. Each output's order of summation is fixed by K alone:
// the result does not depend on the thread count.
#pragma once

#include "cpu_vec.h"
#include "output_cache.h"

namespace bigmodel {
namespace linear {

// Output features up to which the narrow kernel runs, per level: beyond, MKL's panels fill up.
// Measured on the Xeon, op / eager at 1024x256->N, 2 threads: AVX2 capped N = 10 1.22x, 11
// 1.08x, 12 0.96x, 16 0.69x; AVX512 N = 10 1.45x, 12 1.21x, 14 1.09x, 16 0.73x (bench/NOTES.md).
constexpr int64_t kNarrowMaxNAvx2 = 11, kNarrowMaxNAvx512 = 14;

#define BIGMODEL_LINEAR_NARROW_DECLARE(cap)                                                   \
  namespace cap {                                                                             \
  void narrow_rows(const float* x, int64_t ldx, const float* w, const float* bias, float* z,  \
                   int64_t rows, int64_t K, int64_t N);                                       \
  void narrow_grad_input_rows(const float* dz, const float* w, float* dx, int64_t rows,       \
                              int64_t K, int64_t N);                                          \
  void narrow_grad_weight_cols(const float* dz, const float* x, float* dw, int64_t M,         \
                               int64_t K, int64_t N, int64_t k0, int64_t k1);                 \
  }
BIGMODEL_LINEAR_NARROW_DECLARE(AVX2)
BIGMODEL_LINEAR_NARROW_DECLARE(AVX512)
#undef BIGMODEL_LINEAR_NARROW_DECLARE

// Whether the narrow kernel computes this fp32 forward: N up to the level's bound at a vector
// level, with K long enough for the vector lanes. BIGMODEL_NO_NARROW=1 turns it off (to measure
// against). Against oneDNN's AVX2 and AVX-512 kernels, where the plan would otherwise use them
// for a narrow forward (AMD): 1.3-1.6x at N = 10 on the Xeon; on AMD itself not yet measured.
// The most output features the narrow kernels take at the level the engine runs at: 0 at
// DEFAULT, or with BIGMODEL_NO_NARROW set. (bigmodel.nn.Linear reads it too, once.)
inline int64_t narrow_max_n() {
  const CpuLevel level = cpu_level();
  if (!BIGMODEL_CPU_VECTOR_VARIANTS || level == CpuLevel::kDefault) return 0;
  static const bool off = std::getenv("BIGMODEL_NO_NARROW") != nullptr;
  return off ? 0 : level == CpuLevel::kAvx512 ? kNarrowMaxNAvx512 : kNarrowMaxNAvx2;
}

// Inputs at least this long for the narrow kernels (a row is one vector at least).
constexpr int64_t kNarrowMinK = 16;

inline bool narrow_applies(int64_t M, int64_t K, int64_t N) {
  return M > 0 && N > 0 && N <= narrow_max_n() && K >= kNarrowMinK;
}

// z (M, N, contiguous) = x W^T (+ bias): x (M, K) with row stride ldx and unit column stride,
// w (N, K) contiguous, bias (N) or null; rows split across the threads.
inline void narrow_forward(const float* x, int64_t ldx, const float* w, const float* bias,
                           float* z, int64_t M, int64_t K, int64_t N) {
#if BIGMODEL_CPU_VECTOR_VARIANTS
  const bool avx512 = cpu_level() == CpuLevel::kAvx512;
  // ~64 KFLOP a row block at least: a fork costs a few microseconds.
  const int64_t grain = std::max<int64_t>(8, 32768 / std::max<int64_t>(1, K * N));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    if (avx512) {
      AVX512::narrow_rows(x + r0 * ldx, ldx, w, bias, z + r0 * N, r1 - r0, K, N);
    } else {
      AVX2::narrow_rows(x + r0 * ldx, ldx, w, bias, z + r0 * N, r1 - r0, K, N);
    }
  });
#else
  (void)x, (void)ldx, (void)w, (void)bias, (void)z, (void)M, (void)K, (void)N;
#endif
}

// ---- Backward: dX = dz W and dW = dz^T x for the same narrow layers, by the engine's own
// kernels (linear_narrow_kernel.h): dX as R x C register tiles of an N-term outer-product sum
// (W, 10 KB, stays in L1), dW as groups of 5 output features x C column vectors summed down the
// M rows, in fixed spans. Each output's order of summation is fixed by the shape alone, so the
// results do not depend on the thread count: threads split dX by rows and dW by columns.

// Columns a dW task spans: the widest column tile of each level (4 and 2 vectors).
constexpr int64_t kGradWeightChunkAvx512 = 64, kGradWeightChunkAvx2 = 16;

// Whether the narrow kernels compute this fp32 backward: the forward's shapes, with dX and x
// small enough for the whole-tensor backward (under kLargeOutputBytes).
inline bool narrow_backward_applies(int64_t M, int64_t K, int64_t N) {
  return narrow_applies(M, K, N) && M * K * 4 < kLargeOutputBytes;
}

// dz (M, N), w (N, K), dx (M, K): all contiguous.
inline void narrow_grad_input(const float* dz, const float* w, float* dx, int64_t M, int64_t K,
                              int64_t N) {
#if BIGMODEL_CPU_VECTOR_VARIANTS
  const bool avx512 = cpu_level() == CpuLevel::kAvx512;
  const int64_t grain = std::max<int64_t>(8, 32768 / std::max<int64_t>(1, K * N));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    if (avx512) {
      AVX512::narrow_grad_input_rows(dz + r0 * N, w, dx + r0 * K, r1 - r0, K, N);
    } else {
      AVX2::narrow_grad_input_rows(dz + r0 * N, w, dx + r0 * K, r1 - r0, K, N);
    }
  });
#else
  (void)dz, (void)w, (void)dx, (void)M, (void)K, (void)N;
#endif
}

// dz (M, N), x (M, K), dw (N, K): all contiguous; dw written in full (M == 0: zeros).
inline void narrow_grad_weight(const float* dz, const float* x, float* dw, int64_t M, int64_t K,
                               int64_t N) {
#if BIGMODEL_CPU_VECTOR_VARIANTS
  if (M == 0) {
    std::fill(dw, dw + N * K, 0.f);
    return;
  }
  const bool avx512 = cpu_level() == CpuLevel::kAvx512;
  const int64_t chunk = avx512 ? kGradWeightChunkAvx512 : kGradWeightChunkAvx2;
  const int64_t chunks = (K + chunk - 1) / chunk;
  // ~64 KFLOP a task at least, as in the forward.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, chunk * M * N));
  at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
    const int64_t k0 = c0 * chunk, k1 = std::min(K, c1 * chunk);
    if (avx512) {
      AVX512::narrow_grad_weight_cols(dz, x, dw, M, K, N, k0, k1);
    } else {
      AVX2::narrow_grad_weight_cols(dz, x, dw, M, K, N, k0, k1);
    }
  });
#else
  (void)dz, (void)x, (void)dw, (void)M, (void)K, (void)N;
#endif
}

}  // namespace linear
}  // namespace bigmodel
