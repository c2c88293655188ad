// CPU engine for bigmodel::linear_relu: y = relu(x W^T + b), forward and backward.
//
// Why it beats F.relu(F.linear(x, W, b)): eager writes the GEMM output to memory, then reads it
// back and writes a second tensor for the ReLU. Here the rows are cut into blocks that stay in
// cache; each thread runs the GEMM for its block (bias fused by BLAS through beta=1) and applies
// the ReLU while the block is hot, so the output goes to memory once. Backward likewise masks
// grad_output block by block, feeds the masked block straight into both gradient GEMMs and
// reduces the bias gradient from it, never materialising the masked gradient.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

namespace bigmodel {
namespace {

using at::vec::Vectorized;

// Rows per block: the output block plus the input block should sit in L2 (~1 MB), but every
// thread needs work, and BLAS calls need enough rows to amortise their overhead.
int64_t rows_per_block(int64_t M, int64_t K, int64_t N, int64_t elt_size) {
  const int64_t l2_bytes = 1 << 20;
  int64_t rows = l2_bytes / std::max<int64_t>(1, (K + N) * elt_size);
  rows = std::clamp<int64_t>(rows, 16, 512);
  const int64_t threads = at::get_num_threads();
  const int64_t per_thread = (M + threads - 1) / threads;
  return std::max<int64_t>(1, std::min(rows, per_thread));
}

// In-place ReLU that keeps NaN (at::vec::maximum propagates NaN; std::max would not).
template <typename scalar_t>
void relu_inplace(scalar_t* p, int64_t n) {
  using Vec = Vectorized<scalar_t>;
  const Vec zero(scalar_t(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    at::vec::maximum(Vec::loadu(p + i), zero).store(p + i);
  }
  for (; i < n; ++i) {
    const scalar_t v = p[i];
    p[i] = (v > scalar_t(0) || at::_isnan(v)) ? v : scalar_t(0);
  }
}

// dz = grad where out > 0 (or out is NaN, as torch's threshold_backward), else 0.
// Also adds the rows of dz into bias_acc (length n) when it is given.
template <typename scalar_t>
void masked_grad_rows(const scalar_t* g, const scalar_t* y, scalar_t* dz, scalar_t* bias_acc,
                      int64_t rows, int64_t n) {
  using Vec = Vectorized<scalar_t>;
  const Vec zero(scalar_t(0));
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* gr = g + r * n;
    const scalar_t* yr = y + r * n;
    scalar_t* dr = dz + r * n;
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const Vec d = Vec::blendv(Vec::loadu(gr + i), zero, Vec::loadu(yr + i) <= zero);
      d.store(dr + i);
      if (bias_acc) (Vec::loadu(bias_acc + i) + d).store(bias_acc + i);
    }
    for (; i < n; ++i) {
      const scalar_t d = yr[i] <= scalar_t(0) ? scalar_t(0) : gr[i];
      dr[i] = d;
      if (bias_acc) bias_acc[i] += d;
    }
  }
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
  at::Tensor out = at::empty({M, N}, input.options());
  if (M == 0 || N == 0) return out;
  const at::Tensor wt = weight.t();
  const int64_t block = rows_per_block(M, K, N, input.element_size());
  const int64_t nblocks = (M + block - 1) / block;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "linear_relu", [&] {
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * block, rows = std::min(block, M - r0);
        at::Tensor o = out.narrow(0, r0, rows);
        const at::Tensor x = input.narrow(0, r0, rows);
        if (bias.has_value()) {
          at::addmm_out(o, *bias, x, wt);  // beta=1 on the broadcast bias: bias fused by BLAS
        } else {
          at::mm_out(o, x, wt);
        }
        relu_inplace(o.data_ptr<scalar_t>(), rows * N);  // while the block is still in cache
      }
    });
  });
  return out;
}

// Backward in the input dtype (float or double). Returns dx, dw, db (empty when not asked).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad, const at::Tensor& out, const at::Tensor& input,
    const at::Tensor& weight, bool need_dx, bool need_dw, bool need_db) {
  const int64_t M = input.size(0), K = input.size(1), N = weight.size(0);
  const auto opts = input.options();
  at::Tensor dx = need_dx ? at::empty({M, K}, opts) : at::empty({0}, opts);
  const int64_t block = rows_per_block(M, K, N, input.element_size());
  const int64_t nblocks = (M + block - 1) / block;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nblocks));
  // Per-thread partial dW costs threads*N*K; when that is more than materialising the masked
  // gradient (M*N), materialise it instead and let one multithreaded GEMM produce dW.
  const bool partial_dw = need_dw && threads * N * K <= M * N;
  const bool keep_dz = need_dw && !partial_dw;
  at::Tensor dz_all = keep_dz ? at::empty({M, N}, opts) : at::Tensor();
  at::Tensor dw_part = partial_dw ? at::zeros({threads, N, K}, opts) : at::Tensor();
  at::Tensor db_part = need_db ? at::zeros({threads, N}, opts) : at::Tensor();
  // Fixed chunks per thread index so the reduction order (hence the result) is deterministic.
  const int64_t chunk = (nblocks + threads - 1) / threads;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "linear_relu_backward", [&] {
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        at::Tensor scratch = keep_dz ? at::Tensor() : at::empty({block, N}, opts);
        scalar_t* bacc = need_db ? db_part[t].data_ptr<scalar_t>() : nullptr;
        for (int64_t b = t * chunk; b < std::min(nblocks, (t + 1) * chunk); ++b) {
          const int64_t r0 = b * block, rows = std::min(block, M - r0);
          at::Tensor dz = keep_dz ? dz_all.narrow(0, r0, rows) : scratch.narrow(0, 0, rows);
          masked_grad_rows(grad.data_ptr<scalar_t>() + r0 * N, out.data_ptr<scalar_t>() + r0 * N,
                           dz.data_ptr<scalar_t>(), bacc, rows, N);
          if (need_dx) {
            at::Tensor dx_rows = dx.narrow(0, r0, rows);
            at::mm_out(dx_rows, dz, weight);
          }
          if (partial_dw) dw_part[t].addmm_(dz.t(), input.narrow(0, r0, rows));
        }
      }
    });
  });
  at::Tensor dw = at::empty({0}, opts), db = at::empty({0}, opts);
  if (partial_dw) dw = dw_part.sum(0);
  if (keep_dz) dw = at::mm(dz_all.t(), input);
  if (need_db) db = db_part.sum(0);
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
