"""Triton kernels for y = act(x W^T + b), forward and backward, for the linear + activation
family: ReLU (bigmodel::linear_relu) and none, LeakyReLU, GELU (erf or tanh), SiLU, Tanh and
Sigmoid (bigmodel::fused_linear). The activation is a constexpr (ACT), so each one compiles to its
own kernel with the epilogue inlined.

Forward: a tiled GEMM (grouped program order for L2 reuse) whose epilogue adds the bias and
applies the activation on the fp32 accumulator before the single store; where the derivative
needs the pre-activation z (GELU, SiLU, LeakyReLU with a negative slope) the epilogue also
stores z (SAVE_PRE), as eager PyTorch saves it.
Backward: dz = dy * act'(.) is recomputed from the saved tensor (the output, or z) inside the
gradient GEMMs, so dz never goes through memory:
  dX = dz @ W                             one kernel over (M, K) tiles
  dW = dz^T @ X, db = sum_m dz            one kernel over (N, K) tiles; the k=0 column of
                                          programs also reduces db, with no atomics.
Hopper variant (kernels/_hopper.py): the forward's configs with TMA = True run a persistent
kernel instead (one program per SM, each looping over output tiles in the same grouped order)
that reads X and W tiles through tensor descriptors (TMA), optionally warp-specialised, with the
same epilogue, and stores Y (and z) through descriptors; the autotuner measures both.
Only kernels and their launch configs live here; autograd is in C++ (csrc/autograd/).
"""
import torch
import triton
import triton.language as tl

from bigmodel.kernels import _hopper
from bigmodel.kernels._common import DTYPES, INTERPRETED, SMEM_LIMIT, dot_precision, saves_pre_activation

# sm_90 configs: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Pruned per dtype by the
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
# The persistent TMA forward: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, warp-specialised).
# Warp specialisation on Hopper wants num_warps = 4 (two consumer warp groups and a producer).
_HOPPER_FWD_SHAPES = [
    (128, 256, 64, 8, 3, False), (128, 128, 64, 4, 4, True), (128, 128, 64, 8, 4, False), (128, 256, 64, 4, 3, True),
]
# One small tile under the interpreter: autotuning there would only multiply CI time. Its
# persistent variant runs on a few programs, so each of them loops over several tiles.
_INTERP_SHAPE = (32, 32, 32, 4, 1)
_INTERP_PROGRAMS = 3


_SHAPES = {  # kernel -> (pointer shapes, Hopper shapes, grouped program order)
    "fwd": (_FWD_SHAPES, _HOPPER_FWD_SHAPES, True),
    "dx": (_BWD_SHAPES, (), True),
    "dw": (_BWD_SHAPES, (), False),
}


def _config_list(shapes, hopper_shapes, group):
    extra = {"GROUP_M": 8} if group else {}
    configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, TMA=True, WS=ws, **extra),
                             num_warps=w, num_stages=s) for bm, bn, bk, w, s, ws in hopper_shapes]
    flags = dict(TMA=False, WS=False) if hopper_shapes else {}
    return configs + [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **flags, **extra),
                                    num_warps=w, num_stages=s) for bm, bn, bk, w, s in shapes]


def sm90_configs(kernel):
    """Every config ``kernel`` ('fwd', 'dx' or 'dw') may run on a GPU, Hopper variants first
    (what bench/sm90.py compiles and inspects)."""
    shapes, hopper_shapes, group = _SHAPES[kernel]
    return _config_list(shapes, hopper_shapes, group)


def _configs(kernel):
    # The autotuner's candidates. Under the interpreter: its one tile, in each flavour the
    # kernel has (warp-specialised first).
    shapes, hopper_shapes, group = _SHAPES[kernel]
    if INTERPRETED:
        shapes = [_INTERP_SHAPE]
        hopper_shapes = [_INTERP_SHAPE + (ws,) for ws in sorted({ws for *_, ws in hopper_shapes}, reverse=True)]
    return _hopper.supported("linear_relu_" + kernel, _config_list(shapes, hopper_shapes, group))


