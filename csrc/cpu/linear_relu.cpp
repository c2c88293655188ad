// CPU engine of the linear + activation ops (linear_act.h), and bigmodel::linear_relu on it:
// y = act(x W^T + b), forward and backward (bigmodel::fused_linear, csrc/cpu/fused_linear.cpp,
// is the same engine for the other activations).
//
// Why it beats act(F.linear(x, W, b)): eager writes the GEMM output to memory, then reads it
// back and writes a second, freshly allocated tensor for the activation (page faults included).
// Here the activation runs as an epilogue on the GEMM's output while it is in cache (in place
// when the backward needs only y), so each output tensor is written once; backward applies act'
// to grad_output straight into the gradient GEMMs' operand. Where it pays (measured per CPU
// level, bench/NOTES.md "linear_relu per level") the fp32 GEMMs run on oneDNN instead of MKL.
// Half and bfloat16 are computed in float and rounded once, unless the CPU has native bfloat16 /
// half arithmetic and torch's own GEMM is faster.
//
// This file holds the GEMMs and the choices; the elementwise epilogue (one per activation,
// vectorised per CPU level) is linear_epilogue.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Config.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/FunctionRef.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <array>

#include "output_cache.h"
#include "linear_act.h"
#include "linear_narrow.h"
#include "transpose.h"

#if AT_MKL_ENABLED()
// MKL's C entry point (mkl_service.h maps mkl_set_num_threads_local to it; the lowercase
// symbol libtorch_cpu exports is the Fortran one, which takes a pointer).
extern "C" int MKL_Set_Num_Threads_Local(int nt);
#endif

namespace bigmodel {
namespace linear {

void check_inputs(const char* op, const at::Tensor& input, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() == 2, op, ": input must be 2-D (M, K), got shape ", input.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == input.size(1), op,
              ": weight must be (out_features, ", input.size(1), ") for input of shape ",
              input.sizes(), ", got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, ": weight dtype ",
              weight.scalar_type(), " does not match input dtype ", input.scalar_type());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be (",
                weight.size(0), ",), got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), op, ": bias dtype ",
                bias->scalar_type(), " does not match input dtype ", input.scalar_type());
  }
}

namespace {

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Rows per block of the blocked paths (oneDNN's blocks from 32 MB, the widened half / bfloat16
// forward): the output block (and, in backward, the masked-gradient block) should stay in cache
// between the GEMM that writes it and the pass that reads it.
int64_t rows_per_block(int64_t M, int64_t N, int64_t elt_size) {
  const int64_t cache_bytes = 8 << 20;  // well inside the 32 MB L3; 2, 4, 8, 32 MB measured alike
  const int64_t rows = cache_bytes / std::max<int64_t>(1, N * elt_size);
  return std::clamp<int64_t>(rows, 64, std::max<int64_t>(M, 1));
}

// oneDNN's fp32 GEMM, through torch's own mkldnn::_linear_pointwise. Its ReLU post-op is not
// used: it turns NaN into 0; our epilogue keeps NaN. BIGMODEL_NO_ONEDNN=1 turns it off.
using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view, c10::List<std::optional<at::Scalar>>,
                            std::optional<c10::string_view>);

const c10::TypedOperatorHandle<LinearFn>* onednn_linear() {
  static const std::optional<c10::TypedOperatorHandle<LinearFn>> handle =
      []() -> std::optional<c10::TypedOperatorHandle<LinearFn>> {
    if (!at::hasMKLDNN() || std::getenv("BIGMODEL_NO_ONEDNN") != nullptr) return std::nullopt;
    auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!op.has_value()) return std::nullopt;
    return op->typed<LinearFn>();
  }();
  return handle.has_value() ? &*handle : nullptr;
}

// a (R, C) @ b^T with b (O, C) -> (R, O), plus bias; both operands may be strided views.
at::Tensor onednn_mm_bt(const at::Tensor& a, const at::Tensor& b,
                        const std::optional<at::Tensor>& bias = std::nullopt) {
  // The op reads a bias as if contiguous (a strided slice came out wrong): hand it one.
  const std::optional<at::Tensor> b1 =
      bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  return onednn_linear()->call(a, b, b1, "none", c10::List<std::optional<at::Scalar>>(),
                               std::nullopt);
}

constexpr int64_t kOnednnGradWeightMaxRows = 4096;

// dW = dZ^T X on oneDNN, over chunks of at most kOnednnGradWeightMaxRows rows of dZ and X summed
// in chunk order: each chunk a product whose result does not depend on the thread count, with
// dZ^T handed over contiguous (transposed_copy; see plan_gemms). dz (M, N) contiguous float,
// x (M, K), M > 0.
at::Tensor onednn_grad_weight(const at::Tensor& dz, const at::Tensor& x) {
  const int64_t M = dz.size(0);
  at::Tensor dw;
  for (int64_t r0 = 0; r0 < M; r0 += kOnednnGradWeightMaxRows) {
    const int64_t rows = std::min(kOnednnGradWeightMaxRows, M - r0);
    at::Tensor part = onednn_mm_bt(transposed_copy(dz.narrow(0, r0, rows)), x.narrow(0, r0, rows).t());
    dw = r0 == 0 ? part : dw.add_(part);
  }
  return dw;
}

