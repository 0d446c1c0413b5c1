// Fused block-structured attention for x86-64 CPUs with AVX-512 (fp32) and AVX512-BF16 (bf16), or with AVX2
// and FMA (both dtypes, through avx512_on_avx2.h).
//
// A row of queries is cut into query groups; group g has the queries [q0, q1) and sees exactly the keys
// of its ranges (the union of the ranges, every pair allowed). The operands are packed once per (batch,
// head) into the layouts the GEMM micro-kernels read. Forward, per (batch, head, group) and tile of query
// rows: S = Q K^T over the group's ranges (fp32 accumulation), the softmax in fp32, O = P V; optionally
// E = exp(scale (S - row max)) and the rows' normalisers are kept for the backward ("probs", P = E / sum).
// Backward, per (batch, head), group, tile of queries and tile of keys: dP = dO V^T, P kept or recomputed
// (S = Q K^T, P = exp(scale S - lse)), dS = P (dP - delta); dV += P^T dO, dK += dS^T Q, dQ += dS K,
// accumulated in fp32 (dK and dQ times the scale when written out).
// bf16 operands go through vdpbf16ps (pairs of bf16 along the reduction axis, fp32 sums; on AVX2, fp32 FMAs
// on the pairs' exact fp32 values), or through AMX tiles (tdpbf16ps, the same pairs) where the CPU has them;
// P and dS are rounded to the operands' dtype for their products, as GPU flash attention does.
//
// Called through ctypes (plain C ABI, raw pointers); tensors are (B, H, L, D) with any strides along
// B, H, L and the last axis contiguous (the forward's keys and values may be longer or shorter than its
// queries: (B, H, Lk, D)); the entry points check the strides (and the kept probabilities' size) and
// refuse what they cannot read. lse is (B, H, L) fp32 contiguous; the backward writes dq/dk/dv
// whole (zero where no group reaches), contiguous, in fp32 or in the inputs' dtype.
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <new>
#include <tuple>
#include <utility>
#include <vector>

#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__))
#include "avx512_on_avx2.h"  // the same source on AVX2 + FMA: 512-bit vectors as pairs of 256-bit halves
#define UNIMODAL_AVX2 1
#endif
// bf16 products on AMX tiles where the compiler targets AMX-TILE and AMX-BF16 (-march=native on such a CPU),
// once block_attention_amx has found the CPU and the OS ready; or on tiles emulated in software (tests).
#if !defined(UNIMODAL_AVX2) && defined(UNIMODAL_AMX_EMULATE)
#include "amx_emulated.h"
#define UNIMODAL_AMX 1
#elif !defined(UNIMODAL_AVX2) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <cpuid.h>
#define UNIMODAL_AMX 1
#endif
#ifdef UNIMODAL_AMX
#include <cfenv>
#include <csetjmp>
#include <csignal>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

typedef uint16_t bf16;

// ---------------------------------------------------------------- element access

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void store1(float* p, float x) { *p = x; }
inline void store1(bf16* p, float x) { *p = (bf16)_mm_extract_epi16((__m128i)_mm_cvtneps_pbh(_mm_set_ss(x)), 0); }
inline void store16(bf16* p, __m512 x) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(x)); }

// 2^t for t <= 0 (softmax arguments, pre-multiplied by log2 e): 2^n p(r), n = round(t), |r| <= 1/2, p the
// minimax polynomial of 2^r on [-1/2, 1/2] (relative error) of degree DEG: 2.7e-6 at 4 (bf16: below the 4e-3 of
// the P it feeds), 2.2e-7 at 5 (fp32), with these float coefficients. t = -inf never arises (every pair is
// allowed: S is finite); very negative t give 0 (scalef underflows).
template <int DEG>
inline __m512 exp2_16(__m512 t) {
  static_assert(DEG == 4 || DEG == 5);
  static constexpr float c4[5] = {0.9999992847442627f, 0.6931218504905701f, 0.240247443318367f,
                                  0.05591777339577675f, 0.00957007147371769f};
  static constexpr float c5[6] = {1.0000001192092896f, 0.6931469440460205f, 0.24022120237350464f,
                                  0.05550713092088699f, 0.009675533510744572f, 0.0013276446843519807f};
  const float* c = DEG == 4 ? c4 : c5;
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(c[DEG]);
  for (int j = DEG - 1; j >= 0; j--) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[j]));
  return _mm512_scalef_ps(p, n);
}
constexpr float LOG2E = 1.44269504088896341f;

// log x for x >= 1: x = 2^e m with m in [sqrt(1/2), sqrt 2), log m = 2 atanh(t), t = (m - 1) / (m + 1), |t| < 0.18
// (the series to t^9: error below 1e-9).
inline __m512 log16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.f);
  __m512 e = _mm512_getexp_ps(x);
  __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
  const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356f), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_ps(e, big, e, one);
  const __m512 t = _mm512_div_ps(_mm512_sub_ps(m, one), _mm512_add_ps(m, one)), t2 = _mm512_mul_ps(t, t);
  __m512 p = _mm512_set1_ps(1.f / 9);
  for (float c : {1.f / 7, 1.f / 5, 1.f / 3, 1.f}) p = _mm512_fmadd_ps(p, t2, _mm512_set1_ps(c));
  return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693147180559945309f), _mm512_mul_ps(_mm512_add_ps(t, t), p));
}

// out[i] = scale mx[i] + log sum[i] for i < n (sum >= 1): the rows' log-sum-exp.
inline void log16_rows(int n, const float* mx, const float* sum, float scale, float* out) {
  for (int i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
    const __m512 l = log16(_mm512_mask_loadu_ps(_mm512_set1_ps(1.f), k, sum + i));
    _mm512_mask_storeu_ps(out + i, k, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, mx + i), _mm512_set1_ps(scale), l));
  }
}

// ---------------------------------------------------------------- micro-kernels

template <typename T> struct KStep;
template <> struct KStep<float> { static constexpr int v = 1; };
template <> struct KStep<bf16> { static constexpr int v = 2; };
template <typename T> constexpr int EXP_DEG = KStep<T>::v == 2 ? 4 : 5;

// acc[i][j] += A(i, k) Bp(k, 16 j ...) over k < K: the k loops of the micro-kernels. A's element k of row i
// at A + i lda + k ldk (fp32), or its pair k, k + 1 at A + i lda + (k / 2) ldk (bf16).
template <int MR, int NV>
inline void kloop(__m512 (&acc)[MR][NV], int K, const float* A, int lda, int ldk, const float* Bp, int ldb) {
  for (int k = 0; k < K; k++) {
    __m512 b[NV];
    for (int j = 0; j < NV; j++) b[j] = _mm512_loadu_ps(Bp + (size_t)k * ldb + 16 * j);
    for (int i = 0; i < MR; i++) {
      __m512 a = _mm512_set1_ps(A[i * lda + (size_t)k * ldk]);
      for (int j = 0; j < NV; j++) acc[i][j] = _mm512_fmadd_ps(a, b[j], acc[i][j]);
    }
  }
}
template <int MR, int NV>
inline void kloop(__m512 (&acc)[MR][NV], int K, const bf16* A, int lda, int ldk, const bf16* Bp, int ldb) {
  for (int k = 0; k < K; k += 2) {
    __m512bh b[NV];
    for (int j = 0; j < NV; j++) b[j] = (__m512bh)_mm512_loadu_si512(Bp + (size_t)(k / 2) * ldb * 2 + 32 * j);
    for (int i = 0; i < MR; i++) {
      int32_t pair;
      std::memcpy(&pair, A + i * lda + (size_t)(k / 2) * ldk, 4);
      __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < NV; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, b[j]);
    }
  }
}
#ifdef UNIMODAL_AVX2
// AVX2 has no bf16 dot product, and splitting both operands' pairs in the k loop costs more instructions
// than the FMAs: A is widened to fp32 once per GEMM (every column panel reuses it), and each pair of B's
// packed rows is split into its even row (the low halves, shifted up) and its odd row (the high halves), as
// exact fp32 values, each used by all MR rows.
template <int MR, int NV>
inline void kloop(__m512 (&acc)[MR][NV], int K, const float* A, int lda, int ldk, const bf16* Bp, int ldb) {
  static_assert(NV == 1, "the AVX2 panels are one vector wide");
  const __m256i hi = _mm256_set1_epi32(int(0xffff0000u));
  for (int k = 0; k < K; k += 2) {
    const __m256i* bp = reinterpret_cast<const __m256i*>(Bp + (size_t)(k / 2) * ldb * 2);
    for (int odd = 0; odd < 2; odd++) {
      const __m256i w0 = _mm256_loadu_si256(bp), w1 = _mm256_loadu_si256(bp + 1);
      const __m256 b0 = _mm256_castsi256_ps(odd ? _mm256_and_si256(w0, hi) : _mm256_slli_epi32(w0, 16));
      const __m256 b1 = _mm256_castsi256_ps(odd ? _mm256_and_si256(w1, hi) : _mm256_slli_epi32(w1, 16));
      for (int i = 0; i < MR; i++) {
        const __m256 a = _mm256_broadcast_ss(A + i * lda + (size_t)(k + odd) * ldk);
        acc[i][0].lo = _mm256_fmadd_ps(a, b0, acc[i][0].lo);
        acc[i][0].hi = _mm256_fmadd_ps(a, b1, acc[i][0].hi);
      }
    }
  }
}