def smem_estimate(config, elt_size, extra_tiles=0):
    """Bytes of shared memory the software pipeline needs: num_stages copies of the two
    operand tiles (plus ``extra_tiles`` more BLOCK_M x BLOCK_K tiles, e.g. the saved output),
    and for a TMA config the output tile its store is staged through."""
    k = config.kwargs
    tile = (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] + extra_tiles * k["BLOCK_M"] * k["BLOCK_K"]
    epilogue = k["BLOCK_M"] * k["BLOCK_N"] if k.get("TMA", False) else 0
    return (config.num_stages * tile + epilogue) * elt_size


# Activations whose epilogue (and derivative) is a transcendental function (erf, exp): evaluated
# on whole fp32 tiles they need registers beside them. Compiled for sm_90 with GELU (both
# Tritons), every tile holding more than 96 live fp32 values a thread spilled (forward 128x256 on
# 8 warps: 128 values, 48-344 B; dW 128x64x64 on 4 warps: 128, 500-540 B; dW 128x128x32 on
# 4 warps: 160, 180-204 B) and none at 96 or fewer (bench/NOTES.md, fused_linear).
_TRANSCENDENTAL = ("gelu", "gelu_tanh", "silu", "tanh", "sigmoid")
_MAX_LIVE_PER_THREAD = 96


def live_values_per_thread(config, extra_tiles=0):
    """fp32 values each compute thread holds: the accumulator tile, plus ``extra_tiles``
    BLOCK_M x BLOCK_K operand tiles the epilogue's function runs on (the backward's saved
    tensor and dz). A warp-specialised config computes on two warp groups of num_warps warps."""
    k = config.kwargs
    threads = 32 * config.num_warps * (2 if k.get("WS", False) else 1)
    return (k["BLOCK_M"] * k["BLOCK_N"] + extra_tiles * k["BLOCK_M"] * k["BLOCK_K"]) // threads


def prune(configs, elt_size, extra_tiles=0, family="plain", act="relu"):
    """The configs of ``family`` (kernels/_hopper.py's select) that fit in shared memory and,
    for a transcendental activation, hold at most 96 live fp32 values a thread (the family's
    smallest one if none does)."""
    configs = _hopper.select(configs, family)
    kept = [c for c in configs if smem_estimate(c, elt_size, extra_tiles) <= SMEM_LIMIT
            and (act not in _TRANSCENDENTAL or live_values_per_thread(c, extra_tiles) <= _MAX_LIVE_PER_THREAD)]
    return kept or configs[-1:]


def _pruner(extra_tiles):
    def early_config_prune(configs, named_args, **kwargs):
        return prune(configs, named_args["x_ptr"].element_size(), extra_tiles, kwargs.get("VARIANTS", "plain"),
                     kwargs.get("ACT", "relu"))

    return early_config_prune


# The op's activation names (ACT); gelu_tanh is GELU with approximate="tanh".
ACTIVATIONS = ("none", "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid")
# Globals a @triton.jit function reads must be constexpr objects.
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_GELU_TANH_CUBIC = tl.constexpr(0.044715)


@triton.jit
def _sigmoid(z):
    # exp(-z) overflows to inf for z < -88: 1 / inf = 0, as it should be.
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(z):
    # Neither the interpreter nor every Triton has a tanh. 1 - 2 / (exp(2|z|) + 1) cancels for
    # small |z|, so below 1/4 the odd Taylor series (to z^9: the z^11 term is < 1e-8 relative).
    a = tl.abs(z)
    a2 = a * a
    series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.25, series, 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0))
    return tl.where(z < 0, -t, t)


@triton.jit
def _gelu_tanh_gate(z):
    # 0.5 * (1 + tanh(u)) = sigmoid(2u): GELU's tanh form without a tanh, and no cancellation.
    # Tensors lead in these products: the interpreter cannot multiply a constexpr by a tensor.
    return _sigmoid((z + z * z * z * _GELU_TANH_CUBIC) * (2.0 * _SQRT_2_OVER_PI))


