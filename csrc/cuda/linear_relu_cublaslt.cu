// cuBLASLt backend of bigmodel::linear_relu: the CUDA kernel's choice under the 'cublaslt'
// backend (bigmodel/ops/linear_relu.py calls these through bigmodel._C; they are not ops of their
// own, so the op keeps one autograd, one fake kernel and one autocast).
//
//   forward   out = relu(x W^T + b) from ONE cublasLtMatmul whose epilogue (RELU_AUX_BIAS, or
//             RELU_AUX without bias) adds the bias and applies the ReLU while the accumulator tile
//             is still in registers. The epilogue also writes a 1-bit ReLU mask (M * N / 8
//             bytes), which the NaN fix-up below keeps consistent; the op's backward derives the
//             mask from the saved output instead, as the Triton and C++ kernels do, so the mask
//             is dropped (a candidate for the RELU_BIAS epilogue once measured on the H200).
//   backward  dZ = grad where out > 0 or out is NaN (one memory-bound pass), dX = dZ W (plain
//             GEMM), and dW = dZ^T X with the BGRADB epilogue, which reduces db = sum_m dZ in
//             the same GEMM.
//
// Row-major <-> column-major: cuBLASLt is column-major, so a row-major (r, c) tensor with row
// stride ld is, to cuBLASLt, the (c x r) matrix with leading dimension ld. Every product below is
// therefore computed transposed: out^T = W x^T, dX^T = W^T dZ^T, dW^T = x^T dZ. The mask is the
// bit matrix of out^T: column m of it (= output row m) starts at bit m * mask_ld, so as a uint8
// tensor it is (M, mask_ld / 8), row-major. We assume bit n of a row is bit (n % 8) of byte n / 8
// (LSB first), the only layout compatible with the header's "leading dimension in elements (i.e.
// bits), divisible by 128".
//
// Why the backward does not use DRELU_BGRAD: that epilogue applies the ReLU gradient to the
// OUTPUT of a GEMM. In a stack of layers that GEMM is the NEXT layer's dX = dY W (its output is
// this layer's grad), so DRELU_BGRAD belongs to a fused MLP whose backward sees both layers. This
// op sees one layer: its grad arrives as a tensor, and the GEMMs that consume dZ = grad * mask
// take it as an INPUT, which no cuBLASLt epilogue can mask. Running grad through a GEMM only to
// reach the epilogue (an identity factor, or beta = 1 with C = grad) costs the same traffic as
// the mask pass below (read grad and mask, write dZ) and relies on undocumented corner cases
// (alpha = 0, tiny k). So: one elementwise pass (reads grad + M*N/8 bytes of mask instead of
// eager's grad + a full output tensor), and db reduced for free in the dW GEMM's BGRADB epilogue.
//
// NaN. torch.relu keeps NaN; cuBLASLt's ReLU epilogue turns it into 0 (and clears its mask bit).
// With an fp32 accumulator a NaN in z = x W^T + b needs a NaN or inf in x, W or b, or a partial
// sum that overflows (then inf - inf). Both are ruled out for the whole call when
//     max_m |x_m|_inf * max_n |W_n|_inf * K + max |b|  <  FLT_MAX / 2.
// So before the GEMM one pass over x and W (and b) computes each row's max |.| (non-finite or
// >= 1e38 counts as inf: TF32 rounding can push 3.4e38 to inf) and the global maxima. A fix-up
// kernel after the GEMM reads the maxima on the device (no host sync, graph-capturable), exits at
// once when the bound holds, and otherwise recomputes in fp32 exactly the entries (m, n) whose
// own bound |x_m| |W_n| K + |b_n| fails, writing the NaN-keeping ReLU and the mask bit.
// Cost: reading x and W once more (x: M*K elements). For M=N=K=8192 that is ~4% of the GEMM's
// time; when K is small x is also small next to the output (M=65536, K=256, N=1024: x is 32 MB
// against a 128 MB output) and the pass runs first so the GEMM finds x in the 50 MB L2.
// Inputs with NaN or inf take the slow path only for the affected rows/columns.
//
// Unsupported layouts (no cuBLASLt algorithm for the shape/alignment) fall back inside this file
// where a cheap fallback exists (forward: plain GEMM + our NaN-keeping bias/ReLU/mask pass;
// backward: plain GEMM + at::sum for db); when not even a plain GEMM is available we raise
// NotImplementedError naming the shapes, so the Python layer can choose another backend.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cublasLt.h>

#include <array>
#include <cfloat>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "cuda/cublaslt_gemm.h"
#include "cuda/linear_relu_cublaslt.h"

