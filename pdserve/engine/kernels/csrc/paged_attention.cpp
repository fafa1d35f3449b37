// The pdserve::paged_attention_decode and pdserve::paged_attention_prefill ops (CPU).
//
// Each reads a sequence's K/V blocks where they lie in one layer's cache
// [Hkv, S, D] (no gather copy). This file checks the arguments, plans the work as
// tasks (decode: sequence x KV head x partition of the context, flash-decoding;
// prefill: sequence x KV head x tile of query tokens), and runs the tasks on
// at::parallel_for's threads (torch.set_num_threads), which pull them from a shared
// counter, largest first. The math lives in attention_kernels.cpp and the headers it
// includes (decode_kernel.h, prefill_kernel.h), compiled once per instruction set; the
// best table the CPU runs is picked at load time (select_isa overrides it, for tests).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "attention_kernels.h"

namespace pdserve {
namespace {

constexpr int64_t kMinSplitKeys = 256;     // a decode partition is at least this many keys
constexpr int64_t kTasksPerThread = 8;     // decode: enough partitions to balance the threads
constexpr int64_t kMinParallelKeys = 2048; // decode: fewer keys (x KV heads) run on one thread
constexpr int64_t kPrefillRows = 192;      // prefill: query rows (tokens x G) per tile

// ---- Instruction set ----------------------------------------------------------------

bool cpu_runs(const std::string& isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == "generic";
}

const Kernels* table_of(const std::string& isa) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa == "avx512") return &avx512::kernels();
  if (isa == "avx2") return &avx2::kernels();
#endif
  if (isa == "generic") return &generic::kernels();
  return nullptr;
}

const Kernels* best_table() {
  for (const char* isa : {"avx512", "avx2", "generic"})
    if (cpu_runs(isa)) return table_of(isa);
  return &generic::kernels();
}

std::atomic<const Kernels*> g_kernels{best_table()};

// "auto": the best the CPU runs; "avx512", "avx2", "generic": that one if the CPU runs
// it (else an error); "": no change. Returns the set in use.
std::string select_isa(const std::string& isa) {
  if (isa == "auto") {
    g_kernels.store(best_table());
  } else if (!isa.empty()) {
    const Kernels* table = table_of(isa);
    TORCH_CHECK(table != nullptr && cpu_runs(isa), "pdserve::select_isa: this CPU or build does not run '", isa, "'");
    g_kernels.store(table);
  }
  return g_kernels.load()->isa;
}

// ---- Running tasks ------------------------------------------------------------------

// Per-thread scratch, kept between calls (warm pages), 64-byte aligned.
float* thread_scratch(size_t floats) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < floats + 16) buffer.resize(floats + 16);
  auto addr = reinterpret_cast<uintptr_t>(buffer.data());
  return reinterpret_cast<float*>((addr + 63) & ~uintptr_t(63));
}

// Runs run(task, scratch) for every task; tasks should come largest first.
template <class Task, class Fn>
void run_tasks(const std::vector<Task>& tasks, size_t scratch_floats, bool parallel, const Fn& run) {
  const int64_t n = static_cast<int64_t>(tasks.size());
  const int64_t workers = parallel ? std::min<int64_t>(at::get_num_threads(), n) : 1;
  if (workers <= 1) {
    float* scratch = thread_scratch(scratch_floats);
    for (const Task& t : tasks) run(t, scratch);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    float* scratch = thread_scratch(scratch_floats);
    for (int64_t w = begin; w < end; ++w)
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) run(tasks[i], scratch);
  });
}

// ---- Argument checks ----------------------------------------------------------------

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: break;
  }
  TORCH_CHECK(false, "pdserve paged attention: unsupported dtype ", t.scalar_type());
  return DType::kFloat32;
}

void check_int32(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kInt && t.dim() == dim, "pdserve paged attention: ",
              name, " must be a CPU int32 tensor of ", dim, " dimensions, got ", t.scalar_type(), " ", t.sizes());
}

// The Problem of q [T, H, D] against one layer's cache; out is allocated [T, H, D].
Problem make_problem(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, int64_t block_size, double scale, at::Tensor& out) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "pdserve paged attention: tensors must be on the CPU");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3, "pdserve paged attention: q must be [T, H, D] and the caches "
              "[Hkv, S, D], got ", q.sizes(), " and ", k_cache.sizes());
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "pdserve paged attention: q, k_cache and v_cache must share a dtype");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "pdserve paged attention: k_cache and v_cache must be contiguous and of one shape");
  const int64_t H = q.size(1), D = q.size(2), Hkv = k_cache.size(0), S = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == D && D % 8 == 0 && D > 0 && D <= 256,
              "pdserve paged attention: head_dim must match and be a multiple of 8 up to 256, got ", D);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "pdserve paged attention: ", H, " query heads for ", Hkv, " KV heads");
  TORCH_CHECK(block_size > 0 && S % block_size == 0, "pdserve paged attention: block_size ", block_size,
              " does not divide the cache's ", S, " slots");
  TORCH_CHECK(q.stride(2) == 1, "pdserve paged attention: q's last dimension must be contiguous");
  out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  Problem p{};
  p.dtype = dtype_of(q);
  p.num_kv_heads = static_cast<int32_t>(Hkv);
  p.group = static_cast<int32_t>(H / Hkv);
  p.head_dim = static_cast<int32_t>(D);
  p.block_size = static_cast<int32_t>(block_size);
  p.scale = static_cast<float>(scale);
  p.q = q.data_ptr();
  p.q_stride_t = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.cache_stride_h = S * D;
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.block_table_stride = block_tables.size(1);
  p.out = out.data_ptr();
  return p;
}

