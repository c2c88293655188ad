"""Triton kernels for y = relu(x W^T + b), forward and backward.

Forward: a tiled GEMM (grouped program order for L2 reuse) whose epilogue adds the bias and
applies the ReLU on the fp32 accumulator before the single store.
Backward: the ReLU mask is recomputed from the saved output inside the gradient GEMMs, so the
masked grad_output never goes through memory:
  dX = (G * [Y > 0]) @ W                  one kernel over (M, K) tiles
  dW = (G * [Y > 0])^T @ X, db = sum_m    one kernel over (N, K) tiles; the k=0 column of
                                          programs also reduces db, with no atomics.
Only kernels and their launch configs live here; autograd is in bigmodel/ops/linear_relu.py.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
SMEM_LIMIT = 227 * 1024  # H200 (sm_90) shared memory per block

# Hopper configs: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Pruned per dtype by the
# shared memory the pipeline needs (fp32 tiles are twice as large).
_FWD_SHAPES = [
    (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 32, 4, 4),
    (64, 64, 32, 4, 3),
]
# The backward tiles are (rows, cols) of the gradient being produced; the loop dimension is K.
_BWD_SHAPES = [
    (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
    (128, 128, 32, 4, 4), (64, 64, 32, 4, 3),
]
# One small config under the interpreter: autotuning there would only multiply CI time.
_INTERP_SHAPE = (32, 32, 32, 4, 1)


def _configs(shapes, group=True):
    shapes = [_INTERP_SHAPE] if INTERPRETED else shapes
    return [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **({"GROUP_M": 8} if group else {})),
                      num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


def smem_estimate(config, elt_size, extra_tiles=0):
    """Bytes of shared memory the software pipeline needs: num_stages copies of the two
    operand tiles (plus ``extra_tiles`` more BLOCK_M x BLOCK_K tiles, e.g. the saved output)."""
    k = config.kwargs
    tile = (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] + extra_tiles * k["BLOCK_M"] * k["BLOCK_K"]
    return config.num_stages * tile * elt_size


def _prune(extra_tiles):
    def prune(configs, named_args, **kwargs):
        elt = named_args["x_ptr"].element_size()
        kept = [c for c in configs if smem_estimate(c, elt, extra_tiles) <= SMEM_LIMIT]
        return kept or configs[-1:]

    return prune


@triton.jit
def _relu_keep_nan(x):
    # tl.maximum(x, 0) maps NaN to 0; `x < 0` is False for NaN, so NaN survives here.
    return tl.where(x < 0, 0.0, x)


@triton.jit
def _grouped_pids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Programs sharing a group of GROUP_M row tiles run together and reuse their columns in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.autotune(configs=_configs(_FWD_SHAPES), key=["M", "N", "K", "PRECISION"],
                 prune_configs_by={"early_config_prune": _prune(0)})
@triton.jit
def _linear_relu_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_pids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # W^T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        w = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n * stride_b, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y = _relu_keep_nan(acc)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _masked_grad(g, y):
    # torch's threshold_backward: the gradient passes unless out <= 0 (so it passes for NaN).
    return tl.where(y <= 0, 0.0, g)


@triton.autotune(configs=_configs(_BWD_SHAPES), key=["M", "N", "K", "PRECISION"],
                 prune_configs_by={"early_config_prune": _prune(1)})
@triton.jit
def _linear_relu_bwd_dx_kernel(
    g_ptr, y_ptr, w_ptr, dx_ptr, M, N, K,
    stride_gm, stride_gn, stride_ym, stride_yn, stride_wn, stride_wk, stride_dxm, stride_dxk,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # dX tile (BLOCK_M rows of M, BLOCK_N columns of K), looping over N in steps of BLOCK_K.
    pid_m, pid_k = _grouped_pids(M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = (pid_k * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_K).to(tl.int64)
    g_ptrs = g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n in range(0, tl.cdiv(N, BLOCK_K)):
        n_left = N - n * BLOCK_K
        rows = (offs_m[:, None] < M) & (offs_n[None, :] < n_left)
        g = tl.load(g_ptrs, mask=rows, other=0.0)
        y = tl.load(y_ptrs, mask=rows, other=0.0)
        w = tl.load(w_ptrs, mask=(offs_n[:, None] < n_left) & (offs_k[None, :] < K), other=0.0)
        dz = _masked_grad(g, y).to(w.dtype)
        acc = tl.dot(dz, w, acc, input_precision=PRECISION)
        g_ptrs += BLOCK_K * stride_gn
        y_ptrs += BLOCK_K * stride_yn
        w_ptrs += BLOCK_K * stride_wn
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.autotune(configs=_configs(_BWD_SHAPES, group=False), key=["M", "N", "K", "PRECISION"],
                 prune_configs_by={"early_config_prune": _prune(1)})
@triton.jit
def _linear_relu_bwd_dw_kernel(
    g_ptr, y_ptr, x_ptr, dw_ptr, db_ptr, M, N, K,
    stride_gm, stride_gn, stride_ym, stride_yn, stride_xm, stride_xk, stride_dwn, stride_dwk,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # dW tile (BLOCK_M rows of N, BLOCK_N columns of K), looping over M in steps of BLOCK_K.
    # The programs with pid_k == 0 also sum the masked gradient over M into db: each db entry
    # has exactly one writer, so the result is deterministic.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = (pid_n * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = (pid_k * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_K).to(tl.int64)
    gt_ptrs = g_ptr + offs_n[:, None] * stride_gn + offs_m[None, :] * stride_gm  # G^T tile
    yt_ptrs = y_ptr + offs_n[:, None] * stride_yn + offs_m[None, :] * stride_ym
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for m in range(0, tl.cdiv(M, BLOCK_K)):
        m_left = M - m * BLOCK_K
        cols = (offs_n[:, None] < N) & (offs_m[None, :] < m_left)
        g = tl.load(gt_ptrs, mask=cols, other=0.0)
        y = tl.load(yt_ptrs, mask=cols, other=0.0)
        dz = _masked_grad(g, y)
        if COMPUTE_DW:
            x = tl.load(x_ptrs, mask=(offs_m[:, None] < m_left) & (offs_k[None, :] < K), other=0.0)
            acc = tl.dot(dz.to(x.dtype), x, acc, input_precision=PRECISION)
        if COMPUTE_DB:  # every column of programs sums (cheap beside the dot); pid_k == 0 stores
            db += tl.sum(dz.to(tl.float32), axis=1)
        gt_ptrs += BLOCK_K * stride_gm
        yt_ptrs += BLOCK_K * stride_ym
        x_ptrs += BLOCK_K * stride_xm
    if COMPUTE_DW:
        dw_ptrs = dw_ptr + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))
    if COMPUTE_DB:
        tl.store(db_ptr + offs_n, db.to(db_ptr.dtype.element_ty), mask=(offs_n < N) & (pid_k == 0))


def _precision(dtype):
    """tf32 for fp32 only where torch allows it; fp16/bf16 always accumulate in fp32."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def linear_relu_fwd(x, weight, bias):
    """relu(x @ weight.T + bias) for a 2-D x of any strides; returns a contiguous (M, N) tensor."""
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y
    b = bias if bias is not None else y  # never read when HAS_BIAS is False

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _linear_relu_fwd_kernel[grid](
        x, weight, b, y, M, N, K,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), b.stride(0), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype),
    )
    return y