// out = a @ b (+ bias) by MKL, with a result that does not depend on the thread count (the
// widened half / bfloat16 forward, block by block). One
// multithreaded MKL call moves its partition with the thread count, and with it which elements
// its edge kernels compute (in another order): 44 of 240 shapes with M in 7..1100, K in 5..784,
// N in 1..200 differed in the last bits between 1, 2 and 3 threads, and so did K = 100 at
// M, N >= 64; none of 240 shapes whose dimensions were all multiples of 64. So the product is
// cut here into a grid of tiles fixed by the shape alone, each tile one single-threaded MKL call
// over the full reduction, the tiles spread over the threads: rows first, at least 128 x 128
// and 32 MFLOP a tile (MKL costs ~5 us a call and packs its operands for each: 4, 8 and 32
// tiles ran 5%, 6% and 12% slower than one single-threaded call at 1024x784->512), at most 64.
// `then`, where given, runs on each finished tile (rows r0.., columns c0..) by the thread that
// computed it: an epilogue there reads the tile from that core's cache, in the same parallel
// region (one barrier per block instead of two).
using TileFn = c10::function_ref<void(int64_t r0, int64_t rows, int64_t c0, int64_t cols)>;

void mkl_mm(at::Tensor out, const at::Tensor& a, const at::Tensor& b,
            const std::optional<at::Tensor>& bias, std::optional<TileFn> then = std::nullopt) {
  const int64_t R = out.size(0), C = out.size(1);
  if (R == 0 || C == 0) return;
  auto tile = [&](int64_t r0, int64_t rows, int64_t c0, int64_t cols) {
    at::Tensor o = out.narrow(0, r0, rows).narrow(1, c0, cols);
    const at::Tensor at_ = a.narrow(0, r0, rows), bt = b.narrow(1, c0, cols);
    if (bias.has_value()) {
      at::addmm_out(o, bias->narrow(0, c0, cols), at_, bt);  // beta=1 on the broadcast bias
    } else {
      at::mm_out(o, at_, bt);
    }
    if (then.has_value()) (*then)(r0, rows, c0, cols);
  };
  const int64_t Kd = a.size(1);
  const double flops = 2.0 * R * C * Kd;
  int64_t tiles = std::clamp<int64_t>(static_cast<int64_t>(flops / 32e6), 1, 64);
  // Below 128 MFLOP that gives fewer tiles than cores (one tile: one core, 0.5x eager's
  // multithreaded call at 64x784->512 on 2 cores): from 4 MFLOP (~40 us on one core, 8x a
  // call's overhead) at least 4 tiles, still a count fixed by the shape.
  if (flops >= 4e6) tiles = std::max<int64_t>(tiles, 4);
  const int64_t rt = std::clamp<int64_t>(tiles, 1, (R + 127) / 128);
  const int64_t ct = std::clamp<int64_t>(tiles / rt, 1, (C + 127) / 128);
  const int64_t rows = round_up((R + rt - 1) / rt, 8), cols = round_up((C + ct - 1) / ct, 16);
  const int64_t nr = (R + rows - 1) / rows, nc = (C + cols - 1) / cols;
#if AT_MKL_ENABLED()
  at::parallel_for(0, nr * nc, 1, [&](int64_t t0, int64_t t1) {
    const int previous = MKL_Set_Num_Threads_Local(1);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t / nc * rows, c0 = t % nc * cols;
      tile(r0, std::min(rows, R - r0), c0, std::min(cols, C - c0));
    }
    MKL_Set_Num_Threads_Local(previous);
  });
#else
  tile(0, R, 0, C);
#endif
}

// Which library runs each fp32 GEMM, per CPU level (bench/NOTES.md, "linear_relu per level";
// torch's own F.linear is MKL at every level). Measured per GEMM, 1 thread, CPU time:
//  * DEFAULT: MKL. oneDNN's pre-AVX2 kernels ran at 0.33-0.64x of MKL's sgemm.
//  * AVX512: oneDNN from 2 MFLOP: 1.1-2.5x MKL on this EPYC (MKL runs its AVX2 code on AMD).
//    Below, oneDNN's fixed cost per call (~12 us) loses: 256x256->10 dX, dW 0.82-0.91x,
//    64x256->10 0.34-0.58x.
//  * AVX2: oneDNN from 4 MFLOP and only for M >= 1024, or a narrow forward (N <= 16); see
//    plan_gemms.
//  * dW = dZ^T X: oneDNN takes dZ^T as a contiguous operand. Handed the strided view, torch's
//    wrapper copied it at ~2 GB/s (1.05 ms for the seed MLP's (1024, 512) dZ, 4.2 ms in the
//    Transformer step's FFN), and every earlier dW measurement counted that copy; now
//    transposed_copy (transpose.h) makes it in 16 x 16 register blocks. Op backward on Zen 5,
//    2 threads, MKL dW -> oneDNN dW: AVX512 1.3-2.0x at every shape with K >= 256 (256x256->512
//    573-652 -> 432-443 us, 2048x1024->256 11.4-11.7 -> 5.7-6.2 ms), a tie at 256x100->256;
//    AVX2 (capped) 1.05-1.2x where K >= 512 (1024x784->512 9.4-9.6 -> 7.9-8.0 ms), ties below;
//    at AVX2 only from M = 1024, as the forward (the native Zen 3 put oneDNN behind MKL below).
//    A longer reduction (M) runs as chunks of at most kOnednnGradWeightMaxRows rows, summed in
//    order (onednn_grad_weight): one oneDNN call over M=65536 depended on the thread count, and
//    at M=16384 lost to MKL (14.4 vs 11.5 ms, the copy included). In chunks, against MKL's one
//    call, AVX512: 16384x256->256 11.6 -> 9.8 ms, 8192x784->512 31.4 -> 17.5 ms (with torch's
//    slow transpose still in); K = 128 a tie. At AVX2 still only up to 4096 rows (unmeasured
//    beyond).
//  * Tensors of 32 MB and more are never one whole oneDNN call: the page faults of its fresh
//    output cost more than the GEMM, while the engine's outputs come from the output cache in
//    huge pages (65536x128->128: 12.6 ms blocked MKL vs 15-16 ms oneDNN into its own 4 KB-page
//    output). They are MKL's whole calls, or per block on oneDNN where onednn_blocks says so.
struct GemmPlan {
  bool fwd = false, dx = false, dw = false;  // true: oneDNN, false: MKL
  bool any() const { return fwd || dx || dw; }
};

