// Everything attention_kernel.h needs apart from at::vec, included before a capability file
// turns on AVX2/AVX512 code generation. Inline functions from these headers are shared with the
// rest of the extension; compiled here first, they keep the baseline instruction set, so the
// linker can never hand a wide-vector copy of them to code running on an older CPU.
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
#include <type_traits>
#include <vector>

#include "attention_args.h"

// The vector variants are built with GCC's target pragma (no per-file flags needed in setup.py).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BIGMODEL_ATTN_VECTOR_VARIANTS 1
#else
#define BIGMODEL_ATTN_VECTOR_VARIANTS 0
#endif
