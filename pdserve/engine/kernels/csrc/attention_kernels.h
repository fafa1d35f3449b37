// The interface between the torch glue (paged_attention.cpp) and the attention
// kernels (attention_kernels.cpp and the headers it includes). The kernels include no
// torch header: they are compiled once per instruction set (avx512, avx2, generic) into
// namespaces of those names, and the glue picks one table at run time from what the
// CPU supports.
// All element offsets and strides below count elements, not bytes.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pdserve {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One call's shapes and pointers: queries [T, H, D], one layer's paged K/V cache
// [Hkv, S, D] (head-major, slots contiguous), block tables [N, M], output [T, H, D].
struct Problem {
  DType dtype;
  int32_t num_kv_heads;
  int32_t group;      // query heads per KV head: query head j reads KV head j / group
  int32_t head_dim;   // a multiple of 8, at most 256
  int32_t block_size;
  float scale;        // softmax scale of q.k
  const void* q;
  int64_t q_stride_t, q_stride_h;  // q's last dimension is contiguous
  const void* k_cache;
  const void* v_cache;
  int64_t cache_stride_h;  // S * D
  const int32_t* block_tables;
  int64_t block_table_stride;
  void* out;  // contiguous [T, H, D]
};

// A decode partition: keys [key_begin, key_end) of one sequence for one KV head.
struct DecodeTask {
  int32_t seq;
  int32_t kv_head;
  int32_t key_begin;
  int32_t key_end;
  int32_t group_index;  // index of (seq, kv_head) among the split ones; unused when not split
  int32_t split;        // which partition of the sequence this is
  int32_t num_splits;   // 1: the task writes the output itself
};

// A prefill tile: num_tokens consecutive query rows of one sequence's chunk, one KV
// head; row q_row attends keys [0, pos + 1) where pos = first_pos + (q_row - first_row).
struct PrefillTask {
  int32_t seq;
  int32_t kv_head;
  int32_t first_row;
  int32_t num_tokens;
  int32_t first_pos;
};

struct Kernels {
  const char* isa;
  // Floats of per-thread scratch the decode kernel needs.
  size_t (*decode_scratch)(const Problem& p);
  // Runs one partition. A split task writes (max, sum, acc) of its G rows to partial,
  // G * (D + 2) floats; an unsplit one writes the output rows.
  void (*decode)(const Problem& p, const DecodeTask& task, float* partial, float* scratch);
  // Merges the num_splits partials (consecutive, G * (D + 2) floats each) into the output.
  void (*decode_combine)(const Problem& p, int32_t seq, int32_t kv_head, int32_t num_splits,
                         const float* partials, float* scratch);
  // Floats of per-thread scratch a prefill tile of up to max_tokens query tokens needs.
  size_t (*prefill_scratch)(const Problem& p, int32_t max_tokens);
  void (*prefill)(const Problem& p, const PrefillTask& task, float* scratch);
};

namespace avx512 { const Kernels& kernels(); }
namespace avx2 { const Kernels& kernels(); }
namespace generic { const Kernels& kernels(); }

}  // namespace pdserve
