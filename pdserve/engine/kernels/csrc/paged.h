// What the decode and prefill kernels share: walking a block table as runs of
// contiguous slots, queries in, output rows out, and the online softmax of one row.
// Included once, by attention_kernels.cpp, after simd.h (see there for why the
// anonymous namespace).
#pragma once

#include "attention_kernels.h"
#include "simd.h"

namespace pdserve {
namespace PDSERVE_ISA {
namespace {

struct Run {
  int64_t slot;  // first slot of the run
  int32_t n;     // keys in the run
};

// From key p (< end) on, the longest run of keys whose slots are consecutive, at most
// cap keys: a block, or several when the table lists consecutive block ids (fresh
// allocations come in order), so that a tile of keys is often one stretch of memory.
inline Run next_run(const int32_t* table, int32_t bs, int32_t p, int32_t end, int32_t cap) {
  int32_t b = p / bs, n = bs - (p - b * bs);
  const int32_t limit = imin(end - p, cap);
  const int64_t slot = int64_t(table[b]) * bs + (p - b * bs);
  while (n < limit && table[b + 1] == table[b] + 1) {
    ++b;
    n += bs;
  }
  return {slot, imin(n, limit)};
}

// A sequence's keys [pos, end) as runs of at most cap keys, then {0, 0}.
struct RunCursor {
  const int32_t* table;
  int32_t block_size, pos, end, cap;
  Run next() {
    if (pos >= end) return {0, 0};
    const Run r = next_run(table, block_size, pos, end, cap);
    pos += r.n;
    return r;
  }
};

// The G query rows of one KV head for num_tokens tokens, fp32, prescaled by
// scale * log2(e) (scores in base 2): row t * G + g is token t's head kv_head * G + g.
template <class T>
void load_queries(const Problem& p, int32_t first_row, int32_t num_tokens, int32_t kv_head, float* dst) {
  const T* q = static_cast<const T*>(p.q);
  const int G = p.group, D = p.head_dim;
  const float s = p.scale * kLog2e;
  for (int t = 0; t < num_tokens; ++t)
    for (int g = 0; g < G; ++g) {
      const T* src = q + (first_row + t) * p.q_stride_t + (int64_t(kv_head) * G + g) * p.q_stride_h;
      float* row = dst + (int64_t(t) * G + g) * D;
      for (int d = 0; d < D; d += 8) store8(row + d, load8(src + d) * s);
    }
}

// out[first_row + t, kv_head * G + g, :] = acc[r] / l[r], r = t * G + g.
template <class T>
void store_rows(const Problem& p, int32_t first_row, int32_t num_tokens, int32_t kv_head, const float* acc,
                int acc_stride, const float* l) {
  T* out = static_cast<T*>(p.out);
  const int G = p.group, D = p.head_dim;
  const int64_t H = int64_t(p.num_kv_heads) * G;
  for (int t = 0; t < num_tokens; ++t)
    for (int g = 0; g < G; ++g) {
      const int r = t * G + g;
      const float inv = 1.0f / l[r];
      T* dst = out + ((first_row + t) * H + int64_t(kv_head) * G + g) * D;
      const float* src = acc + int64_t(r) * acc_stride;
      for (int d = 0; d < D; ++d) dst[d] = from_f32<T>(src[d] * inv);
    }
}

// Folds the scores s[0, n) of one row into its running max m, sum l and accumulator
// acc (width floats, rescaled when the max moves); s becomes the probabilities, padded
// with zeros to a multiple of 8 (s must have room for it). Base 2 throughout.
inline void online_softmax_row(float* s, int n, float& m, float& l, float* acc, int width) {
  const int np = round_up(n, 8);
  for (int t = n; t < np; ++t) s[t] = kNegInf;
  v8f mx = splat<v8f>(kNegInf);
  for (int t = 0; t < np; t += 8) {
    const v8f x = load8(s + t);
    mx = x > mx ? x : mx;
  }
  const float m_new = fmax_(m, hmax(mx));
  if (m_new == kNegInf) return;  // every key masked: nothing to add
  const float alpha = m == kNegInf ? 0.0f : __builtin_exp2f(m - m_new);
  v8f sum = {};
  for (int t = 0; t < np; t += 8) {
    const v8f e = exp2v(load8(s + t) - m_new);
    store8(s + t, e);
    sum += e;
  }
  l = l * alpha + hsum(sum);
  m = m_new;
  if (alpha != 1.0f)
    for (int d = 0; d < width; d += 8) store8(acc + d, load8(acc + d) * alpha);
}

}  // namespace
}  // namespace PDSERVE_ISA
}  // namespace pdserve
