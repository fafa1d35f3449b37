// The attention kernels of one instruction set, as the table the glue picks from.
//
// build.py compiles this file once per instruction set: with -DPDSERVE_ISA_AVX512 and
// the AVX-512 -m flags, with -DPDSERVE_ISA_AVX2 and the AVX2 ones, and with neither
// (generic); each object defines its own pdserve::<isa>::kernels(). No torch header
// here: three compiles of it stay cheap.
//   simd.h           vectors, element types, conversions, exp2
//   paged.h          block-table runs, queries in, rows out, online softmax
//   decode_kernel.h  one query row per sequence, flash-decoding partitions
//   prefill_kernel.h causal tiles of query tokens, register-blocked GEMMs
#include "attention_kernels.h"

#include "decode_kernel.h"
#include "prefill_kernel.h"

namespace pdserve {
namespace PDSERVE_ISA {
namespace {

void decode(const Problem& p, const DecodeTask& task, float* partial, float* scratch) {
  switch (p.dtype) {
    case DType::kFloat32: return decode_impl<float>(p, task, partial, scratch);
    case DType::kBFloat16: return decode_impl<Bf16>(p, task, partial, scratch);
    case DType::kFloat16: return decode_impl<Half>(p, task, partial, scratch);
  }
}

void decode_combine(const Problem& p, int32_t seq, int32_t kv_head, int32_t num_splits, const float* partials,
                    float* scratch) {
  switch (p.dtype) {
    case DType::kFloat32: return decode_combine_impl<float>(p, seq, kv_head, num_splits, partials, scratch);
    case DType::kBFloat16: return decode_combine_impl<Bf16>(p, seq, kv_head, num_splits, partials, scratch);
    case DType::kFloat16: return decode_combine_impl<Half>(p, seq, kv_head, num_splits, partials, scratch);
  }
}

void prefill(const Problem& p, const PrefillTask& task, float* scratch) {
  switch (p.dtype) {
    case DType::kFloat32: return prefill_impl<float>(p, task, scratch);
    case DType::kBFloat16: return prefill_impl<Bf16>(p, task, scratch);
    case DType::kFloat16: return prefill_impl<Half>(p, task, scratch);
  }
}

#define PDSERVE_STR2(x) #x
#define PDSERVE_STR(x) PDSERVE_STR2(x)

}  // namespace

const Kernels& kernels() {
  static const Kernels table = {PDSERVE_STR(PDSERVE_ISA), decode_scratch, decode, decode_combine,
                                prefill_scratch, prefill};
  return table;
}

}  // namespace PDSERVE_ISA
}  // namespace pdserve