inline float widen1(bf16 x) {
  const uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A (M x K bf16, as gemm reads it) -> fp32 W; returns W's (lda, ldk). Row-major pairs (ldk = 2) stay
// row-major; pairs of the transposed operands (lda = 2: consecutive rows' pairs side by side) become
// columns (W(i, k) at k M + i); both 8 words per instruction.
inline std::pair<int, int> widen(int M, int K, const bf16* A, int lda, int ldk, float* W) {
  const __m256i hi = _mm256_set1_epi32(int(0xffff0000u));
  auto wide8 = [](const bf16* p) {  // 8 consecutive bf16 -> fp32
    return _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  };
  if (ldk == 2) {
    for (int i = 0; i < M; i++) {
      const bf16* a = A + (size_t)i * lda;
      float* w = W + (size_t)i * K;
      int k = 0;
      for (; k + 8 <= K; k += 8) _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + k), wide8(a + k));
      for (; k < K; k++) w[k] = widen1(a[k]);
    }
    return {K, 1};
  }
  if (lda == 2) {
    for (int k = 0; k < K; k += 2) {
      const bf16* a = A + (size_t)(k / 2) * ldk;
      float *w0 = W + (size_t)k * M, *w1 = w0 + M;
      int i = 0;
      for (; i + 8 <= M; i += 8) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 2 * i));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(w0 + i), _mm256_slli_epi32(x, 16));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(w1 + i), _mm256_and_si256(x, hi));
      }
      for (; i < M; i++) {
        w0[i] = widen1(a[2 * i]);
        w1[i] = widen1(a[2 * i + 1]);
      }
    }
    return {1, M};
  }
  for (int i = 0; i < M; i++)
    for (int k = 0; k < K; k++)
      W[(size_t)i * K + k] = widen1(A[(size_t)i * lda + (size_t)(k / 2) * ldk + k % 2]);
  return {K, 1};
}

thread_local std::vector<float> widened;  // the calling thread's widened A
#endif

// ---------------------------------------------------------------- GEMM: C (M x N, fp32) (+)= A (M x K) Bp (K x N)
// A as kloop reads it; Bp packed: fp32 [K][ldb], bf16 [K/2][ldb][2]. N a multiple of 16; for bf16 K even
// (callers pad with zeros).

template <typename TA, typename TB, int MR, int NV, bool ACC>
void micro(int K, const TA* A, int lda, int ldk, const TB* Bp, int ldb, float* C, int ldc) {
  if (K <= 0) __builtin_unreachable();
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < NV; j++) acc[i][j] = ACC ? _mm512_loadu_ps(C + i * ldc + 16 * j) : _mm512_setzero_ps();
  kloop(acc, K, A, lda, ldk, Bp, ldb);
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < NV; j++) _mm512_storeu_ps(C + i * ldc + 16 * j, acc[i][j]);
}

template <typename TA, typename TB>
using MicroFn = void (*)(int, const TA*, int, int, const TB*, int, float*, int);

template <typename TA, typename TB, int NV, bool ACC, int... MRs>
constexpr auto micro_row(std::integer_sequence<int, MRs...>) {
  return std::array<MicroFn<TA, TB>, sizeof...(MRs)>{&micro<TA, TB, MRs + 1, NV, ACC>...};
}

constexpr int MAX_MR = 8;
#ifndef UNIMODAL_AVX2
constexpr int MAX_NV = 4;
template <typename T>
int mr_for(int nv) { return nv == 4 ? 6 : 8; }  // accumulators + B vectors within 32 registers
template <typename T> using AType = T;  // what the micro-kernels read A as
#else
constexpr int MAX_NV = 1;  // a vector of 16 is two registers of 16: accumulators + operands within them
template <typename T>
int mr_for(int) { return KStep<T>::v == 1 ? 6 : 5; }  // bf16: the mask and both halves of a B row besides
template <typename T> using AType = float;
#endif

// table[accumulate][nv - 1][mr - 1]: the micro-kernel of mr rows and nv vectors of 16 columns
template <typename TA, typename TB, int... NVs>
auto micro_table(std::integer_sequence<int, NVs...>) {
  using Seq = std::make_integer_sequence<int, MAX_MR>;
  using Row = std::array<MicroFn<TA, TB>, MAX_MR>;
  return std::array<std::array<Row, sizeof...(NVs)>, 2>{
      {{micro_row<TA, TB, NVs + 1, false>(Seq{})...}, {micro_row<TA, TB, NVs + 1, true>(Seq{})...}}};
}

#ifdef UNIMODAL_AMX
bool amx_on = false;  // set by block_attention_amx, between calls
void gemm_amx(int M, int N, int K, const bf16* A, int lda, const bf16* Bp, int ldb, float* C, int ldc, bool accumulate);
#else
constexpr bool amx_on = false;
#endif

// Column panels of 4 vectors (6 rows per micro-kernel call), then 3, 2 or 1 (8 rows); on AVX2, of 1 vector
// (6 rows in fp32, 5 in bf16, whose A is widened first); bf16 with A row-major on AMX tiles where they run.
template <typename T>
void gemm(int M, int N, int K, const T* A, int lda, const T* Bp, int ldb, float* C, int ldc, bool accumulate,
          int ldk = KStep<T>::v) {
#ifdef UNIMODAL_AMX
  if constexpr (KStep<T>::v == 2)
    if (amx_on && ldk == 2 && M % 16 == 0 && N % 16 == 0 && K >= 32)
      return gemm_amx(M, N, K, A, lda, Bp, ldb, C, ldc, accumulate);
#endif
  using TA = AType<T>;
  static const auto table = micro_table<TA, T>(std::make_integer_sequence<int, MAX_NV>{});
  const TA* a = reinterpret_cast<const TA*>(A);
#ifdef UNIMODAL_AVX2
  if constexpr (KStep<T>::v == 2) {
    if (widened.size() < (size_t)M * K) widened.resize((size_t)M * K);
    std::tie(lda, ldk) = widen(M, K, A, lda, ldk, widened.data());
    a = widened.data();
  }
#endif
  for (int n0 = 0, nv; n0 < N; n0 += 16 * nv) {
    nv = std::min(MAX_NV, (N - n0) / 16);
    int MR = mr_for<T>(nv);
    const T* B = Bp + (size_t)n0 * KStep<T>::v;
    const int calls = (M + MR - 1) / MR, big = M - (M / calls) * calls;  // rows split evenly: no thin last call
    for (int c = 0, m0 = 0; c < calls; c++) {
      int mr = M / calls + (c < big);
      table[accumulate][nv - 1][mr - 1](K, a + (size_t)m0 * lda, lda, ldk, B, ldb, C + (size_t)m0 * ldc + n0, ldc);
      m0 += mr;
    }
  }
}

// ---------------------------------------------------------------- AMX tiles
// Every tile 16 rows of 64 bytes: C tiles 0-3 (16 x 16 fp32; a 32 x 32 block of C), A tiles 4-5 (16 rows x 32
// bf16 along K), B tiles 6-7 (16 pairs of rows along K x 16 columns: the packed B layout as it is). A
// worker loads the configuration before its first product of a call and releases the tiles at the end
// of the call's parallel region (tiles_end), so that other code on the thread (oneDNN) finds them free.
#ifdef UNIMODAL_AMX
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

// GCC's _tile_loadconfig tells the compiler it reads 8 bytes of the configuration and its _tile_loadd that it
// reads no memory at all: the configuration is passed as the 64-byte operand it is, and gemm_amx starts with
// a compiler barrier, so that the stores of its operands are made before the tiles load them.
#ifdef UNIMODAL_AMX_EMULATE
inline void load_tile_config(const TileConfig& c) { _tile_loadconfig(&c); }
#else
inline void load_tile_config(const TileConfig& c) { __asm__ volatile("ldtilecfg %0" ::"m"(c)); }
#endif

thread_local bool tiles_on = false;
inline void tiles_begin() {
  if (tiles_on) return;
  TileConfig cfg;
  for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  load_tile_config(cfg);
  tiles_on = true;
}
inline void tiles_end() {
  if (tiles_on) _tile_release();
  tiles_on = false;
}

// C (MT 16 x NT 16, fp32, rows ldc apart) (+)= A (MT 16 x K, row-major bf16, rows lda apart) Bp (K x NT 16,
// packed [K/2][ldb][2]); K a multiple of 32.
template <int MT, int NT>
void amx_block(int K, const bf16* A, int lda, const bf16* Bp, int ldb, float* C, int ldc, bool accumulate) {
  const long sa = 2L * lda, sb = 4L * ldb, sc = 4L * ldc;  // row strides in bytes
  float *C1 = C + 16, *C2 = C + 16L * ldc, *C3 = C2 + 16;
  if (accumulate) {
    _tile_loadd(0, C, sc);
    if constexpr (NT == 2) _tile_loadd(1, C1, sc);
    if constexpr (MT == 2) _tile_loadd(2, C2, sc);
    if constexpr (MT == 2 && NT == 2) _tile_loadd(3, C3, sc);
  } else {
    _tile_zero(0);
    if constexpr (NT == 2) _tile_zero(1);
    if constexpr (MT == 2) _tile_zero(2);
    if constexpr (MT == 2 && NT == 2) _tile_zero(3);
  }
  for (int k = 0; k < K; k += 32) {
    const bf16* b = Bp + (size_t)(k / 2) * ldb * 2;
    _tile_loadd(4, A + k, sa);
    _tile_loadd(6, b, sb);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NT == 2) {
      _tile_loadd(7, b + 32, sb);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (MT == 2) {
      _tile_loadd(5, A + 16L * lda + k, sa);
      _tile_dpbf16ps(2, 5, 6);
    }
    if constexpr (MT == 2 && NT == 2) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, C, sc);
  if constexpr (NT == 2) _tile_stored(1, C1, sc);
  if constexpr (MT == 2) _tile_stored(2, C2, sc);
  if constexpr (MT == 2 && NT == 2) _tile_stored(3, C3, sc);
}