def linear_relu_bwd(grad, out, x, weight, output_mask):
    """(dx, dw, db) for y = relu(x W^T + b); gradients not asked for in output_mask come back empty."""
    M, K = x.shape
    N = weight.shape[0]
    need_dx, need_dw, need_db = (bool(f) for f in output_mask)
    # One fresh empty tensor per gradient not asked for: outputs of an op must not alias.
    dx = torch.empty((M, K), device=x.device, dtype=x.dtype) if need_dx else x.new_empty(0)
    dw = torch.empty((N, K), device=x.device, dtype=x.dtype) if need_dw else x.new_empty(0)
    db = torch.empty((N,), device=x.device, dtype=x.dtype) if need_db else x.new_empty(0)
    precision = _precision(x.dtype)
    if need_dx and M and K:
        if N == 0:
            dx.zero_()
        else:
            def grid_dx(meta):
                return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)

            _linear_relu_bwd_dx_kernel[grid_dx](
                grad, out, weight, dx, M, N, K,
                grad.stride(0), grad.stride(1), out.stride(0), out.stride(1),
                weight.stride(0), weight.stride(1), dx.stride(0), dx.stride(1), PRECISION=precision,
            )
    if (need_dw or need_db) and N:
        kk = K if need_dw else 1  # db alone needs one column of programs

        def grid_dw(meta):
            return (triton.cdiv(N, meta["BLOCK_M"]), triton.cdiv(max(kk, 1), meta["BLOCK_N"]))

        _linear_relu_bwd_dw_kernel[grid_dw](
            grad, out, x, dw if need_dw else db, db if need_db else dw, M, N, K,
            grad.stride(0), grad.stride(1), out.stride(0), out.stride(1), x.stride(0), x.stride(1),
            dw.stride(0) if need_dw else 0, dw.stride(1) if need_dw else 0,
            COMPUTE_DW=need_dw and K > 0, COMPUTE_DB=need_db, PRECISION=precision,
        )
    return dx, dw, db
