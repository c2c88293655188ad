// FlashAttention on the CPU: the kernel bodies behind bigmodel::attention and its backward.
//
// This header is compiled once per CPU capability, as ATen compiles its own kernels: the
// including file defines CPU_CAPABILITY (DEFAULT, AVX2, AVX512) and, for the vector ones, turns
// the instruction set on for what follows (attention_avx2.cpp, attention_avx512.cpp), so at::vec
// maps onto real vector registers and everything here lands in bigmodel::attn::<CAPABILITY>.
//
// Layout of the work (B batches, Hq query heads, Hkv key/value heads, L queries, S keys):
//  * forward: one task per (batch, query head, block of BQ queries). Scores for a block live in
//    a small buffer, transposed (BK keys x BQ queries, S^T = K Qs^T) so that each query's
//    running max and sum are vertical vector work; they rescale the output accumulator (O^T)
//    as each key block arrives (online softmax), so nothing L x S is ever stored. Causal blocks
//    above the diagonal are never visited.
//  * backward: per pair of (key block, query block) the probabilities are recomputed from the
//    saved logsumexp; dK and dV accumulate in block buffers, dQ^T per head. With enough
//    (batch, key/value head) pairs one task owns each pair (query heads of a GQA group
//    included); with fewer, tasks split over key blocks (dK, dV) and then over query blocks
//    (dQ). Every gradient element has a single owner and a fixed summation order, the two
//    schedules run the same block steps in the same order, so results are deterministic and
//    independent of the thread count.
//  * the block products go through gemm() below: for float, at every level, torch's
//    at::native::cpublas::brgemm, which is oneDNN's JIT micro-kernel wherever oneDNN has one for
//    the CPU (AVX2 and up) and MKL's sgemm otherwise (what torch's own flash attention calls per
//    block); double keeps a register-tiled at::vec kernel. Per-core rates on this project's
//    EPYC for the 64-row blocks used here (bench/NOTES.md, "attention per level"): AVX512 brgemm
//    ~240 GFLOP/s, the 512-bit tile ~115; AVX2 brgemm ~121, the 256-bit tiles 101-117, MKL
//    91-98; at DEFAULT the tile is at::vec's scalar fallback (6 GFLOP/s), MKL 90.
//  * the backward works in a transposed frame (scores as S^T: keys x queries) so that every
//    product reads its operands row-major without transposing a probability block.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "attention_args.h"
#include "vec_math_kernel.h"

namespace bigmodel {
namespace attn {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;
using vec_math::CPU_CAPABILITY::exp_shifted;

// Half and bfloat16 are computed in float; double stays double (gradcheck).
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename T>
inline T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// ------------------------------------------------------------------------------------------
// Small GEMM: C[M][N] (+)= A[M][K] B[K][N], all row-major with leading dimensions lda/ldb/ldc.

// An MR x (NV vectors) block of C held in registers while K streams through.
template <typename T, int MR, int NV>
inline void gemm_tile(int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                      int64_t ldc, bool acc) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  V c[MR][NV];
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NV; ++j) c[i][j] = acc ? V::loadu(C + i * ldc + j * W) : V(T(0));
  }
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int j = 0; j < NV; ++j) b[j] = V::loadu(B + k * ldb + j * W);
    for (int i = 0; i < MR; ++i) {
      const V a(A[i * lda + k]);
      for (int j = 0; j < NV; ++j) c[i][j] = at::vec::fmadd(a, b[j], c[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NV; ++j) c[i][j].store(C + i * ldc + j * W);
  }
}

template <typename T, int MR, int NV>
inline void gemm_cols(int64_t M, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                      T* C, int64_t ldc, bool acc) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) gemm_tile<T, MR, NV>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc, acc);
  for (; m < M; ++m) gemm_tile<T, 1, NV>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc, acc);
}

template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
          int64_t ldc, bool acc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!acc) {
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, T(0));
    }
    return;
  }
  // float at every level: brgemm is oneDNN's JIT micro-kernel wherever oneDNN has one for the
  // CPU (AVX2 and up, as capped by ONEDNN_MAX_CPU_ISA) and torch's BLAS call otherwise, which is
  // what torch's own flash attention runs per block. Per-core rates for the 64x64 blocks here
  // (bench/NOTES.md): AVX512 brgemm 240 GFLOP/s vs 115 for the tile below; AVX2 brgemm 121 vs
  // 101-117 for the tile, MKL 91-98; DEFAULT's tile is at::vec's scalar fallback.
  if constexpr (std::is_same_v<T, float>) {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, acc, A, B, C, /*is_vnni=*/false);
    return;
  }
  // double (gradcheck): the register tile.
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  // 512-bit registers: 6x4 accumulators + 4 B vectors + 1 broadcast fit in 32; 256-bit: 4x2 in 16.
  constexpr bool wide = W * sizeof(T) >= 64;
  constexpr int MR = wide ? 6 : 4;
  constexpr int NV = wide ? 4 : 2;
  int64_t n = 0;
  for (; n + NV * W <= N; n += NV * W) gemm_cols<T, MR, NV>(M, K, A, lda, B + n, ldb, C + n, ldc, acc);
  for (; n + W <= N; n += W) gemm_cols<T, MR, 1>(M, K, A, lda, B + n, ldb, C + n, ldc, acc);
  for (; n < N; ++n) {  // callers pad N to whole vectors; this only keeps gemm() general
    for (int64_t i = 0; i < M; ++i) {
      T s = acc ? C[i * ldc + n] : T(0);
      for (int64_t k = 0; k < K; ++k) s += A[i * lda + k] * B[k * ldb + n];
      C[i * ldc + n] = s;
    }
  }
}

// dst[c][r] = src[r][c] for a rows x cols block.
template <typename T>
inline void transpose(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows, int64_t cols) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    at::vec::transpose_mxn<float>(src, lds, dst, ldd, static_cast<int>(rows), static_cast<int>(cols));
    return;
  }
