// The body of linear_narrow.h's kernel, compiled once per vector level (linear_narrow_avx2.cpp,
// linear_narrow_avx512.cpp): everything lands in bigmodel::linear::<CAPABILITY>.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <functional>

#include "linear_narrow.h"

namespace bigmodel {
namespace linear {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// R rows of z, columns [c0, c0 + C): R x C accumulators of K's vector lanes, each x vector
// loaded once for C columns and each W vector once for R rows (AVX2: 2 x 5 accumulators + 2 x
// vectors + 1 W vector in the 16 registers). The tail of K (K % lanes) is a zero-filled load.
template <int R, int C>
inline void narrow_tile(const float* x, int64_t ldx, const float* w, int64_t K, const float* bias,
                        float* z, int64_t ldz) {
  using V = Vectorized<float>;
  constexpr int64_t Wd = V::size();
  V acc[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) acc[r][c] = V(0.f);
  }
  int64_t k = 0;
  for (; k + Wd <= K; k += Wd) {
    V xv[R];
    for (int r = 0; r < R; ++r) xv[r] = V::loadu(x + r * ldx + k);
    for (int c = 0; c < C; ++c) {
      const V wv = V::loadu(w + c * K + k);
      for (int r = 0; r < R; ++r) acc[r][c] = at::vec::fmadd(xv[r], wv, acc[r][c]);
    }
  }
  if (k < K) {
    const int tail = static_cast<int>(K - k);
    V xv[R];
    for (int r = 0; r < R; ++r) xv[r] = V::loadu(x + r * ldx + k, tail);
    for (int c = 0; c < C; ++c) {
      const V wv = V::loadu(w + c * K + k, tail);
      for (int r = 0; r < R; ++r) acc[r][c] = at::vec::fmadd(xv[r], wv, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      const float s = at::vec::vec_reduce_all<float>(std::plus<V>(), acc[r][c]);
      z[r * ldz + c] = bias ? s + bias[c] : s;
    }
  }
}

template <int R>
inline void narrow_row_group(const float* x, int64_t ldx, const float* w, const float* bias,
                             float* z, int64_t K, int64_t N) {
  constexpr int kCols = 5;
  int64_t c = 0;
  for (; c + kCols <= N; c += kCols) {
    narrow_tile<R, kCols>(x, ldx, w + c * K, K, bias ? bias + c : nullptr, z + c, N);
  }
  const float* wc = w + c * K;
  const float* bc = bias ? bias + c : nullptr;
  switch (N - c) {
    case 4: narrow_tile<R, 4>(x, ldx, wc, K, bc, z + c, N); break;
    case 3: narrow_tile<R, 3>(x, ldx, wc, K, bc, z + c, N); break;
    case 2: narrow_tile<R, 2>(x, ldx, wc, K, bc, z + c, N); break;
    case 1: narrow_tile<R, 1>(x, ldx, wc, K, bc, z + c, N); break;
    default: break;
  }
}

void narrow_rows(const float* x, int64_t ldx, const float* w, const float* bias, float* z,
                 int64_t rows, int64_t K, int64_t N) {
  // Rows a tile: 2 in AVX2's 16 registers, 4 in AVX-512's 32 (4 x 5 accumulators).
  constexpr int kRows = Vectorized<float>::size() >= 16 ? 4 : 2;
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) {
    narrow_row_group<kRows>(x + r * ldx, ldx, w, bias, z + r * N, K, N);
  }
  for (; r < rows; ++r) narrow_row_group<1>(x + r * ldx, ldx, w, bias, z + r * N, K, N);
}

}  // namespace CPU_CAPABILITY
}  // namespace linear
}  // namespace bigmodel
