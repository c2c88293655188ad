"""Triton kernels for softmax(Q K^T * scale + mask) V, forward and backward (FlashAttention-2).

Forward: one program per (query block, batch*head). It streams key/value blocks through an
online softmax in fp32, with the scale folded into log2 units so every exponential is an exp2,
and writes the output once plus the row logsumexp (natural log; +inf for a row that sees no
key, so the backward's exp(s - lse) is 0 there).
Backward: a preprocess computing delta = rowsum(dO * O); a dK/dV kernel over key blocks (each
program loops over the query heads of its GQA group and over the query blocks); a dQ kernel
over query blocks. Each output element has exactly one writer: no atomics, deterministic.
Causal blocks above the diagonal are skipped; the per-element masks (causal, sequence edges)
run only on the blocks that straddle them. Head dims are padded to a power of two inside the
kernels (masked loads), never in memory. Dropout regenerates its keep mask from Philox
counters (seed, offset + index of (b, h, i, j)), so the backward sees the forward's mask.
Hopper variants (kernels/_hopper.py): every kernel also has configs with TMA = True, which
read and write their Q/K/V/dO/O/dQ/dK/dV tiles through tensor descriptors (the TMA copy
engine zero-fills past the bounds, as the masked loads do); the forward's WS = True configs
also warp-specialise its key loop. Triton's Hopper warp specialisation takes one loop per
kernel, so that forward runs every key block through the per-element masks (no split into
unmasked and diagonal blocks), and it compiles only for 16-bit inputs without an attn_mask (the
pruner offers it nowhere else). The variants share every line of the scores, masks, dropout
and softmax with the pointer kernels, so the contract is the same by construction; the
autotuner measures both families on sm_90.
Configs are autotuned per power-of-two length bucket; BIGMODEL_AUTOTUNE=0 takes the preferred
config that fits instead (tests). Only kernels and their launch configs live here; autograd is
in bigmodel/ops/attention.py.
"""
import os

import torch
import triton
import triton.language as tl

from bigmodel.kernels import _hopper
from bigmodel.kernels._common import DTYPES, INTERPRETED, LOG2E, SMEM_LIMIT, dot_precision

MAX_HEAD_DIM = 256

# sm_90 configs of the pointer kernels: (BLOCK_M, BLOCK_N, num_warps, num_stages, max_d16), pruned
# per dtype and head dim by the shared memory their pipelines need (fp32 tiles are twice as
# large). BLOCK_M is the query tile and BLOCK_N the key tile in every kernel; the first that
# fits is the preferred one (BIGMODEL_AUTOTUNE=0). max_d16: the largest padded head dim up to
# 128 at which the config compiles without spills and with every 16-bit dot on wgmma
# (bench/results/sm90_static.md, both Tritons); 16-bit launches at head dims up to 128 are
# offered only such configs (0: none; above 128 every config that fits is offered).
FWD_SHAPES = [
    (128, 128, 8, 3, 128), (128, 128, 8, 2, 128), (128, 64, 8, 3, 128), (128, 64, 4, 3, 64),
    (64, 64, 4, 3, 128), (64, 32, 4, 2, 128),
]
# dK/dV: a key tile stays while query tiles stream past it. Its two fp32 accumulators
# (BLOCK_N x head dim each) leave room for only small query tiles at head dim 128.
BWD_DKDV_SHAPES = [
    (32, 128, 8, 2, 64), (32, 64, 8, 2, 128), (16, 128, 8, 2, 128), (32, 64, 4, 2, 64), (16, 64, 4, 2, 64),
    (16, 32, 4, 1, 0),
]
# dQ: a query tile stays while key tiles stream.
BWD_DQ_SHAPES = [
    (128, 64, 8, 2, 128), (128, 32, 8, 2, 128), (64, 64, 4, 2, 128), (64, 32, 4, 2, 128), (32, 32, 4, 1, 0),
]
# The Hopper variants: (BLOCK_M, BLOCK_N, num_warps, num_stages, warp-specialised, max_d16).
# Triton's Hopper warp specialisation runs two consumer warp groups of num_warps = 4 each plus
# a producer group (12 warps in all); it leaves num_warps = 8 loops unspecialised.
HOPPER_FWD_SHAPES = [
    (128, 128, 4, 2, True, 128), (128, 64, 4, 3, True, 128), (128, 128, 8, 2, False, 128),
    (128, 64, 8, 3, False, 128),
]
HOPPER_DKDV_SHAPES = [
    (64, 128, 8, 2, False, 64), (32, 128, 8, 2, False, 64), (32, 64, 8, 2, False, 128), (16, 128, 8, 2, False, 128),
]
HOPPER_DQ_SHAPES = [(128, 64, 8, 2, False, 128), (64, 64, 4, 2, False, 128)]
# Under the interpreter: one small tile each (autotuning there would only multiply CI time),
# with BLOCK_M != BLOCK_N so the diagonal and edge logic sees unequal tiles; its Hopper configs
# only run when BIGMODEL_TRITON_VARIANT asks for them (tests).
INTERP_FWD, INTERP_DKDV, INTERP_DQ = (32, 16, 4, 1, 128), (16, 32, 4, 1, 128), (32, 16, 4, 1, 128)
_PRE_BLOCK_M = 64