#endif
  constexpr int64_t T8 = 8;  // tiles keep both sides in cache lines
  for (int64_t r0 = 0; r0 < rows; r0 += T8) {
    for (int64_t c0 = 0; c0 < cols; c0 += T8) {
      const int64_t r1 = std::min(rows, r0 + T8), c1 = std::min(cols, c0 + T8);
#if defined(CPU_CAPABILITY_AVX2)
      if constexpr (std::is_same_v<T, float>) {
        if (r1 - r0 == T8 && c1 - c0 == T8) {  // a whole 8x8 tile in registers
          at::vec::transpose_mxn<float, 8, 8>(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd);
          continue;
        }
      }
#endif
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = c0; c < c1; ++c) dst[c * ldd + r] = src[r * lds + c];
      }
    }
  }
}

// dst[0:n] = scale * src[0:n:stride] in the accumulation type; dst[n:np] = 0.
template <typename scalar_t, typename acc_t>
inline void load_row(acc_t* dst, const scalar_t* src, int64_t stride, int64_t n, int64_t np,
                     acc_t scale) {
  if (stride == 1) {
    for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<acc_t>(src[c]) * scale;
  } else {
    for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<acc_t>(src[c * stride]) * scale;
  }
  for (int64_t c = n; c < np; ++c) dst[c] = acc_t(0);
}

// rows x n block of a strided (rows, cols) matrix into dst with leading dimension ldd;
// rows rows..rows_pad and columns n..ldd are zero.
template <typename scalar_t, typename acc_t>
inline void load_block(acc_t* dst, int64_t ldd, const scalar_t* src, int64_t s_row, int64_t s_col,
                       int64_t rows, int64_t rows_pad, int64_t n, acc_t scale) {
  for (int64_t r = 0; r < rows; ++r) load_row(dst + r * ldd, src + r * s_row, s_col, n, ldd, scale);
  for (int64_t r = rows; r < rows_pad; ++r) std::fill(dst + r * ldd, dst + (r + 1) * ldd, acc_t(0));
}

// ------------------------------------------------------------------------------------------
// Dropout: a counter-based hash of the element's flat index in the (B, Hq, L, S) score tensor,
// keyed by the seed. The forward and the backward regenerate the same decision anywhere, in any
// order, on any thread count.

inline uint64_t mix64(uint64_t x) {  // splitmix64's finaliser: a bijection with full avalanche
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

struct Dropout {
  bool on = false;
  uint64_t key = 0, offset = 0;
  uint32_t threshold = 0;  // drop when the 24-bit draw is below p * 2^24
  double inv_keep = 1.0;
  int64_t Hq = 0, L = 0, S = 0;

  explicit Dropout(const Args& a) {
    on = a.dropout_p > 0;
    key = mix64(a.seed + 0x9e3779b97f4a7c15ULL);
    offset = a.offset;
    threshold = static_cast<uint32_t>(std::llround(a.dropout_p * 16777216.0));
    inv_keep = on ? 1.0 / (1.0 - a.dropout_p) : 1.0;
    Hq = a.Hq, L = a.L, S = a.S;
  }
  // Index of element (b, h, i, 0) of the score tensor, plus the seed's offset.
  uint64_t row_base(int64_t b, int64_t h, int64_t i) const {
    return offset + static_cast<uint64_t>(((b * Hq + h) * L + i)) * static_cast<uint64_t>(S);
  }
  bool keep(uint64_t idx) const { return (mix64(idx ^ key) >> 40) >= threshold; }
};

// ------------------------------------------------------------------------------------------
// Masks: causal (top-left aligned), bool (True = attend) and additive, applied to a block of
// scores. The forward block is queries x keys; the backward one keys x queries.

template <typename scalar_t>
struct MaskView {
  MaskKind kind;
  const char* base;
  int64_t sb, sh, sl, ss;
  explicit MaskView(const Args& a)
      : kind(a.mask_kind), base(static_cast<const char*>(a.mask)),
        sb(a.sm[0]), sh(a.sm[1]), sl(a.sm[2]), ss(a.sm[3]) {}
  // Element (b, h, i, j) of a bool mask (byte) or an additive one (scalar_t).
  bool visible(int64_t off) const { return reinterpret_cast<const bool*>(base)[off]; }
  template <typename acc_t>
  acc_t add(int64_t off) const {
    return static_cast<acc_t>(reinterpret_cast<const scalar_t*>(base)[off]);
  }
};

// Transposed: st[c][r] for keys j0 + c (c < n) and queries i0 + r (r < m). Hidden entries
// (causal, bool mask) get `fill`; the additive mask is added when `add`.
template <typename scalar_t, typename acc_t>
void mask_scores_t(const MaskView<scalar_t>& mk, bool causal, int64_t b, int64_t h, int64_t i0,
                   int64_t m, int64_t j0, int64_t n, acc_t* st, int64_t lds, acc_t fill, bool add) {
  const acc_t ninf = fill;
  const bool crosses = causal && j0 + n - 1 > i0;
  if (!crosses && (mk.kind == MaskKind::kNone || (mk.kind == MaskKind::kAdditive && !add))) return;
  for (int64_t c = 0; c < n; ++c) {
    acc_t* row = st + c * lds;
    const int64_t j = j0 + c;
    // key j is visible to queries i >= j: hide r < j - i0
    const int64_t first = crosses ? std::clamp<int64_t>(j - i0, 0, m) : 0;
    for (int64_t r = 0; r < first; ++r) row[r] = ninf;
    if (mk.kind == MaskKind::kNone || (mk.kind == MaskKind::kAdditive && !add)) continue;
    const int64_t off = b * mk.sb + h * mk.sh + i0 * mk.sl + j * mk.ss;
    if (mk.kind == MaskKind::kBool) {
      for (int64_t r = first; r < m; ++r) {
        if (!mk.visible(off + r * mk.sl)) row[r] = ninf;
      }
    } else {
      for (int64_t r = first; r < m; ++r) row[r] += mk.template add<acc_t>(off + r * mk.sl);
    }
  }
}

// Per (batch, key/value head, column): whether that column of K or V holds a NaN. NaN in value
// column e reaches every output row through 0 * NaN in P V (torch's math path), including rows
// whose blocks we skip or that see no key; the backward has the same issue with K in dQ.
template <typename scalar_t>
std::vector<uint8_t> nan_columns(const scalar_t* x, const int64_t* st, int64_t B, int64_t H,
                                 int64_t S, int64_t D) {
  std::vector<uint8_t> flags(B * H * D, 0);
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const scalar_t* base = x + (t / H) * st[0] + (t % H) * st[1];
      uint8_t* f = flags.data() + t * D;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
      // float rows: OR the lanes' NaN masks per column chunk (the scalar loop below was 6% of
      // a forward at (8, 4, 256, 64)).
      if constexpr (std::is_same_v<scalar_t, float>) {
        using V = Vectorized<float>;
        constexpr int64_t W = V::size();
        const int64_t Dv = st[3] == 1 ? D / W * W : 0;
        if (Dv > 0) {
          std::vector<float> any(Dv, 0.f);  // per column, a mask of all ones (a NaN) once seen
          for (int64_t j = 0; j < S; ++j) {
            const float* row = base + j * st[2];
            for (int64_t c = 0; c < Dv; c += W) {
              (V::loadu(any.data() + c) | V::loadu(row + c).isnan()).store(any.data() + c);
            }
          }
          for (int64_t e = 0; e < Dv; ++e) f[e] = std::isnan(any[e]) ? 1 : 0;
        }
        for (int64_t j = 0; j < S && Dv < D; ++j) {
          const float* row = base + j * st[2];
          for (int64_t e = Dv; e < D; ++e) f[e] |= std::isnan(row[e * st[3]]) ? 1 : 0;
        }
        continue;
      }
#endif
      for (int64_t j = 0; j < S; ++j) {
        const scalar_t* row = base + j * st[2];
        for (int64_t e = 0; e < D; ++e) f[e] |= at::_isnan(row[e * st[3]]) ? 1 : 0;
      }
    }
  });
  return flags;
}