// gemm<bf16> on tiles: A row-major (pairs along K contiguous), M and N multiples of 16; blocks of 32 x 32
// (16 at the edges) over the K that is a multiple of 32, the rest of K (16) through the vector micro-kernels.
void gemm_amx(int M, int N, int K, const bf16* A, int lda, const bf16* Bp, int ldb, float* C, int ldc,
              bool accumulate) {
  const int K32 = K / 32 * 32;
  __asm__ volatile("" ::: "memory");
  if (K32 > 0) {
    tiles_begin();
    for (int m0 = 0; m0 < M; m0 += 32)
      for (int n0 = 0; n0 < N; n0 += 32) {
        const bf16 *a = A + (size_t)m0 * lda, *b = Bp + (size_t)n0 * 2;
        float* c = C + (size_t)m0 * ldc + n0;
        const bool two_m = M - m0 >= 32, two_n = N - n0 >= 32;
        if (two_m && two_n) amx_block<2, 2>(K32, a, lda, b, ldb, c, ldc, accumulate);
        else if (two_m) amx_block<2, 1>(K32, a, lda, b, ldb, c, ldc, accumulate);
        else if (two_n) amx_block<1, 2>(K32, a, lda, b, ldb, c, ldc, accumulate);
        else amx_block<1, 1>(K32, a, lda, b, ldb, c, ldc, accumulate);
      }
  }
  if (K32 < K)
    gemm<bf16>(M, N, K - K32, A + K32, lda, Bp + (size_t)K32 * ldb, ldb, C, ldc, K32 > 0 || accumulate);
}

// Whether this process may use the tiles: 1, or -2 (CPUID.(7, 0):EDX lacks bit 22, AMX-BF16, or 24, AMX-TILE)
// or -3 (Linux refuses the tile data state: ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA = 18).
int amx_permitted() {
#ifdef UNIMODAL_AMX_EMULATE
  return 1;
#else
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 22) & 1) || !((d >> 24) & 1)) return -2;
  constexpr long GET_PERM = 0x1022, REQ_PERM = 0x1023, XTILEDATA = 18;
  if (syscall(SYS_arch_prctl, REQ_PERM, XTILEDATA) != 0) return -3;
  unsigned long granted = 0;
  return syscall(SYS_arch_prctl, GET_PERM, &granted) == 0 && ((granted >> XTILEDATA) & 1) ? 1 : -3;
#endif
}

sigjmp_buf probe_exit;
constexpr int PROBE_SIGNALS[3] = {SIGILL, SIGSEGV, SIGBUS};
struct sigaction probe_saved[3];  // the handlers before the check
pid_t probe_thread = 0;
// A fault on the checking thread jumps back to the check; on any other thread (a fault of its own, during
// the check's short window), the handler from before is put back and the instruction runs again into it.
void probe_fault(int sig) {
  if (pid_t(syscall(SYS_gettid)) == probe_thread) siglongjmp(probe_exit, 1);
  for (int i = 0; i < 3; i++)
    if (PROBE_SIGNALS[i] == sig) sigaction(sig, &probe_saved[i], nullptr);
}

// Whether products on the tiles equal the vector units' on this machine (operands multiples of 1/8 in
// [-1, 1], so that both sums are exact): M, N and K with edges and a rest of K, fresh and accumulated. A
// fault during it (SIGILL, SIGSEGV, SIGBUS) counts as no: the tiles are used only once they have worked here.
// The jump back skips the kernel's restoring of the thread's floating-point state on return from a signal
// handler: the floating-point environment (x87 and MXCSR: flush-to-zero, rounding) is saved and put back here.
bool amx_works() {
  constexpr int M = 48, N = 48, K = 80, lda = 88, ldb = 64, ldc = 56;
  std::vector<bf16> A((size_t)M * lda), Bp((size_t)K * ldb);
  auto eighths = [](int i) {  // (i mod 17 - 8) / 8 in bf16
    const float x = float(i % 17 - 8) / 8.f;
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return bf16(u >> 16);
  };
  for (size_t i = 0; i < A.size(); i++) A[i] = eighths(int(7 * i + 3));
  for (size_t i = 0; i < Bp.size(); i++) Bp[i] = eighths(int(5 * i + 1));
  std::vector<float> want((size_t)M * ldc, 0.f), got((size_t)M * ldc, 0.f);
  gemm<bf16>(M, N, K, A.data(), lda, Bp.data(), ldb, want.data(), ldc, false);  // amx_on is false: vectors
  struct sigaction on_fault {};
  on_fault.sa_handler = probe_fault;
  sigemptyset(&on_fault.sa_mask);
  probe_thread = pid_t(syscall(SYS_gettid));
  fenv_t env;
  fegetenv(&env);
  for (int i = 0; i < 3; i++) sigaction(PROBE_SIGNALS[i], &on_fault, &probe_saved[i]);
  volatile bool same = false;  // volatile: set between sigsetjmp and a possible siglongjmp
  if (sigsetjmp(probe_exit, 1) == 0) {
    gemm_amx(M, N, K, A.data(), lda, Bp.data(), ldb, got.data(), ldc, false);
    bool ok = got == want;
    gemm_amx(M, N, K, A.data(), lda, Bp.data(), ldb, got.data(), ldc, true);  // accumulated: twice the sums
    for (size_t i = 0; i < want.size(); i++) ok = ok && got[i] == 2 * want[i];
    tiles_end();
    same = ok;
  }
  tiles_on = false;
  for (int i = 0; i < 3; i++) sigaction(PROBE_SIGNALS[i], &probe_saved[i], nullptr);
  fesetenv(&env);
  return same;
}
#else
inline void tiles_end() {}
#endif

// ---------------------------------------------------------------- 16-bit word shuffles
#ifndef UNIMODAL_AVX2
// 32 bf16 (row i's 16 values, then row i+1's) -> interleaved (i's value, i+1's value, ...). The index is a
// constant the compiler sees (loop-invariant, kept in a register), not a global it would reload after every
// store.
inline __m512i interleave_halves(__m512i x) {
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(order, x);
}
// Words [16 h, 16 h + 16) of a and of b (32 bf16 each) -> interleaved (a's, b's, a's, ...).
inline __m512i interleave_rows(__m512i a, __m512i b, int h) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                      39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  return _mm512_permutex2var_epi16(a, h ? _mm512_add_epi16(lo, _mm512_set1_epi16(16)) : lo, b);
}
#else
using avx2::interleave_halves;
using avx2::interleave_rows;
#endif

// ---------------------------------------------------------------- packing
// "B operand" layouts: element (k, n) of a K x N matrix at fp32 [k][ldb + n], bf16 [(k/2)][n][k&1].
// The L rows of one (batch, head) start at x and lie sl elements apart (sl even for bf16).
// 16 (fp32) or 16 word-pairs (bf16) of rows are moved per gather; a scalar tail finishes.

