// The bodies behind linear_epilogue.h, compiled once per CPU capability: the including file
// defines CPU_CAPABILITY (and for the vector ones turns the instruction set on), so everything
// lands in bigmodel::linear::<CAPABILITY>.
//
// At AVX2 and AVX512 the loops are at::vec; at DEFAULT they are plain loops on purpose: there
// at::vec is its generic array fallback, which ran 7x slower than torch's threshold_backward
// (12 ms vs 1.6 ms on 4M elements), while GCC vectorises these selects itself for SSE2.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "linear_epilogue.h"

namespace bigmodel {
namespace linear {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
constexpr bool kVector = true;
#else
constexpr bool kVector = false;
#endif

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

// An activation: its value and its gradient from the saved output, for scalars and vectors.
// kSelects: the value is either the input or zero (and the gradient dy or zero), so half and
// bfloat16 can be done on their bit patterns, without converting or rounding.
struct Relu {
  static constexpr bool kSelects = true;
  // NaN stays NaN (`z < 0` is false for it; at::vec::maximum propagates it), as torch.relu.
  template <typename T>
  static T fwd(T z) {
    return z < T(0) ? T(0) : z;
  }
  template <typename T>
  static Vectorized<T> fwd(const Vectorized<T>& z) {
    return at::vec::maximum(z, Vectorized<T>(T(0)));
  }
  // The gradient passes where y > 0 or y is NaN (as torch's threshold_backward): zero where y <= 0.
  template <typename T>
  static T bwd(T dy, T y) {
    return y <= T(0) ? T(0) : dy;
  }
  template <typename T>
  static Vectorized<T> bwd(const Vectorized<T>& dy, const Vectorized<T>& y) {
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

// y = F(z) with z and y of one type (possibly the same memory).
template <typename F, typename T>
void forward_same(const T* z, T* y, int64_t n) {
  int64_t i = 0;
  if constexpr (kVector) {
    using V = Vectorized<T>;
    for (; i + V::size() <= n; i += V::size()) F::fwd(V::loadu(z + i)).store(y + i);
  }
  for (; i < n; ++i) y[i] = F::fwd(z[i]);
}

// y = F(z) rounded once from float to half or bfloat16.
template <typename F, typename low_t>
void forward_round(const float* z, low_t* y, int64_t n) {
  int64_t i = 0;
  if constexpr (kVector) {
    using V = Vectorized<float>;
    constexpr int64_t W = V::size();
    for (; i + 2 * W <= n; i += 2 * W) {
      at::vec::convert_from_float<low_t>(F::fwd(V::loadu(z + i)), F::fwd(V::loadu(z + i + W)))
          .store(y + i);
    }
  }
  for (; i < n; ++i) y[i] = static_cast<low_t>(F::fwd(z[i]));
}

// y = F(z) for half or bfloat16 in and out (native GEMMs): on the bit patterns where F only
// selects, else through float (at::vec's own bfloat16 maximum dropped NaN). Measured for ReLU
// on 512K bfloat16 at AVX512: the float round trip cost 0.2 ms beside a 1.9 ms GEMM.
template <typename F, typename low_t>
void forward_low(const low_t* z, low_t* y, int64_t n) {
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
      at::vec::convert_from_float<low_t>(F::fwd(z0), F::fwd(z1)).store(y + i);
    }
  }
  for (; i < n; ++i) y[i] = static_cast<low_t>(F::fwd(static_cast<float>(z[i])));
}

template <typename F, typename T>
void backward_same(const T* dy, const T* y, T* dz, int64_t n) {
  int64_t i = 0;
  if constexpr (kVector) {
    using V = Vectorized<T>;
    for (; i + V::size() <= n; i += V::size()) F::bwd(V::loadu(dy + i), V::loadu(y + i)).store(dz + i);
  }
  for (; i < n; ++i) {
    const T g = dy[i], v = y[i];  // both loaded unconditionally: lets GCC vectorise
    dz[i] = F::bwd(g, v);
  }
}

// dz (float) from half or bfloat16 dy and y, converted as they are loaded.
template <typename F, typename low_t>
void backward_widen(const low_t* dy, const low_t* y, float* dz, int64_t n) {
  int64_t i = 0;
  if constexpr (kVector) {
    using L = Vectorized<low_t>;
    constexpr int64_t W = Vectorized<float>::size();
    for (; i + L::size() <= n; i += L::size()) {
      auto [g0, g1] = at::vec::convert_to_float<low_t>(L::loadu(dy + i));
      auto [y0, y1] = at::vec::convert_to_float<low_t>(L::loadu(y + i));
      F::bwd(g0, y0).store(dz + i);
      F::bwd(g1, y1).store(dz + i + W);
    }
  }
  for (; i < n; ++i) dz[i] = F::bwd(static_cast<float>(dy[i]), static_cast<float>(y[i]));
}

// dz in half or bfloat16 itself (native GEMMs), as forward_low.
template <typename F, typename low_t>
void backward_low(const low_t* dy, const low_t* y, low_t* dz, int64_t n) {
  if constexpr (F::kSelects) {
    const uint16_t* gb = reinterpret_cast<const uint16_t*>(dy);
    const uint16_t* yb = reinterpret_cast<const uint16_t*>(y);
    uint16_t* db = reinterpret_cast<uint16_t*>(dz);
    for (int64_t i = 0; i < n; ++i) {
      const uint16_t g = gb[i], v = yb[i];  // both loaded unconditionally: lets GCC vectorise
      db[i] = F::template bwd_bits<low_t>(g, v);
    }
    return;
  }
  int64_t i = 0;
  if constexpr (kVector) {
    using L = Vectorized<low_t>;
    for (; i + L::size() <= n; i += L::size()) {
      auto [g0, g1] = at::vec::convert_to_float<low_t>(L::loadu(dy + i));
      auto [y0, y1] = at::vec::convert_to_float<low_t>(L::loadu(y + i));
      at::vec::convert_from_float<low_t>(F::bwd(g0, y0), F::bwd(g1, y1)).store(dz + i);
    }
  }
  for (; i < n; ++i) dz[i] = static_cast<low_t>(F::bwd(static_cast<float>(dy[i]), static_cast<float>(y[i])));
}

// One switch per activation; issue 14's activations add a case each.
#define BIGMODEL_EPILOGUE_SWITCH(act, call) \
  switch (act) {                            \
    case Activation::kReLU: {               \
      using F = Relu;                       \
      call;                                 \
      return;                               \
    }                                       \
  }

void forward(Activation act, const float* z, float* y, int64_t n) {
  BIGMODEL_EPILOGUE_SWITCH(act, (forward_same<F>(z, y, n)))
}
void forward(Activation act, const double* z, double* y, int64_t n) {
  BIGMODEL_EPILOGUE_SWITCH(act, (forward_same<F>(z, y, n)))
}
void forward(Activation act, const float* z, at::BFloat16* y, int64_t n) {
  BIGMODEL_EPILOGUE_SWITCH(act, (forward_round<F>(z, y, n)))
}
void forward(Activation act, const float* z, at::Half* y, int64_t n) {
  BIGMODEL_EPILOGUE_SWITCH(act, (forward_round<F>(z, y, n)))
}
void forward(Activation act, const at::BFloat16* z, at::BFloat16* y, int64_t n) {
  BIGMODEL_EPILOGUE_SWITCH(act, (forward_low<F>(z, y, n)))
}
void forward(Activation act, const at::Half* z, at::Half* y, int64_t n) {
  BIGMODEL_EPILOGUE_SWITCH(act, (forward_low<F>(z, y, n)))
}
void backward(Activation act, const float* dy, const float* y, float* dz, int64_t n) {
  BIGMODEL_EPILOGUE_SWITCH(act, (backward_same<F>(dy, y, dz, n)))
}
void backward(Activation act, const double* dy, const double* y, double* dz, int64_t n) {
  BIGMODEL_EPILOGUE_SWITCH(act, (backward_same<F>(dy, y, dz, n)))
}
void backward(Activation act, const at::BFloat16* dy, const at::BFloat16* y, float* dz, int64_t n) {
  BIGMODEL_EPILOGUE_SWITCH(act, (backward_widen<F>(dy, y, dz, n)))
}
void backward(Activation act, const at::Half* dy, const at::Half* y, float* dz, int64_t n) {
  BIGMODEL_EPILOGUE_SWITCH(act, (backward_widen<F>(dy, y, dz, n)))
}

void backward(Activation act, const at::BFloat16* dy, const at::BFloat16* y, at::BFloat16* dz,
              int64_t n) {
  BIGMODEL_EPILOGUE_SWITCH(act, (backward_low<F>(dy, y, dz, n)))
}
void backward(Activation act, const at::Half* dy, const at::Half* y, at::Half* dz, int64_t n) {
  BIGMODEL_EPILOGUE_SWITCH(act, (backward_low<F>(dy, y, dz, n)))
}

#undef BIGMODEL_EPILOGUE_SWITCH

}  // namespace CPU_CAPABILITY
}  // namespace linear
}  // namespace bigmodel