// ------------------------------------------------------------------------------------------
// Forward

// One key/value head in the layout the forward's block products read, in the accumulation type:
// K as S rows of E (the A operand of S^T = K Qs^T) and V^T cut into key blocks of BK columns
// (block kb is Ev rows of BK keys, contiguous: its rows sit 4*BK bytes apart, not a
// power-of-two head length apart, which aliased in L1; the A operand of O^T += V^T P^T). Each
// thread packs a head once, up to the last key its tasks need so far (a causal task needs a
// prefix), and reuses it for the next query blocks of the same head: its tasks are a contiguous
// range, so they share heads.
template <typename scalar_t, typename acc_t>
struct PackedHead {
  int64_t b = -1, kvh = -1, upto = 0;  // keys [0, upto) of head (b, kvh) are packed
  int64_t S, E, Ev, BK;
  Buffer<acc_t> k, vt, vn;

  PackedHead(int64_t S_, int64_t E_, int64_t Ev_, int64_t BK_) : S(S_), E(E_), Ev(Ev_), BK(BK_) {}

  const acc_t* k_rows(int64_t j0) const { return k.data() + j0 * E; }
  const acc_t* vt_block(int64_t j0) const { return vt.data() + j0 / BK * Ev * BK; }

  void ensure(const Args& a, int64_t b_, int64_t kvh_, int64_t kend) {
    if (b_ != b || kvh_ != kvh) b = b_, kvh = kvh_, upto = 0;
    if (upto >= kend) return;
    if (k.empty()) {
      const int64_t nkb = (S + BK - 1) / BK;
      k.resize(S * E), vt.assign(nkb * Ev * BK, acc_t(0)), vn.resize(BK * Ev);
    }
    const scalar_t* kbase = static_cast<const scalar_t*>(a.k) + b * a.sk[0] + kvh * a.sk[1];
    const scalar_t* vbase = static_cast<const scalar_t*>(a.v) + b * a.sv[0] + kvh * a.sv[1];
    for (; upto < kend; upto += BK) {
      const int64_t j0 = upto, n = std::min(BK, S - j0);
      load_block(k.data() + j0 * E, E, kbase + j0 * a.sk[2], a.sk[2], a.sk[3], n, n, E, acc_t(1));
      load_block(vn.data(), Ev, vbase + j0 * a.sv[2], a.sv[2], a.sv[3], n, n, Ev, acc_t(1));
      transpose(vn.data(), Ev, vt.data() + j0 / BK * Ev * BK, BK, n, Ev);
    }
    upto = std::min(upto, S);
  }
};

// Tasks [0, total) over the threads, `chunk` at a time from a shared counter until none are
// left: a core that runs slower (a busy neighbour on a shared machine) takes fewer. Static
// ranges left the forward's main thread waiting ~6% of the run at the end barrier on the Xeon
// (AVX2, 2 threads; torch's SDPA, on static ranges too, waited ~1%). body(next) is called once
// per thread with next(t0, t1), which hands out the following range or returns false. Which
// thread runs a task does not change its result.
template <typename Body>
void parallel_chunks(int64_t total, int64_t chunk, const Body& body) {
  std::atomic<int64_t> cursor{0};
  auto next = [&](int64_t& t0, int64_t& t1) {
    t0 = cursor.fetch_add(chunk, std::memory_order_relaxed);
    if (t0 >= total) return false;
    t1 = std::min(total, t0 + chunk);
    return true;
  };
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { body(next); });
}