@triton.jit
def _activate(z, negative_slope, ACT: tl.constexpr):
    # y = act(z) on fp32 values, with torch's NaN and inf results: comparisons are False for NaN,
    # so `where` passes it through; GELU(-inf) = -inf * 0 = NaN, GELU(+inf) = +inf.
    if ACT == "relu":
        y = tl.where(z < 0, 0.0, z)  # tl.maximum(z, 0) would map NaN to 0
    elif ACT == "leaky_relu":
        y = tl.where(z > 0, z, z * negative_slope)
    elif ACT == "gelu":
        y = 0.5 * z * (1.0 + tl.math.erf(z * _INV_SQRT_2))
    elif ACT == "gelu_tanh":
        y = z * _gelu_tanh_gate(z)
    elif ACT == "silu":
        y = z * _sigmoid(z)
    elif ACT == "tanh":
        y = _tanh(z)
    elif ACT == "sigmoid":
        y = _sigmoid(z)
    else:
        y = z
    return y


@triton.jit
def _grouped_pids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Tiles sharing a group of GROUP_M row tiles run together and reuse their columns in L2.
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _plus_bias(acc, b_ptr, offs_n, N, stride_b, HAS_BIAS: tl.constexpr):
    # z = acc + b on the fp32 accumulator, before the activation.
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n * stride_b, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _fwd_persistent_tile(x_desc, w_desc, y_desc, p_desc, b_ptr, tile, M, N, K, stride_b, negative_slope,
                         HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SAVE_PRE: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # One output tile through descriptors: TMA zero-fills the X and W tiles past M, N and K (so
    # the last K step needs no mask) and clips the Y store at (M, N).
    pid_m, pid_n = _grouped_pids(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        x = x_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
        w = w_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
        acc = tl.dot(x, w.T, acc, input_precision=PRECISION)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    z = _plus_bias(acc, b_ptr, offs_n, N, stride_b, HAS_BIAS)
    if SAVE_PRE:
        p_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], z.to(p_desc.dtype))
    y = _activate(z, negative_slope, ACT)
    y_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], y.to(y_desc.dtype))


@triton.autotune(configs=_configs("fwd"),
                 key=["M", "N", "K", "ACT", "PRECISION", "VARIANTS"],
                 prune_configs_by={"early_config_prune": _pruner(0)})
@triton.jit
def _linear_relu_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, pre_ptr, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_ym, stride_yn, num_programs, negative_slope,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SAVE_PRE: tl.constexpr, PRECISION: tl.constexpr,
    VARIANTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TMA: tl.constexpr, WS: tl.constexpr,
):
    if TMA:  # persistent: num_programs programs (one per SM) walk the tiles in grouped order
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
        y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[stride_ym, 1],
                                           block_shape=[BLOCK_M, BLOCK_N])
        p_desc = y_desc  # z has y's layout; only stored through when SAVE_PRE
        if SAVE_PRE:
            p_desc = tl.make_tensor_descriptor(pre_ptr, shape=[M, N], strides=[stride_ym, 1],
                                               block_shape=[BLOCK_M, BLOCK_N])
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        # Two spellings of one loop: a Triton without warp specialisation never compiles the first.
        # The specialised one is not flattened: Hopper's warp specialisation leaves a flattened
        # (tile x K) loop unspecialised.
        if WS:
            for tile in tl.range(tl.program_id(0), num_tiles, num_programs, warp_specialize=True):
                _fwd_persistent_tile(x_desc, w_desc, y_desc, p_desc, b_ptr, tile, M, N, K, stride_b, negative_slope,
                                     HAS_BIAS, ACT, SAVE_PRE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
        else:
            for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=True):
                _fwd_persistent_tile(x_desc, w_desc, y_desc, p_desc, b_ptr, tile, M, N, K, stride_b, negative_slope,
                                     HAS_BIAS, ACT, SAVE_PRE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    else:
        pid_m, pid_n = _grouped_pids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
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
        z = _plus_bias(acc, b_ptr, offs_n, N, stride_b, HAS_BIAS)
        offsets = offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if SAVE_PRE:  # z has y's layout
            tl.store(pre_ptr + offsets, z.to(pre_ptr.dtype.element_ty), mask=inside)
        y = _activate(z, negative_slope, ACT)
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _act_grad(g, s, negative_slope, ACT: tl.constexpr):
    # dz = dy * act'(.) in fp32, from s: the pre-activation z where saves_pre_activation, else
    # the output y. Each formula is the one torch's backward kernel uses, so NaN and inf agree.
    g = g.to(tl.float32)
    s = s.to(tl.float32)
    if ACT == "relu":
        dz = tl.where(s <= 0, 0.0, g)  # threshold_backward: passes for NaN
    elif ACT == "leaky_relu":
        dz = tl.where(s > 0, g, g * negative_slope)  # y > 0 exactly where z > 0 for a slope >= 0
    elif ACT == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(s * _INV_SQRT_2))
        dz = g * (cdf + s * _INV_SQRT_2PI * tl.exp(-0.5 * s * s))
    elif ACT == "gelu_tanh":
        gate = _gelu_tanh_gate(s)  # 0.5 (1 + tanh u); 0.5 (1 - tanh^2 u) = 2 gate (1 - gate)
        du = (1.0 + s * s * (3.0 * _GELU_TANH_CUBIC)) * _SQRT_2_OVER_PI
        dz = g * (gate + s * 2.0 * gate * (1.0 - gate) * du)
    elif ACT == "silu":
        sig = _sigmoid(s)
        dz = g * sig * (1.0 + s * (1.0 - sig))
    elif ACT == "tanh":
        dz = g * (1.0 - s * s)
    elif ACT == "sigmoid":
        dz = g * (1.0 - s) * s
    else:
        dz = g
    return dz


