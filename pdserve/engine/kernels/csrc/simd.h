// Vectors, element types and small math shared by the kernels of one instruction set.
//
// Included once, by attention_kernels.cpp, which is compiled once per instruction set:
// with PDSERVE_ISA_AVX512, with PDSERVE_ISA_AVX2, or with neither (generic). Everything
// here sits in an anonymous namespace inside pdserve::<isa>, and no std:: template is
// used: an inline function shared between the per-ISA objects would be merged by the
// linker into one copy, possibly the AVX-512 one, which would then run on an AVX2 CPU.
//
// The arithmetic is written with GCC vector extensions, which each -m flag set lowers
// to its own instructions; intrinsics appear only for conversions the extensions do
// not express well.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(PDSERVE_ISA_AVX512)
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__F16C__)
#error "PDSERVE_ISA_AVX512 needs -mavx512f -mavx512bw -mavx512vl -mfma -mf16c"
#endif
#define PDSERVE_ISA avx512
#include <immintrin.h>
#elif defined(PDSERVE_ISA_AVX2)
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "PDSERVE_ISA_AVX2 needs -mavx2 -mfma -mf16c"
#endif
#define PDSERVE_ISA avx2
#include <immintrin.h>
#else
#define PDSERVE_ISA generic
#endif

namespace pdserve {
namespace PDSERVE_ISA {
namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef float v8f_u __attribute__((vector_size(32), aligned(4)));  // unaligned access
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint32_t v8u_u __attribute__((vector_size(32), aligned(2)));
typedef float v4f __attribute__((vector_size(16)));

// The prefill GEMMs' vector (VW floats) and register tile (MR rows x 2 vectors), and how
// many keys a decode step scores at once (3 rows x kScoreKeys accumulators). The generic
// build takes AVX-512's shapes: slow, but it is only the fallback of CPUs without AVX2,
// and so the tests on any host run every code path the AVX-512 build takes.
#if defined(PDSERVE_ISA_AVX2)
constexpr int VW = 8;
constexpr int MR = 6;          // 12 accumulators of the 16 ymm registers
constexpr int kScoreKeys = 3;  // 9 accumulators, 3 keys (as 6 vectors) of the 16
#else
constexpr int VW = 16;
constexpr int MR = 14;         // 28 accumulators of the 32 zmm registers
constexpr int kScoreKeys = 4;
#endif
typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vf_u __attribute__((vector_size(VW * 4), aligned(4)));

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -__builtin_inff();

inline int imin(int a, int b) { return a < b ? a : b; }
inline int imax(int a, int b) { return a > b ? a : b; }
inline float fmax_(float a, float b) { return a > b ? a : b; }
inline int round_up(int x, int m) { return (x + m - 1) / m * m; }
// x - (+0) is x for every x (x + 0 is not, at -0), so this folds to a plain broadcast.
template <class V> inline V splat(float x) { return x - V{}; }

// ---- Element types: fp32, and bf16 and fp16 held as raw bits --------------------------

struct Bf16 { uint16_t bits; };
struct Half { uint16_t bits; };

inline float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

inline float to_f32(float x) { return x; }
inline float to_f32(Bf16 x) { return bits_to_float(uint32_t(x.bits) << 16); }
inline float to_f32(Half x) {
#if defined(__F16C__)
  return _cvtsh_ss(x.bits);
#else
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16, exp = (x.bits >> 10) & 0x1fu, mant = x.bits & 0x3ffu;
  if (exp == 0) return bits_to_float(sign | float_to_bits(float(mant) * 5.9604644775390625e-8f));  // m * 2^-24
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  return bits_to_float(sign | ((exp + 112) << 23) | (mant << 13));
#endif
}

template <class T> inline T from_f32(float x);
template <> inline float from_f32<float>(float x) { return x; }
template <> inline Bf16 from_f32<Bf16>(float x) {
  uint32_t u = float_to_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return Bf16{uint16_t((u >> 16) | 0x40)};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                                   // round to nearest even
  return Bf16{uint16_t(u >> 16)};
}
template <> inline Half from_f32<Half>(float x) {
#if defined(__F16C__)
  return Half{uint16_t(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT))};
#else
  const uint32_t u = float_to_bits(x), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a >= 0x47800000u) return Half{uint16_t(sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u))};  // NaN, inf, overflow
  if (a < 0x38800000u) {  // below 2^-14: a multiple of 2^-24, rounded to nearest even by the float add
    const float m = (bits_to_float(a) * 16777216.0f + 8388608.0f) - 8388608.0f;
    return Half{uint16_t(sign | uint32_t(m))};
  }
  // Rebias the exponent and round the 13 dropped mantissa bits to nearest even; a carry
  // out of the mantissa bumps the exponent, up to infinity.
  const uint32_t r = a - ((127u - 15u) << 23) + 0xfffu + ((a >> 13) & 1u);
  return Half{uint16_t(sign | (r >> 13))};
