// Fused block-structured attention for x86-64 CPUs with AVX-512 (fp32) and AVX512-BF16 (bf16).
//
// A row of queries is cut into query groups; group g has the queries [q0, q1) and sees exactly the keys
// of its ranges (the union of the ranges, every pair allowed). Forward: per (batch, head, group) the
// group's keys are packed once, then per tile of query rows S = Q K^T (fp32 accumulation), the softmax
// in fp32 registers, O = P V. Backward (FlashAttention-2 order): per (batch, head, group) and tile of
// keys, per tile of queries: S, P = exp(scale S - lse), dP = dO V^T, dS = P (dP - delta);
// dV += P^T dO, dK += scale dS^T Q, dQ += scale dS K, all accumulated in fp32.
// bf16 operands go through vdpbf16ps (pairs of bf16 along the reduction axis, fp32 sums); P and dS are
// rounded to the operands' dtype for their products, as GPU flash attention does.
//
// Called through ctypes (plain C ABI, raw pointers); tensors are (B, H, L, D) with any strides along
// B, H, L and the last axis contiguous; lse is (B, H, L) fp32 contiguous; dq/dk/dv are fp32 contiguous.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <utility>
#include <vector>

namespace {

typedef uint16_t bf16;

// ---------------------------------------------------------------- element access

inline float to_f(float x) { return x; }
inline float to_f(bf16 x) {
  uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename T> inline T from_f(float x);
template <> inline float from_f<float>(float x) { return x; }
template <> inline bf16 from_f<bf16>(float x) {  // round to nearest even (NaN kept NaN)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return bf16((u >> 16) | 0x40);
  u += 0x7fff + ((u >> 16) & 1);
  return bf16(u >> 16);
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline __m512 round_bf16(__m512 x) {  // fp32 -> nearest bf16 -> fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}
inline void store16(bf16* p, __m512 x) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(x)); }

// exp for x <= 0 (softmax arguments): 2^n * p(r), |r| <= ln2/2, degree-6 Taylor (rel. error ~2e-7)
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-100.f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// ---------------------------------------------------------------- GEMM: C (M x N, fp32) (+)= A (M x K) Bp (K x N)
// A row-major with K contiguous (lda elements); Bp packed: fp32 [K][ldb], bf16 [K/2][ldb][2].
// N a multiple of 16; for bf16 K even (callers pad with zeros).

template <typename T> struct KStep;
template <> struct KStep<float> { static constexpr int v = 1; };
template <> struct KStep<bf16> { static constexpr int v = 2; };

template <typename T, int MR, int NV>
void micro(int K, const T* A, int lda, const T* Bp, int ldb, float* C, int ldc, bool acc_in) {
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < NV; j++) acc[i][j] = acc_in ? _mm512_loadu_ps(C + i * ldc + 16 * j) : _mm512_setzero_ps();
  if constexpr (KStep<T>::v == 1) {
    for (int k = 0; k < K; k++) {
      __m512 b[NV];
      for (int j = 0; j < NV; j++) b[j] = _mm512_loadu_ps(Bp + (size_t)k * ldb + 16 * j);
      for (int i = 0; i < MR; i++) {
        __m512 a = _mm512_set1_ps(A[i * lda + k]);
        for (int j = 0; j < NV; j++) acc[i][j] = _mm512_fmadd_ps(a, b[j], acc[i][j]);
      }
    }
  } else {
    for (int k = 0; k < K; k += 2) {
      __m512bh b[NV];
      for (int j = 0; j < NV; j++)
        b[j] = (__m512bh)_mm512_loadu_si512(Bp + (size_t)(k / 2) * ldb * 2 + 32 * j);
      for (int i = 0; i < MR; i++) {
        int32_t pair;
        std::memcpy(&pair, A + i * lda + k, 4);
        __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
        for (int j = 0; j < NV; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, b[j]);
      }
    }
  }
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < NV; j++) _mm512_storeu_ps(C + i * ldc + 16 * j, acc[i][j]);
}

