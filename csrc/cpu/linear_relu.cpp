// CPU engine for bigmodel::linear_relu: y = relu(x W^T + b), forward and backward.
//
// Why it beats F.relu(F.linear(x, W, b)): eager writes the GEMM output to memory, then reads it
// back and writes a second, freshly allocated tensor for the ReLU (page faults included). Here
// the rows are cut into blocks that stay in cache; each block's GEMM adds the bias through BLAS
// (beta=1) and the ReLU runs while the block is hot, so one output tensor is written once.
// Backward likewise masks grad_output block by block into a cache-resident scratch block and
// feeds it straight into both gradient GEMMs and the bias sum: the masked gradient never goes
// to memory.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <array>

namespace bigmodel {
namespace {


// Rows per block: the output block (and, in backward, the masked-gradient block) should stay in
// cache between the GEMM that writes it and the pass that reads it.
// Each block's GEMM is one multithreaded BLAS call: BLAS splits a block across cores better than
// we would by giving each core its own single-threaded small GEMM (measured: 2x slower at
// M=65536, K=N=128).
int64_t rows_per_block(int64_t M, int64_t N, int64_t elt_size) {
  const int64_t cache_bytes = 8 << 20;  // well inside the 32 MB L3; 2, 4, 8, 32 MB measured alike
  const int64_t rows = cache_bytes / std::max<int64_t>(1, N * elt_size);
  return std::clamp<int64_t>(rows, 64, std::max<int64_t>(M, 1));
}

// Applies f(begin, end) over [0, n) on all threads, in chunks big enough to amortise the fork.
template <typename F>
void parallel_elements(int64_t n, const F& f) {
  at::parallel_for(0, n, 16384, f);
}

// fp32 GEMMs go to oneDNN (through torch's own mkldnn::_linear_pointwise) when torch has it:
// on this project's AMD EPYC, MKL's sgemm runs its AVX2 code (211-225 GFLOP/s on 2 cores at
// 2048^3) while oneDNN's JIT AVX-512 kernels reach 473 GFLOP/s on the same cores, at fp32
// accuracy (measured 2026-11-28: 1024x784->512 dW 3.85 -> 1.97 ms, 16384x256->256 forward
// 9.85 -> 4.7 ms). oneDNN only loses where the reduction is long and the output small (dW at
// M=16384..65536: 11.5 vs 14.4 ms), so dW keeps MKL there. Its ReLU post-op is not used: it
// turns NaN into 0; our pass keeps NaN. BIGMODEL_NO_ONEDNN=1 turns it off (the blocked path).
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

bool use_onednn(const at::Tensor& input) {
  return input.scalar_type() == at::kFloat && onednn_linear() != nullptr;
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

// Below this many rows (the reduction length of dW = dZ^T X) oneDNN's dW beats MKL's.
constexpr int64_t kOnednnGradWeightMaxRows = 4096;

// Large outputs come from 2 MB-aligned memory advised as transparent huge pages: the first touch
// of a fresh 32 MB output then costs 16 page faults instead of 8192 (measured: 8 ms -> 1.6 ms
// for an empty+fill of 32 MB here, which is most of the gap between a GEMM into a reused buffer
// and one into a new tensor). Storage stays resizable and is freed with free().
struct HugePageAllocator final : at::Allocator {
  static constexpr size_t kAlign = size_t(2) << 20;
  static void release(void* p) { std::free(p); }
  at::DataPtr allocate(size_t n) override {
    const size_t bytes = (std::max<size_t>(n, 1) + kAlign - 1) / kAlign * kAlign;
    void* p = std::aligned_alloc(kAlign, bytes);
    TORCH_CHECK(p != nullptr, "bigmodel: out of memory allocating ", bytes, " bytes");
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);  // a hint: without THP it is simply ignored
#endif
    return {p, p, &release, at::Device(at::kCPU)};
  }
  at::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

constexpr int64_t kHugePageOutputBytes = int64_t(32) << 20;

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  // Below glibc's largest mmap threshold (32 MB) freed blocks are reused from the heap without
  // faults, and fresh huge pages would only add the kernel's zeroing: use the default allocator.
  if (numel * int64_t(opts.dtype().itemsize()) < kHugePageOutputBytes) return at::empty(sizes, opts);
  static HugePageAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   opts.dtype().toScalarType(), std::nullopt);
}

// The two elementwise passes are plain loops on purpose: this file is compiled for the baseline
// ISA, where at::vec falls back to its generic (array-based) Vectorized and ran 7x slower than
// torch's own threshold_backward (measured 12 ms vs 1.6 ms on 4M elements); GCC vectorises
// these selects itself at -O3.

// In-place ReLU that keeps NaN: `v < 0` is false for NaN, so NaN stays (std::max would not).
template <typename scalar_t>
void relu_inplace(scalar_t* __restrict__ p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t v = p[i];
    p[i] = v < scalar_t(0) ? scalar_t(0) : v;
  }
}

