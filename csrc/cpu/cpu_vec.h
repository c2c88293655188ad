// What every per-capability CPU kernel file needs before it turns on AVX2/AVX512 code
// generation (cpu_vec_avx2.h, cpu_vec_avx512.h), and the capability the engine runs at.
// Inline functions from these headers are shared with the rest of the extension; compiled here
// first, they keep the baseline instruction set, so the linker can never hand a wide-vector copy
// of them to code running on an older CPU.
#pragma once

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/copysign.h>
#include <c10/util/qint32.h>
#include <c10/util/qint8.h>
#include <c10/util/quint8.h>

#include <algorithm>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

// The vector variants are built with GCC's target pragma (no per-file flags needed in setup.py).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BIGMODEL_CPU_VECTOR_VARIANTS 1
#else
#define BIGMODEL_CPU_VECTOR_VARIANTS 0
#endif

namespace bigmodel {

// The vector level the engine's own kernels run at: the one torch's kernels use
// (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY), so one environment variable
// emulates a smaller CPU for both.
enum class CpuLevel { kDefault, kAvx2, kAvx512 };

inline CpuLevel cpu_level() {
  static const CpuLevel level = [] {
    if (!BIGMODEL_CPU_VECTOR_VARIANTS) return CpuLevel::kDefault;
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512") return CpuLevel::kAvx512;
    if (cap == "AVX2") return CpuLevel::kAvx2;
    return CpuLevel::kDefault;
  }();
  return level;
}

// MKL picks its kernels by CPU vendor as well as by instruction set: on Intel it runs the
// widest code the level allows (MKL_ENABLE_INSTRUCTIONS caps it), elsewhere (AMD) its AVX2 code
// at every level. Where it runs the full width it is at ~97% of the core's FMA peak (1 thread,
// AVX-512 Xeon: 160 GFLOP/s at 1024x784->512) and no other library beats it; where it does not,
// oneDNN's JIT kernels for the level can (bench/NOTES.md, "Per CPU level").
inline bool mkl_runs_full_width() {
  static const bool intel = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
    return ebx == 0x756e6547u && edx == 0x49656e69u && ecx == 0x6c65746eu;  // "GenuineIntel"
#else
    return false;
#endif
  }();
  return intel;
}

// bfloat16 / half arithmetic in hardware at the AVX512 level (avx512_bf16 or AMX-BF16 for
// bfloat16; avx512_fp16 or AMX-FP16 for half): there torch's own kernels in that dtype (its GEMMs,
// its flash attention on AMX brgemm) beat the engine's float blocks, and the engine hands those
// dtypes to them (linear_relu.cpp, attention.cpp). Elsewhere torch's fallbacks run at ~1.3
// GFLOP/s (53 ms at 1024x784->512 on an AVX2 EPYC, 6x its fp32), so the engine converts to float
// and rounds once at the end. BIGMODEL_CPU_LOW_PRECISION_FP32=1 keeps the float blocks anyway.
inline bool native_low_precision(at::ScalarType dtype) {
  if (cpu_level() != CpuLevel::kAvx512) return false;
  static const auto caps = at::cpu::get_cpu_capabilities();
  auto has = [&](const char* key) {
    const auto it = caps.find(key);
    return it != caps.end() && it->second.isBool() && it->second.toBool();
  };
  const bool native = dtype == at::kBFloat16 ? has("avx512_bf16") || has("amx_bf16")
                      : dtype == at::kHalf   ? has("avx512_fp16") || has("amx_fp16")
                                             : false;
  return native && std::getenv("BIGMODEL_CPU_LOW_PRECISION_FP32") == nullptr;
}

}  // namespace bigmodel
