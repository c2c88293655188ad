// CPU engine for bigmodel::attention and bigmodel::attention_backward: FlashAttention on the CPU.
//
// This file checks the inputs, describes them to the kernels as pointers + strides (no copies:
// transposed layouts, expanded masks and GQA heads are all read in place) and picks the kernel
// build for this CPU. The kernels themselves are in attention_kernel.h, compiled three times:
// here for the baseline instruction set, in attention_avx2.cpp and attention_avx512.cpp for the
// vector units torch itself would use (at::get_cpu_capability(), which honours
// ATEN_CPU_CAPABILITY).
#include "attention_prelude.h"

#define CPU_CAPABILITY DEFAULT
#include "attention_kernel.h"
#include "output_cache.h"

#include <torch/library.h>

namespace bigmodel {
namespace attn {
namespace {

void run_forward(const Args& a) {
  switch (cpu_level()) {
#if BIGMODEL_CPU_VECTOR_VARIANTS
    case CpuLevel::kAvx512: return AVX512::forward(a);
    case CpuLevel::kAvx2: return AVX2::forward(a);
#endif
    default: return DEFAULT::forward(a);
  }
}

void run_backward(const Args& a) {
  switch (cpu_level()) {
#if BIGMODEL_CPU_VECTOR_VARIANTS
    case CpuLevel::kAvx512: return AVX512::backward(a);
    case CpuLevel::kAvx2: return AVX2::backward(a);
#endif
    default: return DEFAULT::backward(a);
  }
}

void copy_strides(int64_t* dst, const at::Tensor& t) {
  for (int d = 0; d < 4; ++d) dst[d] = t.stride(d);
}

// Validates the shared inputs and fills everything of Args but the outputs.
Args describe(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const std::optional<at::Tensor>& mask, double dropout_p, bool is_causal,
              double scale, const std::optional<at::Tensor>& rng_seed) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": query, key and value must be 4-D (B, H, L, E), got shapes ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op,
              ": the CPU kernel got tensors on ", q.device(), ", ", k.device(), ", ", v.device());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": query dtype must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, op,
              ": query, key and value must share a dtype, got ", dt, ", ", k.scalar_type(), ", ",
              v.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), E = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), Ev = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, op, ": batch sizes differ: query ", q.sizes(),
              ", key ", k.sizes(), ", value ", v.sizes());
  TORCH_CHECK(k.size(3) == E, op, ": key head dim must match query's: query ", q.sizes(),
              ", key ", k.sizes());
  TORCH_CHECK(v.size(1) == Hkv && v.size(2) == S, op,
              ": key and value must have the same heads and length: key ", k.sizes(), ", value ",
              v.sizes());
  TORCH_CHECK(Hkv > 0 ? Hq % Hkv == 0 : Hq == 0, op, ": query heads (", Hq,
              ") must be a multiple of key/value heads (", Hkv, ")");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ",
              dropout_p);
  Args a;
  a.dtype = dt;
  a.B = B, a.Hq = Hq, a.Hkv = Hkv, a.L = L, a.S = S, a.E = E, a.Ev = Ev;
  a.q = q.data_ptr(), a.k = k.data_ptr(), a.v = v.data_ptr();
  copy_strides(a.sq, q);
  copy_strides(a.sk, k);
  copy_strides(a.sv, v);
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.dim() == 4 && m.size(0) == B && m.size(1) == Hq && m.size(2) == L &&
                    m.size(3) == S,
                op, ": attn_mask must be (B, Hq, L, S) = (", B, ", ", Hq, ", ", L, ", ", S,
                ") (an expanded view is fine), got ", m.sizes());
    TORCH_CHECK(m.device().is_cpu(), op, ": attn_mask is on ", m.device(), ", expected cpu");
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == dt, op,
                ": attn_mask must be bool or have the query's dtype ", dt, ", got ",
                m.scalar_type());
    a.mask_kind = m.scalar_type() == at::kBool ? MaskKind::kBool : MaskKind::kAdditive;
    a.mask = m.data_ptr();
    copy_strides(a.sm, m);
  }
  a.causal = is_causal;
  a.scale = scale;
  a.dropout_p = dropout_p;
  if (dropout_p > 0) {
    TORCH_CHECK(rng_seed.has_value() && rng_seed->defined() && rng_seed->numel() >= 2 &&
                    rng_seed->scalar_type() == at::kLong && rng_seed->device().is_cpu(),
                op, ": dropout_p > 0 needs rng_seed, an int64 CPU tensor (seed, offset)");
    const at::Tensor r = rng_seed->contiguous();
    a.seed = static_cast<uint64_t>(r.data_ptr<int64_t>()[0]);
    a.offset = static_cast<uint64_t>(r.data_ptr<int64_t>()[1]);
  }
  return a;
}