_SHAPES = {  # kernel -> (pointer shapes, Hopper shapes, the interpreter's tile)
    "fwd": (FWD_SHAPES, HOPPER_FWD_SHAPES, INTERP_FWD),
    "dkdv": (BWD_DKDV_SHAPES, HOPPER_DKDV_SHAPES, INTERP_DKDV),
    "dq": (BWD_DQ_SHAPES, HOPPER_DQ_SHAPES, INTERP_DQ),
}


def _config_list(shapes, hopper_shapes):
    configs = []
    for bm, bn, w, s, ws, max_d16 in hopper_shapes:
        configs.append(triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, TMA=True, WS=ws), num_warps=w, num_stages=s))
        _MAX_D16[_shape(configs[-1])] = max_d16
    for bm, bn, w, s, max_d16 in shapes:
        configs.append(triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, TMA=False, WS=False), num_warps=w, num_stages=s))
        _MAX_D16[_shape(configs[-1])] = max_d16
    return configs


_MAX_D16 = {}


def _shape(config):
    k = config.kwargs
    return k["BLOCK_M"], k["BLOCK_N"], config.num_warps, config.num_stages, k["TMA"], k["WS"]


def sm90_configs(kernel):
    """Every config ``kernel`` ('fwd', 'dkdv' or 'dq') may run on a GPU, Hopper variants first
    (what bench/sm90.py compiles and inspects)."""
    shapes, hopper_shapes, _ = _SHAPES[kernel]
    return _config_list(shapes, hopper_shapes)


def _configs(kernel):
    # The autotuner's candidates. Under the interpreter: its one tile, in each Hopper flavour
    # the kernel has (warp-specialised first).
    shapes, hopper_shapes, interp = _SHAPES[kernel]
    if INTERPRETED:
        shapes = [interp]
        flavours = sorted({shape[4] for shape in hopper_shapes}, reverse=True)
        hopper_shapes = [interp[:4] + (ws, interp[4]) for ws in flavours]
    return _hopper.supported(kernel, _config_list(shapes, hopper_shapes))


def smem_estimate(kernel, config, elt_size, block_d, block_dv, mask_elt=0):
    """Bytes of shared memory a config needs: the tiles that stay resident plus num_stages
    copies of the tiles that stream (the software pipeline's buffers), the attn_mask tile
    (``mask_elt`` bytes an element, 0 without a mask) included. Checked against the compiler's
    own numbers by tests/test_attention_aot.py."""
    bm, bn, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
    if kernel == "fwd":  # Q stays; K and V stream
        tiles = bm * block_d + stages * bn * (block_d + block_dv)
    elif kernel == "dkdv":  # K, V stay; Q and dO stream (plus the P^T / dS^T tiles for the dots)
        tiles = bn * (block_d + block_dv) + stages * bm * (block_d + block_dv) + 2 * bm * bn
    else:  # dq: Q, dO stay; K and V stream (plus the dS tile)
        tiles = bm * (block_d + block_dv) + stages * bn * (block_d + block_dv) + bm * bn
    return tiles * elt_size + stages * bm * bn * mask_elt


# fp32 without tf32 runs its dots on the FMA units: small tiles only (big ones compile for
# minutes and gain nothing there).
_IEEE_FP32_MAX_BLOCK = 64


def prune(kernel, configs, elt_size, block_d, block_dv, mask_elt=0, precision="ieee", family="all"):
    """The configs of ``family`` (kernels/_hopper.py's select) that fit in shared memory for
    these tiles and, in 16-bit up to head dim 128, compile without spills and with wgmma dots
    (max_d16 above); the family's smallest one if none does. The warp-specialised forward
    takes 16-bit inputs without an attn_mask only: Triton 3.6 and 3.8 fail to compile it with
    the mask's pointer loads in its loop, or with fp32 dots."""
    configs = _hopper.select(configs, family, warp_specialize=elt_size == 2 and not mask_elt)
    if elt_size == 4 and precision == "ieee":
        configs = [c for c in configs
                   if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= _IEEE_FP32_MAX_BLOCK] or configs
    fit = [c for c in configs if smem_estimate(kernel, c, elt_size, block_d, block_dv, mask_elt) <= SMEM_LIMIT]
    d = max(block_d, block_dv)
    kept = [c for c in fit if elt_size != 2 or d > 128 or d <= _MAX_D16.get(_shape(c), 128)]
    return kept or fit[-1:] or configs[-1:]