// Every block a sequence of `keys` keys reads (its table's first ceil(keys / bs)) exists.
void check_blocks(const int32_t* table, int64_t width, int64_t keys, int64_t block_size, int64_t num_blocks,
                  int64_t seq) {
  const int64_t used = (keys + block_size - 1) / block_size;
  TORCH_CHECK(used <= width, "pdserve paged attention: sequence ", seq, " has ", keys, " keys but its block "
              "table lists ", width, " blocks of ", block_size);
  for (int64_t i = 0; i < used; ++i)
    TORCH_CHECK(table[i] >= 0 && table[i] < num_blocks, "pdserve paged attention: sequence ", seq, " lists block ",
                table[i], ", outside the cache's ", num_blocks);
}

// ---- Decode ---------------------------------------------------------------------------

// Partitions of every (sequence, KV head), largest first; split ones get partial slots.
struct DecodePlan {
  std::vector<DecodeTask> tasks;
  std::vector<int64_t> group_base;  // first partial slot of each split (sequence, KV head)
  int64_t num_partials = 0;
};

// About kTasksPerThread partitions per thread over all the keys, each a whole number of
// blocks and at least kMinSplitKeys long: a long sequence beside short ones is split,
// so it does not serialise the step; with one thread nothing is split.
DecodePlan plan_decode(const int32_t* lens, int64_t batch, int64_t num_kv_heads, int64_t block_size,
                       int64_t total_keys, int64_t threads) {
  int64_t chunk = INT32_MAX;
  if (threads > 1) {
    chunk = std::max(kMinSplitKeys, (total_keys + threads * kTasksPerThread - 1) / (threads * kTasksPerThread));
    chunk = (chunk + block_size - 1) / block_size * block_size;
  }
  DecodePlan plan;
  for (int32_t b = 0; b < batch; ++b) {
    const auto splits = static_cast<int32_t>((lens[b] + chunk - 1) / chunk);
    for (int32_t h = 0; h < num_kv_heads; ++h) {
      const int32_t group_index = splits > 1 ? static_cast<int32_t>(plan.group_base.size()) : -1;
      if (splits > 1) {
        plan.group_base.push_back(plan.num_partials);
        plan.num_partials += splits;
      }
      for (int32_t s = 0; s < splits; ++s) {
        const auto begin = static_cast<int32_t>(s * chunk);
        const auto end = static_cast<int32_t>(std::min<int64_t>(lens[b], begin + chunk));
        plan.tasks.push_back({b, h, begin, end, group_index, s, splits});
      }
    }
  }
  std::stable_sort(plan.tasks.begin(), plan.tasks.end(), [](const DecodeTask& x, const DecodeTask& y) {
    return x.key_end - x.key_begin > y.key_end - y.key_begin;
  });
  return plan;
}

at::Tensor paged_attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                                  double scale) {
  check_int32(block_tables, 2, "block_tables");
  check_int32(context_lens, 1, "context_lens");
  const at::Tensor tables = block_tables.contiguous(), lens_t = context_lens.contiguous();
  at::Tensor out;
  const Problem p = make_problem(q, k_cache, v_cache, tables, block_size, scale, out);
  const int64_t B = q.size(0), num_blocks = k_cache.size(1) / block_size;
  TORCH_CHECK(tables.size(0) == B && lens_t.size(0) == B, "pdserve paged_attention_decode: ", B,
              " queries but block_tables ", tables.sizes(), " and context_lens ", lens_t.sizes());
  const int32_t* lens = lens_t.data_ptr<int32_t>();
  int64_t total_keys = 0;  // x KV heads
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] >= 1, "pdserve paged_attention_decode: context_lens[", b, "] = ", lens[b], ", must be >= 1");
    check_blocks(p.block_tables + b * p.block_table_stride, p.block_table_stride, lens[b], block_size, num_blocks, b);
    total_keys += int64_t(lens[b]) * p.num_kv_heads;
  }
  if (B == 0) return out;
  const int64_t threads = total_keys >= kMinParallelKeys ? at::get_num_threads() : 1;
  const DecodePlan plan = plan_decode(lens, B, p.num_kv_heads, block_size, total_keys, threads);
  const Kernels& kernels = *g_kernels.load();
  const int64_t partial_floats = int64_t(p.group) * (p.head_dim + 2);
  std::vector<float> partials(plan.num_partials * partial_floats);
  std::unique_ptr<std::atomic<int32_t>[]> remaining(new std::atomic<int32_t>[plan.group_base.size()]);
  for (const DecodeTask& t : plan.tasks)
    if (t.num_splits > 1 && t.split == 0) remaining[t.group_index].store(t.num_splits);
  run_tasks(plan.tasks, kernels.decode_scratch(p), threads > 1, [&](const DecodeTask& t, float* scratch) {
    if (t.num_splits == 1) return kernels.decode(p, t, nullptr, scratch);
    float* group = partials.data() + plan.group_base[t.group_index] * partial_floats;
    kernels.decode(p, t, group + t.split * partial_floats, scratch);
    // The last partition of its (sequence, KV head) to finish merges them all.
    if (remaining[t.group_index].fetch_sub(1, std::memory_order_acq_rel) == 1)
      kernels.decode_combine(p, t.seq, t.kv_head, t.num_splits, group, scratch);
  });
  return out;
}