// t[j] = the 32-bit words in[0..15][j] (row i of in at in + i * stride): a 16 x 16 transpose in registers.
inline void transpose16(const int32_t* in, int64_t stride, __m512i t[16]) {
  __m512i a[16], c[16];
  for (int i = 0; i < 16; i++) a[i] = _mm512_loadu_si512(in + i * stride);
  for (int i = 0; i < 16; i += 2) {  // 2 x 2 blocks of words
    c[i] = _mm512_unpacklo_epi32(a[i], a[i + 1]);
    c[i + 1] = _mm512_unpackhi_epi32(a[i], a[i + 1]);
  }
  for (int i = 0; i < 16; i += 4)  // 4 x 4 blocks
    for (int j = 0; j < 2; j++) {
      a[i + j] = _mm512_unpacklo_epi64(c[i + j], c[i + j + 2]);
      a[i + j + 2] = _mm512_unpackhi_epi64(c[i + j], c[i + j + 2]);
    }
  for (int i = 0; i < 16; i += 8)  // 8 x 8 blocks (128-bit lanes)
    for (int j = 0; j < 4; j++) {
      c[i + j] = _mm512_shuffle_i32x4(a[i + j], a[i + j + 4], 0x88);
      c[i + j + 4] = _mm512_shuffle_i32x4(a[i + j], a[i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; j++) {  // 16 x 16
    a[j] = _mm512_shuffle_i32x4(c[j], c[j + 8], 0x88);
    a[j + 8] = _mm512_shuffle_i32x4(c[j], c[j + 8], 0xdd);
  }
  // a[k] now holds word column (lane order) k' of the input for a fixed permutation k -> k'
  static constexpr int col[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};
  for (int k = 0; k < 16; k++) t[col[k]] = a[k];
}

// out (D x L, rows ld apart): element (d, r) = x[r][d]: the B operand of "rows . x^T" (bf16: pairs along D,
// moved as 32-bit words). The L rows of one (batch, head) start at x and lie sl elements apart (sl even
// for bf16). 16 x 16 blocks of words are transposed in registers; a scalar tail finishes. fp32 only: each
// row r times rs[r] when rs is given.
template <typename T>
void pack_transposed(const T* x, int64_t sl, int L, int D, T* out, int ld, const float* rs = nullptr) {
  const int r16 = L / 16 * 16, W = D / KStep<T>::v;  // words per row (a multiple of 16)
  const int64_t ws = sl / KStep<T>::v;
  const int32_t* w = reinterpret_cast<const int32_t*>(x);
  int32_t* o = reinterpret_cast<int32_t*>(out);
  __m512i t[16];
  for (int r = 0; r < r16; r += 16)
    for (int c0 = 0; c0 < W; c0 += 16) {
      transpose16(w + r * ws + c0, ws, t);
      if constexpr (KStep<T>::v == 1)
        if (rs)
          for (int c = 0; c < 16; c++) t[c] = _mm512_castps_si512(_mm512_mul_ps(_mm512_castsi512_ps(t[c]), _mm512_loadu_ps(rs + r)));
      for (int c = 0; c < 16; c++) _mm512_storeu_si512(o + (size_t)(c0 + c) * ld + r, t[c]);
    }
  for (int r = r16; r < L; r++)
    for (int c = 0; c < W; c++) {
      o[(size_t)c * ld + r] = w[r * ws + c];
      if constexpr (KStep<T>::v == 1)
        if (rs) out[(size_t)c * ld + r] *= rs[r];
    }
}

// out (Lp x D), Lp = L rounded up to even: element (r, d) = x[r][d], the B operand of "(. x L) . x"
// (bf16: rows r, r+1 interleaved); a missing last row is zero. Each row r times rs[r] when rs is given.
template <typename T>
void pack_rows(const T* x, int64_t sl, int L, int D, T* out, const float* rs = nullptr) {
  if constexpr (KStep<T>::v == 1) {
    for (int r = 0; r < L; r++)
      if (!rs) {
        std::memcpy(out + (size_t)r * D, x + r * sl, D * sizeof(T));
      } else {
        const __m512 f = _mm512_set1_ps(rs[r]);
        for (int d = 0; d < D; d += 16) _mm512_storeu_ps(out + (size_t)r * D + d, _mm512_mul_ps(f, _mm512_loadu_ps(x + r * sl + d)));
      }
  } else {
    // 32 bf16 of row r times f
    auto scaled = [](__m512i y, __m512 f) {
      __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(y)), 16));
      __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(y, 1)), 16));
      return (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, f), _mm512_mul_ps(lo, f));
    };
    for (int r = 0; r < L; r += 2) {
      T* o = out + (size_t)r * D;
      for (int d = 0; d < D; d += 32) {
        __m512i a = _mm512_loadu_si512(x + r * sl + d);
        __m512i b = r + 1 < L ? _mm512_loadu_si512(x + (r + 1) * sl + d) : _mm512_setzero_si512();
        if (rs) {
          a = scaled(a, _mm512_set1_ps(rs[r]));
          if (r + 1 < L) b = scaled(b, _mm512_set1_ps(rs[r + 1]));
        }
        _mm512_storeu_si512(o + 2 * d, interleave_rows(a, b, 0));
        _mm512_storeu_si512(o + 2 * d + 32, interleave_rows(a, b, 1));
      }
    }
  }
}

// out[c][r] = in[r][c] for 32-bit words: rows x cols (cols a multiple of 16), rows ins words apart in in and
// outs words apart in out. On a pack_rows output (bf16 rows r, r+1 paired), the plain transpose (D x L,
// element (d, r) at d 2 outs + r): the A operand of "x^T . (L x .)" on AMX tiles.
inline void transpose_words(const int32_t* in, int rows, int cols, int64_t ins, int32_t* out, int64_t outs) {
  const int r16 = rows / 16 * 16;
  __m512i t[16];
  for (int r = 0; r < r16; r += 16)
    for (int c0 = 0; c0 < cols; c0 += 16) {
      transpose16(in + r * ins + c0, ins, t);
      for (int c = 0; c < 16; c++) _mm512_storeu_si512(out + (c0 + c) * outs + r, t[c]);
    }
  for (int r = r16; r < rows; r++)
    for (int c = 0; c < cols; c++) out[c * outs + r] = in[r * ins + c];
}

// out (L x D, rows D apart) = scale src^T, src (D x L fp32, rows ld apart): gradients summed transposed.
template <typename G>
void write_transposed(const float* src, int ld, int L, int D, float scale, G* out) {
  const int l16 = L / 16 * 16;
  const __m512 sc = _mm512_set1_ps(scale);
  __m512i t[16];
  for (int l = 0; l < l16; l += 16)
    for (int d0 = 0; d0 < D; d0 += 16) {
      transpose16(reinterpret_cast<const int32_t*>(src + (size_t)d0 * ld + l), ld, t);
      for (int j = 0; j < 16; j++)
        store16(out + (size_t)(l + j) * D + d0, _mm512_mul_ps(_mm512_castsi512_ps(t[j]), sc));
    }
  for (int l = l16; l < L; l++)
    for (int d = 0; d < D; d++) store1(out + (size_t)l * D + d, src[(size_t)d * ld + l] * scale);
}

struct Tensor4 {
  const char* p;
  int64_t sb, sh, sl;  // strides in elements
};

struct Group {
  int q0, q1;
  std::vector<std::pair<int, int>> ranges;
  int keys() const {
    int n = 0;
    for (auto& r : ranges) n += r.second - r.first;
    return n;
  }
};

// The backward's tiles: QT_BWD queries of a group by KT_BWD keys of one of its ranges (fewer at the ends).
constexpr int QT_BWD = 64, KT_BWD = 128;

// The kept probabilities ("probs"): one block per (batch, head), in it one block per group (at the sum of
// the earlier groups' sizes). A group's block holds E = exp(scale S - row max) (queries x the group's m keys,
// its ranges side by side: the softmax before its normalisation), then the queries' normalisers 1 / sum_k E
// (fp32, one per query: KS elements of T). P = E / sum: the backward folds the normaliser into dO (the B
// operand of dV += E^T dO) and into dP - delta (dS = E (dP / sum - delta / sum)).
// E is stored tile by tile in the order the backward reads it: the tile of query rows [t0, t0 + nr) and
// key columns [kc, kc + nk) at t0 m + nr kc (fp32 row-major; bf16 rows i, i+1 interleaved, [(i/2)][nk][2]:
// transposed, the A operand of a product that reduces over queries).
std::vector<int64_t> probs_offsets(const std::vector<Group>& gs, int KS, int64_t* per_bh) {
  std::vector<int64_t> off(gs.size());
  int64_t n = 0;
  for (size_t i = 0; i < gs.size(); i++) off[i] = n, n += (int64_t)(gs[i].q1 - gs[i].q0) * (gs[i].keys() + KS);
  *per_bh = n;
  return off;
}

// Rows i, i+1 of fp32 (16 values each) -> 32 bf16 interleaved.
inline __m512i interleave_bf16(__m512 a, __m512 b) { return interleave_halves((__m512i)_mm512_cvtne2ps_pbh(b, a)); }

bool aligned(const Group& g) {  // what the packed layouts need: 16-multiples, even starts
  if ((g.q1 - g.q0) % 16 || g.q0 % 2) return false;
  for (auto& r : g.ranges)
    if ((r.second - r.first) % 16 || r.first % 2) return false;
  return true;
}

// The groups, or an empty list if one reaches outside [0, L) (queries) or [0, Lk) (keys) or is empty (or the
// count is negative).
std::vector<Group> parse_groups(const int32_t* g, int ngroups, int L, int Lk) {
  if (ngroups < 0) return {};
  std::vector<Group> out(ngroups);
  for (int i = 0; i < ngroups; i++) {
    out[i].q0 = *g++;
    out[i].q1 = *g++;
    int nr = *g++;
    if (out[i].q0 < 0 || out[i].q1 > L || out[i].q0 >= out[i].q1 || nr < 1) return {};
    for (int r = 0; r < nr; r++, g += 2) {
      if (g[0] < 0 || g[1] > Lk || g[0] >= g[1]) return {};
      out[i].ranges.push_back({g[0], g[1]});
    }
  }
  return out;
}

// 0, or -1 (a bad size or group), -2 (a group outside the packed layouts' alignment), -3 (a tensor the
// kernel cannot read in place: its last axis not contiguous, or bf16 with an odd stride).
// strides: (batch, head, position, last) per tensor.
int check(int dtype, int D, int L, const std::vector<Group>& gs, int ngroups, const int64_t* strides, int ntensors) {
  if (D % 32 != 0 || D > 1024 || dtype < 0 || dtype > 1 || (int)gs.size() != ngroups || L < 1) return -1;
  for (int t = 0; t < ntensors; t++) {
    const int64_t* s = strides + 4 * t;
    if (s[3] != 1 || (dtype == 1 && (s[0] % 2 || s[1] % 2 || s[2] % 2))) return -3;
  }
  for (auto& g : gs)
    if (!aligned(g)) return -2;
  return 0;
}

// 0, or -4: kept probabilities of the wrong size or off a 64-byte boundary (they are streamed).
int check_probs(const void* probs, int64_t numel, int dtype, int B, int H, const std::vector<Group>& gs) {
  if (!probs) return 0;
  int64_t per_bh;
  probs_offsets(gs, dtype == 1 ? 2 : 1, &per_bh);
  return numel == (int64_t)B * H * per_bh && reinterpret_cast<uintptr_t>(probs) % 64 == 0 ? 0 : -4;
}

// f(task, worker) for task in [0, n) on up to nthreads workers, in an OpenMP parallel region: the
// process's OpenMP runtime is the one PyTorch loaded (same soname), so the kernel runs on PyTorch's
// own worker threads instead of competing with them while they spin after an ATen op.
template <typename F>
void parallel_for(int n, int nthreads, F&& f) {
  std::atomic<int> next{0};
#pragma omp parallel num_threads(std::max(1, std::min(nthreads, n)))
  {
    const int worker = omp_get_thread_num();
    for (int i; (i = next.fetch_add(1)) < n;) f(i, worker);
    tiles_end();
  }
}

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }
// A row stride for n elements that is no multiple of 4 KiB apart (power-of-two strides make the rows
// of a panel share L1 sets).
inline int padded(int n) { return round_up(n, 16) + 16; }