// dz = grad where out > 0 (or out is NaN, as torch's threshold_backward), else 0.
template <typename scalar_t>
void masked_grad_rows(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                      scalar_t* __restrict__ dz, int64_t rows, int64_t n) {
  const int64_t count = rows * n;
  for (int64_t i = 0; i < count; ++i) {
    const scalar_t gv = g[i], yv = y[i];  // both loaded unconditionally: lets GCC vectorise
    dz[i] = yv <= scalar_t(0) ? scalar_t(0) : gv;
  }
}

// masked_grad_rows over `rows` rows of width n, split across the threads.
template <typename scalar_t>
void masked_grad_parallel(const scalar_t* g, const scalar_t* y, scalar_t* dz, int64_t rows,
                          int64_t n) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)),
                   [&](int64_t a, int64_t b) {
                     masked_grad_rows(g + a * n, y + a * n, dz + a * n, b - a, n);
                   });
}

void check_inputs(const at::Tensor& input, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() == 2, "bigmodel::linear_relu: input must be 2-D (M, K), got shape ",
              input.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == input.size(1),
              "bigmodel::linear_relu: weight must be (out_features, ", input.size(1),
              ") for input of shape ", input.sizes(), ", got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(),
              "bigmodel::linear_relu: weight dtype ", weight.scalar_type(),
              " does not match input dtype ", input.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "bigmodel::linear_relu: bias must be (", weight.size(0), ",), got shape ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), "bigmodel::linear_relu: bias dtype ",
                bias->scalar_type(), " does not match input dtype ", input.scalar_type());
  }
}

at::Tensor linear_relu_forward(const at::Tensor& input_, const at::Tensor& weight_,
                               const std::optional<at::Tensor>& bias_) {
  check_inputs(input_, weight_, bias_);
  // Kernels run below autograd: the ATen calls inside must not record a graph (and worker
  // threads do not inherit the dispatcher's TLS), so work on detached views.
  const at::Tensor input = input_.detach(), weight = weight_.detach();
  const std::optional<at::Tensor> bias =
      bias_.has_value() ? std::optional<at::Tensor>(bias_->detach()) : std::nullopt;
  const int64_t M = input.size(0), K = input.size(1), N = weight.size(0);
  if (M == 0 || N == 0) return empty_output({M, N}, input.options());
  // Outputs of 32 MB and more stay on the blocked path: there the page faults of a fresh
  // output cost more than the GEMM, and that path writes into huge pages (65536x128->128:
  // 12.6 ms blocked MKL vs 15-16 ms oneDNN into its own 4 KB-page output).
  if (use_onednn(input) && K > 0 && M * N * input.element_size() < kHugePageOutputBytes) {
    at::Tensor out = onednn_mm_bt(input, weight, bias);
    float* p = out.data_ptr<float>();
    parallel_elements(M * N, [&](int64_t a, int64_t b) { relu_inplace(p + a, b - a); });
    return out;
  }
  at::Tensor out = empty_output({M, N}, input.options());
  const at::Tensor wt = weight.t();
  const int64_t block = rows_per_block(M, N, input.element_size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "linear_relu", [&] {
    for (int64_t r0 = 0; r0 < M; r0 += block) {
      const int64_t rows = std::min(block, M - r0);
      at::Tensor o = out.narrow(0, r0, rows);
      const at::Tensor x = input.narrow(0, r0, rows);
      if (bias.has_value()) {
        at::addmm_out(o, *bias, x, wt);  // beta=1 on the broadcast bias: bias fused by BLAS
      } else {
        at::mm_out(o, x, wt);
      }
      scalar_t* p = o.data_ptr<scalar_t>();
      // The ReLU runs while the block is still in cache: the output goes to memory once.
      parallel_elements(rows * N, [&](int64_t a, int64_t b) { relu_inplace(p + a, b - a); });
    }
  });
  return out;
}