// bfloat16 on a CPU with bfloat16 arithmetic (native_low_precision: AMX-BF16 or AVX512-BF16, at
// the AVX512 level) runs torch's own flash attention, forward and backward: it multiplies bfloat16
// blocks on AMX, where the engine's float blocks ran 0.36-0.45x it (AVX-512 Xeon, (2,8,1024,64):
// 33 vs 13.3 ms forward; backward 39 vs 40 ms, a tie). It rounds P to bfloat16 for P V, as the
// Triton kernels do on the GPU. Only where its contract is ours: no dropout (the engine's own
// random stream), as many key/value heads as query heads, one head size for Q, K and V, and no
// mask or a mask in the query's dtype (it takes no bool mask). Forward and backward decide
// alike, so the lse one leaves is the one the other reads.
bool torch_flash_runs_it(const Args& a) {
  return a.dtype == at::kBFloat16 && native_low_precision(a.dtype) && a.dropout_p == 0.0 &&
         a.Hq == a.Hkv && a.E == a.Ev && a.mask_kind != MaskKind::kBool;
}

std::tuple<at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal, double scale,
    const std::optional<at::Tensor>& rng_seed) {
  // Kernels run below autograd and touch only raw memory; detached views keep it that way.
  const at::Tensor q = query.detach(), k = key.detach(), v = value.detach();
  std::optional<at::Tensor> mask;
  if (attn_mask.has_value() && attn_mask->defined()) mask = attn_mask->detach();
  Args a = describe("bigmodel::attention", q, k, v, mask, dropout_p, is_causal, scale, rng_seed);
  if (torch_flash_runs_it(a) && a.L > 0 && a.S > 0) {
    auto [out, lse] = at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, a.causal, mask,
                                                                      a.scale);
    return {out, lse.contiguous()};  // its lse is (B, L, H) in memory; the op's is (B, H, L)
  }
  // From the engine's output cache (output_cache.h), as the linear ops' outputs.
  at::Tensor out = empty_output({a.B, a.Hq, a.L, a.Ev}, q.options());
  at::Tensor lse = empty_output({a.B, a.Hq, a.L}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  run_forward(a);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal, double scale,
    const std::optional<at::Tensor>& rng_seed) {
  const at::Tensor q = query.detach(), k = key.detach(), v = value.detach();
  std::optional<at::Tensor> mask;
  if (attn_mask.has_value() && attn_mask->defined()) mask = attn_mask->detach();
  const char* op = "bigmodel::attention_backward";
  Args a = describe(op, q, k, v, mask, dropout_p, is_causal, scale, rng_seed);
  const std::vector<int64_t> oshape{a.B, a.Hq, a.L, a.Ev};
  TORCH_CHECK(grad_out.sizes() == oshape && out.sizes() == oshape, op,
              ": grad_out ", grad_out.sizes(), " and out ", out.sizes(), " must both be ", oshape);
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({a.B, a.Hq, a.L}) && lse.scalar_type() == at::kFloat,
              op, ": lse must be float32 of shape (", a.B, ", ", a.Hq, ", ", a.L, "), got ",
              lse.scalar_type(), " ", lse.sizes());
  const at::Tensor g = grad_out.detach().to(a.dtype), o = out.detach().to(a.dtype);
  const at::Tensor l = lse.detach().contiguous();
  at::Tensor dq = empty_output(q.sizes(), q.options());
  at::Tensor dk = empty_output(k.sizes(), k.options());
  at::Tensor dv = empty_output(v.sizes(), v.options());
  if (dq.numel() == 0 && dk.numel() == 0 && dv.numel() == 0) return {dq, dk, dv};
  if (a.L == 0 || a.Hq == 0) {  // no query sees anything: every gradient is zero
    return {dq.zero_(), dk.zero_(), dv.zero_()};
  }
  if (torch_flash_runs_it(a) && a.S > 0) {
    auto [gq, gk, gv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        g, q, k, v, o, l, 0.0, a.causal, mask, a.scale);
    // Its gradients are (B, L, H, E) in memory; the op's are contiguous (B, H, L, E).
    return {gq.contiguous(), gk.contiguous(), gv.contiguous()};
  }
  a.out = const_cast<void*>(o.data_ptr());
  copy_strides(a.so, o);
  a.dout = g.data_ptr();
  copy_strides(a.sdo, g);
  a.lse = const_cast<float*>(l.data_ptr<float>());
  a.dq = dq.data_ptr(), a.dk = dk.data_ptr(), a.dv = dv.data_ptr();
  run_backward(a);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace attn

TORCH_LIBRARY_IMPL(bigmodel, CPU, m) {
  m.impl("attention", &attn::attention_forward);
  m.impl("attention_backward", &attn::attention_backward);
}

}  // namespace bigmodel