@triton.autotune(configs=_configs("dx"), key=["M", "N", "K", "ACT", "PRECISION"],
                 prune_configs_by={"early_config_prune": _pruner(1)})
@triton.jit
def _linear_relu_bwd_dx_kernel(
    g_ptr, y_ptr, w_ptr, dx_ptr, M, N, K,
    stride_gm, stride_gn, stride_ym, stride_yn, stride_wn, stride_wk, stride_dxm, stride_dxk, negative_slope,
    ACT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # dX tile (BLOCK_M rows of M, BLOCK_N columns of K), looping over N in steps of BLOCK_K.
    # y_ptr is the saved tensor act' reads (the output, or z): see _act_grad.
    pid_m, pid_k = _grouped_pids(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
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
        dz = _act_grad(g, y, negative_slope, ACT).to(w.dtype)
        acc = tl.dot(dz, w, acc, input_precision=PRECISION)
        g_ptrs += BLOCK_K * stride_gn
        y_ptrs += BLOCK_K * stride_yn
        w_ptrs += BLOCK_K * stride_wn
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.autotune(configs=_configs("dw"),
                 key=["M", "N", "K", "ACT", "PRECISION"], prune_configs_by={"early_config_prune": _pruner(1)})
@triton.jit
def _linear_relu_bwd_dw_kernel(
    g_ptr, y_ptr, x_ptr, dw_ptr, db_ptr, M, N, K,
    stride_gm, stride_gn, stride_ym, stride_yn, stride_xm, stride_xk, stride_dwn, stride_dwk, negative_slope,
    ACT: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # dW tile (BLOCK_M rows of N, BLOCK_N columns of K), looping over M in steps of BLOCK_K.
    # The programs with pid_k == 0 also sum the masked gradient over M into db: each db entry
    # has exactly one writer, so the result is deterministic. y_ptr: the saved tensor (_act_grad).
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
        dz = _act_grad(g, y, negative_slope, ACT)
        if COMPUTE_DW:
            x = tl.load(x_ptrs, mask=(offs_m[:, None] < m_left) & (offs_k[None, :] < K), other=0.0)
            acc = tl.dot(dz.to(x.dtype), x, acc, input_precision=PRECISION)
        if COMPUTE_DB:  # every column of programs sums (cheap beside the dot); pid_k == 0 stores
            db += tl.sum(dz, axis=1)
        gt_ptrs += BLOCK_K * stride_gm
        yt_ptrs += BLOCK_K * stride_ym
        x_ptrs += BLOCK_K * stride_xm
    if COMPUTE_DW:
        dw_ptrs = dw_ptr + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))
    if COMPUTE_DB:
        tl.store(db_ptr + offs_n, db.to(db_ptr.dtype.element_ty), mask=(offs_n < N) & (pid_k == 0))


def _check_dtypes_devices(where, named):
    # named: (name, tensor) pairs, the first one the reference; None entries are skipped.
    (first_name, first), others = named[0], [(n, t) for n, t in named[1:] if t is not None]
    if first.dtype not in DTYPES:
        raise TypeError(f"{where}: {first_name} must be float16, bfloat16 or float32; got {first.dtype}")
    wrong = next(((n, t) for n, t in others if t.dtype != first.dtype), None)
    if wrong:
        raise TypeError(f"{where}: {wrong[0]} dtype {wrong[1].dtype} does not match {first_name} dtype {first.dtype}")
    elsewhere = next(((n, t) for n, t in others if t.device != first.device), None)
    if elsewhere:
        raise ValueError(f"{where}: {elsewhere[0]} is on {elsewhere[1].device} but {first_name} is on {first.device}")


def _check_fwd(x, weight, bias, where):
    if x.dim() != 2 or weight.dim() != 2 or (bias is not None and bias.dim() != 1):
        raise ValueError(f"{where}: expected x (M, K), weight (N, K) and bias (N,) or None; got x "
                         f"{tuple(x.shape)}, weight {tuple(weight.shape)}, bias "
                         f"{None if bias is None else tuple(bias.shape)}")
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K or (bias is not None and bias.shape[0] != N):
        raise ValueError(f"{where}: x {tuple(x.shape)} needs weight (N, {K}) and bias (N,); got weight "
                         f"{tuple(weight.shape)}, bias {None if bias is None else tuple(bias.shape)}")
    _check_dtypes_devices(where, (("x", x), ("weight", weight), ("bias", bias)))
    return M, N, K


def _check_act(act, where):
    if act not in ACTIVATIONS:
        raise ValueError(f"{where}: unknown activation {act!r}; expected one of {', '.join(ACTIVATIONS)}")


def _check_bwd(grad, saved, saved_name, x, weight, output_mask, where):
    M, N, K = _check_fwd(x, weight, None, where)
    for name, t in (("grad_output", grad), (saved_name, saved)):
        if tuple(t.shape) != (M, N):
            raise ValueError(f"{where}: {name} must have shape {(M, N)} for x {tuple(x.shape)} and weight "
                             f"{tuple(weight.shape)}; got {tuple(t.shape)}")
    if len(output_mask) != 3:
        raise ValueError(f"{where}: output_mask must have 3 entries (dx, dw, db); got {list(output_mask)}")
    _check_dtypes_devices(where, (("x", x), ("grad_output", grad), (saved_name, saved)))
    return M, N, K


_SMS = {}


def _num_programs(device):
    # The persistent kernel runs one program per SM.
    if INTERPRETED:
        return _INTERP_PROGRAMS
    if device.index not in _SMS:
        _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device.index]