// Backward in the input dtype (float or double). Returns dx, dw, db (empty when not asked).
// Block by block: mask grad_output into a cache-resident scratch block, then feed it to the dX
// GEMM, the dW GEMM (accumulated block after block, in order: deterministic) and the db sum.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad, const at::Tensor& out, const at::Tensor& input,
    const at::Tensor& weight, bool need_dx, bool need_dw, bool need_db) {
  const int64_t M = input.size(0), K = input.size(1), N = weight.size(0);
  const auto opts = input.options();
  // Written by the first block, accumulated by the others (no zero-fill pass; M == 0 is zeros).
  at::Tensor dw = need_dw ? (M ? at::empty({N, K}, opts) : at::zeros({N, K}, opts)) : at::empty({0}, opts);
  at::Tensor db = need_db ? (M ? at::empty({N}, opts) : at::zeros({N}, opts)) : at::empty({0}, opts);
  at::Tensor dx = at::empty({0}, opts);
  // As in the forward, tensors of 32 MB and more stay on the blocked path: fresh full-size dZ
  // and dX would cost their page faults (65536x128->128 bwd: 1.57x eager blocked, 1.05x here).
  if (use_onednn(input) && M > 0 && N > 0 && K > 0 &&
      M * std::max(N, K) * input.element_size() < kHugePageOutputBytes) {
    // Whole-tensor GEMMs (oneDNN has no accumulate-into-output here): dZ once, as eager has it.
    at::Tensor dz = at::empty({M, N}, opts);
    masked_grad_parallel(grad.data_ptr<float>(), out.data_ptr<float>(), dz.data_ptr<float>(), M, N);
    if (need_dx) dx = onednn_mm_bt(dz, weight.t());
    if (need_dw) {
      if (M <= kOnednnGradWeightMaxRows) {
        dw = onednn_mm_bt(dz.t(), input.t());
      } else {
        at::mm_out(dw, dz.t(), input);
      }
    }
    if (need_db) at::sum_out(db, dz, 0);
    return {dx, dw, db};
  }
  if (need_dx) dx = empty_output({M, K}, opts);
  const int64_t block = rows_per_block(M, N, input.element_size());
  at::Tensor scratch = at::empty({std::min(block, M), N}, opts);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "linear_relu_backward", [&] {
    for (int64_t r0 = 0; r0 < M; r0 += block) {
      const int64_t rows = std::min(block, M - r0);
      at::Tensor dz = scratch.narrow(0, 0, rows);
      masked_grad_parallel(grad.data_ptr<scalar_t>() + r0 * N, out.data_ptr<scalar_t>() + r0 * N,
                           dz.data_ptr<scalar_t>(), rows, N);
      if (need_dx) {
        at::Tensor dx_rows = dx.narrow(0, r0, rows);
        at::mm_out(dx_rows, dz, weight);
      }
      const at::Tensor x = input.narrow(0, r0, rows);
      if (need_dw) r0 == 0 ? at::mm_out(dw, dz.t(), x) : dw.addmm_(dz.t(), x);
      if (need_db) r0 == 0 ? at::sum_out(db, dz, 0) : db.add_(dz.sum(0));
    }
  });
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward(
    const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& input,
    const at::Tensor& weight, std::array<bool, 3> output_mask) {
  check_inputs(input, weight, std::nullopt);
  const int64_t M = input.size(0), N = weight.size(0);
  TORCH_CHECK(grad_output.sizes() == output.sizes() && output.dim() == 2 &&
                  output.size(0) == M && output.size(1) == N,
              "bigmodel::linear_relu_backward: grad_output ", grad_output.sizes(), " and output ",
              output.sizes(), " must both be (", M, ", ", N, ")");
  const auto dtype = input.scalar_type();
  // Half and bfloat16 are computed in float, as torch accumulates them, then rounded once.
  const bool low = dtype == at::kBFloat16 || dtype == at::kHalf;
  auto prep = [&](const at::Tensor& t) {  // detached: see linear_relu_forward
    return (low ? t.detach().to(at::kFloat) : t.detach()).contiguous();
  };
  auto [dx, dw, db] = backward_impl(prep(grad_output.to(dtype)), prep(output), prep(input),
                                    prep(weight), output_mask[0], output_mask[1], output_mask[2]);
  if (low) {
    dx = dx.to(dtype);
    dw = dw.to(dtype);
    db = db.to(dtype);
  }
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(bigmodel, CPU, m) {
  m.impl("linear_relu", &linear_relu_forward);
  m.impl("linear_relu_backward", &linear_relu_backward);
}

}  // namespace bigmodel
