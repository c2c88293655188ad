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

}  // namespace bigmodel