// The online-softmax step for U column vectors (U * W queries from column r) of one block of
// transposed scores st (n keys x mp queries, one query per column): per query, the running max
// and sum (rmax, rsum) take in the block, the scores become exp(s - max) in place, and alpha
// gets the factor the output accumulator must be rescaled by. Every reduction runs down the
// columns: vertical vector work with no horizontal step (in the queries x keys frame each row's
// max and sum end in a horizontal reduction and a scalar exp per row per block), and U
// independent chains per pass, so the max and the sum are not latency-bound on one register.
template <typename acc_t, int U>
void softmax_cols_t(acc_t* st, int64_t n, int64_t mp, int64_t r, acc_t* rmax, acc_t* rsum,
                    acc_t* alpha) {
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const V ninf(neg_inf<acc_t>()), zero(acc_t(0)), one(acc_t(1));
  V mx[U], sub[U], sum[U];
  for (int u = 0; u < U; ++u) mx[u] = V::loadu(rmax + r + u * W);
  // maximum() propagates NaN, so a NaN score reaches its query's output, as in the reference.
  for (int64_t c = 0; c < n; ++c) {
    const acc_t* row = st + c * mp + r;
    for (int u = 0; u < U; ++u) mx[u] = at::vec::maximum(mx[u], V::loadu(row + u * W));
  }
  for (int u = 0; u < U; ++u) {
    // A query that sees no key yet subtracts 0: exp(-inf - 0) = 0 for its scores and its alpha.
    sub[u] = V::blendv(mx[u], zero, mx[u] == ninf);
    sum[u] = zero;
  }
  for (int64_t c = 0; c < n; ++c) {
    acc_t* row = st + c * mp + r;
    for (int u = 0; u < U; ++u) {
      const V e = exp_shifted<false>(V::loadu(row + u * W), sub[u]);
      e.store(row + u * W);
      sum[u] = sum[u] + e;
    }
  }
  for (int u = 0; u < U; ++u) {
    const int64_t ru = r + u * W;
    const V old = V::loadu(rmax + ru);
    // exp(old max - new max), exactly 1 where the max stayed (0 on the first visible block).
    const V al = V::blendv((old - sub[u]).exp(), one, old == mx[u]);
    (V::loadu(rsum + ru) * al + sum[u]).store(rsum + ru);
    mx[u].store(rmax + ru);
    al.store(alpha + ru);
  }
}

// The whole block (mp queries), then the output accumulator ot (Ev x mp, transposed too;
// null before the first block's product) rescaled where some query's max moved.
template <typename acc_t>
void softmax_block_t(acc_t* st, int64_t n, int64_t mp, acc_t* rmax, acc_t* rsum, acc_t* alpha,
                     acc_t* ot, int64_t Ev) {
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  int64_t r = 0;
  for (; r + 4 * W <= mp; r += 4 * W) softmax_cols_t<acc_t, 4>(st, n, mp, r, rmax, rsum, alpha);
  for (; r < mp; r += W) softmax_cols_t<acc_t, 1>(st, n, mp, r, rmax, rsum, alpha);
  if (ot == nullptr) return;
  bool moved = false;
  for (int64_t i = 0; i < mp; ++i) moved = moved || !(alpha[i] == acc_t(1));
  if (!moved) return;
  for (int64_t e = 0; e < Ev; ++e) {
    acc_t* row = ot + e * mp;
    for (r = 0; r < mp; r += W) (V::loadu(row + r) * V::loadu(alpha + r)).store(row + r);
  }
}

