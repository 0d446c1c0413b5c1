// The AVX-512 / AVX512-BF16 intrinsics that block_attention.cpp uses, for CPUs with AVX2 and FMA only.
//
// Included in place of the native ones when the compiler targets no AVX-512 (block_kernel.py builds with
// -mno-avx512f where the CPU lacks AVX512-BF16). A 512-bit vector is a pair of 256-bit halves, and the
// intrinsics' names are aliased to these functions (SIMDe's "native aliases"), so that the kernel's source
// is the same for both targets. Semantics are those of the Intel intrinsics guide for finite inputs:
// bf16 conversions round to nearest even (NaN is not preserved: softmax inputs are finite), scalef takes
// integral exponents (2^n underflows to 0 for n < -126), getexp/getmant take positive normal numbers.
// The kernel picks register blockings that fit AVX2's 16 registers (MAX_NV, MAX_PAIRS).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace avx2 {

struct m512 { __m256 lo, hi; };  // 16 fp32
struct m256bh { __m256i v; operator __m256i() const { return v; } };  // 16 bf16
struct m128bh { __m128i v; operator __m128i() const { return v; } };  // 8 bf16
struct m512bh;
struct m512i {  // 512 bits of integers (or 32 bf16)
  __m256i lo, hi;
  m512i() = default;
  m512i(__m256i l, __m256i h) : lo(l), hi(h) {}
  explicit m512i(const m512bh& x);
};
struct m512bh {
  __m256i lo, hi;
  m512bh() = default;
  m512bh(__m256i l, __m256i h) : lo(l), hi(h) {}
  explicit m512bh(const m512i& x) : lo(x.lo), hi(x.hi) {}
};
inline m512i::m512i(const m512bh& x) : lo(x.lo), hi(x.hi) {}

// A 16-lane mask as two vectors of all-ones / all-zeros lanes (built from a bit mask, or by a compare).
struct mask16 {
  __m256 lo, hi;
  mask16() = default;
  mask16(__m256 l, __m256 h) : lo(l), hi(h) {}
  mask16(unsigned bits) {
    const __m256i lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i b = _mm256_set1_epi32((int)bits);
    lo = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(b, lanes), lanes));
    hi = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_srli_epi32(b, 8), lanes), lanes));
  }
};