namespace bigmodel {
namespace {

using namespace cublaslt;  // the shared GEMM and layout helpers (cublaslt_gemm.h)

// The mask's leading dimension, in bits: cuBLASLt wants a multiple of 128 that is >= N.
int64_t mask_ld_bits(int64_t n) { return (n + 127) / 128 * 128; }

// Bound under which an fp32-accumulated product cannot produce NaN (see the header comment).
constexpr double kSafeLimit = 0.5 * static_cast<double>(FLT_MAX);
// |v| at or above this counts as inf in the row maxima: TF32 rounding may overflow it.
constexpr float kHugeInput = 1e38f;

// ------------------------------------------------------------------------------------------
// Kernels. T is float, c10::Half or c10::BFloat16; all arithmetic is in fp32.

__device__ __forceinline__ bool entry_is_safe(float ax, float aw, float ab, int64_t k) {
  // False for inf and NaN operands too (comparisons with NaN are false).
  return static_cast<double>(ax) * static_cast<double>(aw) * static_cast<double>(k) +
             static_cast<double>(ab) < kSafeLimit;
}

template <typename T>
__device__ __forceinline__ float abs_or_inf(T v) {
  const float a = fabsf(static_cast<float>(v));
  return a < kHugeInput ? a : INFINITY;  // NaN fails the comparison too
}

// For each row r of a row-major (rows, cols) matrix with row stride ld: row_max[r] = max |p[r, :]|
// (non-finite or huge -> inf), and *global_max = max over all rows (float bits: every value is
// >= 0, so unsigned order is float order and atomicMax on the bits is a float max). One warp per
// row; rows are 16-byte aligned when kVec, so a lane reads 16 bytes at a time.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) row_absmax_kernel(const T* __restrict__ p, int64_t rows,
                                                              int64_t cols, int64_t ld,
                                                              float* __restrict__ row_max,
                                                              unsigned int* __restrict__ global_max) {
  constexpr int kPack = 16 / sizeof(T);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  float local = 0.f;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * warps + warp; r < rows;
       r += static_cast<int64_t>(gridDim.x) * warps) {
    const T* row = p + r * ld;
    float m = 0.f;
    int64_t c = 0;
    if (kVec) {
      const int64_t packs = cols / kPack;
      const uint4* row16 = reinterpret_cast<const uint4*>(row);
      for (int64_t i = lane; i < packs; i += 32) {
        const uint4 raw = __ldg(row16 + i);
        const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int j = 0; j < kPack; ++j) m = fmaxf(m, abs_or_inf(v[j]));
      }
      c = packs * kPack;
    }
    for (c += lane; c < cols; c += 32) m = fmaxf(m, abs_or_inf(row[c]));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    if (lane == 0) row_max[r] = m;
    local = fmaxf(local, m);
  }
  __shared__ float warp_max[kThreads / 32];
  if (lane == 0) warp_max[warp] = local;
  __syncthreads();
  if (threadIdx.x == 0) {
    float b = 0.f;
    for (int w = 0; w < warps; ++w) b = fmaxf(b, warp_max[w]);
    atomicMax(global_max, __float_as_uint(b));
  }
}

// Recomputes, in fp32 and without TF32, the entries the GEMM epilogue may have got wrong (NaN
// turned into 0): every (m, n) whose bound fails, or all of them when `force` (K == 0). Writes the
// NaN-keeping ReLU into out (M, N) and the mask bit (set when z > 0 or z is NaN, as torch's
// threshold_backward lets the gradient through a NaN output).
template <typename T>
__global__ void __launch_bounds__(kThreads) nan_fixup_kernel(
    const T* __restrict__ x, int64_t ldx, const T* __restrict__ w, int64_t ldw,
    const T* __restrict__ bias, T* __restrict__ out, unsigned int* __restrict__ mask_words,
    int64_t mask_ld_words, const float* __restrict__ x_max, const float* __restrict__ w_max,
    const float* __restrict__ global_max, int64_t M, int64_t N, int64_t K, bool force) {
  if (!force && entry_is_safe(global_max[0], global_max[1], global_max[2], K)) return;
  const int64_t total = M * N;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = idx / N;
    const int64_t n = idx - m * N;
    const float b = bias != nullptr ? static_cast<float>(bias[n]) : 0.f;
    if (!force && entry_is_safe(x_max[m], w_max[n], fabsf(b), K)) continue;
    const T* xr = x + m * ldx;
    const T* wr = w + n * ldw;
    float z = 0.f;
    for (int64_t k = 0; k < K; ++k) z = fmaf(static_cast<float>(xr[k]), static_cast<float>(wr[k]), z);
    z += b;
    const bool keep = z > 0.f || isnan(z);
    out[m * N + n] = keep ? static_cast<T>(z) : static_cast<T>(0.f);
    unsigned int* word = mask_words + m * mask_ld_words + (n >> 5);
    const unsigned int bit = 1u << (n & 31);
    if (keep) {
      atomicOr(word, bit);
    } else {
      atomicAnd(word, ~bit);
    }
  }
}

