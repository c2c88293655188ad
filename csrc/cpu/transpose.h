// A (rows, cols) float matrix into a fresh (cols, rows) one, in 16 x 16 register blocks.
//
// Why: oneDNN's dW = dZ^T X takes dZ^T as its first operand and makes it contiguous with
// torch's strided copy, which runs a transpose at 2 GB/s on Zen 5 (a (1024, 512) dZ: 1.05 ms
// inside the seed MLP's 11 ms step). The blocked transpose reads and writes whole cache lines.
#pragma once

#include "cpu_vec.h"

namespace bigmodel {

#define BIGMODEL_TRANSPOSE_DECLARE(cap)                                                       \
  namespace cap {                                                                             \
  void transpose_col_span(const float* src, int64_t rows, int64_t cols, float* dst,           \
                          int64_t c0, int64_t c1);                                            \
  }
BIGMODEL_TRANSPOSE_DECLARE(AVX2)
BIGMODEL_TRANSPOSE_DECLARE(AVX512)
#undef BIGMODEL_TRANSPOSE_DECLARE

// t (R, C), contiguous float -> t^T as a contiguous (C, R) tensor. At DEFAULT (no vector
// kernel) torch's own copy.
inline at::Tensor transposed_copy(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() == 2 && t.is_contiguous() && t.scalar_type() == at::kFloat);
  const CpuLevel level = cpu_level();
  if (!BIGMODEL_CPU_VECTOR_VARIANTS || level == CpuLevel::kDefault) return t.t().contiguous();
#if BIGMODEL_CPU_VECTOR_VARIANTS
  const int64_t R = t.size(0), C = t.size(1);
  at::Tensor out = at::empty({C, R}, t.options());
  const float* src = t.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  // Spans of 16 source columns (whole blocks), ~16K elements a task at least.
  const int64_t blocks = (C + 15) / 16;
  const int64_t grain = std::max<int64_t>(1, 1024 / std::max<int64_t>(1, R));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t c0 = b0 * 16, c1 = std::min(C, b1 * 16);
    if (level == CpuLevel::kAvx512) {
      AVX512::transpose_col_span(src, R, C, dst, c0, c1);
    } else {
      AVX2::transpose_col_span(src, R, C, dst, c0, c1);
    }
  });
  return out;
#endif
}

}  // namespace bigmodel
