// The body of transpose.h's kernel, compiled once per vector level (transpose_avx2.cpp,
// transpose_avx512.cpp): everything lands in bigmodel::<CAPABILITY>.
#include <ATen/cpu/vec/vec.h>

#include "transpose.h"

namespace bigmodel {
namespace CPU_CAPABILITY {

// Source columns [c0, c1) of src (rows, cols) into rows [c0, c1) of dst (cols, rows): 16 x 16
// blocks through at::vec's register transpose, down the source's rows, so each destination row
// is written as one sequential stream; the edges element by element. (Across the rows instead,
// each block wrote 16 lines a power-of-two stride apart, into one L1 set: 227 vs 87 us for a
// (1024, 512) matrix on Zen 5 at AVX2, against 24 us for a plain clone.)
void transpose_col_span(const float* src, int64_t rows, int64_t cols, float* dst, int64_t c0,
                        int64_t c1) {
  constexpr int64_t B = 16;
  const int64_t full_rows = rows / B * B;
  int64_t j = c0;
  for (; j + B <= c1; j += B) {
    for (int64_t i = 0; i < full_rows; i += B) {
      at::vec::transpose_mxn<float, B, B>(src + i * cols + j, cols, dst + j * rows + i, rows);
    }
    for (int64_t c = j; c < j + B; ++c) {
      for (int64_t i = full_rows; i < rows; ++i) dst[c * rows + i] = src[i * cols + c];
    }
  }
  for (; j < c1; ++j) {
    for (int64_t i = 0; i < rows; ++i) dst[j * rows + i] = src[i * cols + j];
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace bigmodel
