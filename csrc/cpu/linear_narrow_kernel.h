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

// ---- Backward. dz (M, N) is narrow, so both gradient GEMMs are an outer-product sum over N
// (dX) or a long sum over M into a tiny output (dW), shapes MKL's panels also run at a fraction
// of its rate (1024x256->10: dX 45 us, dW 82 us on Zen 5, 2 threads).

// Loads and stores of the last column vector of a tile: whole, or its first `tail` lanes.
template <bool Tail>
inline Vectorized<float> load_cols(const float* p, int64_t tail) {
  return Tail ? Vectorized<float>::loadu(p, tail) : Vectorized<float>::loadu(p);
}
template <bool Tail>
inline void store_cols(const Vectorized<float>& v, float* p, int64_t tail) {
  Tail ? v.store(p, tail) : v.store(p);
}

// The C column vectors of one row at p, the last holding `tail` lanes where Tail.
template <int C, bool Tail>
inline void load_row(const float* p, int64_t tail, Vectorized<float> (&v)[C]) {
  constexpr int64_t Wd = Vectorized<float>::size();
  for (int c = 0; c < C; ++c) {
    v[c] = c == C - 1 ? load_cols<Tail>(p + c * Wd, tail) : Vectorized<float>::loadu(p + c * Wd);
  }
}
template <int C, bool Tail>
inline void store_row(const Vectorized<float> (&v)[C], float* p, int64_t tail) {
  constexpr int64_t Wd = Vectorized<float>::size();
  for (int c = 0; c < C; ++c) {
    c == C - 1 ? store_cols<Tail>(v[c], p + c * Wd, tail) : v[c].store(p + c * Wd);
  }
}

// One rank-1 step of both backward products: acc[a][c] += s[a * stride] * row[c] for A scalars
// (a column of dz for dX, a row of dz for dW) and the C column vectors of one row (of W, of x).
template <int A, int C, bool Tail>
inline void rank1_update(Vectorized<float> (&acc)[A][C], const float* s, int64_t stride,
                         const float* row, int64_t tail) {
  Vectorized<float> v[C];
  load_row<C, Tail>(row, tail, v);
  for (int a = 0; a < A; ++a) {
    const Vectorized<float> d(s[a * stride]);
    for (int c = 0; c < C; ++c) acc[a][c] = at::vec::fmadd(d, v[c], acc[a][c]);
  }
}

// dX rows [0, R) x C column vectors: dx[r, k] = sum over n of dz[r, n] w[n, k], n in order (the
// summation order is fixed by N alone). The last vector holds `tail` lanes where Tail.
template <int R, int C, bool Tail>
inline void grad_input_tile(const float* dz, int64_t N, const float* w, int64_t K, float* dx,
                            int64_t tail) {
  Vectorized<float> acc[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) acc[r][c] = Vectorized<float>(0.f);
  }
  for (int64_t n = 0; n < N; ++n) rank1_update<R, C, Tail>(acc, dz + n, N, w + n * K, tail);
  for (int r = 0; r < R; ++r) store_row<C, Tail>(acc[r], dx + r * K, tail);
}

// Tile shapes: R x C accumulators plus C weight vectors and a broadcast in the registers
// (AVX2's 16: 4 x 2 + 2 + 1; AVX-512's 32: 4 x 4 + 4 + 1).
constexpr int kGradRows = 4;
constexpr int kGradCols = Vectorized<float>::size() >= 16 ? 4 : 2;

template <int R>
inline void grad_input_row_group(const float* dz, const float* w, float* dx, int64_t K,
                                 int64_t N) {
  constexpr int64_t Wd = Vectorized<float>::size();
  int64_t k = 0;
  for (; k + kGradCols * Wd <= K; k += kGradCols * Wd) {
    grad_input_tile<R, kGradCols, false>(dz, N, w + k, K, dx + k, Wd);
  }
  for (; k + Wd <= K; k += Wd) grad_input_tile<R, 1, false>(dz, N, w + k, K, dx + k, Wd);
  if (k < K) grad_input_tile<R, 1, true>(dz, N, w + k, K, dx + k, K - k);
}

