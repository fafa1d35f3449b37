// Structured output's token masks applied to logits in place: for each constrained row r,
// logits[rows[r], t] = -inf for every token t whose bit is clear in bitmask[r] (bit t % 32 of
// int32 word t / 32, set = allowed; the layout grammar libraries fill). One pass per row that
// skips whole words with every token allowed and writes -inf over words with none; tokens past
// 32 * words (a vocabulary wider than the mask) are forbidden. The PyTorch oracle is
// pdserve/engine/structured_output.py's apply_token_bitmask_reference.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace {

void apply_token_bitmask(at::Tensor logits, const at::Tensor& rows, const at::Tensor& bitmask) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "logits must be a contiguous [B, V] float32 tensor");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.scalar_type() == at::kInt && bitmask.is_contiguous(),
              "bitmask must be a contiguous [R, W] int32 tensor");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.size(0) == bitmask.size(0),
              "rows must be [R] int64, one per bitmask row");
  const int64_t vocab = logits.size(1), words = bitmask.size(1), batch = logits.size(0);
  const int64_t* row_ids = rows.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows.size(0); ++r) {
    TORCH_CHECK(row_ids[r] >= 0 && row_ids[r] < batch, "row ", row_ids[r], " out of [0, ", batch, ")");
  }
  const float neg_inf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, rows.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* out = logits.data_ptr<float>() + row_ids[r] * vocab;
      const uint32_t* mask = reinterpret_cast<const uint32_t*>(bitmask.data_ptr<int32_t>()) + r * words;
      for (int64_t w = 0; w < words && w * 32 < vocab; ++w) {
        const uint32_t bits = mask[w];
        if (bits == 0xFFFFFFFFu) continue;
        const int64_t base = w * 32, n = std::min<int64_t>(32, vocab - base);
        if (bits == 0) {
          std::fill(out + base, out + base + n, neg_inf);
          continue;
        }
        for (int64_t k = 0; k < n; ++k) {
          if (!((bits >> k) & 1u)) out[base + k] = neg_inf;
        }
      }
      for (int64_t t = words * 32; t < vocab; ++t) out[t] = neg_inf;
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) {
  m.def("apply_token_bitmask_(Tensor(a!) logits, Tensor rows, Tensor bitmask) -> ()");
}

TORCH_LIBRARY_IMPL(pdserve, CPU, m) {
  m.impl("apply_token_bitmask_", &apply_token_bitmask);
}