template <typename T>
using MicroFn = void (*)(int, const T*, int, const T*, int, float*, int, bool);

template <typename T, int NV, int... MRs>
constexpr auto micro_row(std::integer_sequence<int, MRs...>) {
  return std::array<MicroFn<T>, sizeof...(MRs)>{&micro<T, MRs + 1, NV>...};
}

constexpr int MAX_MR = 8;
inline int mr_for(int nv) { return nv == 4 ? 6 : 8; }  // accumulators + B vectors within 32 registers

template <typename T>
void gemm(int M, int N, int K, const T* A, int lda, const T* Bp, int ldb, float* C, int ldc, bool accumulate) {
  static const std::array<MicroFn<T>, MAX_MR> table[4] = {
      micro_row<T, 1>(std::make_integer_sequence<int, MAX_MR>{}),
      micro_row<T, 2>(std::make_integer_sequence<int, MAX_MR>{}),
      micro_row<T, 3>(std::make_integer_sequence<int, MAX_MR>{}),
      micro_row<T, 4>(std::make_integer_sequence<int, MAX_MR>{})};
  for (int n0 = 0; n0 < N; n0 += 64) {
    int nv = std::min(4, (N - n0) / 16);
    int MR = mr_for(nv);
    const T* B = Bp + (size_t)n0 * KStep<T>::v;
    for (int m0 = 0; m0 < M; m0 += MR) {
      int mr = std::min(MR, M - m0);
      table[nv - 1][mr - 1](K, A + (size_t)m0 * lda, lda, B, ldb, C + (size_t)m0 * ldc + n0, ldc, accumulate);
    }
  }
}

// ---------------------------------------------------------------- packing
// "B operand" layouts: element (k, n) of a K x N matrix at fp32 [k][ldb + n], bf16 [(k/2)][n][k&1].

template <typename T>
inline size_t bidx(int k, int n, int ldb) {
  return KStep<T>::v == 1 ? (size_t)k * ldb + n : ((size_t)(k >> 1) * ldb + n) * 2 + (k & 1);
}

// rows[r] points at row r (D elements); out (D x Np): element (d, r) = rows[r][d]; columns >= R zero
template <typename T>
void pack_transposed(const std::vector<const T*>& rows, int R, int D, int Np, T* out) {
  std::fill(out, out + (size_t)D * Np, T(0));
  if constexpr (KStep<T>::v == 2) {  // bf16: 32-bit words (d, d+1) move together
    uint32_t* o = reinterpret_cast<uint32_t*>(out);
    for (int r = 0; r < R; r++) {
      const uint32_t* s = reinterpret_cast<const uint32_t*>(rows[r]);
      for (int w = 0; w < D / 2; w++) o[(size_t)w * Np + r] = s[w];
    }
  } else {
    for (int r = 0; r < R; r++)
      for (int d = 0; d < D; d++) out[(size_t)d * Np + r] = rows[r][d];
  }
}