template <typename scalar_t>
void forward_impl(const Args& a) {
  using acc_t = typename AccOf<scalar_t>::type;
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t B = a.B, Hq = a.Hq, L = a.L, S = a.S, E = a.E, Ev = a.Ev;
  const int64_t group = Hq / a.Hkv;
  // 64 queries (the products' N, one query per column of S^T) by 512 keys a block, chosen on the
  // Xeon (AVX512, and AVX2 capped; bench/NOTES.md): against BK = 128 the larger block halves
  // the per-block work (two products, the max / exp passes' setup, the rescale) relative to the
  // scores, 1.04 / 1.00 / 1.02x torch at (2,8,1024,64) / (1,4,2048,128) / (4,8,512,64) against
  // 0.97 / 0.98 / 0.98x; BQ = 32 or 128 measured lower.
  const int64_t BQ = 64;
  const int64_t BK = std::min<int64_t>(512, std::max<int64_t>(S, 1));
  const int64_t nqb = (L + BQ - 1) / BQ;
  const acc_t scale = static_cast<acc_t>(a.scale);
  const scalar_t* q = static_cast<const scalar_t*>(a.q);
  scalar_t* out = static_cast<scalar_t*>(a.out);
  const MaskView<scalar_t> mk(a);
  const Dropout drop(a);
  const std::vector<uint8_t> vnan = nan_columns(static_cast<const scalar_t*>(a.v), a.sv, B, a.Hkv, S, Ev);

  // Chunks of a head's query blocks (the packed K and V are reused across a chunk), at least 16
  // a thread so the last one's wait stays short.
  const int64_t tasks = B * Hq * nqb;
  const int64_t chunk = std::clamp<int64_t>(tasks / (16 * at::get_num_threads()), 1, nqb);
  parallel_chunks(tasks, chunk, [&](auto& next) {
    // Per-thread scratch: the packed head, Q block (rows, then transposed), scores, output
    // accumulator (transposed), per-query stats.
    PackedHead<scalar_t, acc_t> kv(S, E, Ev, BK);
    Buffer<acc_t> qs(BQ * E), qt(E * BQ), st(BK * BQ), ot(Ev * BQ), orows(BQ * Ev), rmax(BQ),
        rsum(BQ), alpha(BQ);
    int64_t t0 = 0, t1 = 0;
    while (next(t0, t1)) {
      for (int64_t t = t0; t < t1; ++t) {
        // Under causal, later query blocks cost more; zigzag order mixes heavy and light ones
        // within each chunk.
        const int64_t b = t / (Hq * nqb), h = (t / nqb) % Hq;
        const int64_t qb = a.causal ? (t % nqb % 2 == 0 ? t % nqb / 2 : nqb - 1 - t % nqb / 2) : t % nqb;
        const int64_t kvh = h / group;
        const int64_t i0 = qb * BQ, m = std::min(BQ, L - i0), mp = round_up(m, W);
        const scalar_t* qbase = q + b * a.sq[0] + h * a.sq[1] + i0 * a.sq[2];
        // Qs^T (E x mp): the scale is folded into Q once rather than applied to every score;
        // columns m..mp are zero queries, computed and never stored.
        load_block(qs.data(), E, qbase, a.sq[2], a.sq[3], m, m, E, scale);
        transpose(qs.data(), E, qt.data(), mp, m, E);
        for (int64_t e = 0; e < E; ++e) std::fill(qt.data() + e * mp + m, qt.data() + (e + 1) * mp, acc_t(0));
        std::fill(rmax.begin(), rmax.end(), neg_inf<acc_t>());
        std::fill(rsum.begin(), rsum.end(), acc_t(0));
        const int64_t kend = a.causal ? std::min(S, i0 + m) : S;  // later keys are hidden to all rows
        kv.ensure(a, b, kvh, kend);
        if (kend == 0) std::fill(ot.begin(), ot.end(), acc_t(0));
        // The first block's product writes O^T, so it needs neither a zeroed nor a rescaled one.
        for (int64_t j0 = 0; j0 < kend; j0 += BK) {
          const int64_t n = std::min(BK, kend - j0);
          // S^T = K Qs^T (n x mp), masked, then its online softmax.
          gemm(n, mp, E, kv.k_rows(j0), E, qt.data(), mp, st.data(), mp, false);
          mask_scores_t(mk, a.causal, b, h, i0, m, j0, n, st.data(), mp, neg_inf<acc_t>(), true);
          softmax_block_t(st.data(), n, mp, rmax.data(), rsum.data(), alpha.data(), j0 > 0 ? ot.data() : nullptr, Ev);
          if (drop.on) {  // the normaliser uses every probability, the product only the kept ones
            const acc_t inv = static_cast<acc_t>(drop.inv_keep);
            for (int64_t c = 0; c < n; ++c) {
              acc_t* row = st.data() + c * mp;
              for (int64_t r = 0; r < m; ++r) {
                row[r] = drop.keep(drop.row_base(b, h, i0 + r) + j0 + c) ? row[r] * inv : acc_t(0);
              }
            }
          }
          // O^T += V^T P^T over the n real keys.
          gemm(Ev, mp, n, kv.vt_block(j0), BK, st.data(), mp, ot.data(), mp, /*acc=*/j0 > 0);
        }
        // O = O^T's columns times 1/sum (0 for a query that sees no key), back in rows.
        for (int64_t r = 0; r < mp; ++r) alpha[r] = rsum[r] == acc_t(0) ? acc_t(0) : acc_t(1) / rsum[r];
        for (int64_t e = 0; e < Ev; ++e) {
          acc_t* row = ot.data() + e * mp;
          for (int64_t r = 0; r < mp; r += W) (V::loadu(row + r) * V::loadu(alpha.data() + r)).store(row + r);
        }
        transpose(ot.data(), mp, orows.data(), Ev, Ev, m);
        const uint8_t* nanc = vnan.data() + (b * a.Hkv + kvh) * Ev;
        const bool nan_v = std::any_of(nanc, nanc + Ev, [](uint8_t f) { return f != 0; });
        scalar_t* obase = out + ((b * Hq + h) * L + i0) * Ev;
        for (int64_t r = 0; r < m; ++r) {
          const acc_t* o = orows.data() + r * Ev;
          scalar_t* dst = obase + r * Ev;
          if constexpr (std::is_same_v<scalar_t, acc_t>) {
            if (!nan_v) {
              std::copy(o, o + Ev, dst);
              continue;
            }
          }
          for (int64_t e = 0; e < Ev; ++e) {
            dst[e] = nanc[e] ? std::numeric_limits<scalar_t>::quiet_NaN() : static_cast<scalar_t>(o[e]);
          }
        }
        // lse = max + log(sum); a query that sees no key gets +inf (exp(s - lse) = 0 in the backward).
        float* lbase = a.lse + (b * Hq + h) * L + i0;
        for (int64_t r = 0; r < m; ++r) {
          const acc_t l = rsum[r];
          const acc_t lse = l == acc_t(0) ? std::numeric_limits<acc_t>::infinity() : rmax[r] + std::log(l);
          lbase[r] = static_cast<float>(lse);
          if (a.lse64) a.lse64[(b * Hq + h) * L + i0 + r] = static_cast<double>(lse);
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------
// Backward (FlashAttention-2 in the transposed frame).
//
// With Qs = scale * Q, P = exp(Qs K^T - lse), Pd = P * keep / (1 - p) and dP = dO V^T:
//   dV = Pd^T dO,  dS = P * (dP * keep / (1 - p) - D) with D = rowsum(dO * O),
//   dK = dS^T Qs,  dQ = scale * dS K.
// The query side of a head (Qs, Qs^T, dO, dO^T, D, lse) is packed once, so the inner loop only
// runs products and element-wise work. Two schedules, chosen by how much parallelism the
// heads give, run the very same block steps in the same order, so they agree bit for bit:
//  * one task per (batch, key/value head): walks key blocks, accumulating dK, dV per block and
//    dQ^T per head (5 products per block pair);
//  * when there are fewer (batch, key/value head) pairs than threads: one task per key block
//    for dK, dV, then one per query block for dQ (7 products per block pair, all threads busy).

template <typename scalar_t>
struct Backward {
  using acc_t = typename AccOf<scalar_t>::type;
  using V = Vectorized<acc_t>;
  static constexpr int64_t W = V::size();
  static constexpr int64_t BQ = 64, BK = 64;

  const Args& a;
  int64_t B, Hq, Hkv, L, S, E, Ev, group, Lp, Ep, Evp, nqb, nkb;
  int64_t QT, QTv;  // elements of one query block of Qs^T (E x BQ) and of dO^T (Ev x BQ)
  acc_t scale;
  MaskView<scalar_t> mk;
  Dropout drop;
  std::vector<double> lse64;     // float64 only: exact lse (see the constructor)
  std::vector<uint8_t> k_nan;    // per (b, kvh, e): a NaN in that column of K

  // Offsets of one packed head inside its block of per_head() elements.
  struct Head {
    acc_t* qs;   // L x Ep, scaled
    acc_t* qst;  // nqb blocks of E x BQ (see blocked_t)
    acc_t* dO;   // L x Evp
    acc_t* dOt;  // nqb blocks of Ev x BQ
    acc_t* D;    // Lp
    acc_t* lse;  // Lp
  };

  explicit Backward(const Args& args)
      : a(args), B(args.B), Hq(args.Hq), Hkv(args.Hkv), L(args.L), S(args.S), E(args.E),
        Ev(args.Ev), mk(args), drop(args) {
    group = Hq / Hkv;
    Lp = round_up(std::max<int64_t>(L, 1), W);
    QT = E * BQ, QTv = Ev * BQ;
    Ep = round_up(E, W), Evp = round_up(Ev, W);
    nqb = (L + BQ - 1) / BQ, nkb = (S + BK - 1) / BK;
    scale = static_cast<acc_t>(a.scale);
    // The saved lse is float32, which would cap float64 gradients at float32 accuracy;
    // float64 (gradcheck) recomputes it in double with one more forward.
    if constexpr (std::is_same_v<scalar_t, double>) {
      lse64.resize(B * Hq * L);
      std::vector<double> tmp_out(B * Hq * L * Ev);
      std::vector<float> tmp_lse(B * Hq * L);
      Args f = a;
      f.out = tmp_out.data(), f.lse = tmp_lse.data(), f.lse64 = lse64.data();
      forward_impl<double>(f);
    }
    k_nan = nan_columns(static_cast<const scalar_t*>(a.k), a.sk, B, Hkv, S, E);
  }

  int64_t per_head() const { return L * Ep + nqb * QT + L * Evp + nqb * QTv + 2 * Lp; }

  Head view(acc_t* p) const {
    Head hd;
    hd.qs = p, p += L * Ep;
    hd.qst = p, p += nqb * QT;
    hd.dO = p, p += L * Evp;
    hd.dOt = p, p += nqb * QTv;
    hd.D = p, p += Lp;
    hd.lse = p;
    return hd;
  }

  // Transposes the L x D rows of x (leading dimension ldx) query block by query block: block qb
  // of xt is D x BQ, contiguous, its columns past the block's queries zero. The products read
  // one block at a time; in a single D x L transpose their rows sat 4*L bytes apart, a power of
  // two for the usual lengths, and all aliased to the same L1 sets.
  void blocked_t(const acc_t* x, int64_t ldx, acc_t* xt, int64_t D) const {
    for (int64_t qb = 0; qb < nqb; ++qb) {
      const int64_t i0 = qb * BQ, m = std::min(BQ, L - i0);
      acc_t* blk = xt + qb * D * BQ;
      transpose(x + i0 * ldx, ldx, blk, BQ, m, D);
      for (int64_t e = 0; e < D; ++e) std::fill(blk + e * BQ + m, blk + (e + 1) * BQ, acc_t(0));
    }
  }

  void pack_head(int64_t b, int64_t h, const Head& hd) const {
    const scalar_t* qh = static_cast<const scalar_t*>(a.q) + b * a.sq[0] + h * a.sq[1];
    const scalar_t* oh = static_cast<const scalar_t*>(a.out) + b * a.so[0] + h * a.so[1];
    const scalar_t* doh = static_cast<const scalar_t*>(a.dout) + b * a.sdo[0] + h * a.sdo[1];
    load_block(hd.qs, Ep, qh, a.sq[2], a.sq[3], L, L, E, scale);
    load_block(hd.dO, Evp, doh, a.sdo[2], a.sdo[3], L, L, Ev, acc_t(1));
    blocked_t(hd.qs, Ep, hd.qst, E);
    blocked_t(hd.dO, Evp, hd.dOt, Ev);
    const float* lse_h = a.lse + (b * Hq + h) * L;
    for (int64_t i = 0; i < L; ++i) {
      acc_t s = 0;
      const scalar_t* orow = oh + i * a.so[2];
      const acc_t* drow = hd.dO + i * Evp;
      for (int64_t e = 0; e < Ev; ++e) s += drow[e] * static_cast<acc_t>(orow[e * a.so[3]]);
      hd.D[i] = s;
      hd.lse[i] = lse64.empty() ? static_cast<acc_t>(lse_h[i])
                                : static_cast<acc_t>(lse64[(b * Hq + h) * L + i]);
    }
    // Padding queries: lse = +inf makes their probabilities exactly 0.
    for (int64_t i = L; i < Lp; ++i) hd.D[i] = 0, hd.lse[i] = std::numeric_limits<acc_t>::infinity();
  }

  // The reference's products also multiply hidden (zero) entries, so a NaN anywhere in a
  // column of Q, K or dO, or a NaN row of P (NaN lse), reaches gradient entries that the blocks
  // we skip never touch. These flags patch the results to the reference's NaN semantics.
  struct QueryNans {
    std::vector<uint8_t> q, dO;
    bool p = false;
  };
  QueryNans query_nans(const Head* heads) const {  // heads: the group of one key/value head
    QueryNans f;
    f.q.assign(E, 0), f.dO.assign(Ev, 0);
    for (int64_t g = 0; g < group; ++g) {
      const Head& hd = heads[g];
      for (int64_t i = 0; i < L; ++i) {
        for (int64_t e = 0; e < E; ++e) f.q[e] |= std::isnan(hd.qs[i * Ep + e]) ? 1 : 0;
        for (int64_t e = 0; e < Ev; ++e) f.dO[e] |= std::isnan(hd.dO[i * Evp + e]) ? 1 : 0;
        f.p = f.p || std::isnan(hd.lse[i]);
      }
    }
    return f;
  }

  // Per-thread block buffers.
  struct Scratch {
    Buffer<acc_t> kn, kt, vn, st, dpt, pd, dkacc, dvacc, tmp;
    explicit Scratch(const Backward& bw)
        : kn(BK * bw.E), kt(bw.E * BK), vn(BK * bw.Ev), st(BK * BQ), dpt(BK * BQ), pd(BK * BQ),
          dkacc(BK * bw.Ep), dvacc(BK * bw.Evp), tmp(std::max(bw.Ep, bw.Evp) * BQ) {}
  };

  void load_keys(int64_t b, int64_t kvh, int64_t j0, int64_t n, Scratch& sc) const {
    const scalar_t* kb = static_cast<const scalar_t*>(a.k) + b * a.sk[0] + kvh * a.sk[1] + j0 * a.sk[2];
    const scalar_t* vb = static_cast<const scalar_t*>(a.v) + b * a.sv[0] + kvh * a.sv[1] + j0 * a.sv[2];
    load_block(sc.kn.data(), E, kb, a.sk[2], a.sk[3], n, n, E, acc_t(1));
    load_block(sc.vn.data(), Ev, vb, a.sv[2], a.sv[3], n, n, Ev, acc_t(1));
    transpose(sc.kn.data(), E, sc.kt.data(), n, n, E);
  }

  // One (key block, query block) pair: P^T into sc.st, dS^T into sc.dpt; returns Pd^T.
  const acc_t* step(int64_t b, int64_t h, int64_t j0, int64_t n, int64_t i0, int64_t m,
                    int64_t mp, const Head& hd, Scratch& sc) const {
    acc_t* st = sc.st.data();
    acc_t* dpt = sc.dpt.data();
    // S^T = K Qs^T (n x mp), masked; P^T = exp(S^T - lse).
    gemm(n, mp, E, sc.kn.data(), E, hd.qst + i0 / BQ * QT, BQ, st, mp, false);
    mask_scores_t(mk, a.causal, b, h, i0, m, j0, n, st, mp, neg_inf<acc_t>(), true);
    for (int64_t c = 0; c < n; ++c) {
      acc_t* row = st + c * mp;
      for (int64_t r = 0; r < mp; r += W) {
        exp_shifted<true>(V::loadu(row + r), V::loadu(hd.lse + i0 + r)).store(row + r);
      }
    }
    // dP^T = V dO^T (n x mp).
    gemm(n, mp, Ev, sc.vn.data(), Ev, hd.dOt + i0 / BQ * QTv, BQ, dpt, mp, false);
    const acc_t* pdrop = st;
    if (drop.on) {
      const acc_t inv = static_cast<acc_t>(drop.inv_keep);
      acc_t* pd = sc.pd.data();
      for (int64_t c = 0; c < n; ++c) {
        for (int64_t r = 0; r < m; ++r) {
          const bool kp = drop.keep(drop.row_base(b, h, i0 + r) + j0 + c);
          pd[c * mp + r] = kp ? st[c * mp + r] * inv : acc_t(0);
          dpt[c * mp + r] = kp ? dpt[c * mp + r] * inv : acc_t(0);
        }
        for (int64_t r = m; r < mp; ++r) pd[c * mp + r] = 0;
      }
      pdrop = pd;
    }
    // dS^T = P^T * (dP^T - D), in place of dP^T.
    for (int64_t c = 0; c < n; ++c) {
      acc_t* dr = dpt + c * mp;
      const acc_t* pr = st + c * mp;
      for (int64_t r = 0; r < mp; r += W) {
        (V::loadu(pr + r) * (V::loadu(dr + r) - V::loadu(hd.D + i0 + r))).store(dr + r);
      }
    }
    // Hidden scores get exactly zero gradient, as masked_fill's backward gives them, even where
    // a NaN elsewhere would turn 0 * (dP - D) into NaN. (-inf from an additive mask is a score
    // like any other: it keeps 0 * NaN = NaN, as in the reference.)
    mask_scores_t(mk, a.causal, b, h, i0, m, j0, n, dpt, mp, acc_t(0), false);
    return pdrop;
  }

  // dV += Pd^T dO and dK += dS^T Qs for one pair (after step()).
  void accumulate_dkdv(const acc_t* pdrop, int64_t n, int64_t i0, int64_t m, int64_t mp,
                       const Head& hd, Scratch& sc) const {
    gemm(n, Evp, m, pdrop, mp, hd.dO + i0 * Evp, Evp, sc.dvacc.data(), Evp, true);
    gemm(n, Ep, m, sc.dpt.data(), mp, hd.qs + i0 * Ep, Ep, sc.dkacc.data(), Ep, true);
  }

  // dQ^T[:, 0:mp] += K^T dS^T for one query block (dqt: that block's E x BQ accumulator).
  void accumulate_dq(int64_t n, int64_t mp, acc_t* dqt, Scratch& sc) const {
    gemm(E, mp, n, sc.kt.data(), n, sc.dpt.data(), mp, dqt, BQ, true);
  }

  void store_dkdv(int64_t b, int64_t kvh, int64_t j0, int64_t n, const QueryNans& f,
                  const Scratch& sc) const {
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    scalar_t* dkb = static_cast<scalar_t*>(a.dk) + ((b * Hkv + kvh) * S + j0) * E;
    scalar_t* dvb = static_cast<scalar_t*>(a.dv) + ((b * Hkv + kvh) * S + j0) * Ev;
    for (int64_t c = 0; c < n; ++c) {
      for (int64_t e = 0; e < E; ++e) {
        dkb[c * E + e] = static_cast<scalar_t>(f.q[e] ? nan : sc.dkacc[c * Ep + e]);
      }
      for (int64_t e = 0; e < Ev; ++e) {
        dvb[c * Ev + e] = static_cast<scalar_t>(f.p || f.dO[e] ? nan : sc.dvacc[c * Evp + e]);
      }
    }
  }

  // dQ rows i0..i0+m of head h = scale * (dQ^T)^T (dqt: the query block's accumulator).
  void store_dq(int64_t b, int64_t h, int64_t i0, int64_t m, const acc_t* dqt, Scratch& sc) const {
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    const uint8_t* kn = k_nan.data() + (b * Hkv + h / group) * E;
    scalar_t* dqh = static_cast<scalar_t*>(a.dq) + (b * Hq + h) * L * E;
    transpose(dqt, BQ, sc.tmp.data(), E, E, m);
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t e = 0; e < E; ++e) {
        dqh[(i0 + r) * E + e] = static_cast<scalar_t>(kn[e] ? nan : sc.tmp[r * E + e] * scale);
      }
    }
  }

  // Causal work grows (query blocks) or shrinks (key blocks) along the sequence, and
  // at::parallel_for hands each thread a contiguous range of tasks: visiting blocks in the
  // order 0, n-1, 1, n-2, ... gives every range as much heavy as light work.
  static int64_t zigzag(int64_t i, int64_t n) { return i % 2 == 0 ? i / 2 : n - 1 - i / 2; }

  // Dropping out of a key block: queries before j0 see none of it under causal.
  int64_t first_qb(int64_t j0) const { return a.causal ? j0 / BQ : 0; }

  // Schedule 1: one task per (batch, key/value head).
  void run_per_head() const {
    at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
      Buffer<acc_t> packed(group * per_head()), dqt(group * nqb * QT);
      std::vector<Head> heads(group);
      for (int64_t g = 0; g < group; ++g) heads[g] = view(packed.data() + g * per_head());
      Scratch sc(*this);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / Hkv, kvh = t % Hkv;
        for (int64_t g = 0; g < group; ++g) pack_head(b, kvh * group + g, heads[g]);
        const QueryNans f = query_nans(heads.data());
        std::fill(dqt.begin(), dqt.end(), acc_t(0));
        for (int64_t j0 = 0; j0 < S; j0 += BK) {
          const int64_t n = std::min(BK, S - j0);
          load_keys(b, kvh, j0, n, sc);
          std::fill(sc.dkacc.begin(), sc.dkacc.end(), acc_t(0));
          std::fill(sc.dvacc.begin(), sc.dvacc.end(), acc_t(0));
          for (int64_t g = 0; g < group; ++g) {
            for (int64_t qb = first_qb(j0); qb < nqb; ++qb) {
              const int64_t i0 = qb * BQ, m = std::min(BQ, L - i0), mp = round_up(m, W);
              const acc_t* pdrop = step(b, kvh * group + g, j0, n, i0, m, mp, heads[g], sc);
              accumulate_dkdv(pdrop, n, i0, m, mp, heads[g], sc);
              accumulate_dq(n, mp, dqt.data() + (g * nqb + qb) * QT, sc);
            }
          }
          store_dkdv(b, kvh, j0, n, f, sc);
        }
        for (int64_t g = 0; g < group; ++g) {
          for (int64_t i0 = 0; i0 < L; i0 += BQ) {
            store_dq(b, kvh * group + g, i0, std::min(BQ, L - i0), dqt.data() + (g * nqb + i0 / BQ) * QT, sc);
          }
        }
      }
    });
  }

  // Schedule 2: the query side of every head packed up front (memory ~ 4x that of Q and dO,
  // used only when there are few heads), then dK/dV per key block and dQ per query block.
  void run_per_block() const {
    const int64_t ph = per_head();
    Buffer<acc_t> packed(B * Hq * ph);
    std::vector<Head> heads(B * Hq);
    for (int64_t t = 0; t < B * Hq; ++t) heads[t] = view(packed.data() + t * ph);
    at::parallel_for(0, B * Hq, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) pack_head(t / Hq, t % Hq, heads[t]);
    });
    std::vector<QueryNans> flags(B * Hkv);
    for (int64_t t = 0; t < B * Hkv; ++t) flags[t] = query_nans(heads.data() + t * group);
    at::parallel_for(0, B * Hkv * nkb, 1, [&](int64_t t0, int64_t t1) {
      Scratch sc(*this);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t bk = t / nkb, b = bk / Hkv, kvh = bk % Hkv, j0 = zigzag(t % nkb, nkb) * BK;
        const int64_t n = std::min(BK, S - j0);
        load_keys(b, kvh, j0, n, sc);
        std::fill(sc.dkacc.begin(), sc.dkacc.end(), acc_t(0));
        std::fill(sc.dvacc.begin(), sc.dvacc.end(), acc_t(0));
        for (int64_t g = 0; g < group; ++g) {
          const Head& hd = heads[b * Hq + kvh * group + g];
          for (int64_t qb = first_qb(j0); qb < nqb; ++qb) {
            const int64_t i0 = qb * BQ, m = std::min(BQ, L - i0), mp = round_up(m, W);
            accumulate_dkdv(step(b, kvh * group + g, j0, n, i0, m, mp, hd, sc), n, i0, m, mp, hd, sc);
          }
        }
        store_dkdv(b, kvh, j0, n, flags[bk], sc);
      }
    });
    at::parallel_for(0, B * Hq * nqb, 1, [&](int64_t t0, int64_t t1) {
      Scratch sc(*this);
      Buffer<acc_t> dqt(QT);  // one block, as schedule 1's: the products match exactly
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t bh = t / nqb, b = bh / Hq, h = bh % Hq, qb = zigzag(t % nqb, nqb);
        const int64_t i0 = qb * BQ, m = std::min(BQ, L - i0), mp = round_up(m, W);
        std::fill(dqt.begin(), dqt.end(), acc_t(0));
        for (int64_t j0 = 0; j0 < S; j0 += BK) {
          if (first_qb(j0) > qb) break;
          const int64_t n = std::min(BK, S - j0);
          load_keys(b, h / group, j0, n, sc);
          step(b, h, j0, n, i0, m, mp, heads[bh], sc);
          accumulate_dq(n, mp, dqt.data(), sc);
        }
        store_dq(b, h, i0, m, dqt.data(), sc);
      }
    });
  }
};

template <typename scalar_t>
void backward_impl(const Args& a) {
  const Backward<scalar_t> bw(a);
  // Per head, the busiest thread runs ceil(P / T) heads of 5 products; per block, every thread
  // runs P / T heads' worth of 7. Split only when that finishes sooner.
  const int64_t P = a.B * a.Hkv, T = at::get_num_threads();
  if (7 * P < 5 * T * ((P + T - 1) / T)) {
    bw.run_per_block();
  } else {
    bw.run_per_head();
  }
}
// ------------------------------------------------------------------------------------------

void forward(const Args& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.dtype, "bigmodel::attention",
                                  [&] { forward_impl<scalar_t>(a); });
}

void backward(const Args& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.dtype, "bigmodel::attention_backward",
                                  [&] { backward_impl<scalar_t>(a); });
}

}  // namespace CPU_CAPABILITY
}  // namespace attn
}  // namespace bigmodel
