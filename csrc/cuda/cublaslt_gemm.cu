// The shared half of bigmodel's cuBLASLt backends (cublaslt_gemm.h): the GEMM with its algorithm
// cache, operand layouts, and the backward's two gradient GEMMs.
#include "cuda/cublaslt_gemm.h"

#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <unordered_map>

namespace bigmodel {
namespace cublaslt {
namespace {

// Algorithms may use up to this much scratch; it comes from torch's caching allocator per call.
constexpr uint64_t kMaxWorkspaceBytes = 32ull << 20;

using PreferenceDesc = std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>,
                                       LtDeleter<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy>>;

uint32_t alignment_of(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && a % al != 0) al /= 2;
  return al;
}

// torch.backends.cuda.matmul.allow_{fp16,bf16}_reduced_precision_reduction: when reduced
// precision is not allowed, split-K partial sums must be reduced in fp32 (the compute type), not
// in the output type. The getter returned bool in older torch and an enum (0 = allowed) since.
template <typename R>
bool reduced_precision_allowed(R option) {
  if constexpr (std::is_same_v<R, bool>) {
    return option;
  } else {
    return static_cast<int>(option) == 0;
  }
}

uint32_t reduction_scheme_mask(at::ScalarType dtype) {
  bool allowed = true;
  if (dtype == at::kHalf) allowed = reduced_precision_allowed(at::globalContext().allowFP16ReductionCuBLAS());
  if (dtype == at::kBFloat16) allowed = reduced_precision_allowed(at::globalContext().allowBF16ReductionCuBLAS());
  return allowed ? static_cast<uint32_t>(CUBLASLT_REDUCTION_SCHEME_MASK)
                 : static_cast<uint32_t>(CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE);
}

cublasComputeType_t compute_type(at::ScalarType dtype) {
  // fp32 uses TF32 tensor cores only when torch allows it for matmuls (allow_tf32 /
  // set_float32_matmul_precision); fp16 and bf16 always accumulate in fp32.
  if (dtype == at::kFloat && at::globalContext().allowTF32CuBLAS()) return CUBLAS_COMPUTE_32F_FAST_TF32;
  return CUBLAS_COMPUTE_32F;
}

LayoutDesc make_layout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
  cublasLtMatrixLayout_t raw = nullptr;
  BIGMODEL_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&raw, type, static_cast<uint64_t>(rows),
                                                     static_cast<uint64_t>(cols), ld));
  return LayoutDesc(raw);
}

template <typename V>
void set_attr(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const V& value) {
  BIGMODEL_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)));
}

template <typename V>
void set_pref(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr, const V& value) {
  BIGMODEL_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value)));
}

// Heuristic answers, keyed by everything they depend on (shape, layout, types, epilogue and the
// alignment of every pointer), so repeated calls skip the heuristic query (tens of us of host time).
using AlgoKey = std::array<int64_t, 20>;

struct AlgoKeyHash {
  size_t operator()(const AlgoKey& k) const {
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the 64-bit words
    for (int64_t v : k) h = (h ^ static_cast<uint64_t>(v)) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

std::mutex algo_cache_mutex;
std::unordered_map<AlgoKey, AlgoChoice, AlgoKeyHash> algo_cache;

}  // namespace

int grid_for(int64_t work_items, int per_block, int blocks_per_sm) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = (work_items + per_block - 1) / per_block;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, sms * blocks_per_sm)));
}

cudaDataType_t cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CUDA_R_32F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: break;
  }
  TORCH_CHECK(false, "bigmodel (cuBLASLt): unsupported dtype ", t);
}

// Row stride to hand cuBLASLt for a 2-D tensor stored row-major (unit column stride, row stride
// >= columns), or -1 when it is not (then the caller makes it contiguous).
int64_t row_major_ld(const at::Tensor& t) {
  const int64_t rows = t.size(0), cols = t.size(1);
  const int64_t min_ld = std::max<int64_t>(cols, 1);
  if (cols > 1 && t.stride(1) != 1) return -1;
  if (rows <= 1) return min_ld;
  return t.stride(0) >= min_ld ? t.stride(0) : -1;
}

// A GEMM operand cuBLASLt reads in place when it can: row-major with any row stride. A copy is
// made when the layout is not row-major, or when the pointer or row stride is not 16-byte aligned
// but a fresh contiguous copy would be (Hopper's fast kernels load tiles with TMA, which needs 16
// bytes; the copy costs one pass, far less than a slow kernel for the whole GEMM).
at::Tensor as_row_major(const at::Tensor& t) {
  const int64_t ld = row_major_ld(t);
  if (ld < 0) return t.contiguous();
  const int64_t es = t.element_size();
  const bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
                       (t.size(0) <= 1 || (ld * es) % 16 == 0);
  const bool copy_aligns = t.numel() > 0 && (t.size(1) * es) % 16 == 0;
  if (!aligned && copy_aligns) return t.clone(at::MemoryFormat::Contiguous);
  return t;
}

