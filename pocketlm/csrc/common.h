// What gemv.cpp and train_kernels.cpp share: bf16 vector loads and stores, and the AMX tile unit's set-up.
#pragma once
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdint>

using bf16 = uint16_t;  // raw bits; at::BFloat16 only at the edges

static bool amx_ready() {  // Linux hands out the tile state only on request (arch_prctl, kernel >= 5.16)
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

struct alignas(64) TileConfig {  // _tile_loadconfig's 64-byte layout: palette 1, rows and bytes per row of each tile
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

static inline __m512 load_bf16(const bf16* p) {  // 16 bf16 numbers -> fp32 (the top half of each)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

static inline void store_bf16(bf16* p, __m512 v) {  // 16 fp32 -> bf16, rounded to nearest even
  _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v));
}