// out (Rp x D): element (r, d) = rows[r][d]; rows >= R zero (Rp even for bf16)
template <typename T>
void pack_rows(const std::vector<const T*>& rows, int R, int Rp, int D, T* out) {
  if constexpr (KStep<T>::v == 1) {
    for (int r = 0; r < R; r++) std::memcpy(out + (size_t)r * D, rows[r], D * sizeof(T));
    std::fill(out + (size_t)R * D, out + (size_t)Rp * D, T(0));
  } else {
    for (int r = 0; r < Rp; r += 2) {
      T* o = out + (size_t)r * D;
      const T* a = r < R ? rows[r] : nullptr;
      const T* b = r + 1 < R ? rows[r + 1] : nullptr;
      for (int d = 0; d < D; d++) {
        o[2 * d] = a ? a[d] : T(0);
        o[2 * d + 1] = b ? b[d] : T(0);
      }
    }
  }
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

std::vector<Group> parse_groups(const int32_t* g, int ngroups) {
  std::vector<Group> out(ngroups);
  for (int i = 0; i < ngroups; i++) {
    out[i].q0 = *g++;
    out[i].q1 = *g++;
    int nr = *g++;
    for (int r = 0; r < nr; r++, g += 2) out[i].ranges.push_back({g[0], g[1]});
  }
  return out;
}

template <typename F>
void parallel_for(int n, int nthreads, F&& f) {
  std::atomic<int> next{0};
  auto work = [&]() {
    for (int i; (i = next.fetch_add(1)) < n;) f(i);
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < std::min(nthreads, n); t++) pool.emplace_back(work);
  work();
  for (auto& th : pool) th.join();
}

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

template <typename T>
const T* row_ptr(const Tensor4& t, int b, int h, int l) {
  return reinterpret_cast<const T*>(t.p) + b * t.sb + h * t.sh + (int64_t)l * t.sl;
}

// ---------------------------------------------------------------- per-(batch, head) packed operands

// All L rows of x at (b, h): transposed (D x L), bf16 pairs along D, as the B operand of "rows . x^T".
template <typename T>
void pack_all_transposed(const Tensor4& x, int b, int h, int L, int D, T* out) {
  std::vector<const T*> rows(L);
  for (int l = 0; l < L; l++) rows[l] = row_ptr<T>(x, b, h, l);
  pack_transposed<T>(rows, L, D, L, out);
}
// All L rows as the B operand of "(. x L) . x" (L x D), bf16 pairs along L (L padded to even).
template <typename T>
void pack_all_rows(const Tensor4& x, int b, int h, int L, int D, T* out) {
  std::vector<const T*> rows(L);
  for (int l = 0; l < L; l++) rows[l] = row_ptr<T>(x, b, h, l);
  pack_rows<T>(rows, L, round_up(L, 2), D, out);
}
// Plain transpose (D x L), elements in place (the A operand of "x^T . (L x .)", bf16 pairs along L).
template <typename T>
void plain_transposed(const Tensor4& x, int b, int h, int L, int D, T* out) {
  for (int l = 0; l < L; l++) {
    const T* r = row_ptr<T>(x, b, h, l);
    for (int d = 0; d < D; d++) out[(size_t)d * L + l] = r[d];
  }
}

bool aligned(const Group& g) {  // what the packed layouts need: 16-multiples, even starts
  if ((g.q1 - g.q0) % 16 || g.q0 % 2) return false;
  for (auto& r : g.ranges)
    if ((r.second - r.first) % 16 || r.first % 2) return false;
  return true;
}

// ---------------------------------------------------------------- forward

constexpr int QT_FWD = 16;

template <typename T>
void forward(int B, int H, int D, Tensor4 q, Tensor4 k, Tensor4 v, Tensor4 o, float* lse, int L,
             const std::vector<Group>& groups, float scale, int nthreads) {
  const int G = groups.size(), KS = KStep<T>::v, Le = round_up(L, 2);
  std::vector<T> Kt((size_t)B * H * D * L), Vp((size_t)B * H * Le * D);
  parallel_for(B * H, nthreads, [&](int bh) {
    pack_all_transposed<T>(k, bh / H, bh % H, L, D, &Kt[(size_t)bh * D * L]);  // B of Q K^T: (D x L)
    pack_all_rows<T>(v, bh / H, bh % H, L, D, &Vp[(size_t)bh * Le * D]);       // B of P V: (L x D)
  });
  std::vector<int> order(B * H * G);
  for (int i = 0; i < (int)order.size(); i++) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {  // largest groups first
    const Group &ga = groups[a % G], &gb = groups[b % G];
    return (int64_t)(ga.q1 - ga.q0) * ga.keys() > (int64_t)(gb.q1 - gb.q0) * gb.keys();
  });
  parallel_for(order.size(), nthreads, [&](int task) {
    int t = order[task];
    const Group& g = groups[t % G];
    int bh = t / G, b = bh / H, h = bh % H;
    int m = g.keys();
    const T* kt = &Kt[(size_t)bh * D * L];
    const T* vp = &Vp[(size_t)bh * Le * D];
    std::vector<T> P((size_t)QT_FWD * m);
    std::vector<float> S((size_t)QT_FWD * m), O((size_t)QT_FWD * D);
    for (int r0 = g.q0; r0 < g.q1; r0 += QT_FWD) {
      int nr = std::min(QT_FWD, g.q1 - r0), col = 0;
      for (auto& r : g.ranges) {  // S (nr x m), the ranges side by side
        gemm<T>(nr, r.second - r.first, D, row_ptr<T>(q, b, h, r0), q.sl, kt + (size_t)r.first * KS, L, S.data() + col,
                m, false);
        col += r.second - r.first;
      }
      float rowsum[QT_FWD];
      for (int i = 0; i < nr; i++) {
        float* s = &S[(size_t)i * m];
        T* p = &P[(size_t)i * m];
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int c = 0; c < m; c += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + c));
        float mxs = _mm512_reduce_max_ps(mx);
        __m512 shift = _mm512_set1_ps(-mxs * scale), sc = _mm512_set1_ps(scale), sum = _mm512_setzero_ps();
        for (int c = 0; c < m; c += 16) {
          __m512 e = exp16(_mm512_fmadd_ps(_mm512_loadu_ps(s + c), sc, shift));
          if constexpr (KStep<T>::v == 2) e = round_bf16(e);  // normalise by what P V sums
          sum = _mm512_add_ps(sum, e);
          store16(p + c, e);
        }
        rowsum[i] = _mm512_reduce_add_ps(sum);
        lse[((int64_t)b * H + h) * L + r0 + i] = mxs * scale + std::log(rowsum[i]);
      }
      col = 0;
      for (size_t ri = 0; ri < g.ranges.size(); ri++) {  // O (nr x D) = sum over ranges of P[:, range] V[range]
        auto& r = g.ranges[ri];
        gemm<T>(nr, D, r.second - r.first, P.data() + col, m, vp + (size_t)r.first * D, D, O.data(), D, ri > 0);
        col += r.second - r.first;
      }
      for (int i = 0; i < nr; i++) {
        T* dst = const_cast<T*>(row_ptr<T>(o, b, h, r0 + i));
        __m512 inv = _mm512_set1_ps(1.f / rowsum[i]);
        for (int d = 0; d < D; d += 16) store16(dst + d, _mm512_mul_ps(_mm512_loadu_ps(&O[(size_t)i * D + d]), inv));
      }
    }
  });
}