constexpr int64_t kOnednnGradWeightMinKAvx512 = 256, kOnednnGradWeightMinKAvx2 = 512;
constexpr int64_t kAvx2OnednnMinRows = 1024;
constexpr int64_t kAvx2OnednnNarrowN = 16;

// Measured 2026-12-02, each GEMM alone, 1 thread, process CPU time (immune to the shared
// machine's stolen time), MKL time / oneDNN time on 14 shapes from 64x784->512 to 4096x784->512
// (bench/NOTES.md, "Per CPU level"). On an Intel CPU MKL runs its full-width code at every level
// (mkl_runs_full_width) and oneDNN never won (AVX-512 Xeon: fwd 0.89-1.05, dX 0.53-1.03, dW
// 0.12-0.81; capped to AVX2: fwd 0.86-1.12, dX 0.71-1.13, dW 0.15-0.91), so MKL runs all three.
// On AMD, where MKL runs its AVX2 code:
//  * AVX512: fwd and dX 1.08-1.59 from 5 MFLOP (256x100->256, 13 MFLOP: 0.98-1.01, a tie);
//    dW: see above (those figures, with the slow copy, had oneDNN win only at K >= 512).
//  * AVX2: fwd 0.69-0.99 and dX 0.83-1.05 for M <= 1024, 1.03-1.18 from M = 2048; a narrow
//    output (N = 10) 1.60 fwd, 1.10 dX. That was Zen 5 capped to AVX2. On a native AVX2 EPYC
//    (Zen 3, 2026-12-02, 2 threads, wall time, the libraries' own threading): fwd / dX 1.10 / 1.14 at 1024x784->512, 1.05 / 1.09 at
//    1024x512->256, 1.02-1.34 / 0.99-1.19 from M = 2048; M = 256: 0.82-1.10 / 0.66-1.05; N = 10
//    at M = 1024: fwd 1.31, dX 0.74; dW 0.55-0.99 with the slow copy (not yet measured there
//    with transposed_copy). So oneDNN from M = 1024, and a narrow output on oneDNN for its
//    forward only.
GemmPlan plan_gemms(at::ScalarType compute, int64_t M, int64_t K, int64_t N) {
  GemmPlan p;
  const CpuLevel level = cpu_level();
  if (compute != at::kFloat || level == CpuLevel::kDefault || onednn_linear() == nullptr) return p;
  if (mkl_runs_full_width()) return p;
  const bool avx512 = level == CpuLevel::kAvx512;
  if (M == 0 || N == 0 || K == 0 || 2.0 * M * N * K < (avx512 ? 2e6 : 4e6)) return p;
  const int64_t elt = 4;
  const bool small = M * std::max(N, K) * elt < kLargeOutputBytes;
  const bool onednn_rows = avx512 || M >= kAvx2OnednnMinRows;
  p.fwd = M * N * elt < kLargeOutputBytes && (onednn_rows || N <= kAvx2OnednnNarrowN);
  p.dx = small && (avx512 || (onednn_rows && N > kAvx2OnednnNarrowN));
  p.dw = small && onednn_rows && (avx512 || M <= kOnednnGradWeightMaxRows) &&
         K >= (avx512 ? kOnednnGradWeightMinKAvx512 : kOnednnGradWeightMinKAvx2);
  return p;
}

// Tensors of 32 MB and more (the blocked path) on AMD at AVX512: each block's products on oneDNN
// where both dimensions are at least kOnednnBlockMinDim, blocks of at most
// kOnednnGradWeightMaxRows rows (so each product is one the small-tensor plan also trusts, and
// its result does not depend on the thread count). The block's output is oneDNN's own (a block
// from torch's allocator, not a fresh 32 MB tensor): the forward's epilogue reads it and writes
// y (and pre) in the huge-page output, the one pass it makes anyway; dX is copied into place
// (one more pass over a cached block), dW added up block by block in order. Zen 5, 2 threads,
// the blocked MKL grid -> oneDNN blocks (eager): fwd 16384x256->1024 46.3 -> 23.6 ms (84),
// 16384x1024->1024 184 -> 86 ms (212); bwd 104 -> 62 ms (128), 428 -> 184 ms (392). A
// prototype of it lost at 65536x128->128 (fwd 12.7 -> 17.2 ms), hence the bound; at AVX2
// capped too (fwd 16384x256->1024 47.2 vs 61.9 ms), so the grid stays there.
constexpr int64_t kOnednnBlockMinDim = 256;

bool onednn_blocks(at::ScalarType compute, int64_t K, int64_t N) {
  return compute == at::kFloat && cpu_level() == CpuLevel::kAvx512 && !mkl_runs_full_width() &&
         onednn_linear() != nullptr && std::min(K, N) >= kOnednnBlockMinDim;
}

at::Tensor detached(const at::Tensor& t) { return t.detach(); }
std::optional<at::Tensor> detached(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? std::optional<at::Tensor>(t->detach()) : std::nullopt;
}