def _forward(x, weight, bias, act, negative_slope, where, keep_pre=True):
    # (y, z or an empty tensor): see fused_linear_fwd.
    M, N, K = _check_fwd(x, weight, bias, where)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    save_pre = keep_pre and saves_pre_activation(act, negative_slope)
    pre = torch.empty_like(y) if save_pre else x.new_empty(0)
    if M == 0 or N == 0:
        return y, pre
    b = bias if bias is not None else y  # never read when HAS_BIAS is False
    # TMA cannot address a K = 0 matrix: that (all-bias) case takes the pointer kernel.
    variants = _hopper.family(where, (x, weight, y)) if K else "plain"
    if variants != "plain":
        _hopper.ensure_allocator()
    programs = _num_programs(x.device)

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (min(tiles, programs) if meta["TMA"] else tiles,)

    _linear_relu_fwd_kernel[grid](
        x, weight, b, y, pre if save_pre else y, M, N, K,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), b.stride(0), y.stride(0), y.stride(1),
        programs, float(negative_slope),
        HAS_BIAS=bias is not None, ACT=act, SAVE_PRE=save_pre, PRECISION=dot_precision(x.dtype), VARIANTS=variants,
    )
    return y, pre


def _backward(grad, saved, x, weight, output_mask, act, negative_slope):
    # (dx, dw, db) from dz = grad * act'(saved): see fused_linear_bwd.
    M, N, K = x.shape[0], weight.shape[0], x.shape[1]
    need_dx, need_dw, need_db = (bool(f) for f in output_mask)
    # One fresh empty tensor per gradient not asked for: outputs of an op must not alias.
    dx = torch.empty((M, K), device=x.device, dtype=x.dtype) if need_dx else x.new_empty(0)
    dw = torch.empty((N, K), device=x.device, dtype=x.dtype) if need_dw else x.new_empty(0)
    db = torch.empty((N,), device=x.device, dtype=x.dtype) if need_db else x.new_empty(0)
    precision = dot_precision(x.dtype)
    slope = float(negative_slope)
    if need_dx and M and K:
        if N == 0:
            dx.zero_()
        else:
            def grid_dx(meta):
                return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)

            _linear_relu_bwd_dx_kernel[grid_dx](
                grad, saved, weight, dx, M, N, K,
                grad.stride(0), grad.stride(1), saved.stride(0), saved.stride(1),
                weight.stride(0), weight.stride(1), dx.stride(0), dx.stride(1), slope, ACT=act, PRECISION=precision,
            )
    if (need_dw or need_db) and N:
        kk = K if need_dw else 1  # db alone needs one column of programs

        def grid_dw(meta):
            return (triton.cdiv(N, meta["BLOCK_M"]), triton.cdiv(max(kk, 1), meta["BLOCK_N"]))

        _linear_relu_bwd_dw_kernel[grid_dw](
            grad, saved, x, dw if need_dw else db, db if need_db else dw, M, N, K,
            grad.stride(0), grad.stride(1), saved.stride(0), saved.stride(1), x.stride(0), x.stride(1),
            dw.stride(0) if need_dw else 0, dw.stride(1) if need_dw else 0, slope,
            ACT=act, COMPUTE_DW=need_dw and K > 0, COMPUTE_DB=need_db, PRECISION=precision,
        )
    return dx, dw, db