// ---------------------------------------------------------------- backward
// Transposed formulation: per (key tile, query tile) S^T = K Q^T and dP^T = V dO^T (keys as rows), so
// P^T and dS^T come out in the row-major layout the products dV += P^T dO and dK += dS^T Q read, and
// dQ^T += K^T dS^T takes dS^T re-paired along keys.

constexpr int QT_BWD = 32, KT_BWD = 64;

template <typename T>
void backward(int B, int H, int D, Tensor4 q, Tensor4 k, Tensor4 v, Tensor4 o, Tensor4 dout, const float* lse,
              float* dq, float* dk, float* dv, int L, const std::vector<Group>& groups, float scale, int nthreads) {
  const int KS = KStep<T>::v, Le = round_up(L, 2);
  parallel_for(B * H, nthreads, [&](int bh) {  // one task per (batch, head): its groups add into the same dk/dv rows
    int b = bh / H, h = bh % H;
    const int64_t base = (int64_t)bh * L;
    std::vector<T> Qt((size_t)D * L), dOt((size_t)D * L), Qp((size_t)Le * D), dOp((size_t)Le * D), KT((size_t)D * L);
    pack_all_transposed<T>(q, b, h, L, D, Qt.data());      // B of K Q^T: (D x L)
    pack_all_transposed<T>(dout, b, h, L, D, dOt.data());  // B of V dO^T: (D x L)
    pack_all_rows<T>(q, b, h, L, D, Qp.data());            // B of dS^T Q: (L x D)
    pack_all_rows<T>(dout, b, h, L, D, dOp.data());        // B of P^T dO: (L x D)
    plain_transposed<T>(k, b, h, L, D, KT.data());         // A of K^T dS^T: (D x L)
    std::vector<T> PT((size_t)KT_BWD * QT_BWD), dST((size_t)KT_BWD * QT_BWD), dSp((size_t)KT_BWD * QT_BWD);
    std::vector<float> ST((size_t)KT_BWD * QT_BWD), dPT((size_t)KT_BWD * QT_BWD), dKacc((size_t)KT_BWD * D),
        dVacc((size_t)KT_BWD * D), dQT, delta;
    for (const Group& g : groups) {
      int nq = g.q1 - g.q0;
      delta.resize(nq);
      for (int i = 0; i < nq; i++) {  // delta_i = sum_d dO_id O_id
        const T *orow = row_ptr<T>(o, b, h, g.q0 + i), *drow = row_ptr<T>(dout, b, h, g.q0 + i);
        __m512 acc = _mm512_setzero_ps();
        for (int d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(load16(drow + d), load16(orow + d), acc);
        delta[i] = _mm512_reduce_add_ps(acc);
      }
      dQT.assign((size_t)D * nq, 0.f);  // dQ^T of the group (D x nq)
      for (auto& r : g.ranges)
        for (int k0 = r.first; k0 < r.second; k0 += KT_BWD) {
          int nk = std::min(KT_BWD, r.second - k0);
          std::fill(dKacc.begin(), dKacc.begin() + (size_t)nk * D, 0.f);
          std::fill(dVacc.begin(), dVacc.begin() + (size_t)nk * D, 0.f);
          for (int r0 = 0; r0 < nq; r0 += QT_BWD) {
            int nr = std::min(QT_BWD, nq - r0), qa = g.q0 + r0;
            gemm<T>(nk, nr, D, row_ptr<T>(k, b, h, k0), k.sl, Qt.data() + (size_t)qa * KS, L, ST.data(), nr, false);
            gemm<T>(nk, nr, D, row_ptr<T>(v, b, h, k0), v.sl, dOt.data() + (size_t)qa * KS, L, dPT.data(), nr, false);
            const __m512 sc = _mm512_set1_ps(scale);
            for (int c = 0; c < nk; c++)
              for (int i = 0; i < nr; i += 16) {
                __m512 p = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(&ST[(size_t)c * nr + i]), sc, _mm512_loadu_ps(lse + base + qa + i)));
                __m512 ds = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(&dPT[(size_t)c * nr + i]),
                                                                         _mm512_loadu_ps(&delta[r0 + i]))), sc);
                store16(&PT[(size_t)c * nr + i], p);
                store16(&dST[(size_t)c * nr + i], ds);
              }
            if constexpr (KStep<T>::v == 2) {  // dS^T re-paired along keys: dSp[(c/2)][i][c&1]
              const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                   23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
              for (int c = 0; c < nk; c += 2)
                for (int i = 0; i < nr; i += 16) {
                  __m256i a = _mm256_loadu_si256((const __m256i*)&dST[(size_t)c * nr + i]);
                  __m256i bb = _mm256_loadu_si256((const __m256i*)&dST[(size_t)(c + 1) * nr + i]);
                  __m512i ab = _mm512_inserti64x4(_mm512_castsi256_si512(a), bb, 1);
                  _mm512_storeu_si512(&dSp[((size_t)(c / 2) * nr + i) * 2], _mm512_permutexvar_epi16(idx, ab));
                }
            }
            const T* dsb = KStep<T>::v == 2 ? dSp.data() : dST.data();
            gemm<T>(nk, D, nr, PT.data(), nr, dOp.data() + (size_t)qa * D, D, dVacc.data(), D, true);  // dV += P^T dO
            gemm<T>(nk, D, nr, dST.data(), nr, Qp.data() + (size_t)qa * D, D, dKacc.data(), D, true);  // dK += dS^T Q
            gemm<T>(D, nr, nk, KT.data() + k0, L, dsb, nr, dQT.data() + r0, nq, true);                 // dQ^T += K^T dS^T
          }
          for (int c = 0; c < nk; c++) {
            float* dkr = dk + (base + k0 + c) * D;
            float* dvr = dv + (base + k0 + c) * D;
            for (int d = 0; d < D; d += 16) {
              _mm512_storeu_ps(dkr + d, _mm512_add_ps(_mm512_loadu_ps(dkr + d), _mm512_loadu_ps(&dKacc[(size_t)c * D + d])));
              _mm512_storeu_ps(dvr + d, _mm512_add_ps(_mm512_loadu_ps(dvr + d), _mm512_loadu_ps(&dVacc[(size_t)c * D + d])));
            }
          }
        }
      for (int i = 0; i < nq; i++) {
        float* dqr = dq + (base + g.q0 + i) * D;
        for (int d = 0; d < D; d++) dqr[d] += dQT[(size_t)d * nq + i];
      }
    }
  });
}