// At DEFAULT, GELU's forward is torch's own kernel, in place: its DEFAULT GELU runs 1.1 ns an
// element on Zen 5 and is libm-accurate, where the engine's loop is libm's scalar erf (its A-S
// erf, vectorised by GCC, measured 0.94-0.97x eager at 4096x784->512 and 16384x256->1024 against
// 0.99-1.02x for torch's kernel, and is off the house rule on small outputs). The other transcendental activations run the engine's loops there (vec_math_kernel.h's
// scalar forms): torch's sigmoid and SiLU are scalar at DEFAULT and its GELU-tanh a scalar tanh,
// and the engine's forwards measured 1.15-1.31x (sigmoid, SiLU) and 1.9-3.5x (GELU-tanh) eager
// against 0.96-1.07x through torch's kernels (bench/NOTES.md, "Zen 5, fifth session"). Same
// dtype in and out only (no rounding).
bool aten_epilogue_applies(const Activation& act, const at::Tensor& z, const at::Tensor& y) {
  return cpu_level() == CpuLevel::kDefault && z.scalar_type() == y.scalar_type() &&
         act.kind == Activation::kGelu;
}

// On the tile (rows r0.., columns c0..); false, without touching it, where it does not apply.
bool aten_epilogue(const Activation& act, const at::Tensor& z, const at::Tensor& y, int64_t r0,
                   int64_t rows, int64_t c0, int64_t cols) {
  if (!aten_epilogue_applies(act, z, y)) return false;
  // Views only once it applies: four narrows cost ~1.5 us, a quarter of a small call.
  at::Tensor out = y.narrow(0, r0, rows).narrow(1, c0, cols);
  at::gelu_out(out, z.narrow(0, r0, rows).narrow(1, c0, cols), "none");
  return true;
}

// y = act(z) on rows [r0, r0 + rows) and columns [c0, c0 + cols) of row-major blocks of one
// shape, z the GEMM's output. y is of z's type (possibly z itself), or half / bfloat16 from a
// float z, and then pre (where defined) receives z rounded once too.
void epilogue_tile(const Activation& act, const at::Tensor& z, const at::Tensor& y,
                   const at::Tensor& pre, int64_t r0, int64_t rows, int64_t c0, int64_t cols) {
  if (aten_epilogue(act, z, y, r0, rows, c0, cols)) return;
  const int64_t ld = z.size(1);
  // Whole rows are one run: the helpers split it across the threads outside a parallel region.
  const bool whole_rows = c0 == 0 && cols == ld;
  const int64_t runs = whole_rows ? 1 : rows, run = whole_rows ? rows * ld : cols;
  if (z.scalar_type() == y.scalar_type()) {
    if (act.kind == Activation::kNone && z.data_ptr() == y.data_ptr()) return;  // nothing to do
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "linear_epilogue", [&] {
      const scalar_t* zp = z.data_ptr<scalar_t>() + r0 * ld + c0;
      scalar_t* yp = y.data_ptr<scalar_t>() + r0 * ld + c0;
      for (int64_t i = 0; i < runs; ++i) epilogue_forward(act, zp + i * ld, yp + i * ld, run);
    });
    return;
  }
  TORCH_CHECK(z.scalar_type() == at::kFloat, "bigmodel: no epilogue from ", z.scalar_type(),
              " to ", y.scalar_type());
  AT_DISPATCH_REDUCED_FLOATING_TYPES(y.scalar_type(), "linear_epilogue_round", [&] {
    const float* zp = z.data_ptr<float>() + r0 * ld + c0;
    scalar_t* yp = y.data_ptr<scalar_t>() + r0 * ld + c0;
    scalar_t* pp = pre.defined() ? pre.data_ptr<scalar_t>() + r0 * ld + c0 : nullptr;
    for (int64_t i = 0; i < runs; ++i) {
      epilogue_forward(act, zp + i * ld, yp + i * ld, pp ? pp + i * ld : nullptr, run);
    }
  });
}

void epilogue_into(const Activation& act, const at::Tensor& z, const at::Tensor& y,
                   const at::Tensor& pre) {
  epilogue_tile(act, z, y, pre, 0, z.size(0), 0, z.size(1));
}

}  // namespace

// Where plan_gemms sends a Linear's products to oneDNN from a few MFLOP (AMD at AVX512), the
// engine wins from ~8M multiply-adds: engine / F.linear, Zen 5, fwd / fwd+bwd: 64x256->256 (4M)
// 0.87 / 1.03x, 64x512->128 (4M) 1.11 / 1.21x, 128x256->256 (8M) 1.25 / 1.38x, 256x256->256
// 1.72 / 1.61x, 128x1024->512 1.99 / 2.05x. Elsewhere its plan below 1024 rows is MKL's call,
// F.linear's own, plus the op's ~6 us (AVX2: 0.90x at 4M, 0.96x at 16M, 1.12x at 64M, where
// 1024 rows reach oneDNN; Intel and DEFAULT: MKL's call at every size), so from 64M, where those
// 6 us are under 1%.
int64_t plain_linear_min_macs() {
  const bool onednn_early = cpu_level() == CpuLevel::kAvx512 && !mkl_runs_full_width() &&
                            onednn_linear() != nullptr;
  return onednn_early ? int64_t(8) << 20 : int64_t(64) << 20;
}