def _pruner(kernel):
    def early_config_prune(configs, named_args, **kwargs):
        elt = named_args["q_ptr"].element_size()
        mask_elt = (0, 1, elt)[kwargs["MASK_KIND"]]
        kept = prune(kernel, configs, elt, kwargs["BLOCK_D"], kwargs["BLOCK_DV"], mask_elt, kwargs["PRECISION"],
                     kwargs.get("VARIANTS", "plain"))
        # BIGMODEL_AUTOTUNE=0: take the first (preferred) config that fits, with no benchmarking;
        # for test runs, where every new shape would otherwise compile every config.
        return kept[:1] if os.environ.get("BIGMODEL_AUTOTUNE", "1") == "0" else kept

    return early_config_prune


_KEY = ["L_BUCKET", "S_BUCKET", "GROUP", "BLOCK_D", "BLOCK_DV", "MASK_KIND", "IS_CAUSAL", "DROPOUT", "PRECISION",
        "VARIANTS"]


@triton.jit
def _load_2d(base, rows, cols, stride_r, stride_c, n_rows, n_cols,
             CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    # A (len(rows), len(cols)) tile with zeros outside the bounds; the bounds checks the
    # caller knows to be true are left out at compile time.
    ptrs = base + rows[:, None].to(tl.int64) * stride_r + cols[None, :].to(tl.int64) * stride_c
    if CHECK_ROWS and CHECK_COLS:
        x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif CHECK_ROWS:
        x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _source(base, n_rows, n_cols, stride_r, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TMA: tl.constexpr):
    # Where a kernel reads (or writes) an (n_rows, n_cols) matrix: a tensor descriptor for
    # (BLOCK_R, BLOCK_C) tiles (the launcher checked the unit last stride and 16-byte
    # alignment TMA needs), or just its base pointer. Only the branch taken is compiled.
    if TMA:
        src = tl.make_tensor_descriptor(base, shape=[n_rows, n_cols], strides=[stride_r, 1],
                                        block_shape=[BLOCK_R, BLOCK_C])
    else:
        src = base
    return src


@triton.jit
def _load_tile(src, start, rows, cols, stride_r, stride_c, n_rows, n_cols,
               CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr, TMA: tl.constexpr):
    # The tile whose first row is `start` (rows = start + arange): a TMA copy, which zero-fills
    # past the bounds just as the masked load does, or that masked load.
    if TMA:
        x = src.load([start, 0])
    else:
        x = _load_2d(src, rows, cols, stride_r, stride_c, n_rows, n_cols, CHECK_ROWS, CHECK_COLS)
    return x


@triton.jit
def _store_tile(dst, x, start, rows, cols, stride_r, stride_c, n_rows, n_cols, TMA: tl.constexpr):
    # x converted to the destination's dtype; a TMA store clips at the bounds as the mask does.
    if TMA:
        dst.store([start, 0], x.to(dst.dtype))
    else:
        ptrs = dst + rows[:, None].to(tl.int64) * stride_r + cols[None, :] * stride_c
        tl.store(ptrs, x.to(dst.dtype.element_ty), mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def _masked_scores(s, mask_base, rows, cols, L, S, stride_mm, stride_mn,
                   MASK_KIND: tl.constexpr, CAUSAL_EDGE: tl.constexpr, S_EDGE: tl.constexpr):
    # s: scores in log2 units, laid out (rows, cols) (the caller may pass transposed index
    # vectors to get an S^T tile). Hidden entries become -inf, which also drops a NaN there:
    # a hidden key must not leak into the output.
    if MASK_KIND == 1:  # bool, True = attend
        inb = (rows < L) & (cols < S)
        keep = tl.load(mask_base + rows.to(tl.int64) * stride_mm + cols.to(tl.int64) * stride_mn,
                       mask=inb, other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    elif MASK_KIND == 2:  # additive, in natural-log units
        inb = (rows < L) & (cols < S)
        add = tl.load(mask_base + rows.to(tl.int64) * stride_mm + cols.to(tl.int64) * stride_mn,
                      mask=inb, other=0.0)
        s = s + add.to(tl.float32) * 1.4426950408889634
    if CAUSAL_EDGE:
        s = tl.where(cols <= rows, s, float("-inf"))
    if S_EDGE:
        s = tl.where(cols < S, s, float("-inf"))
    return s


@triton.jit
def _keep(seed, rng_base, rows, cols, S, dropout_p):
    # Philox counter = offset + ((b * H + h) * L + i) * S + j: one number per (b, h, i, j), the
    # same whichever tile shape or kernel asks for it.
    return tl.rand(seed, rng_base + rows.to(tl.int64) * S + cols) >= dropout_p


@triton.jit
def _query_block_ids(L, H, GROUP, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr):
    # 1-D grid over (b, h, query block): the query blocks of one (b, h) are neighbours (they
    # share K/V in L2); causal runs the longest rows first so the tail of the launch is short.
    # Returns the query block and the int64 batch, query head and kv head (GQA) indices.
    pid = tl.program_id(0)
    num_m = tl.cdiv(L, BLOCK_M)
    pid_m = pid % num_m
    if IS_CAUSAL:
        pid_m = num_m - 1 - pid_m
    bh = pid // num_m
    h = bh % H
    return pid_m, (bh // H).to(tl.int64), h.to(tl.int64), (h // GROUP).to(tl.int64)


@triton.jit
def _key_range(start_m, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    # For the query block at start_m: key blocks [0, full_hi) need no per-element mask;
    # [full_hi, hi) straddle the diagonal or the end of the keys. Causal skips every block
    # right of hi.
    s_full = (S // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, S)
        full_hi = tl.minimum((start_m // BLOCK_N) * BLOCK_N, s_full)
    else:
        hi = S
        full_hi = s_full
    return full_hi, hi


@triton.jit
def _fwd_step(acc, m_i, l_i, q, k_src, v_src, mask_base, start_n, offs_m, offs_n, offs_d, offs_dv,
              L, S, E, EV, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
              qk_scale, dropout_p, seed, rng_base,
              MASK_KIND: tl.constexpr, CAUSAL_EDGE: tl.constexpr, S_EDGE: tl.constexpr,
              DROPOUT: tl.constexpr, PRECISION: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
              TMA: tl.constexpr):
    cols = start_n + offs_n
    k = _load_tile(k_src, start_n, cols, offs_d, stride_kn, stride_kd, S, E, S_EDGE, not EVEN_D, TMA)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = _masked_scores(s, mask_base, offs_m[:, None], cols[None, :], L, S, stride_mm, stride_mn,
                       MASK_KIND, CAUSAL_EDGE, S_EDGE)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing visible yet keeps m = -inf; subtract 0 there so exp2 gives 0, not NaN.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DROPOUT:  # the softmax normaliser counts every key; only P V sees the dropout
        p = tl.where(_keep(seed, rng_base, offs_m[:, None], cols[None, :], S, dropout_p), p, 0.0)
    v = _load_tile(v_src, start_n, cols, offs_dv, stride_vn, stride_vd, S, EV, S_EDGE, not EVEN_DV, TMA)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _fwd_blocks(acc, m_i, l_i, q, k_src, v_src, mask_base, lo, hi, offs_m, offs_n, offs_d, offs_dv,
                L, S, E, EV, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                qk_scale, dropout_p, seed, rng_base,
                MASK_KIND: tl.constexpr, CAUSAL_EDGE: tl.constexpr, S_EDGE: tl.constexpr,
                DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr):
    # Two spellings of one loop: a Triton without warp specialisation never compiles the first.
    if WS:
        for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_src, v_src, mask_base, start_n, offs_m, offs_n, offs_d,
                                      offs_dv, L, S, E, EV, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm,
                                      stride_mn, qk_scale, dropout_p, seed, rng_base, MASK_KIND, CAUSAL_EDGE,
                                      S_EDGE, DROPOUT, PRECISION, EVEN_D, EVEN_DV, TMA)
    else:
        for start_n in tl.range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_src, v_src, mask_base, start_n, offs_m, offs_n, offs_d,
                                      offs_dv, L, S, E, EV, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm,
                                      stride_mn, qk_scale, dropout_p, seed, rng_base, MASK_KIND, CAUSAL_EDGE,
                                      S_EDGE, DROPOUT, PRECISION, EVEN_D, EVEN_DV, TMA)
    return acc, m_i, l_i


@triton.autotune(configs=_configs("fwd"), key=_KEY,
                 prune_configs_by={"early_config_prune": _pruner("fwd")})
@triton.jit
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    H, GROUP, L, S, E, EV, L_BUCKET, S_BUCKET,
    qk_scale, dropout_p, seed, rng_offset,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, VARIANTS: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr,
):
    pid_m, b, h, hkv = _query_block_ids(L, H, GROUP, BLOCK_M, IS_CAUSAL)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_src = _source(q_ptr + b * stride_qb + h * stride_qh, L, E, stride_qm, BLOCK_M, BLOCK_D, TMA)
    k_src = _source(k_ptr + b * stride_kb + hkv * stride_kh, S, E, stride_kn, BLOCK_N, BLOCK_D, TMA)
    v_src = _source(v_ptr + b * stride_vb + hkv * stride_vh, S, EV, stride_vn, BLOCK_N, BLOCK_DV, TMA)
    mask_base = mask_ptr + b * stride_mb + h * stride_mh
    rng_base = rng_offset + (b * H + h) * L * S

    q = _load_tile(q_src, start_m, offs_m, offs_d, stride_qm, stride_qd, L, E, True, not EVEN_D, TMA)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)

    full_hi, hi = _key_range(start_m, S, BLOCK_M, BLOCK_N, IS_CAUSAL)
    if WS:
        # Triton's Hopper warp specialisation handles one loop per kernel: every block takes
        # the per-element masks (a select per score; the dots dominate).
        acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_src, v_src, mask_base, 0, hi, offs_m, offs_n,
                                    offs_d, offs_dv, L, S, E, EV, stride_kn, stride_kd, stride_vn, stride_vd,
                                    stride_mm, stride_mn, qk_scale, dropout_p, seed, rng_base,
                                    MASK_KIND, IS_CAUSAL, True, DROPOUT, PRECISION, BLOCK_N, EVEN_D, EVEN_DV, TMA,
                                    True)
    else:
        acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_src, v_src, mask_base, 0, full_hi, offs_m, offs_n,
                                    offs_d, offs_dv, L, S, E, EV, stride_kn, stride_kd, stride_vn, stride_vd,
                                    stride_mm, stride_mn, qk_scale, dropout_p, seed, rng_base,
                                    MASK_KIND, False, False, DROPOUT, PRECISION, BLOCK_N, EVEN_D, EVEN_DV, TMA, False)
        acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_src, v_src, mask_base, full_hi, hi, offs_m, offs_n,
                                    offs_d, offs_dv, L, S, E, EV, stride_kn, stride_kd, stride_vn, stride_vd,
                                    stride_mm, stride_mn, qk_scale, dropout_p, seed, rng_base,
                                    MASK_KIND, IS_CAUSAL, True, DROPOUT, PRECISION, BLOCK_N, EVEN_D, EVEN_DV, TMA,
                                    False)

    # A row that saw no key: output 0 and lse = +inf (exp(s - lse) = 0 in the backward).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    out = tl.where(empty[:, None], 0.0, out)
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_dst = _source(out_ptr + b * stride_ob + h * stride_oh, L, EV, stride_om, BLOCK_M, BLOCK_DV, TMA)
    _store_tile(o_dst, out, start_m, offs_m, offs_dv, stride_om, stride_od, L, EV, TMA)
    tl.store(lse_ptr + (b * H + h) * L + offs_m, lse, mask=offs_m < L)


@triton.jit
def _attention_bwd_preprocess_kernel(
    out_ptr, do_ptr, delta_ptr,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    H, L, EV, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # delta_i = sum_e dO[i, e] * O[i, e] = sum_j P_ij dP_ij (the softmax backward's row term).
    pid = tl.program_id(0)
    num_m = tl.cdiv(L, BLOCK_M)
    bh = pid // num_m
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    o = _load_2d(out_ptr + b * stride_ob + h * stride_oh, offs_m, offs_dv, stride_om, stride_od, L, EV, True, True)
    do = _load_2d(do_ptr + b * stride_gb + h * stride_gh, offs_m, offs_dv, stride_gm, stride_gd, L, EV, True, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + (b * H + h) * L + offs_m, delta, mask=offs_m < L)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_src, do_src, lse_base, delta_base, mask_base, lo, hi, cols, offs_m,
                 offs_d, offs_dv, L, S, E, EV, stride_qm, stride_qd, stride_gm, stride_gd, stride_mm, stride_mn,
                 qk_scale, dropout_p, seed, rng_base,
                 MASK_KIND: tl.constexpr, CAUSAL_EDGE: tl.constexpr, DROPOUT: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
                 TMA: tl.constexpr):
    # Works on transposed tiles (keys x queries) so dK and dV come out of plain dots.
    for start_m in tl.range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = _load_tile(q_src, start_m, rows, offs_d, stride_qm, stride_qd, L, E, True, not EVEN_D, TMA)
        do = _load_tile(do_src, start_m, rows, offs_dv, stride_gm, stride_gd, L, EV, True, not EVEN_DV, TMA)
        # Rows past L read lse = +inf: their probabilities are exactly 0.
        lse = tl.load(lse_base + rows, mask=rows < L, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=rows < L, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        st = _masked_scores(st, mask_base, rows[None, :], cols[:, None], L, S, stride_mm, stride_mn,
                            MASK_KIND, CAUSAL_EDGE, False)
        pt = tl.math.exp2(st - lse[None, :])
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if DROPOUT:
            keep = _keep(seed, rng_base, rows[None, :], cols[:, None], S, dropout_p)
            inv = 1.0 / (1.0 - dropout_p)
            dv = tl.dot(tl.where(keep, pt * inv, 0.0).to(do.dtype), do, dv, input_precision=PRECISION)
            dpt = tl.where(keep, dpt * inv, 0.0)
        else:
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=_configs("dkdv"), key=_KEY,
                 prune_configs_by={"early_config_prune": _pruner("dkdv")})
@triton.jit
def _attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, GROUP, L, S, E, EV, L_BUCKET, S_BUCKET,
    qk_scale, sm_scale, dropout_p, seed, rng_offset,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, VARIANTS: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(S, BLOCK_N)
    HKV = H // GROUP
    bh = pid // num_n
    b = (bh // HKV).to(tl.int64)
    hkv = (bh % HKV).to(tl.int64)
    start_n = (pid % num_n) * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    k_src = _source(k_ptr + b * stride_kb + hkv * stride_kh, S, E, stride_kn, BLOCK_N, BLOCK_D, TMA)
    v_src = _source(v_ptr + b * stride_vb + hkv * stride_vh, S, EV, stride_vn, BLOCK_N, BLOCK_DV, TMA)
    k = _load_tile(k_src, start_n, cols, offs_d, stride_kn, stride_kd, S, E, True, not EVEN_D, TMA)
    v = _load_tile(v_src, start_n, cols, offs_dv, stride_vn, stride_vd, S, EV, True, not EVEN_DV, TMA)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)

    # Query blocks [lo, mid) straddle the diagonal; [mid, L) see the whole key block. Blocks
    # before lo are above the diagonal (every i < every j) and are skipped.
    if IS_CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, L)
        mid = tl.maximum(mid, lo)
    else:
        lo = 0
        mid = 0
    # The query heads of this key/value head's group, one after another: each dK/dV element has
    # one writer, so the sum over the group is deterministic.
    for g in range(GROUP):
        h = hkv * GROUP + g
        q_src = _source(q_ptr + b * stride_qb + h * stride_qh, L, E, stride_qm, BLOCK_M, BLOCK_D, TMA)
        do_src = _source(do_ptr + b * stride_gb + h * stride_gh, L, EV, stride_gm, BLOCK_M, BLOCK_DV, TMA)
        lse_base = lse_ptr + (b * H + h) * L
        delta_base = delta_ptr + (b * H + h) * L
        mask_base = mask_ptr + b * stride_mb + h * stride_mh
        rng_base = rng_offset + (b * H + h) * L * S
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_src, do_src, lse_base, delta_base, mask_base, lo, mid, cols,
                              offs_m, offs_d, offs_dv, L, S, E, EV, stride_qm, stride_qd, stride_gm, stride_gd,
                              stride_mm, stride_mn, qk_scale, dropout_p, seed, rng_base,
                              MASK_KIND, IS_CAUSAL, DROPOUT, PRECISION, BLOCK_M, EVEN_D, EVEN_DV, TMA)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_src, do_src, lse_base, delta_base, mask_base, mid, L, cols,
                              offs_m, offs_d, offs_dv, L, S, E, EV, stride_qm, stride_qd, stride_gm, stride_gd,
                              stride_mm, stride_mn, qk_scale, dropout_p, seed, rng_base,
                              MASK_KIND, False, DROPOUT, PRECISION, BLOCK_M, EVEN_D, EVEN_DV, TMA)
    dk_dst = _source(dk_ptr + b * stride_dkb + hkv * stride_dkh, S, E, stride_dkn, BLOCK_N, BLOCK_D, TMA)
    dv_dst = _source(dv_ptr + b * stride_dvb + hkv * stride_dvh, S, EV, stride_dvn, BLOCK_N, BLOCK_DV, TMA)
    _store_tile(dk_dst, dk * sm_scale, start_n, cols, offs_d, stride_dkn, stride_dkd, S, E, TMA)
    _store_tile(dv_dst, dv, start_n, cols, offs_dv, stride_dvn, stride_dvd, S, EV, TMA)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_src, v_src, mask_base, lo, hi, offs_m, offs_n, offs_d, offs_dv,
               L, S, E, EV, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
               qk_scale, dropout_p, seed, rng_base,
               MASK_KIND: tl.constexpr, CAUSAL_EDGE: tl.constexpr, S_EDGE: tl.constexpr,
               DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
               EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, TMA: tl.constexpr):
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_src, start_n, cols, offs_d, stride_kn, stride_kd, S, E, S_EDGE, not EVEN_D, TMA)
        v = _load_tile(v_src, start_n, cols, offs_dv, stride_vn, stride_vd, S, EV, S_EDGE, not EVEN_DV, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = _masked_scores(s, mask_base, offs_m[:, None], cols[None, :], L, S, stride_mm, stride_mn,
                           MASK_KIND, CAUSAL_EDGE, S_EDGE)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = _keep(seed, rng_base, offs_m[:, None], cols[None, :], S, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.autotune(configs=_configs("dq"), key=_KEY,
                 prune_configs_by={"early_config_prune": _pruner("dq")})
@triton.jit
def _attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, GROUP, L, S, E, EV, L_BUCKET, S_BUCKET,
    qk_scale, sm_scale, dropout_p, seed, rng_offset,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, VARIANTS: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr,
):
    pid_m, b, h, hkv = _query_block_ids(L, H, GROUP, BLOCK_M, IS_CAUSAL)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_src = _source(q_ptr + b * stride_qb + h * stride_qh, L, E, stride_qm, BLOCK_M, BLOCK_D, TMA)
    do_src = _source(do_ptr + b * stride_gb + h * stride_gh, L, EV, stride_gm, BLOCK_M, BLOCK_DV, TMA)
    q = _load_tile(q_src, start_m, offs_m, offs_d, stride_qm, stride_qd, L, E, True, not EVEN_D, TMA)
    do = _load_tile(do_src, start_m, offs_m, offs_dv, stride_gm, stride_gd, L, EV, True, not EVEN_DV, TMA)
    lse = tl.load(lse_ptr + (b * H + h) * L + offs_m, mask=offs_m < L, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + (b * H + h) * L + offs_m, mask=offs_m < L, other=0.0)
    k_src = _source(k_ptr + b * stride_kb + hkv * stride_kh, S, E, stride_kn, BLOCK_N, BLOCK_D, TMA)
    v_src = _source(v_ptr + b * stride_vb + hkv * stride_vh, S, EV, stride_vn, BLOCK_N, BLOCK_DV, TMA)
    mask_base = mask_ptr + b * stride_mb + h * stride_mh
    rng_base = rng_offset + (b * H + h) * L * S
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    full_hi, hi = _key_range(start_m, S, BLOCK_M, BLOCK_N, IS_CAUSAL)
    dq = _dq_blocks(dq, q, do, lse, delta, k_src, v_src, mask_base, 0, full_hi, offs_m, offs_n, offs_d,
                    offs_dv, L, S, E, EV, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                    qk_scale, dropout_p, seed, rng_base, MASK_KIND, False, False, DROPOUT, PRECISION, BLOCK_N,
                    EVEN_D, EVEN_DV, TMA)
    dq = _dq_blocks(dq, q, do, lse, delta, k_src, v_src, mask_base, full_hi, hi, offs_m, offs_n, offs_d,
                    offs_dv, L, S, E, EV, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                    qk_scale, dropout_p, seed, rng_base, MASK_KIND, IS_CAUSAL, True, DROPOUT, PRECISION, BLOCK_N,
                    EVEN_D, EVEN_DV, TMA)
    dq_dst = _source(dq_ptr + b * stride_dqb + h * stride_dqh, L, E, stride_dqm, BLOCK_M, BLOCK_D, TMA)
    _store_tile(dq_dst, dq * sm_scale, start_m, offs_m, offs_d, stride_dqm, stride_dqd, L, E, TMA)


# ---------------------------------------------------------------------------------------------
# Launchers.


@triton.jit
def _dropout_keep_kernel(keep_ptr, total, dropout_p, seed, rng_offset, BLOCK: tl.constexpr):
    # The keep mask the attention kernels use, materialised (for tests and debugging only):
    # element (bh, i, j) of a contiguous (B * H, L, S) tensor has counter offset + its index.
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = tl.rand(seed, rng_offset + idx) >= dropout_p
    tl.store(keep_ptr + idx, keep, mask=idx < total)


def _block_dim(n):
    # tl.dot needs at least 16 along the reduction; pad to the next power of two inside the kernel.
    return max(16, triton.next_power_of_2(n))


def _head_dims(e, ev):
    bd, bdv = _block_dim(e), _block_dim(ev)
    return dict(BLOCK_D=bd, BLOCK_DV=bdv, EVEN_D=bd == e, EVEN_DV=bdv == ev)


def _bucket(n):
    # Autotune per power-of-two length bucket, not per length.
    return max(16, triton.next_power_of_2(max(n, 1)))


def _mask_kind(mask):
    return 0 if mask is None else (1 if mask.dtype == torch.bool else 2)


def _check(q, k, v, mask, where):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{where}: expected 4-D (B, H, L, E) tensors; got query {tuple(q.shape)}, "
                         f"key {tuple(k.shape)}, value {tuple(v.shape)}")
    B, H, L, E = q.shape
    HKV, S = k.shape[1], k.shape[2]
    shapes = f"query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)}"
    if k.shape[0] != B or v.shape[0] != B or k.shape[3] != E or tuple(v.shape[1:3]) != (HKV, S):
        raise ValueError(f"{where}: inconsistent shapes {shapes}")
    if HKV == 0 or H % HKV != 0:
        raise ValueError(f"{where}: query heads ({H}) must be a multiple of key/value heads ({HKV}); got {shapes}")
    if E > MAX_HEAD_DIM or v.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"{where}: head dims up to {MAX_HEAD_DIM} are supported; got {shapes}")
    if k.dtype != q.dtype or v.dtype != q.dtype or q.dtype not in DTYPES:
        raise TypeError(f"{where}: query, key and value must share one of float16, bfloat16, float32; got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("key", k), ("value", v), ("attn_mask", mask)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{where}: {name} is on {t.device} but query is on {q.device}")
    if mask is not None:
        if tuple(mask.shape) != (B, H, L, S):
            raise ValueError(f"{where}: attn_mask must have shape {(B, H, L, S)} (expand it); got {tuple(mask.shape)}")
        if mask.dtype != torch.bool and mask.dtype != q.dtype:
            raise TypeError(f"{where}: attn_mask must be bool or {q.dtype}; got {mask.dtype}")
    return B, H, HKV, L, S, E, v.shape[3]