#endif
}

// ---- Loads as fp32 ------------------------------------------------------------------------

// 8 consecutive elements.
inline v8f load8(const float* p) { return *reinterpret_cast<const v8f_u*>(p); }
inline v8f load8(const Bf16* p) {
#if defined(__AVX2__)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (v8f)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#else
  v8f r;
  for (int i = 0; i < 8; ++i) r[i] = to_f32(p[i]);
  return r;
#endif
}
inline v8f load8(const Half* p) {
#if defined(__F16C__)
  return (v8f)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  v8f r;
  for (int i = 0; i < 8; ++i) r[i] = to_f32(p[i]);
  return r;
#endif
}
inline void store8(float* p, v8f x) { *reinterpret_cast<v8f_u*>(p) = x; }

// 16 consecutive elements as two vectors in "pair order": natural for fp32 and fp16; for
// bf16 the even then the odd elements, which a 32-bit lane holding two bf16 gives with
// one shift and one mask (no widening shuffle). Whoever multiplies them keeps its other
// operand in the same order (kPairSplit).
inline void load16(const float* p, v8f& a, v8f& b) { a = load8(p), b = load8(p + 8); }
inline void load16(const Half* p, v8f& a, v8f& b) { a = load8(p), b = load8(p + 8); }
inline void load16(const Bf16* p, v8f& a, v8f& b) {
  const v8u pair = *reinterpret_cast<const v8u_u*>(p);
  a = (v8f)(pair << 16);
  b = (v8f)(pair & 0xffff0000u);
}
template <class T> constexpr bool kPairSplit = false;
template <> constexpr bool kPairSplit<Bf16> = true;

// ---- Reductions and exp2 ----------------------------------------------------------------

inline float hsum(v8f x) {
  v4f lo, hi;
  memcpy(&lo, &x, 16);
  memcpy(&hi, reinterpret_cast<const char*>(&x) + 16, 16);
  const v4f s = lo + hi;
  return (s[0] + s[2]) + (s[1] + s[3]);
}

inline float hmax(v8f x) {
  float m = x[0];
  for (int i = 1; i < 8; ++i) m = fmax_(m, x[i]);
  return m;
}

// The horizontal sums of a[0..3] to out[0..3]: two rounds of pairwise adds.
inline void hsum4(const v8f* a, float* out) {
  const v8i even = {0, 8, 2, 10, 4, 12, 6, 14}, odd = {1, 9, 3, 11, 5, 13, 7, 15};
  const v8f t0 = __builtin_shuffle(a[0], a[1], even) + __builtin_shuffle(a[0], a[1], odd);
  const v8f t1 = __builtin_shuffle(a[2], a[3], even) + __builtin_shuffle(a[2], a[3], odd);
  const v8i lo = {0, 1, 8, 9, 4, 5, 12, 13}, hi = {2, 3, 10, 11, 6, 7, 14, 15};
  const v8f u = __builtin_shuffle(t0, t1, lo) + __builtin_shuffle(t0, t1, hi);
  v4f a4, b4;
  memcpy(&a4, &u, 16);
  memcpy(&b4, reinterpret_cast<const char*>(&u) + 16, 16);
  const v4f s = a4 + b4;
  memcpy(out, &s, 16);
}

// 2^x to ~2e-7 relative; exactly 0 below 2^-126 (so a masked score, -inf, gives 0). Lanes
// below -126 compute garbage (NaN for -inf) that the last line clears.
inline v8f exp2v(v8f x) {
  const v8i dead = x < splat<v8f>(-126.0f);
  const v8f n = (x + 12582912.0f) - 12582912.0f;  // round to nearest: 1.5 * 2^23 pushes out the fraction
  const v8f f = x - n;                            // [-0.5, 0.5]: Taylor terms of 2^f up to f^6
  v8f p = splat<v8f>(1.5403530393381608e-4f);
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  const v8i bits = (v8i)p + (__builtin_convertvector(n, v8i) << 23);
  return (v8f)(bits & ~dead);
}

// Asks for the cache lines of n contiguous elements.
template <class T>
inline void prefetch(const T* p, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * int64_t(sizeof(T)); off += 64) __builtin_prefetch(bytes + off);
}

}  // namespace
}  // namespace PDSERVE_ISA
}  // namespace pdserve