// Scratch memory without value-initialisation (every element is written before it is read), kept
// from call to call so that its pages are not faulted in again; in 2 MiB-aligned blocks offered to the
// kernel as huge pages (the packed key-side operands are read a row per page otherwise: 3-6% on AVX2).
template <typename T>
struct Scratch {
  struct Free {
    void operator()(T* q) const { std::free(q); }
  };
  std::unique_ptr<T[], Free> p;
  size_t n = 0;
  T* get(size_t want) {
    if (want > n) {
      constexpr size_t huge = size_t(2) << 20;
      const size_t bytes = (want * sizeof(T) + huge - 1) / huge * huge;
      p.reset(static_cast<T*>(std::aligned_alloc(huge, bytes)));
      if (!p) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
      madvise(p.get(), bytes, MADV_HUGEPAGE);
#endif
      n = want;
    }
    return p.get();
  }
};

template <typename T>
T* align64(T* p) { return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63)); }

constexpr int MAX_THREADS = 256;
struct Workspace {  // one per worker
  Scratch<uint16_t> h[7], tiles_h;
  Scratch<float> f[7], grad[2], tiles;
  template <typename T>
  T* get(int i, size_t n) {
    if constexpr (sizeof(T) == 2) return reinterpret_cast<T*>(h[i].get(n));
    else return reinterpret_cast<T*>(f[i].get(n));
  }
};
Workspace workspaces[MAX_THREADS];
Scratch<uint16_t> shared_h[2];
Scratch<float> shared_f[2];
std::mutex call_lock;  // the workspaces serve one call at a time

template <typename T>
T* shared_scratch(int i, size_t n) {
  if constexpr (sizeof(T) == 2) return reinterpret_cast<T*>(shared_h[i].get(n));
  else return reinterpret_cast<T*>(shared_f[i].get(n));
}

template <typename T>
const T* row_ptr(const Tensor4& t, int b, int h, int l) {
  return reinterpret_cast<const T*>(t.p) + b * t.sb + h * t.sh + (int64_t)l * t.sl;
}

template <typename T>
const T* rows_of(const Tensor4& t, int b, int h) { return reinterpret_cast<const T*>(t.p) + b * t.sb + h * t.sh; }

// ---------------------------------------------------------------- forward

// f(kc, nk) for the backward's key tiles of a group: columns [kc, kc + nk) (its ranges side by side).
template <typename F>
void for_key_tiles(const Group& g, F&& f) {
  int col = 0;
  for (auto& r : g.ranges) {
    for (int k0 = r.first; k0 < r.second; k0 += KT_BWD) f(col + k0 - r.first, std::min(KT_BWD, r.second - k0));
    col += r.second - r.first;
  }
}

constexpr int QT_FWD = 24;  // even: the kept probabilities pair rows
constexpr int QT_FWD_AMX = 32;  // bf16 on AMX tiles: 2 rows of tiles

template <typename T>
void forward(int B, int H, int D, Tensor4 q, Tensor4 k, Tensor4 v, Tensor4 o, float* lse, T* probs, int L, int Lk,
             const std::vector<Group>& groups, float scale, int nthreads) {
  const int G = groups.size(), KS = KStep<T>::v, Le = round_up(Lk, 2);
  const int QT = KS == 2 && amx_on ? QT_FWD_AMX : QT_FWD;  // query rows per tile
  int64_t per_bh;
  const std::vector<int64_t> poff = probs_offsets(groups, KS, &per_bh);
  const int Lt = padded(Lk);
  T* Kt = shared_scratch<T>(0, (size_t)B * H * D * Lt);
  T* Vp = shared_scratch<T>(1, (size_t)B * H * Le * D);
  // a (batch, head)'s keys and values are packed by the first task that needs them (0 not yet, 1 being
  // packed, 2 ready): memory-bound copies next to the other workers' products, no region of their own
  std::unique_ptr<std::atomic<int>[]> packed(new std::atomic<int>[B * H]);
  for (int i = 0; i < B * H; i++) packed[i].store(0, std::memory_order_relaxed);
  auto ensure_packed = [&](int bh) {
    if (packed[bh].load(std::memory_order_acquire) == 2) return;
    int idle = 0;
    if (packed[bh].compare_exchange_strong(idle, 1, std::memory_order_acq_rel)) {
      pack_transposed<T>(rows_of<T>(k, bh / H, bh % H), k.sl, Lk, D, &Kt[(size_t)bh * D * Lt], Lt);  // B of Q K^T: (D x Lk)
      pack_rows<T>(rows_of<T>(v, bh / H, bh % H), v.sl, Lk, D, &Vp[(size_t)bh * Le * D]);       // B of P V: (Lk x D)
      packed[bh].store(2, std::memory_order_release);
      return;
    }
    while (packed[bh].load(std::memory_order_acquire) != 2) _mm_pause();
  };
  // A worker claims a (batch, head), packs its keys and values and runs its groups, largest first, so that
  // they stay in its own L2; once every (batch, head) is claimed, the workers share out the groups left (the
  // smallest). Each group writes only its own rows: which worker runs it changes nothing in the results.
  std::vector<int> order(G);
  for (int i = 0; i < G; i++) order[i] = i;
  auto size = [&](int i) { return (int64_t)(groups[i].q1 - groups[i].q0) * groups[i].keys(); };
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return size(a) > size(b); });
  auto run = [&](int bh, int gi, int worker) {
    const Group& g = groups[gi];
    const int b = bh / H, h = bh % H;
    int m = g.keys(), ms = padded(m);
    ensure_packed(bh);
    const T* kt = &Kt[(size_t)bh * D * Lt];
    const T* vp = &Vp[(size_t)bh * Le * D];
    Workspace& ws = workspaces[worker];
    T* P = ws.get<T>(2, (size_t)QT * ms);  // apart from S and O when T is float
    float *S = ws.get<float>(0, (size_t)QT * ms), *O = ws.get<float>(1, (size_t)QT * D);
    for (int r0 = g.q0; r0 < g.q1; r0 += QT) {
      int nr = std::min(QT, g.q1 - r0), col = 0;
      for (auto& r : g.ranges) {  // S (nr x m), the ranges side by side
        gemm<T>(nr, r.second - r.first, D, row_ptr<T>(q, b, h, r0), q.sl, kt + (size_t)r.first * KS, Lt, S + col,
                ms, false);
        col += r.second - r.first;
      }
      // E = exp(scale (S - row max)) into P (row-major: the A operand of E V) and, kept, into the group's block
      // of the probabilities (streamed: whole cache lines in order, not through the cache)
      T* kept = probs ? probs + per_bh * bh + poff[gi] : nullptr;  // the group's block
      const float sl2 = scale * LOG2E;  // e^(scale (s - max)) = 2^(sl2 s - sl2 max)
      const __m512 sc = _mm512_set1_ps(sl2);
      float rowsum[std::max(QT_FWD, QT_FWD_AMX)], rowmax[std::max(QT_FWD, QT_FWD_AMX)];
      if (KS == 2 && kept) {  // rows i, i + 1 together: the kept layout interleaves them
        for (int i = 0; i < nr; i += 2) {
          const float *s0 = &S[(size_t)i * ms], *s1 = s0 + ms;
          bf16* p0 = reinterpret_cast<bf16*>(&P[(size_t)i * ms]);
          const int row = r0 - g.q0 + i, t0 = row / QT_BWD * QT_BWD, tr = std::min(QT_BWD, g.q1 - g.q0 - t0);
          bf16* dst = reinterpret_cast<bf16*>(kept) + (int64_t)t0 * m;  // the pair's query tile
          __m512 mx0 = _mm512_set1_ps(-INFINITY), mx1 = mx0;
          for (int c = 0; c < m; c += 16) {
            mx0 = _mm512_max_ps(mx0, _mm512_loadu_ps(s0 + c));
            mx1 = _mm512_max_ps(mx1, _mm512_loadu_ps(s1 + c));
          }
          rowmax[i] = _mm512_reduce_max_ps(mx0), rowmax[i + 1] = _mm512_reduce_max_ps(mx1);
          const __m512 sh0 = _mm512_set1_ps(-rowmax[i] * sl2), sh1 = _mm512_set1_ps(-rowmax[i + 1] * sl2);
          __m512 sum0 = _mm512_setzero_ps(), sum1 = sum0;
          for_key_tiles(g, [&](int kc, int nk) {
            bf16* out = dst + (int64_t)tr * kc + (int64_t)(row - t0) * nk;  // the pair's row of this tile
            for (int c = kc; c < kc + nk; c += 16) {
              __m512 e0 = exp2_16<EXP_DEG<T>>(_mm512_fmadd_ps(_mm512_loadu_ps(s0 + c), sc, sh0));
              __m512 e1 = exp2_16<EXP_DEG<T>>(_mm512_fmadd_ps(_mm512_loadu_ps(s1 + c), sc, sh1));
              sum0 = _mm512_add_ps(sum0, e0);
              sum1 = _mm512_add_ps(sum1, e1);
              __m512i x = (__m512i)_mm512_cvtne2ps_pbh(e1, e0);  // row i's 16 values, then row i + 1's
              _mm256_storeu_si256((__m256i*)(p0 + c), _mm512_castsi512_si256(x));
              _mm256_storeu_si256((__m256i*)(p0 + ms + c), _mm512_extracti64x4_epi64(x, 1));
              _mm512_stream_si512((__m512i*)(out + 2 * (c - kc)), interleave_halves(x));
            }
          });
          rowsum[i] = _mm512_reduce_add_ps(sum0), rowsum[i + 1] = _mm512_reduce_add_ps(sum1);
        }
      } else {
        for (int i = 0; i < nr; i++) {
          const float* s = &S[(size_t)i * ms];
          T* p = &P[(size_t)i * ms];
          // two independent chains each: the loops are bound by latency otherwise (m is a multiple of 16)
          __m512 mx0 = _mm512_set1_ps(-INFINITY), mx1 = mx0;
          int c = 0;
          for (; c + 32 <= m; c += 32) {
            mx0 = _mm512_max_ps(mx0, _mm512_loadu_ps(s + c));
            mx1 = _mm512_max_ps(mx1, _mm512_loadu_ps(s + c + 16));
          }
          if (c < m) mx0 = _mm512_max_ps(mx0, _mm512_loadu_ps(s + c));
          rowmax[i] = _mm512_reduce_max_ps(_mm512_max_ps(mx0, mx1));
          const __m512 shift = _mm512_set1_ps(-rowmax[i] * sl2);
          __m512 sum0 = _mm512_setzero_ps(), sum1 = sum0;
          auto exp_at = [&](int c) {
            __m512 e = exp2_16<EXP_DEG<T>>(_mm512_fmadd_ps(_mm512_loadu_ps(s + c), sc, shift));
            store16(p + c, e);
            return e;
          };
          if (kept) {  // fp32 (bf16 pairs rows above): the row of each of its tiles
            const int row = r0 - g.q0 + i, t0 = row / QT_BWD * QT_BWD, tr = std::min(QT_BWD, g.q1 - g.q0 - t0);
            float* dst = reinterpret_cast<float*>(kept) + (int64_t)t0 * m;
            for_key_tiles(g, [&](int kc, int nk) {
              float* out = dst + (int64_t)tr * kc + (int64_t)(row - t0) * nk;
              for (c = kc; c < kc + nk; c += 16) {
                __m512 e = exp_at(c);
                _mm512_stream_ps(out + c - kc, e);
                sum0 = _mm512_add_ps(sum0, e);
                std::swap(sum0, sum1);  // two chains
              }
            });
          } else {
            for (c = 0; c + 32 <= m; c += 32) {
              sum0 = _mm512_add_ps(sum0, exp_at(c));
              sum1 = _mm512_add_ps(sum1, exp_at(c + 16));
            }
            if (c < m) sum0 = _mm512_add_ps(sum0, exp_at(c));
          }
          rowsum[i] = _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
        }
      }
      float* lse_row = &lse[((int64_t)b * H + h) * L + r0];
      log16_rows(nr, rowmax, rowsum, scale, lse_row);  // lse = scale max + log sum
      if (kept) {  // the normalisers, after the group's E
        float* inv = reinterpret_cast<float*>(probs + per_bh * bh + poff[gi] + (int64_t)(g.q1 - g.q0) * m) + (r0 - g.q0);
        for (int i = 0; i < nr; i++) inv[i] = 1.f / rowsum[i];
      }
      col = 0;
      for (size_t ri = 0; ri < g.ranges.size(); ri++) {  // O (nr x D) = sum over ranges of P[:, range] V[range]
        auto& r = g.ranges[ri];
        gemm<T>(nr, D, r.second - r.first, P + col, ms, vp + (size_t)r.first * D, D, O, D, ri > 0);
        col += r.second - r.first;
      }
      for (int i = 0; i < nr; i++) {
        T* dst = const_cast<T*>(row_ptr<T>(o, b, h, r0 + i));
        __m512 inv = _mm512_set1_ps(1.f / rowsum[i]);
        for (int d = 0; d < D; d += 16) store16(dst + d, _mm512_mul_ps(_mm512_loadu_ps(&O[(size_t)i * D + d]), inv));
      }
    }
  };
  const int BH = B * H;
  std::unique_ptr<std::atomic<int>[]> next(new std::atomic<int>[BH]);  // per (batch, head): its next group
  for (int i = 0; i < BH; i++) next[i].store(0, std::memory_order_relaxed);
  std::atomic<int> claim{0};