Tensor4 t4(const void* p, const int64_t* s) { return Tensor4{static_cast<const char*>(p), s[0], s[1], s[2]}; }

}  // namespace

// dtype: 0 fp32, 1 bf16. Strides (3 per tensor: batch, head, position) in elements. groups: per group
// q0, q1, number of ranges, then (start, end) per range. Returns 0, or -1 for a bad argument.
extern "C" int block_attention_forward(int dtype, int B, int H, int L, int D, const void* q, const int64_t* qs,
                                       const void* k, const int64_t* ks, const void* v, const int64_t* vs, void* o,
                                       const int64_t* os, float* lse, const int32_t* groups, int ngroups, float scale,
                                       int nthreads) {
  if (D % 32 != 0 || dtype < 0 || dtype > 1) return -1;
  auto gs = parse_groups(groups, ngroups);
  for (auto& g : gs)
    if (!aligned(g)) return -2;
  if (dtype == 0)
    forward<float>(B, H, D, t4(q, qs), t4(k, ks), t4(v, vs), t4(o, os), lse, L, gs, scale, nthreads);
  else
    forward<bf16>(B, H, D, t4(q, qs), t4(k, ks), t4(v, vs), t4(o, os), lse, L, gs, scale, nthreads);
  return 0;
}

extern "C" int block_attention_backward(int dtype, int B, int H, int L, int D, const void* q, const int64_t* qs,
                                        const void* k, const int64_t* ks, const void* v, const int64_t* vs,
                                        const void* o, const int64_t* os, const void* dout, const int64_t* dos,
                                        const float* lse, float* dq, float* dk, float* dv, const int32_t* groups,
                                        int ngroups, float scale, int nthreads) {
  if (D % 32 != 0 || dtype < 0 || dtype > 1) return -1;
  auto gs = parse_groups(groups, ngroups);
  for (auto& g : gs)
    if (!aligned(g)) return -2;
  if (dtype == 0)
    backward<float>(B, H, D, t4(q, qs), t4(k, ks), t4(v, vs), t4(o, os), t4(dout, dos), lse, dq, dk, dv, L, gs, scale,
                    nthreads);
  else
    backward<bf16>(B, H, D, t4(q, qs), t4(k, ks), t4(v, vs), t4(o, os), t4(dout, dos), lse, dq, dk, dv, L, gs, scale,
                   nthreads);
  return 0;
}