std::tuple<at::Tensor, at::Tensor> linear_act_forward(const char* op, const Activation& act,
                                                      const at::Tensor& input_,
                                                      const at::Tensor& weight_,
                                                      const std::optional<at::Tensor>& bias_,
                                                      bool keep_pre) {
  check_inputs(op, input_, weight_, bias_);
  // Kernels run below autograd: the ATen calls inside must not record a graph (and worker
  // threads do not inherit the dispatcher's TLS), so work on detached views.
  const at::Tensor input = detached(input_), weight = detached(weight_);
  const std::optional<at::Tensor> bias = detached(bias_);
  const int64_t M = input.size(0), K = input.size(1), N = weight.size(0);
  const auto dtype = input.scalar_type();
  const bool want_pre = keep_pre && derivative_reads_pre(act);
  // What the op returns for pre where the backward does not need it.
  const at::Tensor no_pre = at::empty({0}, input.options());
  auto new_output = [&] { return empty_output({M, N}, input.options()); };
  if (M == 0 || N == 0) return {new_output(), want_pre ? new_output() : no_pre};
  const bool low = dtype == at::kBFloat16 || dtype == at::kHalf;
  const bool widen = low && !native_low_precision(dtype);
  // The GEMM's type: float for half and bfloat16 (converted once here), else the input's.
  auto widened = [&](const at::Tensor& t) { return widen ? t.to(at::kFloat) : t; };
  const at::Tensor x = widened(input), w = widened(weight);
  const std::optional<at::Tensor> b =
      bias.has_value() ? std::optional<at::Tensor>(widened(*bias)) : std::nullopt;
  const auto compute = x.scalar_type();
  // y = act(z) for a z in the input's dtype: z is pre itself where the backward needs it, else y
  // is computed in place.
  auto activate = [&](const at::Tensor& z) -> std::tuple<at::Tensor, at::Tensor> {
    at::Tensor out = want_pre ? new_output() : z;
    epilogue_into(act, z, out, at::Tensor());
    return {out, want_pre ? z : no_pre};
  };
  if (!widen && compute == at::kFloat && M * N * 4 < kLargeOutputBytes && narrow_applies(M, K, N)) {
    // A narrow layer (linear_narrow.h): the engine's own dot products, the bias in them, then
    // the activation on the small output while it is in cache.
    const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
    const at::Tensor wc = w.contiguous();
    const at::Tensor bc = b.has_value() ? b->contiguous() : at::Tensor();
    at::Tensor z = new_output();
    narrow_forward(xc.data_ptr<float>(), xc.stride(0), wc.data_ptr<float>(),
                   bc.defined() ? bc.data_ptr<float>() : nullptr, z.data_ptr<float>(), M, K, N);
    return activate(z);
  }
  if (plan_gemms(compute, M, K, N).fwd) {
    const at::Tensor z = onednn_mm_bt(x, w, b);
    if (widen) {  // rounded once into y (and pre) while each chunk is in cache
      at::Tensor out = new_output(), pre = want_pre ? new_output() : at::Tensor();
      epilogue_into(act, z, out, pre);
      return {out, want_pre ? pre : no_pre};
    }
    return activate(z);
  }
  const bool large = M * N * input.element_size() >= kLargeOutputBytes;
  if (!widen && !(large && onednn_blocks(compute, K, N))) {
    // torch's own GEMM call, as eager F.linear makes it (one multithreaded MKL call, or native
    // half / bfloat16), into an output from the engine's cache (output_cache.h: no page faults
    // whatever the heap's history; huge pages from 32 MB), then the activation, in place where
    // pre is not kept: eager's GEMM without its second pass and second tensor. The fixed grid
    // of single-threaded MKL tiles below ran 0.84-0.95x this call on 2 cores (M = 64-1024;
    // bench/NOTES.md, "linear_relu per level"), and since the output cache it loses at 32 MB and
    // more too (each tile packs its operands again): there, the Xeon, 2 threads, this call and
    // one epilogue pass against the grid with the epilogue on each tile in cache, against eager
    // (bench/NOTES.md, "The Xeon, sixth session"): ReLU 16384x256->1024 1.77 -> 2.26x,
    // 2048x1024->4096 1.05 -> 1.38x, 65536x128->128 2.29 -> 3.03x at AVX512; 1.09-2.02 ->
    // 1.24-2.39x at AVX2, 1.02-1.54 -> 1.11-1.57x at DEFAULT; GELU and SiLU alike, but for SiLU
    // at 65536x128->128 at AVX2 (2.20 -> 2.02x, its cheap GEMM leaves the transcendental pass
    // the larger share). So the grid is kept only for widened half / bfloat16 (converted block
    // by block) and the blocks are oneDNN's where onednn_blocks says so (AMD at AVX512).
    //
    // The bias: addmm broadcasts it into its output before a beta = 1 GEMM, through a
    // TensorIterator copy that is slow for narrow rows (13 us for a (1024, 10) output, the same as
    // z.add_(b), against ~1 us for the GEMM's own write of it). In float and double, at the
    // vector levels, the GEMM runs without it and the epilogue adds it as it applies the
    // activation: one rounding of z + b either way. (DEFAULT keeps addmm: there the bias's phase
    // index keeps the engine's bias loop scalar, while its plain epilogue loops over z vectorise,
    // and GELU's is an ATen call on z, see aten_epilogue; half / bfloat16 keep the GEMM's single
    // rounding of z + b.)
    // Without an activation there is no pass to fold the bias into: addmm, as F.linear (the
    // epilogue's bias pass ran 0.92-0.93x F.linear at 256-512 x 256->256, AVX2).
    const bool bias_in_epilogue = b.has_value() && (compute == at::kFloat || compute == at::kDouble) &&
                                  cpu_level() != CpuLevel::kDefault && act.kind != Activation::kNone;
    at::Tensor z = new_output();
    if (!b.has_value() || bias_in_epilogue) {
      at::mm_out(z, x, w.t());
    } else {
      at::addmm_out(z, *b, x, w.t());
    }
    at::Tensor out = want_pre ? new_output() : z;
    if (bias_in_epilogue) {
      const at::Tensor bc = b->contiguous();
      AT_DISPATCH_FLOATING_TYPES(compute, "linear_bias_epilogue", [&] {
        epilogue_forward_bias(act, z.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(),
                              out.data_ptr<scalar_t>(), M, N);
      });
    } else {
      epilogue_into(act, z, out, at::Tensor());
    }
    return {out, want_pre ? z : no_pre};
  }
  at::Tensor out = new_output();
  at::Tensor pre = want_pre ? new_output() : no_pre;
  const at::Tensor wt = w.t();
  const bool on_onednn = !widen && onednn_blocks(compute, K, N);
  const int64_t block = std::min(rows_per_block(M, N, x.element_size()),
                                 on_onednn ? kOnednnGradWeightMaxRows : M);
  // Widened: each block's GEMM writes a float scratch block, which the epilogue rounds into out
  // (and pre). Otherwise it writes pre's block where pre is kept (y computed from it), else y's.
  at::Tensor scratch = widen ? at::empty({std::min(block, M), N}, x.options()) : at::Tensor();
  for (int64_t r0 = 0; r0 < M; r0 += block) {
    const int64_t rows = std::min(block, M - r0);
    at::Tensor o = out.narrow(0, r0, rows);
    at::Tensor p = want_pre ? pre.narrow(0, r0, rows) : at::Tensor();
    if (on_onednn) {  // the block's z (bias included) by oneDNN, then y (and pre) from it
      const at::Tensor zb = onednn_mm_bt(x.narrow(0, r0, rows), w, b);
      if (want_pre) p.copy_(zb);
      epilogue_into(act, zb, o, at::Tensor());
      continue;
    }
    at::Tensor z = widen ? scratch.narrow(0, 0, rows) : want_pre ? p : o;
    // The activation runs on each tile of the block's GEMM as soon as it is computed, while it
    // is in that core's cache: each output goes to memory once. The bias is fused by BLAS.
    auto epilogue = [&](int64_t tr, int64_t trows, int64_t tc, int64_t tcols) {
      epilogue_tile(act, z, o, widen ? p : at::Tensor(), tr, trows, tc, tcols);
    };
    const bool nothing_to_do = act.kind == Activation::kNone && z.is_same(o);
    // torch's own GELU (aten_epilogue, DEFAULT) reaches its fast path only on contiguous
    // tensors: GELU on the GEMM's tiles (strided views) ran 4.7x slower than on whole rows (34
    // vs 7.3 ms for 4096x1024, 2 threads), so there the epilogue runs once per finished block.
    const bool whole_block = aten_epilogue_applies(act, z, o);
    mkl_mm(z, x.narrow(0, r0, rows), wt, b,
           nothing_to_do || whole_block ? std::nullopt : std::optional<TileFn>(epilogue));
    if (whole_block) epilogue(0, rows, 0, N);
  }
  return {out, pre};
}

