// Weight-only quantized linears for decode on the CPU: y = x W^T, W in 4 or 8 bits, x and
// every product in fp32 (bf16 activations are widened first), so the result is the dense
// product with the dequantized weight up to fp32 rounding. The Python side is
// pdserve/engine/quantization.py: its Int4Weight / Int8Weight define the formats, and its
// *_reference functions are what these kernels must equal.
//
//   int4: w[n, k] = scale[n, k / 32] * q[n, k] + offset[n, k / 32], q in 0..15, two per byte
//         in GGUF Q4_1's order (in a group's 16 bytes, byte i holds columns i and i + 16).
//         sum_k w[n, k] x[k] = sum_g scale[n, g] (sum_i q x) + sum_g offset[n, g] xsum[g],
//         so the offsets cost one scalar FMA per group with the groups' sums of x.
//   int8: w[n, k] = scale[n, k / gs] * q[n, k], q in -127..127, gs = K / G for scale [N, G]:
//         G = 1 is per output channel, gs = 32 is GGUF Q8_0 (the group sums are scaled once each).
//
// One file, one binary for every x86-64: the inner loops exist per instruction set (AVX-512,
// AVX2 + FMA, portable C++), each compiled under `#pragma GCC target`, and the glue picks one
// at run time from what the CPU reports; no -march flag. (GCC 12's generic vector extensions
// under target_clones scalarize the u8/i8 -> f32 widening, 3-5x slower, hence intrinsics.)
// A tile of up to kRowTile activation rows shares every unpacked weight group; each task
// owns kRowsPerTask output features, so a thread reads its weights once per call.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

namespace {

constexpr int64_t kGroup = 32;        // int4 weights per (scale, offset)
constexpr int kRowTile = 4;           // activation rows sharing one unpacked weight group
constexpr int64_t kRowsPerTask = 16;  // output features per parallel task

// Output features [n0, n1) for MT activation rows x ([MT, K], row stride K) into y (row stride ldy).
struct Int4Args {
  const float* x;
  const float* xsum;  // [MT, K / 32]
  int64_t K;
  const uint8_t* packed;
  const float* scale;
  const float* offset;
  float* y;
  int64_t ldy;
};

struct Int8Args {
  const float* x;
  int64_t K;
  const int8_t* q;
  const float* scale;  // [N, G]
  int64_t G;           // scales per row; a group is K / G weights, a multiple of 16
  float* y;
  int64_t ldy;
};

// -- portable C++ ------------------------------------------------------------------------------

struct Generic {
  template <int MT>
  static void int4_rows(const Int4Args& a, int64_t n0, int64_t n1) {
    const int64_t G = a.K / kGroup;
    for (int64_t n = n0; n < n1; ++n) {
      float acc[MT] = {};
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* b = a.packed + n * (a.K / 2) + g * 16;
        const float d = a.scale[n * G + g], m = a.offset[n * G + g];
        for (int r = 0; r < MT; ++r) {
          const float* xr = a.x + r * a.K + g * kGroup;
          float t = 0.f;
          for (int i = 0; i < 16; ++i) t += float(b[i] & 0x0F) * xr[i] + float(b[i] >> 4) * xr[i + 16];
          acc[r] += t * d + m * a.xsum[r * G + g];
        }
      }
      for (int r = 0; r < MT; ++r) a.y[r * a.ldy + n] = acc[r];
    }
  }

  // Rows [n0, n1) of the dense weight, w[n, k] at w + n * K + k.
  static void int4_dequantize_rows(const uint8_t* packed, const float* scale, const float* offset, int64_t K,
                                   int64_t n0, int64_t n1, float* w) {
    for (int64_t i = n0 * (K / kGroup); i < n1 * (K / kGroup); ++i) {  // i: a group of the whole weight
      for (int j = 0; j < 16; ++j) {
        w[i * kGroup + j] = float(packed[i * 16 + j] & 0x0F) * scale[i] + offset[i];
        w[i * kGroup + j + 16] = float(packed[i * 16 + j] >> 4) * scale[i] + offset[i];
      }
    }
  }