#pragma omp parallel num_threads(std::max(1, std::min(nthreads, BH * G)))
  {
    const int worker = omp_get_thread_num();
    for (int bh; (bh = claim.fetch_add(1)) < BH;)  // claimed (batch, head)s, one after the other
      for (int i; (i = next[bh].fetch_add(1)) < G;) run(bh, order[i], worker);
    for (int bh = 0; bh < BH; bh++)  // then what is left of the others' (their smallest groups)
      for (int i; (i = next[bh].fetch_add(1)) < G;) run(bh, order[i], worker);
    tiles_end();
  }
}

// ---------------------------------------------------------------- backward

// Prefetches `lines` cache lines from p on, one per step().
struct Ahead {
  const char* p = nullptr;
  int lines = 0, l = 0;
  Ahead() = default;
  Ahead(const void* p_, int lines_) : p(static_cast<const char*>(p_)), lines(lines_) {}
  void step() {
    if (l < lines) _mm_prefetch(p + 64 * l++, _MM_HINT_T0);
  }
  void rest() {
    while (l < lines) step();
  }
};
// bf16 with kept probabilities: dS of 2 PAIRS rows and 16 NV columns of a tile, dP = dO V^T held in
// registers (K = D). E (kept, pairs, 2 ld elements per pair of rows), nrm and dlt (per row) at the block's
// first row; dS = E (dP nrm - dlt) to dSr (row-major, rows ld apart) and dSb (pairs, 2 ld per pair).
// A (dO's rows) row-major, as AType<bf16>.
template <int PAIRS_, int NV>
void micro_ds(int K, const AType<bf16>* A, int lda, const bf16* Bp, int ldb, const bf16* E, const float* nrm,
              const float* dlt, bf16* dSr, bf16* dSb, int ld, Ahead* ahead) {
  if (K <= 0) __builtin_unreachable();
  constexpr int MR = 2 * PAIRS_;
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < NV; j++) acc[i][j] = _mm512_setzero_ps();
  kloop(acc, K, A, lda, KStep<AType<bf16>>::v, Bp, ldb);
  const __m512i hi = _mm512_set1_epi32(int(0xffff0000u));
  for (int p = 0; p < PAIRS_; p++) {
    const __m512 n0 = _mm512_set1_ps(nrm[2 * p]), n1 = _mm512_set1_ps(nrm[2 * p + 1]);
    const __m512 d0 = _mm512_set1_ps(dlt[2 * p]), d1 = _mm512_set1_ps(dlt[2 * p + 1]);
    for (int j = 0; j < NV; j++) {
      ahead->step();
      const __m512i x = _mm512_loadu_si512(E + (size_t)p * 2 * ld + 32 * j);  // rows 2p, 2p + 1: low, high halves
      const __m512 s0 = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(x, 16)), _mm512_fmsub_ps(acc[2 * p][j], n0, d0));
      const __m512 s1 = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(x, hi)), _mm512_fmsub_ps(acc[2 * p + 1][j], n1, d1));
      const __m512i y = (__m512i)_mm512_cvtne2ps_pbh(s1, s0);  // row 2p's 16, then row 2p + 1's
      _mm256_storeu_si256((__m256i*)(dSr + (size_t)2 * p * ld + 16 * j), _mm512_castsi512_si256(y));
      _mm256_storeu_si256((__m256i*)(dSr + (size_t)(2 * p + 1) * ld + 16 * j), _mm512_extracti64x4_epi64(y, 1));
      _mm512_storeu_si512(dSb + (size_t)p * 2 * ld + 32 * j, interleave_halves(y));
    }
  }
}

using DsFn = void (*)(int, const AType<bf16>*, int, const bf16*, int, const bf16*, const float*, const float*, bf16*,
                      bf16*, int, Ahead*);

#ifndef UNIMODAL_AVX2
constexpr int MAX_PAIRS = 3;
#else
constexpr int MAX_PAIRS = 2;
#endif

template <int NV, int... Ps>
constexpr std::array<DsFn, sizeof...(Ps)> ds_row(std::integer_sequence<int, Ps...>) { return {&micro_ds<Ps + 1, NV>...}; }
template <int... NVs>
constexpr auto ds_table(std::integer_sequence<int, NVs...>) {  // [nv - 1][pairs - 1]
  return std::array<std::array<DsFn, MAX_PAIRS>, sizeof...(NVs)>{ds_row<NVs + 1>(std::make_integer_sequence<int, MAX_PAIRS>{})...};
}

// dS of an M x N tile (M even, N a multiple of 16) through micro_ds: panels of up to MAX_NV vectors, calls of
// up to MAX_PAIRS pairs of rows (split evenly).
void gemm_ds(int M, int N, int K, const bf16* A, int lda, const bf16* Bp, int ldb, const bf16* E, const float* nrm,
             const float* dlt, bf16* dSr, bf16* dSb, Ahead* ahead) {
  static const auto table = ds_table(std::make_integer_sequence<int, MAX_NV>{});
  const AType<bf16>* a = reinterpret_cast<const AType<bf16>*>(A);
#ifdef UNIMODAL_AVX2
  if (widened.size() < (size_t)M * K) widened.resize((size_t)M * K);
  lda = widen(M, K, A, lda, 2, widened.data()).first;
  a = widened.data();
#endif
  const int pairs = M / 2, calls = (pairs + MAX_PAIRS - 1) / MAX_PAIRS, base = pairs / calls, big = pairs - base * calls;
  for (int n0 = 0, nv; n0 < N; n0 += 16 * nv) {
    nv = std::min(MAX_NV, (N - n0) / 16);
    for (int c = 0, m0 = 0; c < calls; c++) {
      const int np = base + (c < big);
      table[nv - 1][np - 1](K, a + (size_t)m0 * lda, lda, Bp + (size_t)n0 * 2, ldb, E + (size_t)m0 * N + 2 * n0,
                            nrm + m0, dlt + m0, dSr + (size_t)m0 * N + n0, dSb + (size_t)m0 * N + 2 * n0, N, ahead);
      m0 += 2 * np;
    }
  }
}