def linear_relu_fwd(x, weight, bias):
    """relu(x @ weight.T + bias) for a 2-D x (M, K) of any strides, weight (N, K) and bias (N,)
    or None, all of one dtype on one device; returns a contiguous (M, N) tensor."""
    return _forward(x, weight, bias, "relu", 0.0, "bigmodel linear_relu forward")[0]


def linear_relu_bwd(grad, out, x, weight, output_mask):
    """(dx, dw, db) for y = relu(x W^T + b), from grad_output and output (M, N), x (M, K) and
    weight (N, K); gradients not asked for in output_mask come back empty."""
    _check_bwd(grad, out, "output", x, weight, output_mask, "bigmodel linear_relu backward")
    return _backward(grad, out, x, weight, output_mask, "relu", 0.0)


def fused_linear_fwd(x, weight, bias, act, negative_slope, keep_pre=True):
    """(y, pre) for y = act(x @ weight.T + bias), ``act`` one of ACTIVATIONS (``negative_slope``
    is LeakyReLU's); x (M, K) of any strides, weight (N, K), bias (N,) or None, one dtype on one
    device. ``pre`` is z = x W^T + b, contiguous (M, N), where saves_pre_activation says the
    backward needs it and ``keep_pre`` is set, else an empty tensor (and not stored)."""
    where = f"bigmodel fused_linear forward ({act})"
    _check_act(act, where)
    return _forward(x, weight, bias, act, negative_slope, where, keep_pre)


def fused_linear_bwd(grad, out, pre, x, weight, act, negative_slope, output_mask):
    """(dx, dw, db) for y = act(x W^T + b) from grad_output, the output and what fused_linear_fwd
    returned as ``pre`` (read instead of the output where saves_pre_activation); gradients not
    asked for in output_mask come back empty."""
    where = f"bigmodel fused_linear backward ({act})"
    _check_act(act, where)
    saved, name = (pre, "pre") if saves_pre_activation(act, negative_slope) else (out, "output")
    _check_bwd(grad, saved, name, x, weight, output_mask, where)
    return _backward(grad, saved, x, weight, output_mask, act, negative_slope)
