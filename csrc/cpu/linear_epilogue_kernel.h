// The bodies behind linear_epilogue.h, compiled once per CPU capability: the including file
// defines CPU_CAPABILITY (and for the vector ones turns the instruction set on), so everything
// lands in bigmodel::linear::<CAPABILITY>.
//
// At AVX2 and AVX512 the loops are at::vec; at DEFAULT they are plain loops on purpose: there
// at::vec is its generic array fallback, which ran 7x slower than torch's threshold_backward
// (12 ms vs 1.6 ms on 4M elements), while GCC vectorises these selects itself for SSE2.
#include <ATen/Config.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

#include "linear_epilogue.h"
#include "vec_math_kernel.h"

#if AT_MKL_ENABLED() && !defined(BIGMODEL_MKL_VML_DECLARED)
#define BIGMODEL_MKL_VML_DECLARED
// MKL's vector-math tanh, which libtorch_cpu exports: the routine torch.tanh itself runs for float
// on CPU (ATen's vml.h). n as a 64-bit integer: right for MKL's LP64 (int) and ILP64 interfaces.
extern "C" void vmsTanh(long long n, const float* a, float* r, long long mode);
#endif

namespace bigmodel {
namespace linear {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
constexpr bool kVector = true;
#else
constexpr bool kVector = false;
#endif

// exp(x) for x <= 0, -inf (0) and NaN (NaN): in float the engine's inlined exp (vec_math_kernel.h,
// 4 ulp, ~14 vector operations) instead of at::vec's Sleef call, which was a third of GELU's
// epilogue at AVX512 (perf, Xeon); at::vec's in double. A Cody-Waite exp of 1 ulp (two more
// FMAs and a degree-6 polynomial) cost 0-8% of the fused forward at 16384x256->1024 and made no
// test of the house rule pass that this one fails ("Zen 5, fifth session").
template <typename T>
Vectorized<T> exp_nonpositive(const Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return vec_math::CPU_CAPABILITY::exp_shifted<false>(x, Vectorized<T>(0.f));
  } else {
    return x.exp();
  }
}

// (sigmoid(x), 1 - sigmoid(x)) through e = exp(-|x|) <= 1: neither cancels, nothing overflows;
// x = +-inf gives (1, 0) / (0, 1), NaN gives NaN.
template <typename T>
std::pair<Vectorized<T>, Vectorized<T>> sigmoid_pair_of(const Vectorized<T>& x) {
  using V = Vectorized<T>;
  const V e = exp_nonpositive(x.abs().neg()), r = V(T(1)) / (V(T(1)) + e), er = e * r;
  const V positive = x >= V(T(0));
  return {V::blendv(er, r, positive), V::blendv(r, er, positive)};
}

// The scalar forms of the two above in float, the same operations in the same order: the vector
// loops' tails round as their lanes do, and at DEFAULT they are the loop bodies, which GCC
// vectorises for SSE2 (no libm call; selects on bit patterns). torch's sigmoid and SiLU run
// scalar at DEFAULT (2.9-3.1 ns an element on Zen 5), its GELU at 1.1 ns.
inline float exp_nonpositive(float x) { return vec_math::CPU_CAPABILITY::exp_shifted_scalar(x); }

inline std::pair<float, float> sigmoid_pair_of(float x) {
  using vec_math::CPU_CAPABILITY::select_bits;
  const float e = exp_nonpositive(-std::fabs(x)), r = 1.f / (1.f + e), er = e * r;
  const bool positive = x >= 0.f;
  return {select_bits(positive, r, er), select_bits(positive, er, r)};
}

// Bit patterns of half and bfloat16: the magnitude bits, and +inf's (above it: NaN).
template <typename low_t>
struct LowBits {
  static constexpr uint16_t kAbs = 0x7fff;
  static constexpr uint16_t kInf = std::is_same_v<low_t, at::BFloat16> ? 0x7f80 : 0x7c00;
  // x <= 0 (-0 and +0 included, NaN excluded).
  static bool nonpositive(uint16_t x) {
    const uint16_t a = x & kAbs;
    return a == 0 || ((x & 0x8000) != 0 && a <= kInf);
  }
};

// An activation: its value and its gradient from the saved tensor (the output y, or the
// pre-activation z where derivative_reads_pre), for scalars and vectors. Each formula is the one
// torch's own kernel uses, or a rearrangement of it that rounds less (noted where so), so NaN,
// +-inf and the accuracy follow torch's. Functors are instances: LeakyReLU carries its slope.
// kSelects: the value is either the input or zero (and the gradient dy or zero), so half and
// bfloat16 can be done on their bit patterns, without converting or rounding.

// No activation (a plain linear layer). The engine skips it where it would copy onto itself.
struct Identity {
  static constexpr bool kSelects = true;
  template <typename T>
  T fwd(T z) const {
    return z;
  }
  template <typename T>
  T bwd(T dy, T) const {
    return dy;
  }
  template <typename low_t>
  static uint16_t fwd_bits(uint16_t z) {
    return z;
  }
  template <typename low_t>
  static uint16_t bwd_bits(uint16_t dy, uint16_t) {
    return dy;
  }
};

struct Relu {
  static constexpr bool kSelects = true;
  // NaN stays NaN (`z < 0` is false for it; at::vec::maximum propagates it), as torch.relu.
  template <typename T>
  T fwd(T z) const {
    return z < T(0) ? T(0) : z;
  }
  template <typename T>
  Vectorized<T> fwd(const Vectorized<T>& z) const {
    return at::vec::maximum(z, Vectorized<T>(T(0)));
  }
  // The gradient passes where y > 0 or y is NaN (as torch's threshold_backward): zero where y <= 0.
  template <typename T>
  T bwd(T dy, T y) const {
    return y <= T(0) ? T(0) : dy;
  }
  template <typename T>
  Vectorized<T> bwd(const Vectorized<T>& dy, const Vectorized<T>& y) const {
    const Vectorized<T> zero(T(0));
    return Vectorized<T>::blendv(dy, zero, y <= zero);
  }
  // On bit patterns (plain loops: GCC vectorises them at every level): zero where z < 0.
  template <typename low_t>
  static uint16_t fwd_bits(uint16_t z) {
    return (z & 0x8000) != 0 && (z & LowBits<low_t>::kAbs) <= LowBits<low_t>::kInf ? 0 : z;
  }
  template <typename low_t>
  static uint16_t bwd_bits(uint16_t dy, uint16_t y) {
    return LowBits<low_t>::nonpositive(y) ? 0 : dy;
  }
};

// z > 0 ? z : z * slope, as torch's leaky_relu (NaN * slope is NaN). The gradient's test reads
// the saved tensor: y > 0 exactly where z > 0 for a slope >= 0, else the engine saves z.
struct LeakyRelu {
  static constexpr bool kSelects = false;
  double slope;
  template <typename T>
  T fwd(T z) const {
    return z > T(0) ? z : z * T(slope);
  }
  template <typename T>
  Vectorized<T> fwd(const Vectorized<T>& z) const {
    return Vectorized<T>::blendv(z * Vectorized<T>(T(slope)), z, z > Vectorized<T>(T(0)));
  }
  template <typename T>
  T bwd(T dy, T s) const {
    return s > T(0) ? dy : dy * T(slope);
  }
  template <typename T>
  Vectorized<T> bwd(const Vectorized<T>& dy, const Vectorized<T>& s) const {
    return Vectorized<T>::blendv(dy * Vectorized<T>(T(slope)), dy, s > Vectorized<T>(T(0)));
  }
};

// GELU with the exact CDF, torch's formula: 0.5 z (1 + erf(z / sqrt 2)). GELU(+inf) = +inf
// (our convention, tests/test_fused_linear.py), GELU(-inf) = -inf * 0 = NaN, as it gives them.
// at::vec's float erf is Abramowitz-Stegun 7.1.26 (1.5e-7 absolute) around Sleef's exp: on
// [-8, 8] against float64 this GELU is off by at most 4.5e-7, torch's own fp32 F.gelu (oneDNN)
// by 1.2e-6. The exact alternative, 0.5 z erfc(-z / sqrt 2) through Sleef's erfc, measured
// 40 ms of epilogue on 16384 x 1024 (2 threads) against under 10 ms for this one.
struct Gelu {
  static constexpr bool kSelects = false;
  static constexpr double kSqrtHalf = 0.70710678118654752440;
  static constexpr double kInvSqrt2Pi = 0.39894228040143267794;  // phi(0)
  // Scalars (the vector levels' tails; DEFAULT runs torch's kernels for GELU) through libm's
  // erf, as torch's own GELU kernels compute their tails: A-S's 1.5e-7 there failed the house
  // rule on small outputs (1-2% of (1, 1, 1) draws), where torch's error is libm's.
  template <typename T>
  T fwd(T z) const {
    return T(0.5) * z * (T(1) + std::erf(z * T(kSqrtHalf)));
  }
  template <typename T>
  Vectorized<T> fwd(const Vectorized<T>& z) const {
    using V = Vectorized<T>;
    if constexpr (std::is_same_v<T, float>) return z * cdf_and_exp(z).first;
    return V(T(0.5)) * z * (V(T(1)) + (z * V(T(kSqrtHalf))).erf());
  }
  // Phi(z) + z * phi(z), as torch's gelu_backward.
  template <typename T>
  T bwd(T dy, T z) const {
    const T cdf = T(0.5) * (T(1) + std::erf(z * T(kSqrtHalf)));
    return dy * (cdf + z * T(kInvSqrt2Pi) * std::exp(T(-0.5) * z * z));
  }
  // In float, at::vec's erf written out: 7.1.26 is erf(x) = 1 - t poly(t) exp(-x^2) for x >= 0,
  // t = 1 / (1 + p x), and with x = |z| / sqrt 2 its exp(-x^2) is the pdf's exp(-z^2 / 2), so
  // one exp serves both (two before: the dz pass was most of the backward's cost over eager's
  // GEMMs at AVX2). Phi(-|z|) = t poly(t) e / 2 directly, without 0.5 (1 + erf)'s cancellation
  // for z < 0. double keeps Sleef's exact erf (gradcheck's precision).
  template <typename T>
  Vectorized<T> bwd(const Vectorized<T>& dy, const Vectorized<T>& z) const {
    using V = Vectorized<T>;
    if constexpr (std::is_same_v<T, float>) {
      const auto [cdf, e] = cdf_and_exp(z);
      return dy * at::vec::fmadd(z, V(T(kInvSqrt2Pi)) * e, cdf);
    }
    const V e = (V(T(-0.5)) * z * z).exp();
    const V cdf = V(T(0.5)) * (V(T(1)) + (z * V(T(kSqrtHalf))).erf());
    return dy * at::vec::fmadd(z, V(T(kInvSqrt2Pi)) * e, cdf);
  }
  // (Phi(z), exp(-z^2 / 2)) in float, the forward's and the backward's shared part.
  static std::pair<Vectorized<float>, Vectorized<float>> cdf_and_exp(const Vectorized<float>& z) {
    using V = Vectorized<float>;
    const V e = exp_nonpositive(V(-0.5f) * z * z);
    const V t = V(1.0f) / at::vec::fmadd(V(kErfP), z.abs() * V(float(kSqrtHalf)), V(1.0f));
    V poly = at::vec::fmadd(V(kErfA[4]), t, V(kErfA[3]));
    poly = at::vec::fmadd(poly, t, V(kErfA[2]));
    poly = at::vec::fmadd(poly, t, V(kErfA[1]));
    poly = at::vec::fmadd(poly, t, V(kErfA[0]));
    const V below = V(0.5f) * poly * t * e;  // Phi(-|z|)
    return {V::blendv(V(1.0f) - below, below, z < V(0.0f)), e};
  }
  // Abramowitz-Stegun 7.1.26, as at::vec's float erf: p and a1..a5.
  static constexpr float kErfP = 0.3275911f;
  static constexpr float kErfA[5] = {0.254829592f, -0.284496736f, 1.421413741f, -1.453152027f, 1.061405429f};
};

// GELU's tanh approximation, 0.5 z (1 + tanh(u)) with u = sqrt(2/pi) (z + 0.044715 z^3), as
// torch's. Computed as z * sigmoid(2u), the same function, through e = exp(-|2u|) <= 1: no
// cancellation of 1 + tanh(u) for z < 0, no overflow, one exp instead of a tanh, and +-inf and
// NaN come out as torch's formula gives them (GELU(+inf) = inf, GELU(-inf) = -inf * 0 = NaN).
struct GeluTanh {
  static constexpr bool kSelects = false;
  static constexpr double kTwoBeta = 2 * 0.79788456080286535588;  // 2 sqrt(2/pi)
  static constexpr double kKappa = 0.044715;
  // sigmoid(2u) and 1 - sigmoid(2u), each without cancellation.
  template <typename T>
  static std::pair<T, T> sigmoid_pair(T z) {
    if constexpr (std::is_same_v<T, float>) {
      return sigmoid_pair_of(float(kTwoBeta) * vec_math::CPU_CAPABILITY::fmadd_scalar(float(kKappa) * z * z, z, z));
    }
    const T u2 = T(kTwoBeta) * (z + T(kKappa) * z * z * z);
    const T e = std::exp(-std::abs(u2)), r = T(1) / (T(1) + e);
    return u2 >= T(0) ? std::pair<T, T>{r, e * r} : std::pair<T, T>{e * r, r};
  }
  template <typename T>
  static std::pair<Vectorized<T>, Vectorized<T>> sigmoid_pair(const Vectorized<T>& z) {
    using V = Vectorized<T>;
    return sigmoid_pair_of(V(T(kTwoBeta)) * at::vec::fmadd(V(T(kKappa)) * z * z, z, z));
  }
  template <typename T>
  T fwd(T z) const {
    return z * sigmoid_pair(z).first;
  }
  template <typename T>
  Vectorized<T> fwd(const Vectorized<T>& z) const {
    return z * sigmoid_pair(z).first;
  }
  // d/dz z s(2u) = s + z s (1 - s) 2u', 2u' = 2 sqrt(2/pi) (1 + 3 * 0.044715 z^2): torch's
  // 0.5 (1 + t) + 0.5 z (1 - t^2) u' with t = 2s - 1.
  template <typename T>
  T bwd(T dy, T z) const {
    const auto [s, one_minus_s] = sigmoid_pair(z);
    if constexpr (std::is_same_v<T, float>) {
      using vec_math::CPU_CAPABILITY::fmadd_scalar;
      const float du2 = float(kTwoBeta) * fmadd_scalar(float(3 * kKappa) * z, z, 1.f);
      return dy * fmadd_scalar(z * du2, s * one_minus_s, s);
    }
    const T du2 = T(kTwoBeta) * (T(1) + T(3 * kKappa) * z * z);
    return dy * (s + z * du2 * s * one_minus_s);
  }
  template <typename T>
  Vectorized<T> bwd(const Vectorized<T>& dy, const Vectorized<T>& z) const {
    using V = Vectorized<T>;
    const auto [s, one_minus_s] = sigmoid_pair(z);
    const V du2 = V(T(kTwoBeta)) * at::vec::fmadd(V(T(3 * kKappa)) * z, z, V(T(1)));
    return dy * at::vec::fmadd(z * du2, s * one_minus_s, s);
  }
};

// z * sigmoid(z) = z / (1 + exp(-z)), as torch's silu (SiLU(-inf) = -inf / inf = NaN there too;
// here -inf * 0). Vectors take sigmoid from exp(-|z|) (sigmoid_pair_of).
struct Silu {
  static constexpr bool kSelects = false;
  template <typename T>
  T fwd(T z) const {
    if constexpr (std::is_same_v<T, float>) return z * sigmoid_pair_of(z).first;
    return z / (T(1) + std::exp(-z));
  }
  template <typename T>
  Vectorized<T> fwd(const Vectorized<T>& z) const {
    return z * sigmoid_pair_of(z).first;
  }
  // s (1 + z (1 - s)), as torch's silu_backward.
  template <typename T>
  T bwd(T dy, T z) const {
    if constexpr (std::is_same_v<T, float>) {
      const auto [s, one_minus_s] = sigmoid_pair_of(z);
      return dy * s * vec_math::CPU_CAPABILITY::fmadd_scalar(z, one_minus_s, 1.f);
    }
    const T s = T(1) / (T(1) + std::exp(-z));
    return dy * s * (T(1) + z * (T(1) - s));
  }
  template <typename T>
  Vectorized<T> bwd(const Vectorized<T>& dy, const Vectorized<T>& z) const {
    using V = Vectorized<T>;
    const auto [s, one_minus_s] = sigmoid_pair_of(z);
    return dy * s * at::vec::fmadd(z, one_minus_s, V(T(1)));
  }
};

// Float: the engine's tanh (vec_math_kernel.h), or MKL's where MKL runs its full-width code
// (kTanhByVml below); double: libm's and at::vec's.
struct Tanh {
  static constexpr bool kSelects = false;
  template <typename T>
  T fwd(T z) const {
    if constexpr (std::is_same_v<T, float>) {
      return vec_math::CPU_CAPABILITY::tanh_float(z);
    } else {
      return std::tanh(z);
    }
  }
  template <typename T>
  Vectorized<T> fwd(const Vectorized<T>& z) const {
    if constexpr (std::is_same_v<T, float>) {
      return vec_math::CPU_CAPABILITY::tanh_float(z);
    } else {
      return z.tanh();
    }
  }
  // 1 - y^2 from the output, as torch's tanh_backward.
  template <typename T>
  T bwd(T dy, T y) const {
    return dy * (T(1) - y * y);
  }
  template <typename T>
  Vectorized<T> bwd(const Vectorized<T>& dy, const Vectorized<T>& y) const {
    return dy * (Vectorized<T>(T(1)) - y * y);
  }
};

struct Sigmoid {
  static constexpr bool kSelects = false;
  // 1 / (1 + exp(-z)), as torch's sigmoid: sigmoid(-inf) = 0, sigmoid(inf) = 1.
  template <typename T>
  T fwd(T z) const {
    if constexpr (std::is_same_v<T, float>) return sigmoid_pair_of(z).first;
    return T(1) / (T(1) + std::exp(-z));
  }
  template <typename T>
  Vectorized<T> fwd(const Vectorized<T>& z) const {
    return sigmoid_pair_of(z).first;
  }
  // y (1 - y) from the output, as torch's sigmoid_backward.
  template <typename T>
  T bwd(T dy, T y) const {
    return dy * (T(1) - y) * y;
  }
  template <typename T>
  Vectorized<T> bwd(const Vectorized<T>& dy, const Vectorized<T>& y) const {
    return dy * (Vectorized<T>(T(1)) - y) * y;
  }
};

// Float tanh runs MKL's vector math on Intel CPUs (mkl_runs_full_width), in the mode torch.tanh
// passes (high accuracy, denormals kept, errors ignored): the same values as eager's tanh, NaN
// included, and ~3x at::vec's Sleef tanh there (the epilogue of a 4096 x 512 output, 2 threads,
// AVX512 Xeon: 2.9 ms against torch.tanh's 0.9 ms); not yet measured there against the engine's
// own. On AMD MKL's is its slow generic code, and the engine's tanh_float runs.
template <typename F, typename T>
constexpr bool kTanhByVml = AT_MKL_ENABLED() && std::is_same_v<F, Tanh> && std::is_same_v<T, float>;

inline bool tanh_by_vml() { return mkl_runs_full_width(); }

#if AT_MKL_ENABLED()
inline void vml_tanh(const float* z, float* y, int64_t n) {
  constexpr long long kHighAccuracy = 0x2, kDenormalsKept = 0x140000, kErrorsIgnored = 0x100;
  vmsTanh(n, z, y, kHighAccuracy | kDenormalsKept | kErrorsIgnored);
}
#else
inline void vml_tanh(const float*, float*, int64_t) {}
#endif

// y = f(z) with z and y of one type (possibly the same memory).
template <typename F, typename T>
void forward_same(const F& f, const T* z, T* y, int64_t n) {
  if constexpr (kTanhByVml<F, T>) {
    if (tanh_by_vml()) {
      if (n > 0) vml_tanh(z, y, n);
      return;
    }
  }
  int64_t i = 0;
  if constexpr (kVector) {
    using V = Vectorized<T>;
    for (; i + V::size() <= n; i += V::size()) f.fwd(V::loadu(z + i)).store(y + i);
  }
  for (; i < n; ++i) y[i] = f.fwd(z[i]);
}

// t = z + bias broadcast along rows of n, y = f(t), and z = t where y is another buffer (z then
// holds the pre-activation the backward reads). z and y point at flat element e0 of the
// row-major block; bpat[i] = bias[i % n] for i < n + vector width, so every vector of the flat
// run reads its bias from bpat at the run's phase: full vectors whatever n is. (Row by row, a
// narrow row is all tail: at N = 10 a masked store per row, each stalling the next row's load
// from the same cache line, ran 15 us for a (1024, 10) block against 3 us for a flat ReLU.)
template <typename F, typename T>
void forward_bias(const F& f, T* z, const T* bpat, T* y, int64_t n, int64_t e0, int64_t count) {
  if constexpr (kTanhByVml<F, T>) {
    if (tanh_by_vml()) {
      // t = z + b into y a chunk at a time, then MKL's tanh on that chunk while it is in L2.
      // Each VML call inside a parallel region costs ~2.6 us (2M elements over 2 threads in
      // chunks of 1024: 5.9 ms, of 16384: 0.84, whole: 0.57), so the chunks are large.
      constexpr int64_t kChunk = int64_t(1) << 16;
      for (int64_t o = 0; o < count; o += kChunk) {
        const int64_t len = std::min(kChunk, count - o);
        forward_bias(Identity{}, z + o, bpat, y + o, n, e0 + o, len);
        forward_same(f, y + o, y + o, len);
      }
      return;
    }
  }
  const bool keep_pre = y != z;
  int64_t ph = e0 % n, i = 0;
  if constexpr (kVector) {
    using V = Vectorized<T>;
    constexpr int64_t W = V::size();
    const int64_t step = W % n;
    for (; i + W <= count; i += W) {
      const V t = V::loadu(z + i) + V::loadu(bpat + ph);
      if (keep_pre) t.store(z + i);
      f.fwd(t).store(y + i);
      ph += step;
      if (ph >= n) ph -= n;
    }
  }
  for (; i < count; ++i) {
    const T t = z[i] + bpat[ph];
    if (keep_pre) z[i] = t;
    y[i] = f.fwd(t);
    if (++ph == n) ph = 0;
  }
}

// y = f(z) rounded once from float to half or bfloat16, and pre = z rounded once unless null.
template <typename F, typename low_t>
void forward_round(const F& f, const float* z, low_t* y, low_t* pre, int64_t n) {
  int64_t i = 0;
  if constexpr (kVector) {
    using V = Vectorized<float>;
    constexpr int64_t W = V::size();
    for (; i + 2 * W <= n; i += 2 * W) {
      const V z0 = V::loadu(z + i), z1 = V::loadu(z + i + W);
      at::vec::convert_from_float<low_t>(f.fwd(z0), f.fwd(z1)).store(y + i);
      if (pre != nullptr) at::vec::convert_from_float<low_t>(z0, z1).store(pre + i);
    }
  }
  for (; i < n; ++i) {
    y[i] = static_cast<low_t>(f.fwd(z[i]));
    if (pre != nullptr) pre[i] = static_cast<low_t>(z[i]);
  }
}

// y = f(z) for half or bfloat16 in and out (native GEMMs): on the bit patterns where f only
// selects, else through float (at::vec's own bfloat16 maximum dropped NaN). Measured for ReLU
// on 512K bfloat16 at AVX512: the float round trip cost 0.2 ms beside a 1.9 ms GEMM.
template <typename F, typename low_t>
void forward_low(const F& f, const low_t* z, low_t* y, int64_t n) {
  if constexpr (F::kSelects) {
    const uint16_t* zb = reinterpret_cast<const uint16_t*>(z);
    uint16_t* yb = reinterpret_cast<uint16_t*>(y);
    for (int64_t i = 0; i < n; ++i) yb[i] = F::template fwd_bits<low_t>(zb[i]);
    return;
  }
  int64_t i = 0;
  if constexpr (kVector) {
    using L = Vectorized<low_t>;
    for (; i + L::size() <= n; i += L::size()) {
      auto [z0, z1] = at::vec::convert_to_float<low_t>(L::loadu(z + i));
      at::vec::convert_from_float<low_t>(f.fwd(z0), f.fwd(z1)).store(y + i);
    }
  }
  for (; i < n; ++i) y[i] = static_cast<low_t>(f.fwd(static_cast<float>(z[i])));
}

template <typename F, typename T>
void backward_same(const F& f, const T* dy, const T* saved, T* dz, int64_t n) {
  int64_t i = 0;
  if constexpr (kVector) {
    using V = Vectorized<T>;
    for (; i + V::size() <= n; i += V::size()) f.bwd(V::loadu(dy + i), V::loadu(saved + i)).store(dz + i);
  }
  for (; i < n; ++i) {
    const T g = dy[i], v = saved[i];  // both loaded unconditionally: lets GCC vectorise
    dz[i] = f.bwd(g, v);
  }
}

// dz (float) from half or bfloat16 dy and saved, converted as they are loaded.
template <typename F, typename low_t>
void backward_widen(const F& f, const low_t* dy, const low_t* saved, float* dz, int64_t n) {
  int64_t i = 0;
  if constexpr (kVector) {
    using L = Vectorized<low_t>;
    constexpr int64_t W = Vectorized<float>::size();
    for (; i + L::size() <= n; i += L::size()) {
      auto [g0, g1] = at::vec::convert_to_float<low_t>(L::loadu(dy + i));
      auto [s0, s1] = at::vec::convert_to_float<low_t>(L::loadu(saved + i));
      f.bwd(g0, s0).store(dz + i);
      f.bwd(g1, s1).store(dz + i + W);
    }
  }
  for (; i < n; ++i) dz[i] = f.bwd(static_cast<float>(dy[i]), static_cast<float>(saved[i]));
}

// dz in half or bfloat16 itself (native GEMMs), as forward_low.
template <typename F, typename low_t>
void backward_low(const F& f, const low_t* dy, const low_t* saved, low_t* dz, int64_t n) {
  if constexpr (F::kSelects) {
    const uint16_t* gb = reinterpret_cast<const uint16_t*>(dy);
    const uint16_t* sb = reinterpret_cast<const uint16_t*>(saved);
    uint16_t* db = reinterpret_cast<uint16_t*>(dz);
    for (int64_t i = 0; i < n; ++i) {
      const uint16_t g = gb[i], v = sb[i];  // both loaded unconditionally: lets GCC vectorise
      db[i] = F::template bwd_bits<low_t>(g, v);
    }
    return;
  }
  int64_t i = 0;
  if constexpr (kVector) {
    using L = Vectorized<low_t>;
    for (; i + L::size() <= n; i += L::size()) {
      auto [g0, g1] = at::vec::convert_to_float<low_t>(L::loadu(dy + i));
      auto [s0, s1] = at::vec::convert_to_float<low_t>(L::loadu(saved + i));
      at::vec::convert_from_float<low_t>(f.bwd(g0, s0), f.bwd(g1, s1)).store(dz + i);
    }
  }
  for (; i < n; ++i) {
    dz[i] = static_cast<low_t>(f.bwd(static_cast<float>(dy[i]), static_cast<float>(saved[i])));
  }
}

// acc[j] += sum over the rows of x[r][j], one row after another (the order fixes the bits).
template <typename T>
void add_rows_impl(const T* x, int64_t rows, int64_t n, T* acc) {
  int64_t j = 0;
  if constexpr (kVector) {
    using V = Vectorized<T>;
    constexpr int64_t W = V::size();
    for (; j + 4 * W <= n; j += 4 * W) {  // 4 columns of vectors: 4 independent chains
      V s0 = V::loadu(acc + j), s1 = V::loadu(acc + j + W), s2 = V::loadu(acc + j + 2 * W),
        s3 = V::loadu(acc + j + 3 * W);
      for (int64_t r = 0; r < rows; ++r) {
        const T* row = x + r * n + j;
        s0 = s0 + V::loadu(row);
        s1 = s1 + V::loadu(row + W);
        s2 = s2 + V::loadu(row + 2 * W);
        s3 = s3 + V::loadu(row + 3 * W);
      }
      s0.store(acc + j);
      s1.store(acc + j + W);
      s2.store(acc + j + 2 * W);
      s3.store(acc + j + 3 * W);
    }
    for (; j + W <= n; j += W) {
      V s = V::loadu(acc + j);
      for (int64_t r = 0; r < rows; ++r) s = s + V::loadu(x + r * n + j);
      s.store(acc + j);
    }
  }
  // The tail, and at DEFAULT the whole row: plain loops over a row, which GCC vectorises.
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * n;
    for (int64_t c = j; c < n; ++c) acc[c] += row[c];
  }
}