std::string describe(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes() << " (strides " << t.strides() << ", " << t.scalar_type() << ")";
  return os.str();
}

void check_linear_inputs(const char* op, const at::Tensor& input, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(input.dim() == 2 && weight.dim() == 2, op,
                    "expected 2-D input (M, K) and weight (N, K), got input ", input.sizes(),
                    " and weight ", weight.sizes());
  TORCH_CHECK_VALUE(input.size(1) == weight.size(1), op, "input ", input.sizes(),
                    " and weight ", weight.sizes(), " disagree on in_features (K)");
  TORCH_CHECK_VALUE(input.is_cuda() && weight.device() == input.device(), op,
                    "input and weight must be on the same CUDA device, got ", input.device(),
                    " and ", weight.device());
  const auto dt = input.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
                   "supports float32, float16 and bfloat16, got ", dt);
  TORCH_CHECK_TYPE(weight.scalar_type() == dt, op, "weight dtype ", weight.scalar_type(),
                   " does not match input dtype ", dt);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op, "bias must be (",
                      weight.size(0), "), got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->device() == input.device(), op, "bias is on ", bias->device(),
                      " but input is on ", input.device());
    TORCH_CHECK_TYPE(bias->scalar_type() == dt, op, "bias dtype ", bias->scalar_type(),
                     " does not match input dtype ", dt);
  }
}

bool fused_epilogue_enabled() {
  const char* v = std::getenv("BIGMODEL_CUBLASLT_EPILOGUE");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

bool LtGemm::prepare() {
  const cudaDataType_t type = cuda_dtype(dtype);
  const cublasComputeType_t compute = compute_type(dtype);
  cublasLtMatmulDesc_t raw = nullptr;
  BIGMODEL_CUBLASLT_CHECK(cublasLtMatmulDescCreate(&raw, compute, CUDA_R_32F));
  desc.reset(raw);
  set_attr(raw, CUBLASLT_MATMUL_DESC_TRANSA, static_cast<int32_t>(transa));
  set_attr(raw, CUBLASLT_MATMUL_DESC_TRANSB, static_cast<int32_t>(transb));
  set_attr(raw, CUBLASLT_MATMUL_DESC_EPILOGUE, static_cast<uint32_t>(epilogue));
  if (bias != nullptr) set_attr(raw, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias);
  if (aux != nullptr) {
    set_attr(raw, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, aux);
    set_attr(raw, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, aux_ld);
  }
  a_layout = transa == CUBLAS_OP_N ? make_layout(type, m, k, lda) : make_layout(type, k, m, lda);
  b_layout = transb == CUBLAS_OP_N ? make_layout(type, k, n, ldb) : make_layout(type, n, k, ldb);
  d_layout = make_layout(type, m, n, ldd);

  const uint32_t reduction = reduction_scheme_mask(dtype);
  const AlgoKey key = {static_cast<int64_t>(at::cuda::current_device()), m, n, k,
                       static_cast<int64_t>(transa), static_cast<int64_t>(transb), lda, ldb, ldd,
                       static_cast<int64_t>(type), static_cast<int64_t>(compute),
                       static_cast<int64_t>(epilogue), aux_ld, alignment_of(a), alignment_of(b),
                       alignment_of(d), bias != nullptr ? alignment_of(bias) : 0,
                       aux != nullptr ? alignment_of(aux) : 0, static_cast<int64_t>(reduction), 0};
  {
    std::lock_guard<std::mutex> lock(algo_cache_mutex);
    auto it = algo_cache.find(key);
    if (it != algo_cache.end()) {
      choice = it->second;
      return choice.found;
    }
  }
  cublasLtMatmulPreference_t pref_raw = nullptr;
  BIGMODEL_CUBLASLT_CHECK(cublasLtMatmulPreferenceCreate(&pref_raw));
  PreferenceDesc pref(pref_raw);
  set_pref(pref_raw, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, kMaxWorkspaceBytes);
  set_pref(pref_raw, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment_of(a));
  set_pref(pref_raw, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment_of(b));
  set_pref(pref_raw, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment_of(d));
  set_pref(pref_raw, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment_of(d));
  set_pref(pref_raw, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, reduction);

  int count = 0;
  AlgoChoice found;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
      at::cuda::getCurrentCUDABlasLtHandle(), raw, a_layout.get(), b_layout.get(), d_layout.get(),
      d_layout.get(), pref_raw, 1, &found.result, &count);
  // NOT_SUPPORTED means "no heuristic for this configuration": an answer, not an error.
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS || status == CUBLAS_STATUS_NOT_SUPPORTED,
              "bigmodel (cuBLASLt): cublasLtMatmulAlgoGetHeuristic failed: ",
              cublasLtGetStatusString(status));
  found.found = status == CUBLAS_STATUS_SUCCESS && count > 0 &&
                found.result.state == CUBLAS_STATUS_SUCCESS;
  {
    std::lock_guard<std::mutex> lock(algo_cache_mutex);
    if (algo_cache.size() > 4096) algo_cache.clear();  // bounded: shapes churn in some workloads
    algo_cache.emplace(key, found);
  }
  choice = found;
  return choice.found;
}

