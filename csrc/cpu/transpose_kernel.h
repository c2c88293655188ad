// The body of transpose.h's kernel, compiled once per vector level (transpose_avx2.cpp,
// transpose_avx512.cpp): everything lands in bigmodel::<CAPABILITY>.
#include <ATen/cpu/vec/vec.h>

#include "transpose.h"

namespace bigmodel {
namespace CPU_CAPABILITY {

// Source rows [r0, r1) of src (rows, cols) into columns [r0, r1) of dst (cols, rows): full
// 16 x 16 blocks through at::vec's register transpose, the edges element by element.
void transpose_row_span(const float* src, int64_t rows, int64_t cols, float* dst, int64_t r0,
                        int64_t r1) {
  constexpr int64_t B = 16;
  int64_t i = r0;
  for (; i + B <= r1; i += B) {
    int64_t j = 0;
    for (; j + B <= cols; j += B) {
      at::vec::transpose_mxn<float, B, B>(src + i * cols + j, cols, dst + j * rows + i, rows);
    }
    for (; j < cols; ++j) {
      for (int64_t r = i; r < i + B; ++r) dst[j * rows + r] = src[r * cols + j];
    }
  }
  for (; i < r1; ++i) {
    for (int64_t j = 0; j < cols; ++j) dst[j * rows + i] = src[i * cols + j];
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace bigmodel