namespace {

// The backward's counterpart of aten_epilogue: at DEFAULT GELU's derivative is torch's own
// gelu_backward, libm-accurate there (at DEFAULT at::vec's erf is libm's, element by element),
// where the engine's loop would need its A-S erf (1.5e-7: off the house rule on small outputs)
// or run scalar libm (the GELU TransformerEncoderLayer step at DEFAULT: the op's backward 9.6 ms
// a step against eager's gelu_backward 2.9 ms). GELU-tanh's and SiLU's are the engine's loops:
// 1.48-2.41x and 1.12-1.16x eager against 0.94-0.99x and 1.01-1.07x through torch's kernels
// (bench/NOTES.md, "Zen 5, fifth session"). Same dtype for grad, saved and dz only.
bool aten_backward(const Activation& act, const at::Tensor& grad, const at::Tensor& saved,
                   int64_t r0, int64_t rows, const at::Tensor& dz) {
  if (cpu_level() != CpuLevel::kDefault || dz.scalar_type() != grad.scalar_type() ||
      act.kind != Activation::kGelu) {
    return false;
  }
  at::Tensor out = dz;  // rows x N
  at::gelu_backward_out(out, grad.narrow(0, r0, rows), saved.narrow(0, r0, rows), "none");
  return true;
}

// dz = grad_output * act'(saved), rows [r0, r0 + rows), from grad and the saved tensor (the
// output or the pre-activation, in the input's dtype) into dz (the compute type; half and
// bfloat16 widened as they are read, unless dz is theirs too).
void dz_rows(const Activation& act, const at::Tensor& grad, const at::Tensor& saved, int64_t r0,
             int64_t rows, const at::Tensor& dz) {
  if (aten_backward(act, grad, saved, r0, rows, dz)) return;
  const int64_t N = grad.size(1);
  const bool same = dz.scalar_type() == grad.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "linear_dz", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* g = grad.data_ptr<scalar_t>() + r0 * N;
    const scalar_t* s = saved.data_ptr<scalar_t>() + r0 * N;
    if (same) {
      epilogue_backward(act, g, s, dz.data_ptr<scalar_t>(), rows, N);
    } else {
      epilogue_backward(act, g, s, dz.data_ptr<acc_t>(), rows, N);
    }
  });
}

// dz as dz_rows computes it over all M rows, and db = its column sums from the same pass
// (epilogue_backward_db). dz is float or double.
void dz_and_db(const Activation& act, const at::Tensor& grad, const at::Tensor& saved,
               const at::Tensor& dz, const at::Tensor& db) {
  const int64_t M = grad.size(0), N = grad.size(1);
  if (aten_backward(act, grad, saved, 0, M, dz)) {
    at::Tensor sums = db;
    at::sum_out(sums, dz, 0);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "linear_dz_db", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    epilogue_backward_db(act, grad.data_ptr<scalar_t>(), saved.data_ptr<scalar_t>(),
                         dz.data_ptr<acc_t>(), db.data_ptr<acc_t>(), M, N);
  });
}

// Without an activation dz is grad_output itself wherever it is already in the compute type.
bool dz_is_grad(const Activation& act, const at::Tensor& grad, at::ScalarType compute) {
  return act.kind == Activation::kNone && grad.scalar_type() == compute;
}