void add_rows(const float* x, int64_t rows, int64_t n, float* acc) { add_rows_impl(x, rows, n, acc); }
void add_rows(const double* x, int64_t rows, int64_t n, double* acc) { add_rows_impl(x, rows, n, acc); }

// One switch per activation: `call` runs with `f`, the functor of act.
#define BIGMODEL_EPILOGUE_CASE(kind, functor, call) \
  case Activation::kind: {                          \
    const functor f{};                              \
    call;                                           \
    return;                                         \
  }
#define BIGMODEL_EPILOGUE_SWITCH(act, call)           \
  switch (act.kind) {                                 \
    BIGMODEL_EPILOGUE_CASE(kNone, Identity, call)     \
    BIGMODEL_EPILOGUE_CASE(kReLU, Relu, call)         \
    case Activation::kLeakyReLU: {                    \
      const LeakyRelu f{act.negative_slope};          \
      call;                                           \
      return;                                         \
    }                                                 \
    BIGMODEL_EPILOGUE_CASE(kGelu, Gelu, call)         \
    BIGMODEL_EPILOGUE_CASE(kGeluTanh, GeluTanh, call) \
    BIGMODEL_EPILOGUE_CASE(kSilu, Silu, call)         \
    BIGMODEL_EPILOGUE_CASE(kTanh, Tanh, call)         \
    BIGMODEL_EPILOGUE_CASE(kSigmoid, Sigmoid, call)   \
  }

