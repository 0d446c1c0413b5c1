// AMX tiles in software, for running the kernel's AMX path on CPUs without AMX (block_kernel.py builds
// with -DUNIMODAL_AMX_EMULATE for its tests). The six instructions the kernel uses, as the Intel SDM
// (vol. 2, "TILELOADD" ... "TDPBF16PS") defines them, per thread:
// - LDTILECFG reads the 64-byte configuration: palette (byte 0, must be 1), start row (byte 1, must be 0),
//   bytes 2-15 zero, then colsb[16] (uint16, bytes 16-47) and rows[16] (uint8, bytes 48-63), zero for
//   tiles 8-15 (palette 1 has 8), rows and colsb of a tile both zero or both not; it zeroes every tile.
//   TILERELEASE returns to the unconfigured state.
// - TILELOADD t, [base + stride]: rows[t] rows of colsb[t] bytes, row r from base + r stride; the rest of
//   the tile zero. TILESTORED writes the same rows and bytes back. TILEZERO zeroes the tile.
// - TDPBF16PS c, a, b: c.fp32[m][n] += a.bf16[m][2k] b.bf16[k][2n] + a.bf16[m][2k+1] b.bf16[k][2n+1] for
//   m < rows[c], n < colsb[c] / 4, k < colsb[a] / 4, with rows[a] = rows[c], rows[b] = colsb[a] / 4 and
//   colsb[b] = colsb[c] (the SDM's #UD conditions). Summed in fp32 in this order; the hardware's order of
//   summation and its flushing of denormals differ, so the emulation checks indexing and layouts, not the
//   hardware's rounding.
// Any other use (a tile instruction while unconfigured, shapes that disagree, a tile number past 7) aborts
// with a message: what the hardware would fault on, the emulation refuses loudly. With
// UNIMODAL_AMX_EMULATE_FAULT, TDPBF16PS raises SIGILL, as on a CPU without it.
#pragma once

#include <immintrin.h>

#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace amx_emu {

struct State {
  bool configured = false;
  uint8_t rows[8] = {};
  uint16_t colsb[8] = {};
  alignas(64) unsigned char tile[8][16][64] = {};
};
inline thread_local State st;

[[noreturn]] inline void fault(const char* what, int t) {
  std::fprintf(stderr, "amx_emulated: %s (tile %d)\n", what, t);
  std::abort();
}

inline void need(int t) {
  if (!st.configured) fault("tile instruction before LDTILECFG", t);
  if (t < 0 || t > 7) fault("no such tile", t);
  if (st.rows[t] == 0 || st.colsb[t] == 0) fault("tile not configured", t);
}

inline float widen(uint16_t x) {
  const uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline void loadconfig(const void* cfg) {
  const unsigned char* b = static_cast<const unsigned char*>(cfg);
  if (b[0] != 1 || b[1] != 0) fault("palette must be 1 and start row 0", -1);
  for (int i = 2; i < 16; i++)
    if (b[i]) fault("reserved configuration bytes must be zero", -1);
  for (int i = 32; i < 48; i++)
    if (b[i]) fault("colsb of tiles 8-15 must be zero (palette 1)", (i - 16) / 2);
  for (int i = 56; i < 64; i++)
    if (b[i]) fault("rows of tiles 8-15 must be zero (palette 1)", i - 48);
  for (int t = 0; t < 8; t++) {
    std::memcpy(&st.colsb[t], b + 16 + 2 * t, 2);
    st.rows[t] = b[48 + t];
    if (st.rows[t] > 16 || st.colsb[t] > 64 || st.colsb[t] % 4) fault("tile shape beyond palette 1", t);
    if ((st.rows[t] == 0) != (st.colsb[t] == 0)) fault("rows and colsb must be both zero or both not", t);
  }
  std::memset(st.tile, 0, sizeof st.tile);
  st.configured = true;
}

inline void release() { st.configured = false; }

inline void zero(int t) {
  need(t);
  std::memset(st.tile[t], 0, sizeof st.tile[t]);
}

inline void load(int t, const void* base, long stride) {
  need(t);
  std::memset(st.tile[t], 0, sizeof st.tile[t]);
  for (int r = 0; r < st.rows[t]; r++)
    std::memcpy(st.tile[t][r], static_cast<const char*>(base) + r * stride, st.colsb[t]);
}

inline void store(int t, void* base, long stride) {
  need(t);
  for (int r = 0; r < st.rows[t]; r++) std::memcpy(static_cast<char*>(base) + r * stride, st.tile[t][r], st.colsb[t]);
}

inline void dpbf16ps(int c, int a, int b) {
#ifdef UNIMODAL_AMX_EMULATE_FAULT
  std::raise(SIGILL);
#endif
  need(c), need(a), need(b);
  if (c == a || c == b || a == b) fault("TDPBF16PS operands must be distinct tiles", c);
  const int M = st.rows[c], N = st.colsb[c] / 4, K2 = st.colsb[a] / 4;
  if (st.rows[a] != M || st.rows[b] != K2 || st.colsb[b] != st.colsb[c]) fault("TDPBF16PS shapes disagree", c);
  for (int m = 0; m < M; m++) {
    float acc[16];
    std::memcpy(acc, st.tile[c][m], 64);
    for (int k = 0; k < K2; k++) {
      uint16_t x[2];
      std::memcpy(x, st.tile[a][m] + 4 * k, 4);
      for (int n = 0; n < N; n++) {
        uint16_t y[2];
        std::memcpy(y, st.tile[b][k] + 4 * n, 4);
        acc[n] += widen(x[0]) * widen(y[0]);
        acc[n] += widen(x[1]) * widen(y[1]);
      }
    }
    std::memcpy(st.tile[c][m], acc, 4 * N);
  }
}

}  // namespace amx_emu

#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#define _tile_loadconfig(cfg) amx_emu::loadconfig(cfg)
#define _tile_release() amx_emu::release()
#define _tile_zero(t) amx_emu::zero(t)
#define _tile_loadd(t, base, stride) amx_emu::load(t, base, stride)
#define _tile_stored(t, base, stride) amx_emu::store(t, base, stride)
#define _tile_dpbf16ps(c, a, b) amx_emu::dpbf16ps(c, a, b)