def _rng(dropout_p, rng_seed, where):
    if not dropout_p:
        return 0, 0
    if rng_seed is None or rng_seed.numel() != 2:
        raise ValueError(f"{where}: dropout_p > 0 needs rng_seed, an int64 tensor (seed, offset)")
    seed, offset = (int(x) for x in rng_seed.tolist())
    return seed, offset


def _variants(where, tensors):
    # The config family the autotuner may pick from (kernels/_hopper.py); descriptor-based
    # variants write their scratch descriptors through triton's allocator.
    family = _hopper.family(where, tensors)
    if family != "plain":
        _hopper.ensure_allocator()
    return family


def _mask_args(mask, q):
    if mask is None:
        return q, (0, 0, 0, 0)  # never read: MASK_KIND = 0
    return mask, mask.stride()


def attention_fwd(q, k, v, mask, dropout_p, is_causal, scale, rng_seed):
    """(out, lse) for 4-D q (B, H, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev) of any strides;
    out is a contiguous (B, H, L, Ev) tensor of q's dtype, lse float32 (B, H, L)."""
    B, H, HKV, L, S, E, EV = _check(q, k, v, mask, "bigmodel attention forward")
    out = torch.empty((B, H, L, EV), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, L), device=q.device, dtype=torch.float32)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if S == 0:  # no key at all: every row is fully masked
        return out.zero_(), lse.fill_(float("inf"))
    seed, offset = _rng(dropout_p, rng_seed, "bigmodel attention forward")
    mask_t, mstr = _mask_args(mask, q)
    variants = _variants("bigmodel attention forward", (q, k, v, out))

    def grid(meta):
        return (triton.cdiv(L, meta["BLOCK_M"]) * B * H,)

    _attention_fwd_kernel[grid](
        q, k, v, mask_t, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *mstr, *out.stride(),
        H, H // HKV, L, S, E, EV, _bucket(L), _bucket(S),
        scale * LOG2E, float(dropout_p), seed, offset,
        MASK_KIND=_mask_kind(mask), IS_CAUSAL=bool(is_causal), DROPOUT=bool(dropout_p),
        PRECISION=dot_precision(q.dtype), VARIANTS=variants, **_head_dims(E, EV),
    )
    return out, lse