void forward(const Activation& act, const float* z, float* y, int64_t n) {
  BIGMODEL_EPILOGUE_SWITCH(act, (forward_same(f, z, y, n)))
}
void forward(const Activation& act, const double* z, double* y, int64_t n) {
  BIGMODEL_EPILOGUE_SWITCH(act, (forward_same(f, z, y, n)))
}
void forward_bias(const Activation& act, float* z, const float* bpat, float* y, int64_t n,
                  int64_t e0, int64_t count) {
  BIGMODEL_EPILOGUE_SWITCH(act, (forward_bias(f, z, bpat, y, n, e0, count)))
}
void forward_bias(const Activation& act, double* z, const double* bpat, double* y, int64_t n,
                  int64_t e0, int64_t count) {
  BIGMODEL_EPILOGUE_SWITCH(act, (forward_bias(f, z, bpat, y, n, e0, count)))
}
void forward(const Activation& act, const float* z, at::BFloat16* y, at::BFloat16* pre, int64_t n) {
  BIGMODEL_EPILOGUE_SWITCH(act, (forward_round(f, z, y, pre, n)))
}
void forward(const Activation& act, const float* z, at::Half* y, at::Half* pre, int64_t n) {
  BIGMODEL_EPILOGUE_SWITCH(act, (forward_round(f, z, y, pre, n)))
}
void forward(const Activation& act, const at::BFloat16* z, at::BFloat16* y, int64_t n) {
  BIGMODEL_EPILOGUE_SWITCH(act, (forward_low(f, z, y, n)))
}
void forward(const Activation& act, const at::Half* z, at::Half* y, int64_t n) {
  BIGMODEL_EPILOGUE_SWITCH(act, (forward_low(f, z, y, n)))
}
void backward(const Activation& act, const float* dy, const float* saved, float* dz, int64_t n) {
  BIGMODEL_EPILOGUE_SWITCH(act, (backward_same(f, dy, saved, dz, n)))
}
void backward(const Activation& act, const double* dy, const double* saved, double* dz, int64_t n) {
  BIGMODEL_EPILOGUE_SWITCH(act, (backward_same(f, dy, saved, dz, n)))
}
void backward(const Activation& act, const at::BFloat16* dy, const at::BFloat16* saved, float* dz,
              int64_t n) {
  BIGMODEL_EPILOGUE_SWITCH(act, (backward_widen(f, dy, saved, dz, n)))
}
void backward(const Activation& act, const at::Half* dy, const at::Half* saved, float* dz, int64_t n) {
  BIGMODEL_EPILOGUE_SWITCH(act, (backward_widen(f, dy, saved, dz, n)))
}
void backward(const Activation& act, const at::BFloat16* dy, const at::BFloat16* saved,
              at::BFloat16* dz, int64_t n) {
  BIGMODEL_EPILOGUE_SWITCH(act, (backward_low(f, dy, saved, dz, n)))
}
void backward(const Activation& act, const at::Half* dy, const at::Half* saved, at::Half* dz,
              int64_t n) {
  BIGMODEL_EPILOGUE_SWITCH(act, (backward_low(f, dy, saved, dz, n)))
}

#undef BIGMODEL_EPILOGUE_SWITCH
#undef BIGMODEL_EPILOGUE_CASE

}  // namespace CPU_CAPABILITY
}  // namespace linear
}  // namespace bigmodel