  template <int MT>
  static void int8_rows(const Int8Args& a, int64_t n0, int64_t n1) {
    const int64_t gs = a.K / a.G;
    for (int64_t n = n0; n < n1; ++n) {
      for (int r = 0; r < MT; ++r) {
        float acc = 0.f;
        for (int64_t g = 0; g < a.G; ++g) {
          float t = 0.f;
          for (int64_t k = g * gs; k < (g + 1) * gs; ++k) t += float(a.q[n * a.K + k]) * a.x[r * a.K + k];
          acc += t * a.scale[n * a.G + g];
        }
        a.y[r * a.ldy + n] = acc;
      }
    }
  }
};

// -- AVX2 + FMA --------------------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx2,fma")

struct Avx2 {
  static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }

  // q of a group's 32 columns: q[0] columns 0-7, q[1] 8-15 (low nibbles), q[2] 16-23, q[3] 24-31.
  static inline void unpack32(const uint8_t* p, __m256 q[4]) {
    const __m256i low = _mm256_set1_epi32(0x0F);
    const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
    q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(b0, low));
    q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b1, low));
    q[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4));
    q[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));
  }

  template <int MT>
  static void int4_rows(const Int4Args& a, int64_t n0, int64_t n1) {
    const int64_t G = a.K / kGroup;
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* p = a.packed + n * (a.K / 2);
      const float* s = a.scale + n * G;
      const float* o = a.offset + n * G;
      __m256 acc[MT];
      float off[MT];  // sum_g offset * xsum: a scalar chain that overlaps the vector work
      for (int r = 0; r < MT; ++r) acc[r] = _mm256_setzero_ps(), off[r] = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        __m256 q[4];
        unpack32(p + g * 16, q);
        const __m256 d = _mm256_broadcast_ss(s + g);
        for (int r = 0; r < MT; ++r) {
          const float* xr = a.x + r * a.K + g * kGroup;
          // Two short chains instead of one of four: the group's latency, not its work, bounds MT = 1.
          const __m256 t01 = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xr + 8),
                                             _mm256_mul_ps(q[0], _mm256_loadu_ps(xr)));
          const __m256 t23 = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xr + 24),
                                             _mm256_mul_ps(q[2], _mm256_loadu_ps(xr + 16)));
          acc[r] = _mm256_fmadd_ps(_mm256_add_ps(t01, t23), d, acc[r]);
          off[r] += o[g] * a.xsum[r * G + g];
        }
      }
      for (int r = 0; r < MT; ++r) a.y[r * a.ldy + n] = hsum(acc[r]) + off[r];
    }
  }

  static void int4_dequantize_rows(const uint8_t* packed, const float* scale, const float* offset, int64_t K,
                                   int64_t n0, int64_t n1, float* w) {
    for (int64_t i = n0 * (K / kGroup); i < n1 * (K / kGroup); ++i) {
      __m256 q[4];
      unpack32(packed + i * 16, q);
      const __m256 d = _mm256_broadcast_ss(scale + i), m = _mm256_broadcast_ss(offset + i);
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(w + i * kGroup + 8 * j, _mm256_fmadd_ps(q[j], d, m));
    }
  }

  static inline __m256 widen8(const int8_t* p) {  // 8 int8 -> 8 floats
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }

  template <int MT>
  static void int8_rows(const Int8Args& a, int64_t n0, int64_t n1) {
    const int64_t gs = a.K / a.G;
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* qn = a.q + n * a.K;
      __m256 acc[MT];
      for (int r = 0; r < MT; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t g = 0; g < a.G; ++g) {
        __m256 sum[MT];
        for (int r = 0; r < MT; ++r) sum[r] = _mm256_setzero_ps();
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
          const __m256 w0 = widen8(qn + k), w1 = widen8(qn + k + 8);
          for (int r = 0; r < MT; ++r) {
            const float* xr = a.x + r * a.K + k;
            const __m256 t = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), _mm256_mul_ps(w0, _mm256_loadu_ps(xr)));
            sum[r] = _mm256_add_ps(sum[r], t);
          }
        }
        const __m256 d = _mm256_broadcast_ss(a.scale + n * a.G + g);
        for (int r = 0; r < MT; ++r) acc[r] = _mm256_fmadd_ps(sum[r], d, acc[r]);
      }
      for (int r = 0; r < MT; ++r) a.y[r * a.ldy + n] = hsum(acc[r]);
    }
  }
};