// Fallback epilogue, when cuBLASLt has no fused algorithm: out holds x W^T; add the bias, apply
// the NaN-keeping ReLU and write the mask, one mask byte (8 outputs) per thread.
template <typename T>
__global__ void __launch_bounds__(kThreads) bias_relu_mask_kernel(T* __restrict__ out,
                                                                  const T* __restrict__ bias,
                                                                  uint8_t* __restrict__ mask,
                                                                  int64_t mask_ld_bytes, int64_t M,
                                                                  int64_t N) {
  const int64_t bytes_per_row = (N + 7) / 8;
  const int64_t total = M * bytes_per_row;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = idx / bytes_per_row;
    const int64_t j = idx - m * bytes_per_row;
    T* row = out + m * N;
    unsigned int byte = 0;
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      const int64_t n = j * 8 + t;
      if (n < N) {
        float z = static_cast<float>(row[n]);
        if (bias != nullptr) z += static_cast<float>(bias[n]);
        const bool keep = z > 0.f || isnan(z);
        row[n] = keep ? static_cast<T>(z) : static_cast<T>(0.f);
        byte |= static_cast<unsigned int>(keep) << t;
      }
    }
    mask[m * mask_ld_bytes + j] = static_cast<uint8_t>(byte);
  }
}

// dz = grad where out > 0 or out is NaN (torch's threshold_backward keeps NaN), else 0.
template <typename T>
__global__ void __launch_bounds__(kThreads) relu_output_grad_kernel(const T* __restrict__ grad,
                                                                    int64_t ldg,
                                                                    const T* __restrict__ out,
                                                                    int64_t ldo,
                                                                    T* __restrict__ dz, int64_t M,
                                                                    int64_t N) {
  const int64_t total = M * N;
  const T zero = static_cast<T>(0.f);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = idx / N;
    const int64_t n = idx - m * N;
    const float y = static_cast<float>(out[m * ldo + n]);
    dz[idx] = y <= 0.f ? zero : grad[m * ldg + n];
  }
}

// ------------------------------------------------------------------------------------------

