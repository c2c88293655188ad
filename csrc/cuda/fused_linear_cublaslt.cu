// cuBLASLt backend of bigmodel::fused_linear, for the activations cuBLASLt fuses into its GEMM:
//
//   'gelu_tanh'  forward: ONE cublasLtMatmul with the GELU_AUX_BIAS epilogue (GELU_AUX without
//                bias): out = gelu(z) from the fp32 accumulator, and z = x W^T + b itself written
//                as the epilogue's auxiliary output, which is exactly the `pre` the op saves for
//                its backward (eager F.gelu saves z too). cuBLASLt's GELU is the tanh
//                approximation, so approximate='none' (erf) has no cuBLASLt path.
//                backward: dz = dy * gelu'(z) in one elementwise pass (torch's gelu_backward
//                formula), then dX = dZ W and dW = dZ^T X with db from the dW GEMM's BGRADB
//                epilogue (gradient_gemms). cuBLASLt's DGELU_BGRAD epilogue applies gelu' to a
//                GEMM's OUTPUT, i.e. to the next layer's dX: it belongs to a fused MLP, not to
//                one layer's op (see linear_relu_cublaslt.cu for the same argument on ReLU).
//   'none'       forward: one GEMM with the BIAS epilogue; backward: dz = dy, the same GEMMs.
//
// The GELU auxiliary output needs a leading dimension divisible by 8 (elements); the pre tensor
// is (M, N) row-major, i.e. ld = N to cuBLASLt. Where N % 8 != 0, where cuBLASLt has no fused
// algorithm, or under BIGMODEL_CUBLASLT_EPILOGUE=0, the forward runs the GEMM with the BIAS
// epilogue into pre (one rounding of z + b, as eager's addmm) and our kernel below applies GELU
// to it, as eager's F.gelu does to F.linear's output.
//
// NaN and inf: the epilogue and our kernels compute 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715
// z^3))), so NaN stays NaN, gelu(+inf) = +inf and gelu(-inf) = -inf * 0 = NaN, as the float64
// reference gives them.
#include "cuda/fused_linear_cublaslt.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <string>
#include <type_traits>
#include <vector>

#include "cuda/cublaslt_gemm.h"

namespace bigmodel {
namespace cublaslt {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;  // torch's kBeta for approximate='tanh'
constexpr float kKappa = 0.044715f;

__device__ __forceinline__ float gelu_tanh(float z) {
  const float inner = kSqrt2OverPi * (z + kKappa * z * z * z);
  return 0.5f * z * (1.f + tanhf(inner));
}

// d gelu_tanh / dz, arranged as torch's gelu_backward (approximate='tanh') arranges it.
__device__ __forceinline__ float gelu_tanh_derivative(float z) {
  const float z_sq = z * z;
  const float inner = kSqrt2OverPi * (z + kKappa * z_sq * z);
  const float t = tanhf(inner);
  const float left = 0.5f * z;
  const float left_derivative = 0.5f * (1.f + t);
  const float right_derivative = 1.f - t * t;
  const float inner_derivative = kSqrt2OverPi * (1.f + 3.f * kKappa * z_sq);
  return left_derivative + left * right_derivative * inner_derivative;
}

// The fallback epilogue on z (M, N, contiguous; the GEMM's output): with `bias` non-null it is
// added here first (z = round(z + b), when cuBLASLt had no BIAS algorithm either); then, for
// GELU, out = gelu(z) from the rounded z, as eager F.gelu(F.linear(...)) computes it. Without
// GELU, out is z itself and only the bias is added.
template <typename T, bool kGelu>
__global__ void __launch_bounds__(kThreads) bias_act_kernel(T* __restrict__ z,
                                                            const T* __restrict__ bias,
                                                            T* __restrict__ out, int64_t M,
                                                            int64_t N) {
  const int64_t total = M * N;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    T v = z[idx];
    if (bias != nullptr) {
      v = static_cast<T>(static_cast<float>(v) + static_cast<float>(bias[idx % N]));
      z[idx] = v;
    }
    if (kGelu) out[idx] = static_cast<T>(gelu_tanh(static_cast<float>(v)));
  }
}

// dz = dy * gelu'(pre), in fp32, rounded once (as torch's gelu_backward does in half types).
template <typename T>
__global__ void __launch_bounds__(kThreads) gelu_tanh_grad_kernel(const T* __restrict__ grad,
                                                                  int64_t ldg,
                                                                  const T* __restrict__ pre,
                                                                  int64_t ldp, T* __restrict__ dz,
                                                                  int64_t M, int64_t N) {
  const int64_t total = M * N;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = idx / N;
    const int64_t n = idx - m * N;
    const float g = static_cast<float>(grad[m * ldg + n]);
    dz[idx] = static_cast<T>(g * gelu_tanh_derivative(static_cast<float>(pre[m * ldp + n])));
  }
}

void check_activation(const char* op, const std::string& activation) {
  TORCH_CHECK_VALUE(fused_linear_runs(activation), op,
                    "cuBLASLt has epilogues for activations 'none' and 'gelu_tanh' only, got '",
                    activation, "'");
}

