// Decode: one query row per sequence and head, against the sequence's paged keys.
//
// A task is one (sequence, KV head, partition of the context). Its G query heads are
// folded (each K/V row is read once for all G), and the keys are taken a segment at a
// time, a run of at most kSeg contiguous slots: score the segment's keys for the G rows
// (kScoreKeys keys at a time, the dot products reduced horizontally), fold the scores
// into each row's online softmax, then accumulate p.V a slice of 16 columns at a time
// with the accumulators in registers. Rows are read in "pair order" (simd.h's load16):
// q and the accumulators are kept permuted the same way and put back at the end.
//
// Memory: K is read in order, which the hardware prefetcher follows. The p.v loop reads
// V a column slice at a time, a stride it misses, so V rows are prefetched while the
// same keys are scored, and the next segment's K too (it may start anywhere).
// Included once, by attention_kernels.cpp.
#pragma once

#include "paged.h"

namespace pdserve {
namespace PDSERVE_ISA {
namespace {

constexpr int kSeg = 64;              // keys per segment
constexpr int kSegStride = kSeg + 8;  // floats per row of scores, with room for padding

// x (G rows of D) from natural to pair order (forward) or back, for types that need it.
template <class T>
void pair_order(float* x, int G, int D, bool forward) {
  if constexpr (kPairSplit<T>) {
    for (int r = 0; r < G; ++r)
      for (int c = 0; c + 16 <= D; c += 16) {  // a tail of 8 stays natural
        float* row = x + r * D + c;
        float tmp[16];
        for (int i = 0; i < 8; ++i) {
          if (forward) tmp[i] = row[2 * i], tmp[8 + i] = row[2 * i + 1];
          else tmp[2 * i] = row[i], tmp[2 * i + 1] = row[8 + i];
        }
        memcpy(row, tmp, sizeof(tmp));
      }
  }
}

// s[r * kSegStride + t] = q_r . k_t for R rows and n keys (rows of D at k). With v, the
// same keys' V rows and the first n rows of k_next (n_next of them) are prefetched.
template <int R, class T>
inline void score_rows(const float* q, int D, const T* k, int n, float* s, const T* v, const T* k_next,
                       int n_next) {
  const int d16 = D & ~15;
  int t = 0;
  for (; t + kScoreKeys <= n; t += kScoreKeys) {
    if (v) {
      prefetch(v + int64_t(t) * D, int64_t(kScoreKeys) * D);
      if (t < n_next) prefetch(k_next + int64_t(t) * D, int64_t(imin(kScoreKeys, n_next - t)) * D);
    }
    v8f acc[R][4] = {};  // [.][kScoreKeys, 4) stay zero
    for (int d = 0; d < d16; d += 16)
      for (int j = 0; j < kScoreKeys; ++j) {
        v8f lo, hi;
        load16(k + int64_t(t + j) * D + d, lo, hi);
        for (int r = 0; r < R; ++r) {
          acc[r][j] += load8(q + r * D + d) * lo;
          acc[r][j] += load8(q + r * D + d + 8) * hi;
        }
      }
    if (d16 < D)
      for (int j = 0; j < kScoreKeys; ++j) {
        const v8f kv = load8(k + int64_t(t + j) * D + d16);
        for (int r = 0; r < R; ++r) acc[r][j] += load8(q + r * D + d16) * kv;
      }
    for (int r = 0; r < R; ++r) hsum4(acc[r], s + r * kSegStride + t);  // s[t + 3] past the keys: overwritten
  }
  for (; t < n; ++t) {
    if (v) prefetch(v + int64_t(t) * D, D);
    v8f acc[R] = {};
    for (int d = 0; d < d16; d += 16) {
      v8f lo, hi;
      load16(k + int64_t(t) * D + d, lo, hi);
      for (int r = 0; r < R; ++r) acc[r] += load8(q + r * D + d) * lo + load8(q + r * D + d + 8) * hi;
    }
    if (d16 < D) {
      const v8f kv = load8(k + int64_t(t) * D + d16);
      for (int r = 0; r < R; ++r) acc[r] += load8(q + r * D + d16) * kv;
    }
    for (int r = 0; r < R; ++r) s[r * kSegStride + t] = hsum(acc[r]);
  }
}

template <class T>
void score_segment(const float* q, int G, int D, const T* k, const T* v, int n, float* s, const T* k_next,
                   int n_next) {
  int g = 0;
  for (; g + 3 <= G; g += 3, v = nullptr) score_rows<3>(q + g * D, D, k, n, s + g * kSegStride, v, k_next, n_next);
  if (G - g == 2) score_rows<2>(q + g * D, D, k, n, s + g * kSegStride, v, k_next, n_next);
  if (G - g == 1) score_rows<1>(q + g * D, D, k, n, s + g * kSegStride, v, k_next, n_next);
}

// acc[r, d0 : d0 + 8 * W] += sum_t p[r * kSegStride + t] * v[t, d0 : d0 + 8 * W] for R
// rows: 16 columns in pair order (W = 2) or 8 natural ones (W = 1). With fewer than 8
// accumulators, even and odd keys add into two sets, or the FMA latency would bound it.
template <int R, int W, class T>
inline void pv_rows(const float* p, const T* v, int D, int n, float* acc, int d0) {
  constexpr int S = R * W < 8 ? 2 : 1;
  v8f a[S][R][W] = {};
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) a[0][r][w] = load8(acc + r * D + d0 + 8 * w);
  auto step = [&](v8f(&sum)[R][W], int t) {
    v8f vv[2];
    if constexpr (W == 2) load16(v + int64_t(t) * D + d0, vv[0], vv[1]);
    else vv[0] = load8(v + int64_t(t) * D + d0);
    for (int r = 0; r < R; ++r) {
      const v8f pr = splat<v8f>(p[r * kSegStride + t]);
      for (int w = 0; w < W; ++w) sum[r][w] += pr * vv[w];
    }
  };
  int t = 0;
  for (; t + S <= n; t += S)
    for (int i = 0; i < S; ++i) step(a[i], t + i);
  for (; t < n; ++t) step(a[0], t);
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) store8(acc + r * D + d0 + 8 * w, S == 2 ? a[0][r][w] + a[S - 1][r][w] : a[0][r][w]);
}

template <int R, class T>
inline void pv_group(const float* p, const T* v, int D, int n, float* acc) {
  int d = 0;
  for (; d + 16 <= D; d += 16) pv_rows<R, 2>(p, v, D, n, acc, d);
  if (d < D) pv_rows<R, 1>(p, v, D, n, acc, d);
}

template <class T>
void pv_segment(const float* p, int G, int D, const T* v, int n, float* acc) {
  int g = 0;
  for (; g + 4 <= G; g += 4) pv_group<4>(p + g * kSegStride, v, D, n, acc + g * D);
  switch (G - g) {
    case 3: pv_group<3>(p + g * kSegStride, v, D, n, acc + g * D); break;
    case 2: pv_group<2>(p + g * kSegStride, v, D, n, acc + g * D); break;
    case 1: pv_group<1>(p + g * kSegStride, v, D, n, acc + g * D); break;
    default: break;
  }
}

size_t decode_scratch(const Problem& p) {
  const size_t G = p.group, D = p.head_dim;
  return 2 * G * D + G * kSegStride + 2 * G + 64;
}

template <class T>
void decode_impl(const Problem& p, const DecodeTask& task, float* partial, float* scratch) {
  const int G = p.group, D = p.head_dim;
  float* q = scratch;                // [G, D]
  float* acc = q + G * D;            // [G, D]
  float* s = acc + G * D;            // [G, kSegStride]
  float* m = s + G * kSegStride;     // [G]
  float* l = m + G;                  // [G]
  load_queries<T>(p, task.seq, 1, task.kv_head, q);
  pair_order<T>(q, G, D, true);
  for (int g = 0; g < G; ++g) m[g] = kNegInf, l[g] = 0.0f;
  memset(acc, 0, sizeof(float) * G * D);
  const T* k = static_cast<const T*>(p.k_cache) + task.kv_head * p.cache_stride_h;
  const T* v = static_cast<const T*>(p.v_cache) + task.kv_head * p.cache_stride_h;
  RunCursor runs{p.block_tables + task.seq * p.block_table_stride, p.block_size, task.key_begin, task.key_end, kSeg};
  for (Run run = runs.next(), ahead; run.n > 0; run = ahead) {
    ahead = runs.next();
    score_segment(q, G, D, k + run.slot * D, v + run.slot * D, run.n, s, k + ahead.slot * D, ahead.n);
    for (int g = 0; g < G; ++g) online_softmax_row(s + g * kSegStride, run.n, m[g], l[g], acc + g * D, D);
    pv_segment(s, G, D, v + run.slot * D, run.n, acc);
  }
  pair_order<T>(acc, G, D, false);
  if (task.num_splits == 1) return store_rows<T>(p, task.seq, 1, task.kv_head, acc, D, l);
  memcpy(partial, m, sizeof(float) * G);  // (max, sum, acc) of the partition, for decode_combine
  memcpy(partial + G, l, sizeof(float) * G);
  memcpy(partial + 2 * G, acc, sizeof(float) * G * D);
}

// Merges the num_splits partitions' (max, sum, acc), consecutive at partials, into the
// output rows of (seq, kv_head). scratch: decode_scratch floats.
template <class T>
void decode_combine_impl(const Problem& p, int32_t seq, int32_t kv_head, int32_t num_splits, const float* partials,
                         float* scratch) {
  const int G = p.group, D = p.head_dim;
  const int64_t stride = int64_t(G) * (D + 2);
  float* acc = scratch;  // [G, D]
  float* l = acc + G * D;  // [G]
  memset(acc, 0, sizeof(float) * G * D);
  for (int g = 0; g < G; ++g) {
    float m_max = kNegInf;
    for (int i = 0; i < num_splits; ++i) m_max = fmax_(m_max, partials[i * stride + g]);
    l[g] = 0.0f;
    for (int i = 0; i < num_splits; ++i) {
      const float* part = partials + i * stride;
      const float w = __builtin_exp2f(part[g] - m_max);
      l[g] += w * part[G + g];
      const float* a = part + 2 * G + g * D;
      for (int d = 0; d < D; d += 8) store8(acc + g * D + d, load8(acc + g * D + d) + load8(a + d) * w);
    }
  }
  store_rows<T>(p, seq, 1, kv_head, acc, D, l);
}

}  // namespace
}  // namespace PDSERVE_ISA
}  // namespace pdserve