void narrow_grad_input_rows(const float* dz, const float* w, float* dx, int64_t rows, int64_t K,
                            int64_t N) {
  int64_t r = 0;
  for (; r + kGradRows <= rows; r += kGradRows) {
    grad_input_row_group<kGradRows>(dz + r * N, w, dx + r * K, K, N);
  }
  for (; r < rows; ++r) grad_input_row_group<1>(dz + r * N, w, dx + r * K, K, N);
}

// dW rows [n0, n0 + G) x C column vectors over the rows [0, M) of dz and x: a fresh register sum
// per span of kNarrowGradWeightSpan rows (linear_narrow.h), each added to dw in span order (the
// first one stored), so the rounding grows with the span, as in a GEMM's blocked reduction, not
// with M.

template <int G, int C, bool Tail>
inline void grad_weight_tile(const float* dz, int64_t N, const float* x, int64_t K, int64_t M,
                             float* dw, int64_t tail) {
  using V = Vectorized<float>;
  for (int64_t i0 = 0; i0 < M; i0 += kNarrowGradWeightSpan) {
    const int64_t i1 = std::min(M, i0 + kNarrowGradWeightSpan);
    V acc[G][C];
    for (int g = 0; g < G; ++g) {
      for (int c = 0; c < C; ++c) acc[g][c] = V(0.f);
    }
    for (int64_t i = i0; i < i1; ++i) rank1_update<G, C, Tail>(acc, dz + i * N, 1, x + i * K, tail);
    for (int g = 0; g < G; ++g) {
      if (i0 > 0) {
        V sum[C];
        load_row<C, Tail>(dw + g * K, tail, sum);
        for (int c = 0; c < C; ++c) acc[g][c] = acc[g][c] + sum[c];
      }
      store_row<C, Tail>(acc[g], dw + g * K, tail);
    }
  }
}

// Groups of dW rows: G x C accumulators, C x vectors and a broadcast (AVX2: 5 x 2 + 2 + 1;
// AVX-512: 5 x 4 + 4 + 1), so x is read once per 5 output features.
constexpr int kGradWeightGroup = 5;

template <int C, bool Tail>
inline void grad_weight_cols(const float* dz, const float* x, float* dw, int64_t M, int64_t K,
                             int64_t N, int64_t tail) {
  int64_t n = 0;
  for (; n + kGradWeightGroup <= N; n += kGradWeightGroup) {
    grad_weight_tile<kGradWeightGroup, C, Tail>(dz + n, N, x, K, M, dw + n * K, tail);
  }
  const float* dzn = dz + n;
  float* dwn = dw + n * K;
  switch (N - n) {
    case 4: grad_weight_tile<4, C, Tail>(dzn, N, x, K, M, dwn, tail); break;
    case 3: grad_weight_tile<3, C, Tail>(dzn, N, x, K, M, dwn, tail); break;
    case 2: grad_weight_tile<2, C, Tail>(dzn, N, x, K, M, dwn, tail); break;
    case 1: grad_weight_tile<1, C, Tail>(dzn, N, x, K, M, dwn, tail); break;
    default: break;
  }
}

void narrow_grad_weight_cols(const float* dz, const float* x, float* dw, int64_t M, int64_t K,
                             int64_t N, int64_t k0, int64_t k1) {
  constexpr int64_t Wd = Vectorized<float>::size();
  int64_t k = k0;
  for (; k + kGradCols * Wd <= k1; k += kGradCols * Wd) {
    grad_weight_cols<kGradCols, false>(dz, x + k, dw + k, M, K, N, Wd);
  }
  for (; k + Wd <= k1; k += Wd) grad_weight_cols<1, false>(dz, x + k, dw + k, M, K, N, Wd);
  if (k < k1) grad_weight_cols<1, true>(dz, x + k, dw + k, M, K, N, k1 - k);
}

}  // namespace CPU_CAPABILITY
}  // namespace linear
}  // namespace bigmodel