inline m512 setzero_ps() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline m512 set1_ps(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline m512 loadu_ps(const void* p) {
  const float* f = static_cast<const float*>(p);
  return {_mm256_loadu_ps(f), _mm256_loadu_ps(f + 8)};
}
inline void storeu_ps(void* p, m512 x) {
  float* f = static_cast<float*>(p);
  _mm256_storeu_ps(f, x.lo), _mm256_storeu_ps(f + 8, x.hi);
}
inline void stream_ps(void* p, m512 x) {  // p 32-byte aligned
  float* f = static_cast<float*>(p);
  _mm256_stream_ps(f, x.lo), _mm256_stream_ps(f + 8, x.hi);
}
inline m512 add_ps(m512 a, m512 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline m512 sub_ps(m512 a, m512 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline m512 mul_ps(m512 a, m512 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline m512 div_ps(m512 a, m512 b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline m512 max_ps(m512 a, m512 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline m512 fmadd_ps(m512 a, m512 b, m512 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline m512 fmsub_ps(m512 a, m512 b, m512 c) { return {_mm256_fmsub_ps(a.lo, b.lo, c.lo), _mm256_fmsub_ps(a.hi, b.hi, c.hi)}; }
inline float hsum8(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float reduce_add_ps(m512 x) { return hsum8(_mm256_add_ps(x.lo, x.hi)); }
inline float reduce_max_ps(m512 x) {
  const __m256 m8 = _mm256_max_ps(x.lo, x.hi);
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
// x 2^n for integral n <= 127 (n < -126: 0)
inline __m256 scalef8(__m256 x, __m256 n) {
  __m256i e = _mm256_max_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(-127));
  return _mm256_mul_ps(x, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23)));
}
inline m512 scalef_ps(m512 x, m512 n) { return {scalef8(x.lo, n.lo), scalef8(x.hi, n.hi)}; }
template <int IMM>  // scale bits IMM[7:4] zero: rounding to integers
inline m512 roundscale_ps(m512 x) {
  static_assert((IMM >> 4) == 0);
  return {_mm256_round_ps(x.lo, IMM), _mm256_round_ps(x.hi, IMM)};
}
inline __m256 getexp8(__m256 x) {  // floor(log2 x) of positive normal x
  const __m256i b = _mm256_srli_epi32(_mm256_castps_si256(x), 23);
  return _mm256_cvtepi32_ps(_mm256_sub_epi32(b, _mm256_set1_epi32(127)));
}
inline m512 getexp_ps(m512 x) { return {getexp8(x.lo), getexp8(x.hi)}; }
inline __m256 getmant8(__m256 x) {  // the mantissa in [1, 2) of positive normal x
  const __m256i b = _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x007fffff));
  return _mm256_castsi256_ps(_mm256_or_si256(b, _mm256_set1_epi32(0x3f800000)));
}
inline m512 getmant_ps(m512 x) { return {getmant8(x.lo), getmant8(x.hi)}; }
template <int PRED>
inline mask16 cmp_ps_mask(m512 a, m512 b) { return {_mm256_cmp_ps(a.lo, b.lo, PRED), _mm256_cmp_ps(a.hi, b.hi, PRED)}; }
inline m512 blend(m512 src, mask16 k, m512 x) {
  return {_mm256_blendv_ps(src.lo, x.lo, k.lo), _mm256_blendv_ps(src.hi, x.hi, k.hi)};
}
inline m512 mask_mul_ps(m512 src, mask16 k, m512 a, m512 b) { return blend(src, k, mul_ps(a, b)); }
inline m512 mask_add_ps(m512 src, mask16 k, m512 a, m512 b) { return blend(src, k, add_ps(a, b)); }
inline m512 maskz_loadu_ps(mask16 k, const void* p) {
  const float* f = static_cast<const float*>(p);
  return {_mm256_maskload_ps(f, _mm256_castps_si256(k.lo)), _mm256_maskload_ps(f + 8, _mm256_castps_si256(k.hi))};
}
inline m512 mask_loadu_ps(m512 src, mask16 k, const void* p) { return blend(src, k, maskz_loadu_ps(k, p)); }
inline void mask_storeu_ps(void* p, mask16 k, m512 x) {
  float* f = static_cast<float*>(p);
  _mm256_maskstore_ps(f, _mm256_castps_si256(k.lo), x.lo), _mm256_maskstore_ps(f + 8, _mm256_castps_si256(k.hi), x.hi);
}

inline m512i setzero_si512() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline m512i set1_epi32(int x) { return {_mm256_set1_epi32(x), _mm256_set1_epi32(x)}; }
inline m512i loadu_si512(const void* p) {
  const __m256i* v = static_cast<const __m256i*>(p);
  return {_mm256_loadu_si256(v), _mm256_loadu_si256(v + 1)};
}
inline void storeu_si512(void* p, m512i x) {
  __m256i* v = static_cast<__m256i*>(p);
  _mm256_storeu_si256(v, x.lo), _mm256_storeu_si256(v + 1, x.hi);
}
inline void stream_si512(void* p, m512i x) {  // p 32-byte aligned
  __m256i* v = static_cast<__m256i*>(p);
  _mm256_stream_si256(v, x.lo), _mm256_stream_si256(v + 1, x.hi);
}
inline m512i slli_epi32(m512i x, int n) { return {_mm256_slli_epi32(x.lo, n), _mm256_slli_epi32(x.hi, n)}; }
inline m512i and_si512(m512i a, m512i b) { return {_mm256_and_si256(a.lo, b.lo), _mm256_and_si256(a.hi, b.hi)}; }
inline m512 castsi512_ps(m512i x) { return {_mm256_castsi256_ps(x.lo), _mm256_castsi256_ps(x.hi)}; }
inline m512i castps_si512(m512 x) { return {_mm256_castps_si256(x.lo), _mm256_castps_si256(x.hi)}; }
inline __m256i castsi512_si256(m512i x) { return x.lo; }
inline __m256i extracti64x4_epi64(m512i x, int i) { return i ? x.hi : x.lo; }
inline m512i cvtepu16_epi32(__m256i x) {
  return {_mm256_cvtepu16_epi32(_mm256_castsi256_si128(x)), _mm256_cvtepu16_epi32(_mm256_extracti128_si256(x, 1))};
}
// 32-bit words: per 128-bit lane, as the 512-bit instructions do
inline m512i unpacklo_epi32(m512i a, m512i b) { return {_mm256_unpacklo_epi32(a.lo, b.lo), _mm256_unpacklo_epi32(a.hi, b.hi)}; }
inline m512i unpackhi_epi32(m512i a, m512i b) { return {_mm256_unpackhi_epi32(a.lo, b.lo), _mm256_unpackhi_epi32(a.hi, b.hi)}; }
inline m512i unpacklo_epi64(m512i a, m512i b) { return {_mm256_unpacklo_epi64(a.lo, b.lo), _mm256_unpacklo_epi64(a.hi, b.hi)}; }
inline m512i unpackhi_epi64(m512i a, m512i b) { return {_mm256_unpackhi_epi64(a.lo, b.lo), _mm256_unpackhi_epi64(a.hi, b.hi)}; }
// 128-bit lanes: dst lanes 0, 1 from a's lanes imm[1:0], imm[3:2]; lanes 2, 3 from b's imm[5:4], imm[7:6]
template <int IMM>
inline m512i shuffle_i32x4(m512i a, m512i b) {
  return {_mm256_permute2x128_si256(a.lo, a.hi, (IMM & 3) | ((IMM >> 2) & 3) << 4),
          _mm256_permute2x128_si256(b.lo, b.hi, ((IMM >> 4) & 3) | ((IMM >> 6) & 3) << 4)};
}

// fp32 -> bf16, round to nearest even: 8 lanes to the low halves of 8 32-bit words
inline __m256i bf16_words(__m256 x) {
  const __m256i b = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), odd), 16);
}
inline __m256i pack_words(__m256i a, __m256i b) {  // 16 words (< 2^16) of a, then b -> 16 uint16 in order
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xd8);
}
inline m256bh cvtneps_pbh(m512 x) { return {pack_words(bf16_words(x.lo), bf16_words(x.hi))}; }
inline m512bh cvtne2ps_pbh(m512 a, m512 b) {  // b's 16 values, then a's
  return {pack_words(bf16_words(b.lo), bf16_words(b.hi)), pack_words(bf16_words(a.lo), bf16_words(a.hi))};
}
inline m128bh cvtneps_pbh128(__m128 x) {
  const __m128i w = _mm256_castsi256_si128(bf16_words(_mm256_castps128_ps256(x)));
  return {_mm_packus_epi32(w, w)};
}
// acc + the products of bf16 pairs: lane i += a[2i] b[2i] + a[2i + 1] b[2i + 1]
inline __m256 dp8(__m256 acc, __m256i a, __m256i b) {
  const __m256i hi = _mm256_set1_epi32(int(0xffff0000u));
  acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)), acc);
  return _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(a, hi)), _mm256_castsi256_ps(_mm256_and_si256(b, hi)), acc);
}
inline m512 dpbf16_ps(m512 acc, m512bh a, m512bh b) { return {dp8(acc.lo, a.lo, b.lo), dp8(acc.hi, a.hi, b.hi)}; }