// out and the ReLU mask.
std::tuple<at::Tensor, at::Tensor> forward_with_mask(const at::Tensor& input,
                                                     const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& bias_opt) {
  check_linear_inputs("bigmodel::linear_relu (cublaslt): ", input, weight, bias_opt);
  c10::cuda::CUDAGuard guard(input.device());
  const int64_t M = input.size(0), K = input.size(1), N = weight.size(0);
  const at::ScalarType dtype = input.scalar_type();
  const at::Tensor x = as_row_major(input);
  const at::Tensor w = as_row_major(weight);
  const int64_t ldx = row_major_ld(x), ldw = row_major_ld(w);
  const bool has_bias = bias_opt.has_value() && bias_opt->defined();
  const at::Tensor b = has_bias ? bias_opt->contiguous() : at::Tensor();
  const int64_t mask_ld = mask_ld_bits(N);

  at::Tensor out = at::empty({M, N}, input.options());
  at::Tensor mask = at::empty({M, mask_ld / 8}, input.options().dtype(at::kByte));
  if (M == 0 || N == 0) return {out, mask};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // Scratch for the NaN guard: per-row maxima of x (M) and W (N), then max over x, W and b
  // (3 floats, zeroed for atomicMax) and one slot for the bias pass's unused row maximum.
  at::Tensor stats;
  float* x_max = nullptr;
  float* w_max = nullptr;
  float* g_max = nullptr;

  auto fixup = [&](auto* tag, bool force) {
    using T = std::remove_pointer_t<decltype(tag)>;
    nan_fixup_kernel<T><<<grid_for(M * N, kThreads, 8), kThreads, 0, stream>>>(
        x.data_ptr<T>(), ldx, w.data_ptr<T>(), ldw, has_bias ? b.data_ptr<T>() : nullptr,
        out.data_ptr<T>(), reinterpret_cast<unsigned int*>(mask.data_ptr<uint8_t>()), mask_ld / 32,
        x_max, w_max, g_max, M, N, K, force);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };

  if (K == 0) {  // out = relu(b) (or 0): no GEMM to run; the fix-up kernel computes every entry
    dispatch_dtype(dtype, [&](auto* tag) { fixup(tag, /*force=*/true); });
    return {out, mask};
  }

  if (fused_epilogue_enabled()) {
    LtGemm gemm{dtype, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, w.data_ptr(), ldw, x.data_ptr(), ldx,
                out.data_ptr(), N};
    gemm.epilogue = has_bias ? CUBLASLT_EPILOGUE_RELU_AUX_BIAS : CUBLASLT_EPILOGUE_RELU_AUX;
    gemm.bias = has_bias ? b.data_ptr() : nullptr;
    gemm.aux = mask.data_ptr();
    gemm.aux_ld = mask_ld;
    if (gemm.prepare()) {
      stats = at::empty({M + N + 4}, input.options().dtype(at::kFloat));
      x_max = stats.data_ptr<float>();
      w_max = x_max + M;
      g_max = w_max + N;
      C10_CUDA_CHECK(cudaMemsetAsync(g_max, 0, 3 * sizeof(float), stream));
      dispatch_dtype(dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        auto absmax = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, float* row_out,
                          float* global) {
          const bool vec = reinterpret_cast<uintptr_t>(p) % 16 == 0 && (ld * sizeof(T)) % 16 == 0;
          const int grid = grid_for(rows, kThreads / 32, 4);
          auto* g = reinterpret_cast<unsigned int*>(global);
          if (vec) {
            row_absmax_kernel<T, true><<<grid, kThreads, 0, stream>>>(p, rows, cols, ld, row_out, g);
          } else {
            row_absmax_kernel<T, false><<<grid, kThreads, 0, stream>>>(p, rows, cols, ld, row_out, g);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        // Before the GEMM: when x fits in L2 the GEMM then reads it from there.
        absmax(x.data_ptr<T>(), M, K, ldx, x_max, g_max + 0);
        absmax(w.data_ptr<T>(), N, K, ldw, w_max, g_max + 1);
        if (has_bias) absmax(b.data_ptr<T>(), 1, N, N, g_max + 3, g_max + 2);
        gemm.run(input);
        fixup(tag, /*force=*/false);
      });
      return {out, mask};
    }
  }

  // Fallback: plain GEMM, then our NaN-keeping bias + ReLU + mask pass.
  LtGemm gemm{dtype, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, w.data_ptr(), ldw, x.data_ptr(), ldx,
              out.data_ptr(), N};
  TORCH_CHECK_NOT_IMPLEMENTED(gemm.prepare(),
                              "bigmodel::linear_relu (cublaslt): cuBLASLt has no algorithm for input ",
                              describe(input), " x weight ", describe(weight),
                              "; use another backend (triton) for this shape/alignment");
  gemm.run(input);
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    bias_relu_mask_kernel<T><<<grid_for(M * ((N + 7) / 8), kThreads, 8), kThreads, 0, stream>>>(
        out.data_ptr<T>(), has_bias ? b.data_ptr<T>() : nullptr, mask.data_ptr<uint8_t>(), mask_ld / 8,
        M, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mask};
}

}  // namespace

namespace cublaslt {

at::Tensor linear_relu_forward(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias) {
  return std::get<0>(forward_with_mask(input, weight, bias));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward(
    const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& input,
    const at::Tensor& weight, std::array<bool, 3> output_mask) {
  const char* op = "bigmodel::linear_relu_backward (cublaslt): ";
  check_linear_inputs(op, input, weight, std::nullopt);
  const int64_t M = input.size(0), N = weight.size(0);
  const at::ScalarType dtype = input.scalar_type();
  for (const at::Tensor* t : {&grad_output, &output}) {
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == M && t->size(1) == N, op,
                      "grad_output and output must be (", M, ", ", N, ") for input ", input.sizes(),
                      " and weight ", weight.sizes(), ", got ", grad_output.sizes(), " and ",
                      output.sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == dtype, op, "grad_output and output must have the input's dtype ",
                     dtype, ", got ", grad_output.scalar_type(), " and ", output.scalar_type());
    TORCH_CHECK_VALUE(t->device() == input.device(), op,
                      "grad_output, output and input must be on one device");
  }

  const auto opts = input.options();
  c10::cuda::CUDAGuard guard(input.device());
  // Nothing asked (empty tensors), or nothing to differentiate (zeros): no mask pass to run.
  const bool none_asked = !output_mask[0] && !output_mask[1] && !output_mask[2];
  if (none_asked || M == 0 || N == 0) return gradient_gemms(op, grad_output, input, weight, output_mask);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor g = as_row_major(grad_output);
  const at::Tensor y = as_row_major(output);

  // dZ materialised once: both gradient GEMMs read it as an operand.
  at::Tensor dz = at::empty({M, N}, opts);
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    relu_output_grad_kernel<T><<<grid_for(M * N, kThreads, 8), kThreads, 0, stream>>>(
        g.data_ptr<T>(), row_major_ld(g), y.data_ptr<T>(), row_major_ld(y), dz.data_ptr<T>(), M, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  return gradient_gemms(op, dz, input, weight, output_mask);
}

}  // namespace cublaslt
}  // namespace bigmodel