#pragma GCC pop_options

// -- AVX-512 (F + BW) --------------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx2,fma")
#pragma GCC diagnostic push
// GCC 12's own _mm512_cvtepu8_epi32 trips this (its _mm512_undefined_epi32 operand).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

struct Avx512 {
  // q of a group's 32 columns: q[0] columns 0-15 (low nibbles), q[1] columns 16-31 (high).
  static inline void unpack32(const uint8_t* p, __m512 q[2]) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    q[0] = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0x0F)));
    q[1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
  }

  template <int MT>
  static void int4_rows(const Int4Args& a, int64_t n0, int64_t n1) {
    const int64_t G = a.K / kGroup;
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* p = a.packed + n * (a.K / 2);
      const float* s = a.scale + n * G;
      const float* o = a.offset + n * G;
      __m512 acc[MT];
      float off[MT];
      for (int r = 0; r < MT; ++r) acc[r] = _mm512_setzero_ps(), off[r] = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        __m512 q[2];
        unpack32(p + g * 16, q);
        const __m512 d = _mm512_set1_ps(s[g]);
        for (int r = 0; r < MT; ++r) {
          const float* xr = a.x + r * a.K + g * kGroup;
          const __m512 t = _mm512_fmadd_ps(q[1], _mm512_loadu_ps(xr + 16), _mm512_mul_ps(q[0], _mm512_loadu_ps(xr)));
          acc[r] = _mm512_fmadd_ps(t, d, acc[r]);
          off[r] += o[g] * a.xsum[r * G + g];
        }
      }
      for (int r = 0; r < MT; ++r) a.y[r * a.ldy + n] = _mm512_reduce_add_ps(acc[r]) + off[r];
    }
  }

  static void int4_dequantize_rows(const uint8_t* packed, const float* scale, const float* offset, int64_t K,
                                   int64_t n0, int64_t n1, float* w) {
    for (int64_t i = n0 * (K / kGroup); i < n1 * (K / kGroup); ++i) {
      __m512 q[2];
      unpack32(packed + i * 16, q);
      const __m512 d = _mm512_set1_ps(scale[i]), m = _mm512_set1_ps(offset[i]);
      _mm512_storeu_ps(w + i * kGroup, _mm512_fmadd_ps(q[0], d, m));
      _mm512_storeu_ps(w + i * kGroup + 16, _mm512_fmadd_ps(q[1], d, m));
    }
  }

  template <int MT>
  static void int8_rows(const Int8Args& a, int64_t n0, int64_t n1) {
    const int64_t gs = a.K / a.G;
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* qn = a.q + n * a.K;
      __m512 acc[MT];
      for (int r = 0; r < MT; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t g = 0; g < a.G; ++g) {
        __m512 sum[MT];
        for (int r = 0; r < MT; ++r) sum[r] = _mm512_setzero_ps();
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
          const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qn + k));
          const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
          for (int r = 0; r < MT; ++r) sum[r] = _mm512_fmadd_ps(w, _mm512_loadu_ps(a.x + r * a.K + k), sum[r]);
        }
        const __m512 d = _mm512_set1_ps(a.scale[n * a.G + g]);
        for (int r = 0; r < MT; ++r) acc[r] = _mm512_fmadd_ps(sum[r], d, acc[r]);
      }
      for (int r = 0; r < MT; ++r) a.y[r * a.ldy + n] = _mm512_reduce_add_ps(acc[r]);
    }
  }
};

