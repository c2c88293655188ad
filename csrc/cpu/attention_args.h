// What the CPU attention kernels receive: raw pointers, sizes and element strides of the 4-D
// (B, H, L, D) views, so the kernels read any layout (transposed, expanded masks, GQA heads)
// without copies. Shared by attention.cpp (checks, dispatch, registration) and the kernel
// bodies in attention_kernel.h, which are compiled once per CPU capability.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace bigmodel {
namespace attn {

enum class MaskKind { kNone, kBool, kAdditive };

struct Args {
  at::ScalarType dtype;  // of query, key, value, out (and an additive mask)
  int64_t B, Hq, Hkv, L, S, E, Ev;
  const void* q;
  const void* k;
  const void* v;
  int64_t sq[4], sk[4], sv[4];  // element strides of (B, H, L|S, E|Ev)
  MaskKind mask_kind = MaskKind::kNone;
  const void* mask = nullptr;   // bool or dtype, broadcast to (B, Hq, L, S) through sm
  int64_t sm[4] = {0, 0, 0, 0};
  bool causal = false;
  double scale = 1.0;
  double dropout_p = 0.0;
  uint64_t seed = 0, offset = 0;
  // Forward outputs (contiguous): out (B, Hq, L, Ev) in dtype, lse (B, Hq, L) float.
  // In the backward, out and lse are inputs (out read through so).
  void* out = nullptr;
  int64_t so[4] = {0, 0, 0, 0};
  float* lse = nullptr;
  double* lse64 = nullptr;  // optional: the forward also writes lse in double here
  // Backward: grad_out read through sdo; dq, dk, dv written contiguous in dtype.
  const void* dout = nullptr;
  int64_t sdo[4] = {0, 0, 0, 0};
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
};

// One definition per CPU capability (see attention_kernel.h); attention.cpp picks at run time.
#define BIGMODEL_ATTN_DECLARE(cap)      \
  namespace cap {                       \
  void forward(const Args& a);          \
  void backward(const Args& a);         \
  }
BIGMODEL_ATTN_DECLARE(DEFAULT)
BIGMODEL_ATTN_DECLARE(AVX2)
BIGMODEL_ATTN_DECLARE(AVX512)
#undef BIGMODEL_ATTN_DECLARE

}  // namespace attn
}  // namespace bigmodel
