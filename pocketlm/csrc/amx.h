// The AMX tile unit's set-up, shared by gemv.cpp and train_kernels.cpp.
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