#pragma GCC diagnostic pop
#pragma GCC pop_options

// -- dispatch ----------------------------------------------------------------------------------

enum class Isa { kGeneric, kAvx2, kAvx512 };

Isa host_isa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kGeneric;
  }();
  return isa;
}

// Rows [0, M) of x in tiles of kRowTile, output features [n0, n1).
template <class Kernels, class Args>
void run_tiles(Args a, int64_t M, int64_t row_stride_xsum, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; m += kRowTile) {
    Args t = a;
    t.x = a.x + m * a.K;
    t.y = a.y + m * a.ldy;
    if constexpr (std::is_same_v<Args, Int4Args>) t.xsum = a.xsum + m * row_stride_xsum;
    switch (static_cast<int>(std::min<int64_t>(kRowTile, M - m))) {
      case 4: Kernels::template rows<4>(t, n0, n1); break;
      case 3: Kernels::template rows<3>(t, n0, n1); break;
      case 2: Kernels::template rows<2>(t, n0, n1); break;
      default: Kernels::template rows<1>(t, n0, n1); break;
    }
  }
}

template <class I>
struct Int4Of {
  template <int MT>
  static void rows(const Int4Args& a, int64_t n0, int64_t n1) { I::template int4_rows<MT>(a, n0, n1); }
};

template <class I>
struct Int8Of {
  template <int MT>
  static void rows(const Int8Args& a, int64_t n0, int64_t n1) { I::template int8_rows<MT>(a, n0, n1); }
};

void int4_tiles(const Int4Args& a, int64_t M, int64_t n0, int64_t n1) {
  const int64_t G = a.K / kGroup;
  switch (host_isa()) {
    case Isa::kAvx512: return run_tiles<Int4Of<Avx512>>(a, M, G, n0, n1);
    case Isa::kAvx2: return run_tiles<Int4Of<Avx2>>(a, M, G, n0, n1);
    default: return run_tiles<Int4Of<Generic>>(a, M, G, n0, n1);
  }
}

void int8_tiles(const Int8Args& a, int64_t M, int64_t n0, int64_t n1) {
  switch (host_isa()) {
    case Isa::kAvx512: return run_tiles<Int8Of<Avx512>>(a, M, 0, n0, n1);
    case Isa::kAvx2: return run_tiles<Int8Of<Avx2>>(a, M, 0, n0, n1);
    default: return run_tiles<Int8Of<Generic>>(a, M, 0, n0, n1);
  }
}

// -- torch glue --------------------------------------------------------------------------------

void check_input(const at::Tensor& x, int64_t K, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(1) == K, name, ": x must be a CPU tensor [M, ", K,
              "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              name, ": x must be float32, bfloat16 or float16");
}

void check_tensor(const at::Tensor& t, at::ScalarType type, int64_t numel, const char* name, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == type && t.is_contiguous() && t.numel() == numel, name, ": ",
              what, " must be a contiguous CPU ", c10::toString(type), " tensor of ", numel, " elements");
}

void check_int4(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& offset, const char* name) {
  TORCH_CHECK(packed.dim() == 2, name, ": packed must be [N, K / 2]");
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(K % kGroup == 0, name, ": in_features must be a multiple of ", kGroup);
  check_tensor(packed, at::kByte, N * K / 2, name, "packed");
  check_tensor(scale, at::kFloat, N * K / kGroup, name, "scale");
  check_tensor(offset, at::kFloat, N * K / kGroup, name, "offset");
}

