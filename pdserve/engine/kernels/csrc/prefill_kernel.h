// Prefill: causal attention of a chunk of query tokens against its sequence's paged keys.
//
// A task is one (sequence, KV head, tile of query tokens); its rows are the tile's
// tokens x the G folded query heads. The keys run in tiles of kKeyTile, flash style:
// pack the tile's K transposed to fp32 (8 x 8 transposes, through the block table),
// S = Q.K^T with a register-blocked GEMM, mask only where the tile crosses the
// diagonal, fold S into each row's online softmax, then O += P.V with the same GEMM (V
// read in place when it is fp32 and one run of slots, else converted). Rows placed
// before a key tile skip it. The GEMM's micro-kernel keeps an MR x 2-vector tile of C
// in registers and broadcasts one A element per row and step: near the FMA peak.
// Included once, by attention_kernels.cpp.
#pragma once

#include "paged.h"

namespace pdserve {
namespace PDSERVE_ISA {
namespace {

constexpr int NV = 2;          // vectors per micro-tile row
constexpr int NW = NV * VW;    // micro-tile columns: keys (q.k) or head dims (p.v)
constexpr int kKeyTile = 64;   // keys per tile, a multiple of NW

// C[R, NW] (ldc) = (or +=) A[R, K] (lda) . B[K, NW] (ldb): R rows, NV vectors of VW.
template <int R, bool kAccumulate>
inline void micro_kernel(const float* A, int lda, const float* B, int ldb, float* C, int ldc, int K) {
  vf c[R][NV];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v)
      c[i][v] = kAccumulate ? *reinterpret_cast<const vf_u*>(C + i * ldc + v * VW) : vf{};
  for (int k = 0; k < K; ++k) {
    vf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = *reinterpret_cast<const vf_u*>(B + int64_t(k) * ldb + v * VW);
    for (int i = 0; i < R; ++i) {
      vf a = splat<vf>(A[i * lda + k]);
      for (int v = 0; v < NV; ++v) c[i][v] += a * b[v];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) *reinterpret_cast<vf_u*>(C + i * ldc + v * VW) = c[i][v];
}

template <bool kAccumulate, int R = MR>
inline void micro_tail(int rows, const float* A, int lda, const float* B, int ldb, float* C, int ldc, int K) {
  if constexpr (R > 0) {
    if (rows == R) return micro_kernel<R, kAccumulate>(A, lda, B, ldb, C, ldc, K);
    micro_tail<kAccumulate, R - 1>(rows, A, lda, B, ldb, C, ldc, K);
  }
}

// C[M, N] = (or +=) A[M, K] . B[K, N], N a multiple of NW. B (a key or value tile) stays
// in L1 while A's rows stream through.
template <bool kAccumulate>
void gemm(const float* A, int lda, const float* B, int ldb, float* C, int ldc, int M, int N, int K) {
  int i = 0;
  for (; i + MR <= M; i += MR)
    for (int j = 0; j < N; j += NW)
      micro_kernel<MR, kAccumulate>(A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc, K);
  if (i < M)
    for (int j = 0; j < N; j += NW)
      micro_tail<kAccumulate>(M - i, A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc, K);
}

// r[i][j] <- r[j][i]: unpack pairs, then quads, then swap 128-bit halves.
inline void transpose8(v8f* r) {
  const v8i lo2 = {0, 8, 1, 9, 4, 12, 5, 13}, hi2 = {2, 10, 3, 11, 6, 14, 7, 15};
  const v8i lo4 = {0, 1, 8, 9, 4, 5, 12, 13}, hi4 = {2, 3, 10, 11, 6, 7, 14, 15};
  const v8i lo8 = {0, 1, 2, 3, 8, 9, 10, 11}, hi8 = {4, 5, 6, 7, 12, 13, 14, 15};
  v8f t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shuffle(r[i], r[i + 1], lo2);
    t[i + 1] = __builtin_shuffle(r[i], r[i + 1], hi2);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = __builtin_shuffle(t[i], t[i + 2], lo4);
    u[i + 1] = __builtin_shuffle(t[i], t[i + 2], hi4);
    u[i + 2] = __builtin_shuffle(t[i + 1], t[i + 3], lo4);
    u[i + 3] = __builtin_shuffle(t[i + 1], t[i + 3], hi4);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = __builtin_shuffle(u[i], u[i + 4], lo8);
    r[i + 4] = __builtin_shuffle(u[i], u[i + 4], hi8);
  }
}

// Keys [k0, k0 + n) transposed to fp32, kt[d * kKeyTile + j], 8 x 8 at a time; columns
// n..np zeroed.
template <class T>
void pack_keys(const T* k, const int32_t* table, int bs, int D, int k0, int n, int np, float* kt) {
  for (int j0 = 0; j0 < n; j0 += 8) {
    const T* rows[8];
    for (int i = 0; i < 8; ++i) {  // past n: any valid row, its column is zeroed below
      const int key = k0 + imin(j0 + i, n - 1);
      rows[i] = k + (int64_t(table[key / bs]) * bs + key % bs) * D;
    }
    for (int d = 0; d < D; d += 8) {
      v8f r[8];
      for (int i = 0; i < 8; ++i) r[i] = load8(rows[i] + d);
      transpose8(r);
      for (int i = 0; i < 8; ++i) store8(kt + (d + i) * kKeyTile + j0, r[i]);
    }
  }
  for (int d = 0; d < D; ++d)
    for (int j = n; j < np; ++j) kt[d * kKeyTile + j] = 0.0f;
}

// Values [k0, k0 + n) as fp32 rows of Dp (columns D..Dp zeroed); or, when fp32 and in
// one run with Dp == D, the cache rows themselves.
template <class T>
const float* values_tile(const T* v, const int32_t* table, int bs, int D, int Dp, int k0, int n, float* vt) {
  const Run first = next_run(table, bs, k0, k0 + n, n);
  if constexpr (sizeof(T) == sizeof(float)) {
    if (first.n == n && Dp == D) return reinterpret_cast<const float*>(v + first.slot * D);
  }
  for (int j = 0; j < n;) {
    const Run run = next_run(table, bs, k0 + j, k0 + n, n);
    const T* src = v + run.slot * D;
    for (int r = 0; r < run.n; ++r, ++j) {
      float* row = vt + int64_t(j) * Dp;
      for (int d = 0; d < D; d += 8) store8(row + d, load8(src + int64_t(r) * D + d));
      for (int d = D; d < Dp; ++d) row[d] = 0.0f;
    }
  }
  return vt;
}

struct PrefillScratch {
  float *q, *o, *s, *m, *l, *kt, *vt;
};

inline size_t align16(size_t n) { return (n + 15) / 16 * 16; }

PrefillScratch carve(const Problem& p, int32_t max_tokens, float* base, size_t* total) {
  const size_t rows = size_t(max_tokens) * p.group, D = p.head_dim, Dp = round_up(p.head_dim, NW);
  const size_t sizes[7] = {rows * D, rows * Dp, rows * kKeyTile, rows, rows, D * kKeyTile, kKeyTile * Dp};
  float* parts[7];
  size_t off = 0;
  for (int i = 0; i < 7; ++i) {
    parts[i] = base ? base + off : nullptr;
    off += align16(sizes[i]);
  }
  if (total) *total = off;
  return {parts[0], parts[1], parts[2], parts[3], parts[4], parts[5], parts[6]};
}

size_t prefill_scratch(const Problem& p, int32_t max_tokens) {
  size_t total = 0;
  carve(p, max_tokens, nullptr, &total);
  return total;
}

template <class T>
void prefill_impl(const Problem& p, const PrefillTask& task, float* scratch) {
  const int G = p.group, D = p.head_dim, Dp = round_up(D, NW), bs = p.block_size;
  const int M = task.num_tokens * G;
  const PrefillScratch w = carve(p, task.num_tokens, scratch, nullptr);
  load_queries<T>(p, task.first_row, task.num_tokens, task.kv_head, w.q);
  memset(w.o, 0, sizeof(float) * M * Dp);
  for (int r = 0; r < M; ++r) w.m[r] = kNegInf, w.l[r] = 0.0f;
  const T* k = static_cast<const T*>(p.k_cache) + task.kv_head * p.cache_stride_h;
  const T* v = static_cast<const T*>(p.v_cache) + task.kv_head * p.cache_stride_h;
  const int32_t* table = p.block_tables + task.seq * p.block_table_stride;
  const int key_end = task.first_pos + task.num_tokens;
  for (int k0 = 0; k0 < key_end; k0 += kKeyTile) {
    const int n = imin(kKeyTile, key_end - k0), np = round_up(n, NW);
    // Rows before r0 are tokens placed before this tile's first key: they see none of it.
    const int r0 = imax(0, k0 - task.first_pos) * G;
    pack_keys(k, table, bs, D, k0, n, np, w.kt);
    gemm<false>(w.q + r0 * D, D, w.kt, kKeyTile, w.s + r0 * kKeyTile, kKeyTile, M - r0, np, D);
    for (int r = r0; r < M; ++r) {
      float* s = w.s + r * kKeyTile;
      const int visible = imin(task.first_pos + r / G - k0 + 1, n);  // causal: keys up to the row's position
      for (int j = visible; j < np; ++j) s[j] = kNegInf;
      online_softmax_row(s, np, w.m[r], w.l[r], w.o + r * Dp, Dp);
    }
    const float* vt = values_tile(v, table, bs, D, Dp, k0, n, w.vt);
    gemm<true>(w.s + r0 * kKeyTile, kKeyTile, vt, Dp, w.o + r0 * Dp, Dp, M - r0, Dp, n);
  }
  store_rows<T>(p, task.first_row, task.num_tokens, task.kv_head, w.o, Dp, w.l);
}

}  // namespace
}  // namespace PDSERVE_ISA
}  // namespace pdserve