// The backward's two products, dX = dZ W and dW = dZ^T X, are independent and, for a layer of
// M <= 1024 rows, cost about the same. On two threads each runs as one single-threaded MKL call
// side by side (one per core) instead of one after the other on both cores: MKL's 2-thread split
// of a 256-row product runs at ~85% of twice its 1-thread rate (256x784->512 fwd: 1359 us on
// one thread, 802 on two), while whole products need no split at all. Op backward, 2 threads,
// in-process A/B on the Xeon (2026-12-07), sequential -> side by side, AVX512 / AVX2 capped:
// 64x784->512 1.09-1.14 / 1.04-1.07x, 256x784->512 1.04-1.10 / 1.00-1.05x, 256x1024->784
// 1.04-1.06 / 1.06-1.08x, 512x512->512 1.00-1.04 / 1.02-1.04x, 1024x512->256 1.02-1.04 /
// 1.05-1.07x, 1024x784->512 1.07-1.08 / 1.06-1.07x. Not applied: K < 512 (256x100->256 and
// 256x256->512 0.98-1.05x, a tie), M > 1024 (2048-8192 rows 0.96-1.08x, mixed: there MKL's own
// split pays), other thread counts (inside a parallel region MKL runs one thread, so the other
// cores would idle). Both outputs stay torch's MKL results, each now of one thread.
constexpr int64_t kSideBySideMaxRows = 1024, kSideBySideMinK = 512;

bool side_by_side_applies(int64_t M, int64_t K) {
#if AT_MKL_ENABLED()
  return at::get_num_threads() == 2 && M <= kSideBySideMaxRows && K >= kSideBySideMinK;
#else
  return false;
#endif
}

// out0 = a0 b0 and out1 = a1 b1, each one single-threaded MKL call, the two on the pool's two
// threads.
void mkl_products_side_by_side(at::Tensor& out0, const at::Tensor& a0, const at::Tensor& b0,
                               at::Tensor& out1, const at::Tensor& a1, const at::Tensor& b1) {
#if AT_MKL_ENABLED()
  at::parallel_for(0, 2, 1, [&](int64_t i0, int64_t i1) {
    const int previous = MKL_Set_Num_Threads_Local(1);
    for (int64_t i = i0; i < i1; ++i) i == 0 ? at::mm_out(out0, a0, b0) : at::mm_out(out1, a1, b1);
    MKL_Set_Num_Threads_Local(previous);
  });
#else
  at::mm_out(out0, a0, b0);
  at::mm_out(out1, a1, b1);
#endif
}