int64_t num_tasks(int64_t N) { return (N + kRowsPerTask - 1) / kRowsPerTask; }

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                       const at::Tensor& offset) {
  check_int4(packed, scale, offset, "int4_linear");
  const int64_t N = packed.size(0), K = packed.size(1) * 2, G = K / kGroup;
  check_input(x, K, "int4_linear");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t M = xf.size(0);
  // [M, G]: each group's sum of x, for the offsets. A plain loop: an ATen sum here cost more
  // than the kernel's own work on the small layers at batch 1.
  at::Tensor xsum = at::empty({M, G}, xf.options());
  {
    const float* xp = xf.data_ptr<float>();
    float* sp = xsum.data_ptr<float>();
    for (int64_t i = 0; i < M * G; ++i) {
      float s = 0.f;
      for (int64_t j = 0; j < kGroup; ++j) s += xp[i * kGroup + j];
      sp[i] = s;
    }
  }
  at::Tensor y = at::empty({M, N}, xf.options());
  const Int4Args a{xf.data_ptr<float>(), xsum.data_ptr<float>(), K, packed.data_ptr<uint8_t>(),
                   scale.data_ptr<float>(), offset.data_ptr<float>(), y.data_ptr<float>(), N};
  at::parallel_for(0, num_tasks(N), 1, [&](int64_t begin, int64_t end) {
    int4_tiles(a, M, begin * kRowsPerTask, std::min(end * kRowsPerTask, N));
  });
  return y.to(x.scalar_type());
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(q.dim() == 2 && scale.dim() == 2, "int8_linear: q must be [N, K] and scale [N, G]");
  const int64_t N = q.size(0), K = q.size(1), G = scale.size(1);
  TORCH_CHECK(G > 0 && K % G == 0 && (K / G) % 16 == 0, "int8_linear: K / G must be a multiple of 16");
  check_input(x, K, "int8_linear");
  check_tensor(q, at::kChar, N * K, "int8_linear", "q");
  check_tensor(scale, at::kFloat, N * G, "int8_linear", "scale");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t M = xf.size(0);
  at::Tensor y = at::empty({M, N}, xf.options());
  const Int8Args a{xf.data_ptr<float>(), K, q.data_ptr<int8_t>(), scale.data_ptr<float>(), G, y.data_ptr<float>(), N};
  at::parallel_for(0, num_tasks(N), 1, [&](int64_t begin, int64_t end) {
    int8_tiles(a, M, begin * kRowsPerTask, std::min(end * kRowsPerTask, N));
  });
  return y.to(x.scalar_type());
}

// The dense weight [N, K] in `dtype`: for prefill, where one dense GEMM serves many rows.
at::Tensor int4_dequantize(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& offset,
                           at::ScalarType dtype) {
  check_int4(packed, scale, offset, "int4_dequantize");
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  at::Tensor w = at::empty({N, K}, packed.options().dtype(at::kFloat));
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* s = scale.data_ptr<float>();
  const float* o = offset.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, num_tasks(N), 1, [&](int64_t begin, int64_t end) {
    const int64_t n0 = begin * kRowsPerTask, n1 = std::min(end * kRowsPerTask, N);
    switch (host_isa()) {
      case Isa::kAvx512: return Avx512::int4_dequantize_rows(p, s, o, K, n0, n1, wp);
      case Isa::kAvx2: return Avx2::int4_dequantize_rows(p, s, o, K, n0, n1, wp);
      default: return Generic::int4_dequantize_rows(p, s, o, K, n0, n1, wp);
    }
  });
  return w.to(dtype);
}

const char* isa_name() {
  switch (host_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) {
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scale, Tensor offset) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("int4_dequantize(Tensor packed, Tensor scale, Tensor offset, ScalarType dtype) -> Tensor");
  // Which inner loops this CPU runs: "avx512" | "avx2" | "generic" (for logs and benchmarks).
  m.def("quant_linear_isa() -> str", [] { return std::string(isa_name()); });
}

TORCH_LIBRARY_IMPL(pdserve, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_dequantize", &int4_dequantize);
}