def attention_bwd(grad_out, q, k, v, out, lse, mask, dropout_p, is_causal, scale, rng_seed):
    """(dq, dk, dv), contiguous, with the shapes and dtypes of q, k, v (dk, dv summed over the
    query heads of each GQA group)."""
    where = "bigmodel attention backward"
    B, H, HKV, L, S, E, EV = _check(q, k, v, mask, where)
    if tuple(grad_out.shape) != (B, H, L, EV):
        raise ValueError(f"{where}: grad_out must have shape {(B, H, L, EV)}; got {tuple(grad_out.shape)}")
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    if B * H == 0:
        return dq, dk, dv
    if L == 0 or S == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    seed, offset = _rng(dropout_p, rng_seed, where)
    mask_t, mstr = _mask_args(mask, q)
    lse = lse.contiguous()  # the kernels index it as (B, H, L); a no-op for the forward's own
    block_dv = _block_dim(EV)
    delta = torch.empty((B, H, L), device=q.device, dtype=torch.float32)
    _attention_bwd_preprocess_kernel[(triton.cdiv(L, _PRE_BLOCK_M) * B * H,)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), H, L, EV,
        BLOCK_M=_PRE_BLOCK_M, BLOCK_DV=block_dv,
    )
    common = dict(MASK_KIND=_mask_kind(mask), IS_CAUSAL=bool(is_causal), DROPOUT=bool(dropout_p),
                  PRECISION=dot_precision(q.dtype), VARIANTS=_variants(where, (q, k, v, grad_out, dq, dk, dv)),
                  **_head_dims(E, EV))
    sizes = (H, H // HKV, L, S, E, EV, _bucket(L), _bucket(S), scale * LOG2E, scale, float(dropout_p), seed, offset)

    def grid_dkdv(meta):
        return (triton.cdiv(S, meta["BLOCK_N"]) * B * HKV,)

    _attention_bwd_dkdv_kernel[grid_dkdv](
        q, k, v, mask_t, grad_out, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *mstr, *grad_out.stride(), *dk.stride(), *dv.stride(),
        *sizes, **common,
    )

    def grid_dq(meta):
        return (triton.cdiv(L, meta["BLOCK_M"]) * B * H,)

    _attention_bwd_dq_kernel[grid_dq](
        q, k, v, mask_t, grad_out, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *mstr, *grad_out.stride(), *dq.stride(),
        *sizes, **common,
    )
    return dq, dk, dv


def dropout_keep_mask(batch_heads, L, S, dropout_p, rng_seed, device):
    """The bool keep mask (batch_heads, L, S) the kernels draw for ``rng_seed`` (tests use it to
    check the forward and backward against a reference with the same mask)."""
    seed, offset = _rng(dropout_p, rng_seed, "dropout_keep_mask")
    keep = torch.empty((batch_heads, L, S), device=device, dtype=torch.bool)
    block = 1024
    if keep.numel():
        _dropout_keep_kernel[(triton.cdiv(keep.numel(), block),)](
            keep, keep.numel(), float(dropout_p), seed, offset, BLOCK=block)
    return keep
