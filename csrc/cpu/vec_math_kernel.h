// Vector math shared by the per-capability kernels (attention_kernel.h, linear_epilogue_kernel.h),
// compiled once per CPU capability as they are: the including file defines CPU_CAPABILITY (and
// for the vector ones turns the instruction set on), so everything lands in
// bigmodel::vec_math::<CAPABILITY>.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace bigmodel {
namespace vec_math {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// 2^n from f = n + 1.5 * 2^23 (n an integer in [-127, 127] in f's low mantissa bits): the
// exponent field n + 127, shifted into place; n = -127 gives +0.
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
  for (int i = 0; i < W; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &lanes[i], sizeof bits);
    bits = (bits + 127u) << 23;
    std::memcpy(&lanes[i], &bits, sizeof bits);
  }
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
template <bool kMayExceedZero, typename acc_t>
inline Vectorized<acc_t> exp_shifted(const Vectorized<acc_t>& s, const Vectorized<acc_t>& shift) {
  if constexpr (std::is_same_v<acc_t, float>) {
    using V = Vectorized<float>;
    constexpr float kLog2e = 1.44269504088896341f, kRound = 12582912.f;  // 1.5 * 2^23
    constexpr float c0 = 1.0000001192092896f, c1 = 0.6931469440460205f, c2 = 0.24022120237350464f,
                    c3 = 0.05550713464617729f, c4 = 0.009675540961325169f,
                    c5 = 0.0013276452664285898f;
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
    V p = mad(V(c5), r, V(c4));
    p = mad(p, r, V(c3));
    p = mad(p, r, V(c2));
    p = mad(p, r, V(c1));
    p = mad(p, r, V(c0));
    return p * pow2_from_rounded(f);
  }
  return (s - shift).exp_u20();
}

}  // namespace CPU_CAPABILITY
}  // namespace vec_math
}  // namespace bigmodel