// Per (batch, head), group, tile of queries (rows) and tile of keys: dP = dO V^T; P from the kept
// probabilities, or recomputed (S = Q K^T, P = exp(scale S - lse)); dS = P (dP - delta);
// dV += P^T dO and dK += dS^T Q (fp32 sums L x D over all groups), dQ += dS K (fp32, per query tile).
// P and dS, in the layout of the kept probabilities (bf16: query rows paired), are read transposed as the
// A operands of the first two (key rows KS elements apart, queries or query pairs KS nk apart); dS
// row-major is the A operand of the third.


template <typename T, typename G>
void backward(int B, int H, int D, Tensor4 q, Tensor4 k, Tensor4 v, Tensor4 o, Tensor4 dout, const float* lse,
              G* dq, G* dk, G* dv, const T* probs, int L, const std::vector<Group>& groups, float scale,
              int nthreads) {
  const int KS = KStep<T>::v, Le = round_up(L, 2), Lt = padded(L);
  int64_t per_bh;
  const std::vector<int64_t> poff = probs_offsets(groups, KS, &per_bh);
  std::vector<uint8_t> is_query(L, 0);
  for (auto& g : groups) std::fill(is_query.begin() + g.q0, is_query.begin() + g.q1, 1);
  const __m512 zero = _mm512_setzero_ps(), sc = _mm512_set1_ps(scale);
  // one task per (batch, head): its groups add into the same dK, dV rows
  parallel_for(B * H, nthreads, [&](int bh, int worker) {
    int b = bh / H, h = bh % H;
    const int64_t base = (int64_t)bh * L;
    // this (batch, head)'s gradient rows, in locals (the stores below could alias the lambda's captures, which
    // the compiler would then reload after every store)
    G *dqb = dq + base * D, *dkb = dk + base * D, *dvb = dv + base * D;
    Workspace& ws = workspaces[worker];
    T *Vt = ws.get<T>(0, (size_t)D * Lt), *dOp = ws.get<T>(1, (size_t)Le * D), *Qp = ws.get<T>(2, (size_t)Le * D);
    T *Kp = ws.get<T>(3, (size_t)Le * D), *Kt = probs ? nullptr : ws.get<T>(4, (size_t)D * Lt);
    pack_transposed<T>(rows_of<T>(v, b, h), v.sl, L, D, Vt, Lt);          // B of dO V^T: (D x L)
    float* rowf = nullptr;  // kept: the queries' normalisers, by position (0 off the groups)
    if (probs) {
      rowf = ws.f[4].get(L);
      std::fill(rowf, rowf + L, 0.f);
      for (size_t gi = 0; gi < groups.size(); gi++) {
        const Group& g = groups[gi];
        const float* inv = reinterpret_cast<const float*>(probs + per_bh * bh + poff[gi] + (int64_t)(g.q1 - g.q0) * g.keys());
        std::copy(inv, inv + (g.q1 - g.q0), rowf + g.q0);
      }
    }
    pack_rows<T>(rows_of<T>(dout, b, h), dout.sl, L, D, dOp, rowf);      // B of P^T dO, or E^T (dO / sum): (L x D)
    pack_rows<T>(rows_of<T>(q, b, h), q.sl, L, D, Qp);                    // B of dS^T Q: (L x D)
    pack_rows<T>(rows_of<T>(k, b, h), k.sl, L, D, Kp);                    // B of dS K: (L x D)
    if (!probs) pack_transposed<T>(rows_of<T>(k, b, h), k.sl, L, D, Kt, Lt);  // B of Q K^T: (D x L)
    // bf16 on AMX tiles: dV^T += (dO / sum)^T P and dK^T += Q^T dS instead (A row-major, P and dS paired as
    // kept: the B operands as they are), summed transposed (D x L)
    const bool tiles = KS == 2 && amx_on;
    T *dOt = nullptr, *Qt = nullptr;
    if (tiles) {
      dOt = ws.get<T>(5, (size_t)D * Lt), Qt = ws.get<T>(6, (size_t)D * Lt);
      transpose_words(reinterpret_cast<const int32_t*>(dOp), Le / 2, D, D, reinterpret_cast<int32_t*>(dOt), Lt / 2);
      transpose_words(reinterpret_cast<const int32_t*>(Qp), Le / 2, D, D, reinterpret_cast<int32_t*>(Qt), Lt / 2);
    }
    const size_t tile = (size_t)QT_BWD * KT_BWD + 32;  // per tile: S, dP (fp32); P, dS row-major, dS paired
    // (each 128 bytes past a multiple of 4 KiB from the one before: no shared L1 sets)
    float *Sb = align64(ws.tiles.get(2 * tile + 16)), *dPb = Sb + tile;
    T *Pw = align64(reinterpret_cast<T*>(ws.tiles_h.get((3 * tile + 32) * sizeof(T) / 2))), *dSr = Pw + tile, *dSb = dSr + tile;
    std::vector<float> dQf((size_t)QT_BWD * D), delta, lse2, norm;
    // fp32 sums over groups, L x D (or D x Lt on tiles); the products add straight into them
    const size_t gsize = tiles ? (size_t)D * Lt : (size_t)L * D;
    float *dKr = ws.grad[0].get(gsize), *dVr = ws.grad[1].get(gsize);
    std::memset(dKr, 0, sizeof(float) * gsize);
    std::memset(dVr, 0, sizeof(float) * gsize);
    for (int l = 0; l < L; l++)
      if (!is_query[l])
        for (int d = 0; d < D; d += 16) store16(dqb + (int64_t)l * D + d, zero);
    for (size_t gi = 0; gi < groups.size(); gi++) {
      const Group& g = groups[gi];
      const int nq = g.q1 - g.q0, m = g.keys();
      const T* gprobs = probs ? probs + per_bh * bh + poff[gi] : nullptr;
      // kept: the queries' normalisers (P = E norm; dS = E (dP norm - delta norm)); recomputed P: 1
      const float* ginv = gprobs ? reinterpret_cast<const float*>(gprobs + (int64_t)nq * m) : nullptr;
      delta.resize(nq);
      lse2.resize(nq);
      norm.resize(nq);
      for (int i = 0; i < nq; i++) {  // delta_i = sum_d dO_id O_id; lse in base 2
        const T *orow = row_ptr<T>(o, b, h, g.q0 + i), *drow = row_ptr<T>(dout, b, h, g.q0 + i);
        if (i + 8 < nq)  // rows ahead (strided in memory: the hardware prefetcher does not run ahead of them)
          for (int d = 0; d < D; d += 64 / sizeof(T)) {
            _mm_prefetch(reinterpret_cast<const char*>(orow + 8 * o.sl + d), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(drow + 8 * dout.sl + d), _MM_HINT_T0);
          }
        __m512 acc = _mm512_setzero_ps();
        for (int d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(load16(drow + d), load16(orow + d), acc);
        norm[i] = ginv ? ginv[i] : 1.f;
        delta[i] = _mm512_reduce_add_ps(acc) * norm[i];
        lse2[i] = lse[base + g.q0 + i] * LOG2E;
      }
      for (int r0 = 0; r0 < nq; r0 += QT_BWD) {
        const int nr = std::min(QT_BWD, nq - r0), qa = g.q0 + r0;  // nr, qa even
        float* dQa = dQf.data();
        int col = 0;
        bool first = true;
        for (auto& r : g.ranges) {
          for (int k0 = r.first; k0 < r.second; k0 += KT_BWD) {
            const int nk = std::min(KT_BWD, r.second - k0), kc = col + k0 - r.first;  // nk a multiple of 16
            // P: the kept tile (contiguous, in the order of these loops) or recomputed into Pw; the kept
            // tiles are fetched one ahead (the task's first before its dP)
            const T* Pb = gprobs ? gprobs + (int64_t)r0 * m + (int64_t)nr * kc : Pw;
            const int tile_lines = nr * nk * (int)sizeof(T) / 64;
            Ahead ahead;
            if (gprobs) {
              if (gi == 0 && r0 == 0 && kc == 0) Ahead(Pb, tile_lines).rest();
              ahead = Ahead(Pb + (size_t)nr * nk, tile_lines);  // past the group's end: the next group's first
            }
            bool fused = false;
            if constexpr (KStep<T>::v == 2) {
              if (gprobs && !tiles) {  // dP in registers, dS straight from it
                gemm_ds(nr, nk, D, row_ptr<T>(dout, b, h, qa), dout.sl, Vt + (size_t)k0 * KS, Lt, Pb, &norm[r0],
                        &delta[r0], dSr, dSb, &ahead);
                fused = true;
              }
            }
            if (!fused) {
              gemm<T>(nr, nk, D, row_ptr<T>(dout, b, h, qa), dout.sl, Vt + (size_t)k0 * KS, Lt, dPb, nk, false);
              if (!gprobs)
                gemm<T>(nr, nk, D, row_ptr<T>(q, b, h, qa), q.sl, Kt + (size_t)k0 * KS, Lt, Sb, nk, false);
              const __m512 sl2 = _mm512_set1_ps(scale * LOG2E);
              for (int i = 0; i < nr; i += KS) {
                const __m512 l0 = _mm512_set1_ps(lse2[r0 + i]), d0 = _mm512_set1_ps(delta[r0 + i]);
                const __m512 n0 = _mm512_set1_ps(norm[r0 + i]);
                if constexpr (KStep<T>::v == 2) {
                  const __m512 l1 = _mm512_set1_ps(lse2[r0 + i + 1]), d1 = _mm512_set1_ps(delta[r0 + i + 1]);
                  const __m512 n1 = _mm512_set1_ps(norm[r0 + i + 1]);
                  const __m512i hi = _mm512_set1_epi32(int(0xffff0000u));
                  for (int c = 0; c < nk; c += 16) {  // P kept (on tiles; else through gemm_ds) or recomputed
                    __m512 p0, p1;
                    if (gprobs) {
                      ahead.step();
                      const __m512i x = _mm512_loadu_si512(Pb + (size_t)i * nk + 2 * c);  // rows i, i + 1 paired
                      p0 = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
                      p1 = _mm512_castsi512_ps(_mm512_and_si512(x, hi));
                    } else {
                      p0 = exp2_16<EXP_DEG<T>>(_mm512_fmsub_ps(_mm512_loadu_ps(&Sb[(size_t)i * nk + c]), sl2, l0));
                      p1 = exp2_16<EXP_DEG<T>>(_mm512_fmsub_ps(_mm512_loadu_ps(&Sb[(size_t)(i + 1) * nk + c]), sl2, l1));
                      _mm512_storeu_si512(&Pw[(size_t)i * nk + 2 * c], interleave_bf16(p0, p1));
                    }
                    __m512 s0 = _mm512_mul_ps(p0, _mm512_fmsub_ps(_mm512_loadu_ps(&dPb[(size_t)i * nk + c]), n0, d0));
                    __m512 s1 = _mm512_mul_ps(p1, _mm512_fmsub_ps(_mm512_loadu_ps(&dPb[(size_t)(i + 1) * nk + c]), n1, d1));
                    const __m512i x = (__m512i)_mm512_cvtne2ps_pbh(s1, s0);  // row i's 16, then row i + 1's
                    _mm256_storeu_si256((__m256i*)&dSr[(size_t)i * nk + c], _mm512_castsi512_si256(x));
                    _mm256_storeu_si256((__m256i*)&dSr[(size_t)(i + 1) * nk + c], _mm512_extracti64x4_epi64(x, 1));
                    _mm512_storeu_si512(&dSb[(size_t)i * nk + 2 * c], interleave_halves(x));
                  }
                } else {
                  for (int c = 0; c < nk; c += 16) {
                    __m512 p0;
                    if (gprobs) {
                      ahead.step();
                      p0 = load16(Pb + (size_t)i * nk + c);
                    } else {
                      p0 = exp2_16<EXP_DEG<T>>(_mm512_fmsub_ps(_mm512_loadu_ps(&Sb[(size_t)i * nk + c]), sl2, l0));
                      store16(&Pw[(size_t)i * nk + c], p0);
                    }
                    store16(&dSr[(size_t)i * nk + c],
                            _mm512_mul_ps(p0, _mm512_fmsub_ps(_mm512_loadu_ps(&dPb[(size_t)i * nk + c]), n0, d0)));
                  }
                }
              }
            }
            ahead.rest();
            // P and dS transposed as A operands: key row kk at kk KS, query pairs (bf16) or queries KS nk apart
            const T* dsb = KStep<T>::v == 2 ? dSb : dSr;  // fp32: row-major (queries x keys)
            if (tiles) {  // dV^T += dO^T P, dK^T += Q^T dS; else dV += P^T dO, dK += dS^T Q
              gemm<T>(D, nk, nr, dOt + qa, Lt, Pb, nk, dVr + k0, Lt, true);
              gemm<T>(D, nk, nr, Qt + qa, Lt, dsb, nk, dKr + k0, Lt, true);
            } else {
              gemm<T>(nk, D, nr, Pb, KS, dOp + (size_t)qa * D, D, dVr + (size_t)k0 * D, D, true, KS * nk);  // dV
              gemm<T>(nk, D, nr, dsb, KS, Qp + (size_t)qa * D, D, dKr + (size_t)k0 * D, D, true, KS * nk);  // dK
            }
            gemm<T>(nr, D, nk, dSr, nk, Kp + (size_t)k0 * D, D, dQa, D, !first);  // dQ += dS K
            first = false;
          }
          col += r.second - r.first;
        }
        for (int i = 0; i < nr; i++)  // scale dQ -> dq rows (every query is in one group)
          for (int d = 0; d < D; d += 16)
            store16(dqb + (int64_t)(qa + i) * D + d, _mm512_mul_ps(_mm512_loadu_ps(&dQa[(size_t)i * D + d]), sc));
      }
    }
    // dK (times the scale), dV rows -> dk, dv
    if (tiles) {
      write_transposed(dKr, Lt, L, D, scale, dkb);
      write_transposed(dVr, Lt, L, D, 1.f, dvb);
    } else {
      for (size_t i = 0; i < (size_t)L * D; i += 16) {
        store16(dkb + i, _mm512_mul_ps(_mm512_loadu_ps(dKr + i), sc));
        store16(dvb + i, _mm512_loadu_ps(dVr + i));
      }
    }
  });
}

Tensor4 t4(const void* p, const int64_t* s) { return Tensor4{static_cast<const char*>(p), s[0], s[1], s[2]}; }

}  // namespace