// Backward in the compute type (float, or double). grad and saved: contiguous, in the input's
// dtype (half and bfloat16 are widened as dz_rows reads them); input and weight: in the compute
// type. Returns dx, dw, db (empty when not asked).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const Activation& act, const at::Tensor& grad, const at::Tensor& saved,
    const at::Tensor& input, const at::Tensor& weight, bool need_dx, bool need_dw, bool need_db) {
  const int64_t M = input.size(0), K = input.size(1), N = weight.size(0);
  const auto opts = input.options();
  const bool pass_grad = dz_is_grad(act, grad, input.scalar_type());
  const GemmPlan p = plan_gemms(input.scalar_type(), M, K, N);
  // Each output not asked for is its own empty tensor (outputs must not alias).
  const auto none = [&] { return at::empty({0}, opts); };
  const bool small = M * std::max(N, K) * input.element_size() < kLargeOutputBytes;
  if (p.any() || small || !onednn_blocks(input.scalar_type(), K, N)) {
    // Whole tensors, as eager has them: dz once, then each product on the library its plan
    // names. From 32 MB too (dz from the output cache, in huge pages): the block-by-block MKL
    // grid ran 0.73-0.94x eager there, whole tensors 1.06-1.19x (2048x1024->4096 and
    // 8192x1024->1024 on the Xeon, AVX512 and AVX2; bench/NOTES.md, "The Xeon, sixth session").
    // The products oneDNN does not win are torch's own calls, as eager makes them (see
    // linear_act_forward): the grid of single-threaded MKL tiles ran 0.84-0.95x that call on 2
    // cores (1024x256->10 bwd: 0.76x eager with dX on oneDNN and dW on the grid, native AVX2
    // EPYC). Their results then follow MKL's partition, as eager's do.
    //
    // db: with an activation, summed in the pass that writes dz (its chunks still in cache)
    // instead of eager's separate dz.sum(0) over memory; without one, dz is grad and its sum
    // torch's.
    at::Tensor dz = pass_grad ? grad : empty_output({M, N}, opts);
    at::Tensor db = need_db && !pass_grad ? at::empty({N}, opts) : at::Tensor();
    if (db.defined()) {
      dz_and_db(act, grad, saved, dz, db);
    } else if (!pass_grad) {
      dz_rows(act, grad, saved, 0, M, dz);
    }
    at::Tensor dx, dw;
    if (input.scalar_type() == at::kFloat && narrow_backward_applies(M, K, N)) {
      // A narrow layer (linear_narrow.h): the engine's own kernels for both products.
      const float* d = dz.data_ptr<float>();
      if (need_dx) {
        dx = empty_output({M, K}, opts);
        narrow_grad_input(d, weight.data_ptr<float>(), dx.data_ptr<float>(), M, K, N);
      }
      if (need_dw) {
        dw = empty_output({N, K}, opts);
        narrow_grad_weight(d, input.data_ptr<float>(), dw.data_ptr<float>(), M, K, N);
      }
    } else {
      // torch's MKL call, into an output from the engine's cache (output_cache.h).
      auto mkl_product = [&](int64_t rows, int64_t cols, const at::Tensor& a, const at::Tensor& b) {
        at::Tensor out = empty_output({rows, cols}, opts);
        at::mm_out(out, a, b);
        return out;
      };
      if (need_dx && need_dw && !p.dx && !p.dw && side_by_side_applies(M, K)) {
        dx = empty_output({M, K}, opts);
        dw = empty_output({N, K}, opts);
        mkl_products_side_by_side(dx, dz, weight, dw, dz.t(), input);
      } else {
        if (need_dx) dx = p.dx ? onednn_mm_bt(dz, weight.t()) : mkl_product(M, K, dz, weight);
        if (need_dw) dw = p.dw ? onednn_grad_weight(dz, input) : mkl_product(N, K, dz.t(), input);
      }
    }
    return {need_dx ? dx : none(), need_dw ? dw : none(),
            need_db ? (db.defined() ? db : dz.sum(0)) : none()};
  }
  // Written by the first block, accumulated by the others (no zero-fill pass; M == 0 is zeros).
  at::Tensor dw = need_dw ? (M ? at::empty({N, K}, opts) : at::zeros({N, K}, opts)) : none();
  at::Tensor db = need_db ? (M ? at::empty({N}, opts) : at::zeros({N}, opts)) : none();
  at::Tensor dx = need_dx ? empty_output({M, K}, opts) : none();
  // 32 MB and more on oneDNN (AMD at AVX512, onednn_blocks), block by block: dz of a block of
  // rows into a cache-resident scratch block, then fed to the dX GEMM, the dW GEMM (added up
  // block after block, in order: deterministic) and the db sum.
  const int64_t block = std::min(rows_per_block(M, N, input.element_size()), kOnednnGradWeightMaxRows);
  at::Tensor scratch = pass_grad ? at::Tensor() : at::empty({std::min(block, M), N}, opts);
  for (int64_t r0 = 0; r0 < M; r0 += block) {
    const int64_t rows = std::min(block, M - r0);
    at::Tensor dz = pass_grad ? grad.narrow(0, r0, rows) : scratch.narrow(0, 0, rows);
    if (!pass_grad) dz_rows(act, grad, saved, r0, rows, dz);
    const at::Tensor x = input.narrow(0, r0, rows);
    if (need_dx) dx.narrow(0, r0, rows).copy_(onednn_mm_bt(dz, weight.t()));
    if (need_dw) {
      const at::Tensor part = onednn_grad_weight(dz, x);
      r0 == 0 ? dw.copy_(part) : dw.add_(part);
    }
    if (need_db) r0 == 0 ? at::sum_out(db, dz, 0) : db.add_(dz.sum(0));
  }
  return {dx, dw, db};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward(
    const char* op, const Activation& act, const at::Tensor& grad_output, const at::Tensor& saved,
    const at::Tensor& input, const at::Tensor& weight, std::array<bool, 3> output_mask) {
  check_inputs(op, input, weight, std::nullopt);
  const int64_t M = input.size(0), N = weight.size(0);
  TORCH_CHECK(grad_output.sizes() == saved.sizes() && saved.dim() == 2 &&
                  saved.size(0) == M && saved.size(1) == N,
              op, ": grad_output ", grad_output.sizes(), " and output ", saved.sizes(),
              " must both be (", M, ", ", N, ")");
  const auto dtype = input.scalar_type();
  const at::Tensor g = grad_output.detach().to(dtype).contiguous();
  const at::Tensor s = saved.detach().to(dtype).contiguous();
  const bool low = dtype == at::kBFloat16 || dtype == at::kHalf;
  if (low && native_low_precision(dtype)) {
    // As eager computes it: dz (rounded once, as eager's activation backward rounds it) and three
    // GEMMs in the dtype, each accumulated in float and rounded once by torch's native kernels.
    // Whole tensors, not blocks: dW accumulated block by block would round between blocks.
    at::Tensor dz = g;
    if (!dz_is_grad(act, g, dtype)) {
      dz = at::empty_like(g);
      dz_rows(act, g, s, 0, M, dz);
    }
    const at::Tensor x = input.detach(), w = weight.detach();
    const auto opts = input.options();
    return {output_mask[0] ? at::mm(dz, w) : at::empty({0}, opts),
            output_mask[1] ? at::mm(dz.t(), x) : at::empty({0}, opts),
            output_mask[2] ? dz.sum(0) : at::empty({0}, opts)};
  }
  // Otherwise half and bfloat16 are computed in float, as torch accumulates them, then rounded
  // once.
  auto prep = [&](const at::Tensor& t) {  // detached: see linear_act_forward
    return (low ? t.detach().to(at::kFloat) : t.detach()).contiguous();
  };
  auto [dx, dw, db] = backward_impl(act, g, s, prep(input), prep(weight), output_mask[0],
                                    output_mask[1], output_mask[2]);
  if (low) {
    dx = dx.to(dtype);
    dw = dw.to(dtype);
    db = db.to(dtype);
  }
  return {dx, dw, db};
}

namespace {

const Activation kReLU{Activation::kReLU};

at::Tensor linear_relu_forward(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias) {
  return std::get<0>(linear_act_forward("bigmodel::linear_relu", kReLU, input, weight, bias));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward(
    const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& input,
    const at::Tensor& weight, std::array<bool, 3> output_mask) {
  return linear_act_backward("bigmodel::linear_relu_backward", kReLU, grad_output, output, input,
                             weight, output_mask);
}

}  // namespace
}  // namespace linear

TORCH_LIBRARY_IMPL(bigmodel, CPU, m) {
  m.impl("linear_relu", &linear::linear_relu_forward);
  m.impl("linear_relu_backward", &linear::linear_relu_backward);
}

}  // namespace bigmodel
