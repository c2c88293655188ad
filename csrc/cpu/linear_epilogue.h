// The elementwise halves of the CPU linear + activation ops: the epilogue applied to a GEMM's
// output (y = act(z), rounded once to the output dtype, and optionally z itself rounded once for
// the backward) and the backward's gradient (dz = dy * act'(saved), from the saved output or
// pre-activation). The bodies are in linear_epilogue_kernel.h, compiled once per CPU capability
// as attention's kernels are; the functions here pick the build for cpu_level(). Another
// activation is one more Activation::Kind and one more functor in linear_epilogue_kernel.h.
#pragma once

#include <algorithm>
#include <vector>

#include "cpu_vec.h"

namespace bigmodel {
namespace linear {

// An activation and its one parameter (LeakyReLU's slope; the others ignore it).
struct Activation {
  enum Kind { kNone, kReLU, kLeakyReLU, kGelu, kGeluTanh, kSilu, kTanh, kSigmoid };
  Kind kind;
  double negative_slope = 0.0;
};

// Whether the derivative needs the pre-activation z: it is not a function of the output (GELU,
// SiLU, and LeakyReLU with a negative slope, where y > 0 no longer tells z > 0). The others
// differentiate from the output y, as torch's own backward kernels do.
inline bool derivative_reads_pre(const Activation& act) {
  return act.kind == Activation::kGelu || act.kind == Activation::kGeluTanh ||
         act.kind == Activation::kSilu ||
         (act.kind == Activation::kLeakyReLU && act.negative_slope < 0);
}

// One set per CPU capability. add_rows: acc[0:n] += the sum of `rows` rows of x (width n,
// contiguous), row after row. forward: y[0:n] = act(z[0:n]) (z and y may be the same memory
// when they share a type); from float into half or bfloat16 also pre[0:n] = z rounded, unless
// pre is null. backward: dz[0:n] = dy[0:n] * act'(saved[0:n]), in float (double for double)
// reading half and bfloat16 directly, or in their own type (native GEMMs).
#define BIGMODEL_LINEAR_EPILOGUE_DECLARE(cap)                                                      \
  namespace cap {                                                                                  \
  void forward(const Activation& act, const float* z, float* y, int64_t n);                        \
  void forward(const Activation& act, const double* z, double* y, int64_t n);                      \
  void forward_bias(const Activation& act, float* z, const float* bpat, float* y, int64_t n,     \
                    int64_t e0, int64_t count);                                                    \
  void forward_bias(const Activation& act, double* z, const double* bpat, double* y, int64_t n,  \
                    int64_t e0, int64_t count);                                                    \
  void forward(const Activation& act, const float* z, at::BFloat16* y, at::BFloat16* pre,          \
               int64_t n);                                                                         \
  void forward(const Activation& act, const float* z, at::Half* y, at::Half* pre, int64_t n);      \
  void forward(const Activation& act, const at::BFloat16* z, at::BFloat16* y, int64_t n);          \
  void forward(const Activation& act, const at::Half* z, at::Half* y, int64_t n);                  \
  void backward(const Activation& act, const float* dy, const float* saved, float* dz, int64_t n); \
  void backward(const Activation& act, const double* dy, const double* saved, double* dz,          \
                int64_t n);                                                                        \
  void backward(const Activation& act, const at::BFloat16* dy, const at::BFloat16* saved,          \
                float* dz, int64_t n);                                                             \
  void backward(const Activation& act, const at::Half* dy, const at::Half* saved, float* dz,       \
                int64_t n);                                                                        \
  void backward(const Activation& act, const at::BFloat16* dy, const at::BFloat16* saved,          \
                at::BFloat16* dz, int64_t n);                                                      \
  void backward(const Activation& act, const at::Half* dy, const at::Half* saved, at::Half* dz,    \
                int64_t n);                                                                        \
  void add_rows(const float* x, int64_t rows, int64_t n, float* acc);                              \
  void add_rows(const double* x, int64_t rows, int64_t n, double* acc);                            \
  }
BIGMODEL_LINEAR_EPILOGUE_DECLARE(DEFAULT)
BIGMODEL_LINEAR_EPILOGUE_DECLARE(AVX2)
BIGMODEL_LINEAR_EPILOGUE_DECLARE(AVX512)
#undef BIGMODEL_LINEAR_EPILOGUE_DECLARE

// Chunks big enough to amortise a fork, small enough to spread a cache-sized block over cores.
constexpr int64_t kEpilogueGrain = 16384;

// The per-capability call for one chunk, picked once per call of the helpers below.
#if BIGMODEL_CPU_VECTOR_VARIANTS
#define BIGMODEL_EPILOGUE_AT_LEVEL(level, fn, ...)                   \
  switch (level) {                                                   \
    case CpuLevel::kAvx512: return AVX512::fn(__VA_ARGS__);          \
    case CpuLevel::kAvx2: return AVX2::fn(__VA_ARGS__);              \
    default: return DEFAULT::fn(__VA_ARGS__);                        \
  }
#else
#define BIGMODEL_EPILOGUE_AT_LEVEL(level, fn, ...) return DEFAULT::fn(__VA_ARGS__);
#endif

// The epilogue over n elements, split across the threads.
template <typename acc_t, typename out_t>
void epilogue_forward(const Activation& act, const acc_t* z, out_t* y, int64_t n) {
  const CpuLevel level = cpu_level();
  at::parallel_for(0, n, kEpilogueGrain, [&](int64_t a, int64_t b) {
    BIGMODEL_EPILOGUE_AT_LEVEL(level, forward, act, z + a, y + a, b - a)
  });
}

// y = act(z + bias) over `rows` rows of width n (bias broadcast along them), z = z + bias where
// y is another buffer; the flat run split across the threads.
template <typename T>
void epilogue_forward_bias(const Activation& act, T* z, const T* bias, T* y, int64_t rows,
                           int64_t n) {
  const CpuLevel level = cpu_level();
  std::vector<T> bpat(n + 64);  // bias repeated: bpat[i] = bias[i % n] (64 >= any vector width)
  for (int64_t i = 0; i < n + 64; ++i) bpat[i] = bias[i % n];
  at::parallel_for(0, rows * n, kEpilogueGrain, [&](int64_t a, int64_t b) {
    BIGMODEL_EPILOGUE_AT_LEVEL(level, forward_bias, act, z + a, bpat.data(), y + a, n, a, b - a)
  });
}

// The same from a float block into half or bfloat16 y, and z itself rounded into pre (unless
// null) while the block is in cache.
template <typename low_t>
void epilogue_forward(const Activation& act, const float* z, low_t* y, low_t* pre, int64_t n) {
  const CpuLevel level = cpu_level();
  at::parallel_for(0, n, kEpilogueGrain, [&](int64_t a, int64_t b) {
    BIGMODEL_EPILOGUE_AT_LEVEL(level, forward, act, z + a, y + a, pre ? pre + a : nullptr, b - a)
  });
}

// The gradient over `rows` rows of width n, split across the threads.
template <typename in_t, typename acc_t>
void epilogue_backward(const Activation& act, const in_t* dy, const in_t* saved, acc_t* dz,
                       int64_t rows, int64_t n) {
  const CpuLevel level = cpu_level();
  const int64_t grain = std::max<int64_t>(1, kEpilogueGrain / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t a, int64_t b) {
    const int64_t o = a * n, c = (b - a) * n;
    BIGMODEL_EPILOGUE_AT_LEVEL(level, backward, act, dy + o, saved + o, dz + o, c)
  });
}

// Rows per partial column sum of the fused bias gradient: fixed, so db's summation order (and
// its bits) depends on the shape alone, not on the thread count.
constexpr int64_t kBiasGradRows = 64;

// dz over `rows` rows of width n as epilogue_backward computes it, and db[0:n] = the column sums
// of dz from the same pass, while each chunk of rows is still in cache: eager's separate
// grad.sum(0) re-reads dz from memory. Each chunk of kBiasGradRows rows sums into its own partial
// row, and the partials are added in chunk order.
template <typename in_t, typename acc_t>
void epilogue_backward_db(const Activation& act, const in_t* dy, const in_t* saved, acc_t* dz,
                          acc_t* db, int64_t rows, int64_t n) {
  const CpuLevel level = cpu_level();
  const int64_t chunks = (rows + kBiasGradRows - 1) / kBiasGradRows;
  std::vector<acc_t> partial(chunks * n, acc_t(0));
  const int64_t grain = std::max<int64_t>(1, kEpilogueGrain / std::max<int64_t>(n * kBiasGradRows, 1));
  auto add_rows = [&](const acc_t* x, int64_t count, acc_t* acc) {
    BIGMODEL_EPILOGUE_AT_LEVEL(level, add_rows, x, count, n, acc)
  };
  auto chunk_dz = [&](int64_t o, int64_t c) {
    BIGMODEL_EPILOGUE_AT_LEVEL(level, backward, act, dy + o, saved + o, dz + o, c)
  };
  at::parallel_for(0, chunks, grain, [&](int64_t a, int64_t b) {
    for (int64_t c = a; c < b; ++c) {
      const int64_t r0 = c * kBiasGradRows, count = std::min(kBiasGradRows, rows - r0);
      chunk_dz(r0 * n, count * n);
      add_rows(dz + r0 * n, count, partial.data() + c * n);
    }
  });
  std::fill(db, db + n, acc_t(0));
  add_rows(partial.data(), chunks, db);
}

#undef BIGMODEL_EPILOGUE_AT_LEVEL

}  // namespace linear
}  // namespace bigmodel
