// The forward GEMM of a narrow layer (a few output features: a classifier's last Linear, the
// seed MLP's 256 -> 10), z = x W^T + b, by the engine itself at the vector levels. MKL's sgemm
// runs such shapes at about half its rate (1024x256->10: 67 GFLOP/s on one Xeon core capped
// to AVX2, against 117 at 1024x784->512): its micro-kernel tiles the output in wide column
// panels, mostly padding here. With N this small the whole of W fits in L1 (10 x 256 floats:
// 10 KB), so each output is a dot product of an x row with a W row along K, in vector lanes,
// with one horizontal sum at the end. Each output's order of summation is fixed by K alone:
// the result does not depend on the thread count.
#pragma once

#include <memory>

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
// results do not depend on the thread count: threads split dX by rows, and dW by columns
// within one span of rows, by spans past it.

// Columns a dW task spans: the widest column tile of each level (4 and 2 vectors).
constexpr int64_t kGradWeightChunkAvx512 = 64, kGradWeightChunkAvx2 = 16;
// Rows of one register sum of dW (linear_narrow_kernel.h's grad_weight_tile).
constexpr int64_t kNarrowGradWeightSpan = 256;

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
//
// Up to one span of rows the threads split dW by columns. Past it, by spans: each span of
// kNarrowGradWeightSpan rows is one task, its dW (N x K, ~10 KB) a partial of its own, and the
// partials are then added up in span order: the same sums in the same order as one pass over
// every span (so the same bits), but each task streams whole rows of x once. Split by columns,
// each thread re-read its column strip of x (4 MB at 4096x256) from memory for every group of
// five output features: the backward of 4096x256->10 ran 0.79x eager at AVX512 on the Xeon,
// its dW 524 us against MKL's 348 (bench/NOTES.md, "The Xeon, sixth session").
inline void narrow_grad_weight(const float* dz, const float* x, float* dw, int64_t M, int64_t K,
                               int64_t N) {
#if BIGMODEL_CPU_VECTOR_VARIANTS
  if (M == 0) {
    std::fill(dw, dw + N * K, 0.f);
    return;
  }
  const bool avx512 = cpu_level() == CpuLevel::kAvx512;
  auto cols = [&](const float* dz_rows, const float* x_rows, float* out, int64_t rows, int64_t k0,
                  int64_t k1) {
    if (avx512) {
      AVX512::narrow_grad_weight_cols(dz_rows, x_rows, out, rows, K, N, k0, k1);
    } else {
      AVX2::narrow_grad_weight_cols(dz_rows, x_rows, out, rows, K, N, k0, k1);
    }
  };
  const int64_t spans = (M + kNarrowGradWeightSpan - 1) / kNarrowGradWeightSpan;
  if (spans == 1) {
    const int64_t chunk = avx512 ? kGradWeightChunkAvx512 : kGradWeightChunkAvx2;
    const int64_t chunks = (K + chunk - 1) / chunk;
    // ~64 KFLOP a task at least, as in the forward.
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, chunk * M * N));
    at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
      cols(dz, x, dw, M, c0 * chunk, std::min(K, c1 * chunk));
    });
    return;
  }
  const std::unique_ptr<float[]> partial(new float[spans * N * K]);  // every element written
  at::parallel_for(0, spans, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t i0 = s * kNarrowGradWeightSpan, rows = std::min(kNarrowGradWeightSpan, M - i0);
      cols(dz + i0 * N, x + i0 * K, partial.get() + s * N * K, rows, 0, K);
    }
  });
  // dw = ((p0 + p1) + p2) + ..., element by element, split across the threads.
  at::parallel_for(0, N * K, 2048, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      float sum = partial[e];
      for (int64_t s = 1; s < spans; ++s) sum += partial[s * N * K + e];
      dw[e] = sum;
    }
  });
#else
  (void)dz, (void)x, (void)dw, (void)M, (void)K, (void)N;
#endif
}

}  // namespace linear
}  // namespace bigmodel