// ---- Prefill --------------------------------------------------------------------------

// Tiles of about kPrefillRows query rows (tokens x G), halved down to 16 tokens while
// that leaves threads without about 4 tiles each; largest (most keys) first.
std::vector<PrefillTask> plan_prefill(const int32_t* starts, const int32_t* pos, int64_t num_seqs, int64_t group,
                                      int64_t num_kv_heads, int64_t threads, int64_t* tile_tokens) {
  int64_t tile = std::max<int64_t>(8, kPrefillRows / group);
  auto count_tiles = [&](int64_t t) {
    int64_t c = 0;
    for (int64_t n = 0; n < num_seqs; ++n) c += (starts[n + 1] - starts[n] + t - 1) / t;
    return c * num_kv_heads;
  };
  while (tile > 16 && count_tiles(tile) < 4 * threads) tile /= 2;
  std::vector<PrefillTask> tasks;
  for (int32_t n = 0; n < num_seqs; ++n)
    for (int32_t h = 0; h < num_kv_heads; ++h)
      for (int32_t r = starts[n]; r < starts[n + 1]; r += tile) {
        const auto rows = static_cast<int32_t>(std::min<int64_t>(tile, starts[n + 1] - r));
        tasks.push_back({n, h, r, rows, pos[n] + (r - starts[n])});
      }
  auto cost = [](const PrefillTask& t) { return int64_t(t.num_tokens) * (t.first_pos + t.num_tokens); };
  std::stable_sort(tasks.begin(), tasks.end(),
                   [&](const PrefillTask& x, const PrefillTask& y) { return cost(x) > cost(y); });
  *tile_tokens = tile;
  return tasks;
}

at::Tensor paged_attention_prefill(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& block_tables, const at::Tensor& query_start,
                                   const at::Tensor& start_pos, int64_t block_size, double scale) {
  check_int32(block_tables, 2, "block_tables");
  check_int32(query_start, 1, "query_start");
  check_int32(start_pos, 1, "start_pos");
  const at::Tensor tables = block_tables.contiguous(), qs_t = query_start.contiguous(), pos_t = start_pos.contiguous();
  at::Tensor out;
  const Problem p = make_problem(q, k_cache, v_cache, tables, block_size, scale, out);
  const int64_t N = pos_t.size(0), T = q.size(0), num_blocks = k_cache.size(1) / block_size;
  TORCH_CHECK(qs_t.size(0) == N + 1 && tables.size(0) == N, "pdserve paged_attention_prefill: ", N,
              " sequences but query_start ", qs_t.sizes(), " and block_tables ", tables.sizes());
  const int32_t* qs = qs_t.data_ptr<int32_t>();
  const int32_t* pos = pos_t.data_ptr<int32_t>();
  TORCH_CHECK(N == 0 ? T == 0 : (qs[0] == 0 && qs[N] == T), "pdserve paged_attention_prefill: query_start must run "
              "from 0 to the ", T, " query rows");
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(qs[n + 1] >= qs[n] && pos[n] >= 0, "pdserve paged_attention_prefill: sequence ", n,
                " has query_start ", qs[n], "..", qs[n + 1], " and start_pos ", pos[n]);
    check_blocks(p.block_tables + n * p.block_table_stride, p.block_table_stride, pos[n] + qs[n + 1] - qs[n],
                 block_size, num_blocks, n);
  }
  if (T == 0) return out;
  int64_t tile = 0;
  const auto tasks = plan_prefill(qs, pos, N, p.group, p.num_kv_heads, at::get_num_threads(), &tile);
  const Kernels& kernels = *g_kernels.load();
  run_tasks(tasks, kernels.prefill_scratch(p, static_cast<int32_t>(tile)), true,
            [&](const PrefillTask& t, float* scratch) { kernels.prefill(p, t, scratch); });
  return out;
}

}  // namespace
}  // namespace pdserve

TORCH_LIBRARY(pdserve, m) {
  m.def("paged_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, int block_size, float scale) -> Tensor");
  m.def("paged_attention_prefill(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor query_start, Tensor start_pos, int block_size, float scale) -> Tensor");
  m.def("select_isa(str isa) -> str", &pdserve::select_isa);
}

TORCH_LIBRARY_IMPL(pdserve, CPU, m) {
  m.impl("paged_attention_decode", &pdserve::paged_attention_decode);
  m.impl("paged_attention_prefill", &pdserve::paged_attention_prefill);
}