// Our epilogue over z (see bias_act_kernel); `bias` null when the GEMM already added it.
void launch_bias_act(bool gelu, at::Tensor& z, const at::Tensor* bias, at::Tensor& out) {
  const int64_t M = z.size(0), N = z.size(1);
  if (M * N == 0 || (!gelu && bias == nullptr)) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int grid = grid_for(M * N, kThreads, 8);
  dispatch_dtype(z.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* b = bias != nullptr ? bias->data_ptr<T>() : nullptr;
    if (gelu) {
      bias_act_kernel<T, true><<<grid, kThreads, 0, stream>>>(z.data_ptr<T>(), b, out.data_ptr<T>(), M, N);
    } else {
      bias_act_kernel<T, false><<<grid, kThreads, 0, stream>>>(z.data_ptr<T>(), b, out.data_ptr<T>(), M, N);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

bool fused_linear_runs(const std::string& activation) {
  return activation == "gelu_tanh" || activation == "none";
}

std::tuple<at::Tensor, at::Tensor> fused_linear_forward(const at::Tensor& input,
                                                        const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias_opt,
                                                        const std::string& activation) {
  const char* op = "bigmodel::fused_linear (cublaslt): ";
  check_linear_inputs(op, input, weight, bias_opt);
  check_activation(op, activation);
  c10::cuda::CUDAGuard guard(input.device());
  const bool gelu = activation == "gelu_tanh";
  const int64_t M = input.size(0), K = input.size(1), N = weight.size(0);
  const at::ScalarType dtype = input.scalar_type();
  const bool has_bias = bias_opt.has_value() && bias_opt->defined();
  const at::Tensor b = has_bias ? bias_opt->contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, input.options());
  // GELU's pre-activation is the epilogue's auxiliary output; 'none' saves nothing.
  at::Tensor pre = gelu ? at::empty({M, N}, input.options()) : at::empty({0}, input.options());
  at::Tensor z = gelu ? pre : out;  // where the GEMM's x W^T (+ b) lands on the fallback path
  if (M == 0 || N == 0) return {out, pre};
  if (K == 0) {  // z = b (or 0): no GEMM to run
    z.zero_();
    launch_bias_act(gelu, z, has_bias ? &b : nullptr, out);
    return {out, pre};
  }
  const at::Tensor x = as_row_major(input);
  const at::Tensor w = as_row_major(weight);
  const int64_t ldx = row_major_ld(x), ldw = row_major_ld(w);
  // out^T (N x M) = W (as stored, transposed) . x^T (as stored)
  auto make = [&](void* d) {
    return LtGemm{dtype, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, w.data_ptr(), ldw, x.data_ptr(), ldx, d, N};
  };
  if (fused_epilogue_enabled() && (!gelu || N % 8 == 0)) {
    LtGemm gemm = make(out.data_ptr());
    gemm.epilogue = gelu ? (has_bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX)
                         : (has_bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT);
    gemm.bias = has_bias ? b.data_ptr() : nullptr;
    if (gelu) {
      gemm.aux = pre.data_ptr();
      gemm.aux_ld = N;
    }
    if (gemm.prepare()) {
      gemm.run(input);
      return {out, pre};
    }
  }
  // Fallback: the GEMM into z, with the BIAS epilogue where cuBLASLt has one, then our epilogue.
  LtGemm gemm = make(z.data_ptr());
  bool bias_done = false;
  if (has_bias) {
    gemm.epilogue = CUBLASLT_EPILOGUE_BIAS;
    gemm.bias = b.data_ptr();
    bias_done = gemm.prepare();
    if (!bias_done) gemm = make(z.data_ptr());
  }
  TORCH_CHECK_NOT_IMPLEMENTED(bias_done || gemm.prepare(), op, "cuBLASLt has no algorithm for input ",
                              describe(input), " x weight ", describe(weight),
                              "; use another backend (triton) for this shape/alignment");
  gemm.run(input);
  launch_bias_act(gelu, z, has_bias && !bias_done ? &b : nullptr, out);
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_backward(
    const at::Tensor& grad_output, const at::Tensor& pre, const at::Tensor& input,
    const at::Tensor& weight, const std::string& activation, std::array<bool, 3> output_mask) {
  const char* op = "bigmodel::fused_linear_backward (cublaslt): ";
  check_linear_inputs(op, input, weight, std::nullopt);
  check_activation(op, activation);
  const bool gelu = activation == "gelu_tanh";
  const int64_t M = input.size(0), N = weight.size(0);
  const at::ScalarType dtype = input.scalar_type();
  std::vector<const at::Tensor*> saved = {&grad_output};
  if (gelu) saved.push_back(&pre);
  for (const at::Tensor* t : saved) {
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == M && t->size(1) == N, op,
                      "grad_output and pre must be (", M, ", ", N, ") for input ", input.sizes(),
                      " and weight ", weight.sizes(), ", got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == dtype, op, "grad_output and pre must have the input's dtype ",
                     dtype, ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == input.device(), op,
                      "grad_output, pre and input must be on one device");
  }
  const auto opts = input.options();
  c10::cuda::CUDAGuard guard(input.device());
  if (!gelu || M == 0 || N == 0) {  // dz = dy, or nothing to differentiate (zeros)
    return gradient_gemms(op, grad_output.contiguous(), input, weight, output_mask);
  }
  const at::Tensor g = as_row_major(grad_output);
  const at::Tensor p = as_row_major(pre);
  // dZ materialised once: both gradient GEMMs read it as an operand.
  at::Tensor dz = at::empty({M, N}, opts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    gelu_tanh_grad_kernel<T><<<grid_for(M * N, kThreads, 8), kThreads, 0, stream>>>(
        g.data_ptr<T>(), row_major_ld(g), p.data_ptr<T>(), row_major_ld(p), dz.data_ptr<T>(), M, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gradient_gemms(op, dz, input, weight, output_mask);
}

}  // namespace cublaslt
}  // namespace bigmodel