// want 1: run the bf16 products on AMX tiles from the next call on, where the build targets AMX, the CPU and
// OS allow it and a product on the tiles has matched the vector units' (checked once); want 0: on the vector
// units. Returns 1 when the tiles are in use, else why not: 0 (want 0), -1 (a build without AMX: the compiler
// did not target it), -2 (the CPU has no AMX-TILE and AMX-BF16), -3 (the OS refused the tile state),
// -4 (the check on the tiles failed or faulted).
extern "C" int block_attention_amx(int want) {
#ifdef UNIMODAL_AMX
  std::lock_guard<std::mutex> hold(call_lock);
  if (!want) {  // neither the permission (process-wide, for good) nor the check is asked for
    amx_on = false;
    return 0;
  }
  static const int usable = [] {
    const int rc = amx_permitted();
    return rc < 0 ? rc : amx_works() ? 1 : -4;
  }();
  amx_on = usable == 1;
  return usable;
#else
  return want ? -1 : 0;
#endif
}

// dtype: 0 fp32, 1 bf16. strides: 4 per tensor (batch, head, position, last), in elements, for q, k, v, o
// (and dout). groups: per group q0, q1, number of ranges, then (start, end) per range. probs: null, or
// probs_numel elements. Returns what `check` and `check_probs` return.
extern "C" int block_attention_forward(int dtype, int B, int H, int L, int Lk, int D, const void* q, const void* k,
                                       const void* v, void* o, const int64_t* strides, float* lse, void* probs,
                                       int64_t probs_numel, const int32_t* groups, int ngroups, float scale,
                                       int nthreads) {
  auto gs = parse_groups(groups, ngroups, L, Lk);
  if (int rc = check(dtype, D, std::min(L, Lk), gs, ngroups, strides, 4)) return rc;
  if (probs && Lk != L) return -1;
  if (int rc = check_probs(probs, probs_numel, dtype, B, H, gs)) return rc;
  std::lock_guard<std::mutex> hold(call_lock);
  nthreads = std::max(1, std::min(nthreads, MAX_THREADS));
  const int64_t* s = strides;
  if (dtype == 0)
    forward<float>(B, H, D, t4(q, s), t4(k, s + 4), t4(v, s + 8), t4(o, s + 12), lse, static_cast<float*>(probs), L,
                   Lk, gs, scale, nthreads);
  else
    forward<bf16>(B, H, D, t4(q, s), t4(k, s + 4), t4(v, s + 8), t4(o, s + 12), lse, static_cast<bf16*>(probs), L,
                  Lk, gs, scale, nthreads);
  _mm_sfence();  // the streamed stores of the kept probabilities
  return 0;
}

extern "C" int block_attention_backward(int dtype, int B, int H, int L, int D, const void* q, const void* k,
                                        const void* v, const void* o, const void* dout, const int64_t* strides,
                                        const float* lse, const void* probs, int64_t probs_numel, void* dq, void* dk,
                                        void* dv, int grad_dtype, const int32_t* groups, int ngroups, float scale,
                                        int nthreads) {
  auto gs = parse_groups(groups, ngroups, L, L);
  if (int rc = check(dtype, D, L, gs, ngroups, strides, 5)) return rc;
  if (grad_dtype != 0 && grad_dtype != dtype) return -1;
  if (int rc = check_probs(probs, probs_numel, dtype, B, H, gs)) return rc;
  std::lock_guard<std::mutex> hold(call_lock);
  nthreads = std::max(1, std::min(nthreads, MAX_THREADS));
  const int64_t* s = strides;
  auto run = [&](auto t, auto g) {
    using T = decltype(t);
    using G = decltype(g);
    backward<T, G>(B, H, D, t4(q, s), t4(k, s + 4), t4(v, s + 8), t4(o, s + 12), t4(dout, s + 16), lse,
                   static_cast<G*>(dq), static_cast<G*>(dk), static_cast<G*>(dv), static_cast<const T*>(probs), L, gs,
                   scale, nthreads);
  };
  if (dtype == 0)
    run(float(), float());
  else if (grad_dtype == 0)
    run(bf16(), float());
  else
    run(bf16(), bf16());
  return 0;
}
