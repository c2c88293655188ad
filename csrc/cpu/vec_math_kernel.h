// Vector math shared by the per-capability kernels (attention_kernel.h, linear_epilogue_kernel.h),
// compiled once per CPU capability as they are: the including file defines CPU_CAPABILITY (and
// for the vector ones turns the instruction set on), so everything lands in
// bigmodel::vec_math::<CAPABILITY>.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <cmath>
#include <cstring>
#include <type_traits>

namespace bigmodel {
namespace vec_math {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// 2^n from f = n + 1.5 * 2^23 (n an integer in [-127, 127] in f's low mantissa bits): the
// exponent field n + 127, shifted into place; n = -127 gives +0. One float, and a vector.
inline float pow2_from_rounded(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  bits = (bits + 127u) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

inline Vectorized<float> pow2_from_rounded(const Vectorized<float>& f) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_castps_si512(f), _mm512_set1_epi32(127)), 23));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(f), _mm256_set1_epi32(127)), 23));
#else
  // DEFAULT: the same integer add and shift lane by lane, a loop GCC turns into SSE2 code.
  constexpr int W = Vectorized<float>::size();
  float lanes[W];
  f.store(lanes);
  for (int i = 0; i < W; ++i) lanes[i] = pow2_from_rounded(lanes[i]);
  return Vectorized<float>::loadu(lanes);
#endif
}

// exp(s - shift) for the softmax's shifted scores (s - max <= 0 in the forward, s - lse in the
// backward), where most of the softmax's time goes (~14% of the forward at AVX2 on the Xeon, the
// block products ~75%). At the vector levels in 14-15 vector operations against at::vec's
// exp_u20's ~20: x = (s - shift) * log2(e), 2^x = 2^n * 2^r with n = round(x) (adding 1.5 * 2^23
// leaves n in the low mantissa bits) and r in [-0.5, 0.5], 2^r by a degree-5 polynomial fitted
// here (near-minimax on Chebyshev nodes: 2.3e-7 relative, 4 ulp in float; exp_u20 is 20 ulp).
// x <= -127 (so -inf: a masked score) gives exactly 0, as the masks need: n + 127 = 0 is a zero
// exponent field. NaN stays NaN: max / min return their second operand when one is NaN, and the
// clamp puts x second. kMayExceedZero also clamps x to 127 (the backward's recomputed scores
// against a saved lse); the forward's s - max cannot exceed 0. Double: exp_u20.
namespace exp_detail {
constexpr float kLog2e = 1.44269504088896341f, kRound = 12582912.f;  // 1.5 * 2^23
// 2^r on [-0.5, 0.5]: c0 + c1 r + ... + c5 r^5.
constexpr float kC[6] = {1.0000001192092896f, 0.6931469440460205f, 0.24022120237350464f,
                         0.05550713464617729f, 0.009675540961325169f, 0.0013276452664285898f};
}  // namespace exp_detail

template <bool kMayExceedZero, typename acc_t>
inline Vectorized<acc_t> exp_shifted(const Vectorized<acc_t>& s, const Vectorized<acc_t>& shift) {
  if constexpr (std::is_same_v<acc_t, float>) {
    using V = Vectorized<float>;
    using namespace exp_detail;
    // clamp_min / clamp_max are max(bound, x) / min(bound, x): x second, so NaN passes.
    V t = at::vec::clamp_min((s - shift) * V(kLog2e), V(-127.f));
    if constexpr (kMayExceedZero) t = at::vec::clamp_max(t, V(127.f));
    const V f = t + V(kRound);
    const V r = t - (f - V(kRound));
#if !defined(CPU_CAPABILITY_AVX512) && !defined(CPU_CAPABILITY_AVX2)
    // DEFAULT: a * b + c, which is what at::vec's generic fmadd computes, written out: GCC had
    // left that fmadd an out-of-line call per vector.
    const auto mad = [](const V& a, const V& b, const V& c) { return a * b + c; };
#else
    const auto mad = [](const V& a, const V& b, const V& c) { return at::vec::fmadd(a, b, c); };
#endif
    V p = mad(V(kC[5]), r, V(kC[4]));
    for (int k = 3; k >= 0; --k) p = mad(p, r, V(kC[k]));
    return p * pow2_from_rounded(f);
  }
  return (s - shift).exp_u20();
}