// The 16-bit word shuffles the kernel uses: (x's 16 low words, its 16 high) -> interleaved; (a's words
// [16 h, 16 h + 16), b's) -> interleaved.
inline m512i interleave_halves(m512i x) {
  const __m256i l = _mm256_unpacklo_epi16(x.lo, x.hi), h = _mm256_unpackhi_epi16(x.lo, x.hi);
  return {_mm256_permute2x128_si256(l, h, 0x20), _mm256_permute2x128_si256(l, h, 0x31)};
}
inline m512i interleave_rows(m512i a, m512i b, int h) {
  const __m256i x = h ? a.hi : a.lo, y = h ? b.hi : b.lo;
  const __m256i l = _mm256_unpacklo_epi16(x, y), u = _mm256_unpackhi_epi16(x, y);
  return {_mm256_permute2x128_si256(l, u, 0x20), _mm256_permute2x128_si256(l, u, 0x31)};
}

}  // namespace avx2

#define __m512 avx2::m512
#define __m512i avx2::m512i
#define __m512bh avx2::m512bh
#define __m256bh avx2::m256bh
#define __mmask16 avx2::mask16
#define _mm512_setzero_ps avx2::setzero_ps
#define _mm512_set1_ps avx2::set1_ps
#define _mm512_loadu_ps avx2::loadu_ps
#define _mm512_storeu_ps avx2::storeu_ps
#define _mm512_stream_ps avx2::stream_ps
#define _mm512_add_ps avx2::add_ps
#define _mm512_sub_ps avx2::sub_ps
#define _mm512_mul_ps avx2::mul_ps
#define _mm512_div_ps avx2::div_ps
#define _mm512_max_ps avx2::max_ps
#define _mm512_fmadd_ps avx2::fmadd_ps
#define _mm512_fmsub_ps avx2::fmsub_ps
#define _mm512_reduce_add_ps avx2::reduce_add_ps
#define _mm512_reduce_max_ps avx2::reduce_max_ps
#define _mm512_scalef_ps avx2::scalef_ps
#define _mm512_roundscale_ps(x, imm) avx2::roundscale_ps<imm>(x)
#define _mm512_getexp_ps avx2::getexp_ps
#define _mm512_getmant_ps(x, interval, sign) avx2::getmant_ps(x)  // _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src only
#define _mm512_cmp_ps_mask(a, b, pred) avx2::cmp_ps_mask<pred>(a, b)
#define _mm512_mask_mul_ps avx2::mask_mul_ps
#define _mm512_mask_add_ps avx2::mask_add_ps
#define _mm512_maskz_loadu_ps avx2::maskz_loadu_ps
#define _mm512_mask_loadu_ps avx2::mask_loadu_ps
#define _mm512_mask_storeu_ps avx2::mask_storeu_ps
#define _mm512_setzero_si512 avx2::setzero_si512
#define _mm512_set1_epi32 avx2::set1_epi32
#define _mm512_loadu_si512 avx2::loadu_si512
#define _mm512_storeu_si512 avx2::storeu_si512
#define _mm512_stream_si512 avx2::stream_si512
#define _mm512_slli_epi32 avx2::slli_epi32
#define _mm512_and_si512 avx2::and_si512
#define _mm512_castsi512_ps avx2::castsi512_ps
#define _mm512_castps_si512 avx2::castps_si512
#define _mm512_castsi512_si256 avx2::castsi512_si256
#define _mm512_extracti64x4_epi64 avx2::extracti64x4_epi64
#define _mm512_cvtepu16_epi32 avx2::cvtepu16_epi32
#define _mm512_unpacklo_epi32 avx2::unpacklo_epi32
#define _mm512_unpackhi_epi32 avx2::unpackhi_epi32
#define _mm512_unpacklo_epi64 avx2::unpacklo_epi64
#define _mm512_unpackhi_epi64 avx2::unpackhi_epi64
#define _mm512_shuffle_i32x4(a, b, imm) avx2::shuffle_i32x4<imm>(a, b)
#define _mm512_cvtneps_pbh avx2::cvtneps_pbh
#define _mm512_cvtne2ps_pbh avx2::cvtne2ps_pbh
#define _mm_cvtneps_pbh avx2::cvtneps_pbh128
#define _mm512_dpbf16_ps avx2::dpbf16_ps
