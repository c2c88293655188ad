// The elementwise halves of the CPU linear + activation ops: the epilogue applied to a GEMM's
// output (y = act(z), rounded once to the output dtype) and the backward's gradient mask
// (dz = dy * act'(z), read from the saved output). The bodies are in linear_epilogue_kernel.h,
// compiled once per CPU capability as attention's kernels are; the functions here pick the
// build for cpu_level(). Only ReLU exists now; another activation is one more Activation value
// and one more functor in linear_epilogue_kernel.h.
#pragma once

#include "cpu_vec.h"

namespace bigmodel {
namespace linear {

enum class Activation { kReLU };

// One set per CPU capability. forward: y[0:n] = act(z[0:n]) (z and y may be the same memory
// when they share a type). backward: dz[0:n] = dy[0:n] * act'(from y[0:n]), in float (double
// for double) reading half and bfloat16 directly, or in their own type (native GEMMs).
#define BIGMODEL_LINEAR_EPILOGUE_DECLARE(cap)                                                       \
  namespace cap {                                                                                   \
  void forward(Activation act, const float* z, float* y, int64_t n);                                \
  void forward(Activation act, const double* z, double* y, int64_t n);                              \
  void forward(Activation act, const float* z, at::BFloat16* y, int64_t n);                         \
  void forward(Activation act, const float* z, at::Half* y, int64_t n);                             \
  void forward(Activation act, const at::BFloat16* z, at::BFloat16* y, int64_t n);                  \
  void forward(Activation act, const at::Half* z, at::Half* y, int64_t n);                          \
  void backward(Activation act, const float* dy, const float* y, float* dz, int64_t n);             \
  void backward(Activation act, const double* dy, const double* y, double* dz, int64_t n);          \
  void backward(Activation act, const at::BFloat16* dy, const at::BFloat16* y, float* dz, int64_t n); \
  void backward(Activation act, const at::Half* dy, const at::Half* y, float* dz, int64_t n);       \
  void backward(Activation act, const at::BFloat16* dy, const at::BFloat16* y, at::BFloat16* dz,     \
                int64_t n);                                                                         \
  void backward(Activation act, const at::Half* dy, const at::Half* y, at::Half* dz, int64_t n);    \
  }
BIGMODEL_LINEAR_EPILOGUE_DECLARE(DEFAULT)
BIGMODEL_LINEAR_EPILOGUE_DECLARE(AVX2)
BIGMODEL_LINEAR_EPILOGUE_DECLARE(AVX512)
#undef BIGMODEL_LINEAR_EPILOGUE_DECLARE

// Chunks big enough to amortise a fork, small enough to spread a cache-sized block over cores.
constexpr int64_t kEpilogueGrain = 16384;

// The epilogue over n elements, split across the threads.
template <typename acc_t, typename out_t>
void epilogue_forward(Activation act, const acc_t* z, out_t* y, int64_t n) {
  const CpuLevel level = cpu_level();
  at::parallel_for(0, n, kEpilogueGrain, [&](int64_t a, int64_t b) {
    switch (level) {
#if BIGMODEL_CPU_VECTOR_VARIANTS
      case CpuLevel::kAvx512: return AVX512::forward(act, z + a, y + a, b - a);
      case CpuLevel::kAvx2: return AVX2::forward(act, z + a, y + a, b - a);
#endif
      default: return DEFAULT::forward(act, z + a, y + a, b - a);
    }
  });
}

// The gradient mask over `rows` rows of width n, split across the threads.
template <typename in_t, typename acc_t>
void epilogue_backward(Activation act, const in_t* dy, const in_t* y, acc_t* dz, int64_t rows,
                       int64_t n) {
  const CpuLevel level = cpu_level();
  const int64_t grain = std::max<int64_t>(1, kEpilogueGrain / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t a, int64_t b) {
    const int64_t o = a * n, c = (b - a) * n;
    switch (level) {
#if BIGMODEL_CPU_VECTOR_VARIANTS
      case CpuLevel::kAvx512: return AVX512::backward(act, dy + o, y + o, dz + o, c);
      case CpuLevel::kAvx2: return AVX2::backward(act, dy + o, y + o, dz + o, c);
#endif
      default: return DEFAULT::backward(act, dy + o, y + o, dz + o, c);
    }
  });
}

}  // namespace linear
}  // namespace bigmodel