// tanh in float, for the Tanh epilogue: MKL's vector tanh (what torch.tanh runs) takes ~2.7 ns
// an element on AMD at every level, where MKL runs its generic code; this is ~1 (AVX2) to 0.5
// (AVX512) ns (bench/NOTES.md, "Zen 5, fifth session"). Two branches, both computed, one kept:
//  * |x| < 1: x + x^3 P(x^2), P of degree 6 fitted here (least squares on Chebyshev nodes,
//    reweighted towards minimax; 1.1 ulp against float64). Odd, so -0 stays -0.
//  * |x| >= 1: 1 - 2e / (1 + e) with e = exp(-2|x|) <= e^-2 (exp_shifted, 4 ulp; its share of
//    the result shrinks by 2e / (1 + e)^2 < 0.21, so 1.5 ulp here), nothing overflows; e is 0
//    from |x| ~ 44 on, giving 1 (tanh rounds to 1 from 9.01). x's sign bit is put back.
// NaN fails |x| < 1 and passes through exp; +-inf gives +-1. The scalar form is the same
// operations in the same order (FMA where the vector form has one, when the level has FMA), so
// a tail element rounds as it would in a vector lane and the result does not depend on where
// the thread split falls. At DEFAULT the scalar form is the loop body, which GCC vectorises.
namespace tanh_detail {
constexpr float kSmall = 1.f;
constexpr float kP[7] = {-0.3333330452442169f, 0.13332530856132507f, -0.05389156937599182f,
                         0.021521370857954025f, -0.00799840409308672f, 0.0023403584491461515f,
                         -0.0003698643413372338f};
}  // namespace tanh_detail

inline Vectorized<float> tanh_float(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  using namespace tanh_detail;
  const V a = x.abs();
  const V e = exp_shifted<false>(a * V(-2.f), V(0.f));
  const V large = V(1.f) - (e + e) / (V(1.f) + e);
  const V z = x * x;
  V p = at::vec::fmadd(V(kP[6]), z, V(kP[5]));
  for (int k = 4; k >= 0; --k) p = at::vec::fmadd(p, z, V(kP[k]));
  const V small = at::vec::fmadd(x * z, p, x);
  return V::blendv(large | (x & V(-0.f)), small, a < V(kSmall));
}

// take_a ? a : b on the bit patterns: GCC vectorises a loop around it, where a float ?: (NaN's
// comparisons being what they are) stays a branch and keeps the loop scalar.
inline float select_bits(bool take_a, float a, float b) {
  uint32_t ab, bb;
  std::memcpy(&ab, &a, sizeof ab);
  std::memcpy(&bb, &b, sizeof bb);
  const uint32_t mask = 0u - static_cast<uint32_t>(take_a);
  const uint32_t out = (ab & mask) | (bb & ~mask);
  float r;
  std::memcpy(&r, &out, sizeof r);
  return r;
}

// a * b + c, fused where the level has FMA (as at::vec::fmadd is there), for the scalar forms.
inline float fmadd_scalar(float a, float b, float c) {
#if defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// exp_shifted<false>(s, 0) for one float, the same operations in the same order: the scalar
// form of the float epilogues' exp (tanh_float's, linear_epilogue_kernel.h's exp_nonpositive),
// for the vector loops' tails and DEFAULT's plain loops, which GCC vectorises around it (no libm
// call, no float ?:).
inline float exp_shifted_scalar(float s) {
  using namespace exp_detail;
  float t = (s - 0.f) * kLog2e;
  t = select_bits(t < -127.f, -127.f, t);  // NaN passes, as clamp_min
  const float f = t + kRound, r = t - (f - kRound);
  float p = fmadd_scalar(kC[5], r, kC[4]);
  for (int k = 3; k >= 0; --k) p = fmadd_scalar(p, r, kC[k]);
  return p * pow2_from_rounded(f);
}

inline float tanh_float(float x) {
  using namespace tanh_detail;
  const float a = std::fabs(x);
  const float e = exp_shifted_scalar(a * -2.f);
  float large = 1.f - (e + e) / (1.f + e);
  uint32_t large_bits, x_bits;
  std::memcpy(&large_bits, &large, sizeof large_bits);
  std::memcpy(&x_bits, &x, sizeof x_bits);
  large_bits |= x_bits & 0x80000000u;
  std::memcpy(&large, &large_bits, sizeof large);
  const float z = x * x;
  float p = fmadd_scalar(kP[6], z, kP[5]);
  for (int k = 4; k >= 0; --k) p = fmadd_scalar(p, z, kP[k]);
  const float small = fmadd_scalar(x * z, p, x);
  return select_bits(a < kSmall, small, large);
}

}  // namespace CPU_CAPABILITY
}  // namespace vec_math
}  // namespace bigmodel
