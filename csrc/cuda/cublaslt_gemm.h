// What the cuBLASLt backends of bigmodel's linear ops share (csrc/cuda/cublaslt_gemm.cu): one
// column-major GEMM with an optional epilogue (LtGemm), the operand layouts cuBLASLt reads in
// place, and the two gradient GEMMs every linear op's backward ends with.
//
// Row-major <-> column-major: cuBLASLt is column-major, so a row-major (r, c) tensor with row
// stride ld is, to cuBLASLt, the (c x r) matrix with leading dimension ld. The ops therefore
// compute every product transposed: out^T = W x^T, dX^T = W^T dZ^T, dW^T = x^T dZ.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <cublasLt.h>

#include <array>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

namespace bigmodel {
namespace cublaslt {

#define BIGMODEL_CUBLASLT_CHECK(expr)                                                   \
  do {                                                                                  \
    const cublasStatus_t status_ = (expr);                                              \
    TORCH_CHECK(status_ == CUBLAS_STATUS_SUCCESS, "bigmodel (cuBLASLt): ", #expr,       \
                " failed: ", cublasLtGetStatusString(status_));                         \
  } while (0)

// Threads per block of the elementwise kernels beside the GEMMs.
constexpr int kThreads = 256;

// A grid of at most blocks_per_sm blocks per SM, enough for work_items at per_block each.
int grid_for(int64_t work_items, int per_block, int blocks_per_sm);

cudaDataType_t cuda_dtype(at::ScalarType t);

// Calls f with a null pointer of the C++ type of `t` (float, c10::Half or c10::BFloat16).
template <typename F>
void dispatch_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kHalf: f(static_cast<c10::Half*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<c10::BFloat16*>(nullptr)); break;
    default: TORCH_CHECK(false, "bigmodel (cuBLASLt): unsupported dtype ", t);
  }
}

// Row stride to hand cuBLASLt for a 2-D tensor stored row-major (unit column stride, row stride
// >= columns), or -1 when it is not (then the caller makes it contiguous).
int64_t row_major_ld(const at::Tensor& t);

// A GEMM operand cuBLASLt reads in place when it can: row-major with any row stride, else a copy.
at::Tensor as_row_major(const at::Tensor& t);

// The tensor's sizes, strides and dtype, for error messages.
std::string describe(const at::Tensor& t);

// The checks every cuBLASLt linear op makes on (input (M, K), weight (N, K), bias (N,)): 2-D,
// one CUDA device, one dtype of float32 / float16 / bfloat16. `op` prefixes the messages.
void check_linear_inputs(const char* op, const at::Tensor& input, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias);

// BIGMODEL_CUBLASLT_EPILOGUE=0 (tests and benchmarks): the forwards run a plain GEMM and the
// ops' own elementwise pass (their fallback path) instead of cuBLASLt's fused epilogue.
bool fused_epilogue_enabled();

template <typename Desc, cublasStatus_t (*Destroy)(Desc)>
struct LtDeleter {
  void operator()(Desc d) const {
    if (d != nullptr) Destroy(d);
  }
};
using MatmulDesc = std::unique_ptr<std::remove_pointer_t<cublasLtMatmulDesc_t>,
                                   LtDeleter<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy>>;
using LayoutDesc = std::unique_ptr<std::remove_pointer_t<cublasLtMatrixLayout_t>,
                                   LtDeleter<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy>>;

struct AlgoChoice {
  bool found = false;
  cublasLtMatmulHeuristicResult_t result{};
};

// One column-major product D (m x n, ldd) = op(A) op(B), with A and B described as stored, and an
// optional epilogue. prepare() picks an algorithm (false: none for this problem; answers are
// cached per shape, layout, types, epilogue and alignment), run() launches it on the current
// stream.
struct LtGemm {
  at::ScalarType dtype;
  cublasOperation_t transa, transb;
  int64_t m, n, k;
  const void* a;
  int64_t lda;
  const void* b;
  int64_t ldb;
  void* d;
  int64_t ldd;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;  // BIAS epilogues read it, BGRAD epilogues write it
  void* aux = nullptr;         // the epilogue's auxiliary output (ReLU's bit mask, GELU's input)
  int64_t aux_ld = 0;

  MatmulDesc desc{};
  LayoutDesc a_layout{}, b_layout{}, d_layout{};
  AlgoChoice choice{};

  bool prepare();
  void run(const at::Tensor& like);
};

// dX = dZ W, dW = dZ^T X (db = sum_m dZ from the dW GEMM's BGRADB epilogue where cuBLASLt has
// one, else at::sum) for a linear layer with input (M, K), weight (N, K) and dz (M, N), all
// CUDA, one dtype; gradients not in output_mask come back as empty tensors, and for M or N = 0
// the asked ones as zeros. `op` names the caller in errors.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gradient_gemms(const char* op, const at::Tensor& dz,
                                                              const at::Tensor& input,
                                                              const at::Tensor& weight,
                                                              std::array<bool, 3> output_mask);

}  // namespace cublaslt
}  // namespace bigmodel