void LtGemm::run(const at::Tensor& like) {
  const float alpha = 1.f, beta = 0.f;
  at::Tensor workspace;
  void* ws = nullptr;
  const size_t ws_bytes = choice.result.workspaceSize;
  if (ws_bytes > 0) {
    // From torch's caching allocator, on the current stream: freed back to it once queued work
    // on this stream is done, exactly like a temporary tensor.
    workspace = at::empty({static_cast<int64_t>(ws_bytes)}, like.options().dtype(at::kByte));
    ws = workspace.data_ptr();
  }
  BIGMODEL_CUBLASLT_CHECK(cublasLtMatmul(at::cuda::getCurrentCUDABlasLtHandle(), desc.get(), &alpha,
                                         a, a_layout.get(), b, b_layout.get(), &beta, d,
                                         d_layout.get(), d, d_layout.get(), &choice.result.algo,
                                         ws, ws_bytes, at::cuda::getCurrentCUDAStream()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gradient_gemms(const char* op, const at::Tensor& dz,
                                                              const at::Tensor& input,
                                                              const at::Tensor& weight,
                                                              std::array<bool, 3> output_mask) {
  const int64_t M = input.size(0), K = input.size(1), N = weight.size(0);
  const at::ScalarType dtype = input.scalar_type();
  const auto opts = input.options();
  if (M == 0 || N == 0) {  // empty sums: no GEMM to run
    return {output_mask[0] ? at::zeros({M, K}, opts) : at::empty({0}, opts),
            output_mask[1] ? at::zeros({N, K}, opts) : at::empty({0}, opts),
            output_mask[2] ? at::zeros({N}, opts) : at::empty({0}, opts)};
  }
  at::Tensor dx = at::empty({0}, opts), dw = at::empty({0}, opts), db = at::empty({0}, opts);
  const auto no_algorithm = [&](const char* which) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, op, "cuBLASLt has no algorithm for ", which, " with input ",
                                describe(input), ", weight ", describe(weight),
                                "; use another backend (triton) for this shape/alignment");
  };
  if (output_mask[0]) {
    dx = at::empty({M, K}, opts);
    if (K > 0) {
      const at::Tensor w = as_row_major(weight);
      // dX^T (K x M) = W^T (K x N, W as stored) . dZ^T (N x M, dZ as stored)
      LtGemm gemm{dtype, CUBLAS_OP_N, CUBLAS_OP_N, K, M, N, w.data_ptr(), row_major_ld(w),
                  dz.data_ptr(), N, dx.data_ptr(), K};
      if (!gemm.prepare()) no_algorithm("dX = dZ W");
      gemm.run(input);
    }
  }
  bool db_done = false;
  if (output_mask[1]) {
    dw = at::empty({N, K}, opts);
    if (K > 0) {
      const at::Tensor x = as_row_major(input);
      // dW^T (K x N) = X^T (K x M, X as stored) . dZ (M x N: dZ as stored, transposed); the
      // BGRADB epilogue sums B = dZ over the GEMM's k (= M) into db.
      auto make = [&]() {
        return LtGemm{dtype, CUBLAS_OP_N, CUBLAS_OP_T, K, N, M, x.data_ptr(), row_major_ld(x),
                      dz.data_ptr(), N, dw.data_ptr(), K};
      };
      LtGemm gemm = make();
      if (output_mask[2]) {
        db = at::empty({N}, opts);
        gemm.epilogue = CUBLASLT_EPILOGUE_BGRADB;
        gemm.bias = db.data_ptr();
        db_done = gemm.prepare();
        if (!db_done) gemm = make();  // no BGRADB algorithm: plain GEMM, db from at::sum below
      }
      if (!db_done && !gemm.prepare()) no_algorithm("dW = dZ^T X");
      gemm.run(input);
    }
  }
  if (output_mask[2] && !db_done) db = at::sum(dz, {0});  // fp32 accumulation inside at::sum
  return {dx, dw, db};
}

}  // namespace cublaslt
}  // namespace bigmodel
