// bf16 half-scores for pk_topk on AMX or AVX512-BF16 (see bf16_scores.h).
#include "bf16_scores.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include "dot_blocks.h"

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#include <asm/prctl.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#ifndef ARCH_REQ_XCOMP_PERM  // kernel headers before 5.16; the kernel answers EINVAL then
#define ARCH_REQ_XCOMP_PERM 0x1023
#endif
#define MEMORY_EXT_HAS_BF16_KERNELS 1
#define MEMORY_EXT_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f")))
#define MEMORY_EXT_DPBF16_TARGET __attribute__((target("avx512f,avx512bf16")))
#else
#define MEMORY_EXT_HAS_BF16_KERNELS 0
#endif

namespace memory_ext::cpu {
namespace {

// Tile shapes: 16 rows of 64 bytes. A: 16 tokens x 32 bf16 dimensions; B: 16 pairs of
// dimensions x 16 keys x 2 bf16 (the packed layout); C: 16 tokens x 16 keys of float32.
constexpr int64_t kRows = 16;
constexpr int64_t kTileKeys = kDotTileKeys;
constexpr int64_t kTileDims = 32;

#if MEMORY_EXT_HAS_BF16_KERNELS
// The tile configuration of ldtilecfg: palette 1, eight tiles of 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands out the AMX register state only to threads of a process that asked for it.
bool request_amx() {
  constexpr int kXfeatureTileData = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, kXfeatureTileData) == 0;
}

bool cpu_has_amx_bf16() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d) == 0) return false;
  const bool amx_bf16 = (d >> 22) & 1u, amx_tile = (d >> 24) & 1u;
  return amx_bf16 && amx_tile;
}

// C tiles 0-3 for 32 tokens x 32 keys, A tiles 4-5 (two blocks of 16 tokens), B tiles 6-7
// (two tiles of 16 keys). a: 32 query rows (a_stride bytes apart, zero-padded past the
// call's tokens by the caller), b: the packed tiles of keys j0 .. j0 + 31 of one group.
MEMORY_EXT_AMX_TARGET void block_32x32(const uint16_t* a, int64_t a_stride, const uint16_t* b0,
                                       const uint16_t* b1, int64_t dim_steps, float* c,
                                       int64_t c_stride) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < dim_steps; ++s) {
    _tile_loadd(4, a + s * kTileDims, a_stride);
    _tile_loadd(5, reinterpret_cast<const char*>(a + s * kTileDims) + kRows * a_stride, a_stride);
    _tile_loadd(6, b0 + s * kRows * 2 * kTileKeys, 64);
    _tile_loadd(7, b1 + s * kRows * 2 * kTileKeys, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  char* out = reinterpret_cast<char*>(c);
  _tile_stored(0, out, c_stride);
  _tile_stored(1, out + kTileKeys * sizeof(float), c_stride);
  _tile_stored(2, out + kRows * c_stride, c_stride);
  _tile_stored(3, out + kRows * c_stride + kTileKeys * sizeof(float), c_stride);
}

MEMORY_EXT_AMX_TARGET void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = kRows;
  }
  // GCC 12 does not count ldtilecfg's operand as a read of cfg and drops the stores above
  // without this barrier (the tiles are then unconfigured and the first tile instruction
  // faults).
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

MEMORY_EXT_AMX_TARGET void release_tiles() { _tile_release(); }

// bf16_scores on the tile unit: 32 tokens x 32 keys per block_32x32.
void tile_scores(const uint16_t* query, int64_t token_stride, const uint16_t* packed, int64_t g0,
                 int64_t g1, int64_t tokens, int64_t n_keys, int64_t half, float* out) {
  constexpr int64_t kBlockTokens = 2 * kRows;
  const int64_t tile_elems = half * kTileKeys;  // one packed tile of 16 keys
  const int64_t dim_steps = half / kTileDims;
  // Rows past the call's tokens come from a zeroed block; their results land in a scratch
  // block, not in out.
  std::vector<uint16_t> a_tail(static_cast<size_t>(kBlockTokens * half), 0);
  std::vector<float> c_tail(static_cast<size_t>(kBlockTokens * 2 * kTileKeys));
  configure_tiles();
  for (int64_t g = g0; g < g1; ++g) {
    const uint16_t* group_tiles = packed + g * n_keys * half;
    for (int64_t t0 = 0; t0 < tokens; t0 += kBlockTokens) {
      const int64_t bt = std::min(kBlockTokens, tokens - t0);
      const uint16_t* a = query + t0 * token_stride + g * half;
      int64_t a_stride = token_stride * int64_t(sizeof(uint16_t));
      if (bt < kBlockTokens) {
        for (int64_t i = 0; i < bt; ++i)
          std::memcpy(a_tail.data() + i * half, a + i * token_stride, half * sizeof(uint16_t));
        a = a_tail.data();
        a_stride = half * int64_t(sizeof(uint16_t));
      }
      for (int64_t j0 = 0; j0 < n_keys; j0 += 2 * kTileKeys) {
        const uint16_t* b0 = group_tiles + (j0 / kTileKeys) * tile_elems;
        float* c = out + ((g - g0) * tokens + t0) * n_keys + j0;
        if (bt == kBlockTokens) {
          block_32x32(a, a_stride, b0, b0 + tile_elems, dim_steps, c,
                      n_keys * int64_t(sizeof(float)));
          continue;
        }
        block_32x32(a, a_stride, b0, b0 + tile_elems, dim_steps, c_tail.data(),
                    2 * kTileKeys * int64_t(sizeof(float)));
        for (int64_t i = 0; i < bt; ++i)
          std::memcpy(c + i * n_keys, c_tail.data() + i * 2 * kTileKeys,
                      2 * kTileKeys * sizeof(float));
      }
    }
  }
  release_tiles();
}

// The AVX512-BF16 kernel: R tokens x 32 keys of one group, R x 2 vectors of 16 float32 sums
// in registers. Per pair of dimensions p, one load of each of the two packed tiles (16 keys'
// values 2p and 2p + 1 side by side) and a broadcast of each token's pair; VDPBF16PS adds
// both products of each lane to its sum. a: R query rows a_stride elements apart; c: R
// rows of 32 sums, c_stride elements apart.
template <int R>
MEMORY_EXT_DPBF16_TARGET void dot_block(const uint16_t* a, int64_t a_stride, const uint16_t* b0,
                                        const uint16_t* b1, int64_t pairs, float* c,
                                        int64_t c_stride) {
  __m512 sums[R][2];
  for (int r = 0; r < R; ++r) sums[r][0] = sums[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const auto k0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b0 + p * 2 * kTileKeys));
    const auto k1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b1 + p * 2 * kTileKeys));
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      std::memcpy(&pair, a + r * a_stride + 2 * p, sizeof pair);
      const auto q = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair)));
      sums[r][0] = _mm512_dpbf16_ps(sums[r][0], q, k0);
      sums[r][1] = _mm512_dpbf16_ps(sums[r][1], q, k1);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(c + r * c_stride, sums[r][0]);
    _mm512_storeu_ps(c + r * c_stride + kTileKeys, sums[r][1]);
  }
}

template <size_t... R>
constexpr std::array<DotBlock<uint16_t>, sizeof...(R)> dot_blocks(std::index_sequence<R...>) {
  return {&dot_block<int(R) + 1>...};
}
// dot_block<r + 1> at [r]: the last block of a call may be short.
constexpr auto kDotBlocks = dot_blocks(std::make_index_sequence<kDotTokens>{});

bool cpu_has_avx512_bf16() { return __builtin_cpu_supports("avx512bf16"); }
#endif

// Which kernel bf16_scores runs in this process: the tile unit, else AVX512-BF16, else none;
// MEMORY_EXT_CPU_BF16_DOT (read once) "0" for none, "amx" or "avx512_bf16" for only that
// one (none where the CPU lacks it), unset or "1" for the first available.
enum class Bf16Kernel { kNone, kTiles, kDot };
Bf16Kernel bf16_kernel() {
  static const Bf16Kernel kernel = [] {
    const char* env = std::getenv("MEMORY_EXT_CPU_BF16_DOT");
    const std::string choice = env == nullptr ? "1" : env;
    TORCH_CHECK(choice == "0" || choice == "1" || choice == "amx" || choice == "avx512_bf16",
                "memory.pk_topk: MEMORY_EXT_CPU_BF16_DOT must be 0, 1, amx or avx512_bf16, got '",
                choice, "'");
    if (choice == "0") return Bf16Kernel::kNone;
#if MEMORY_EXT_HAS_BF16_KERNELS
    if (choice != "avx512_bf16" && cpu_has_amx_bf16() && request_amx()) return Bf16Kernel::kTiles;
    if (choice != "amx" && cpu_has_avx512_bf16()) return Bf16Kernel::kDot;
#endif
    return Bf16Kernel::kNone;
  }();
  return kernel;
}
}  // namespace

bool bf16_scores_available() { return bf16_kernel() != Bf16Kernel::kNone; }

const char* bf16_scores_kernel() {
  switch (bf16_kernel()) {
    case Bf16Kernel::kTiles:
      return "amx";
    case Bf16Kernel::kDot:
      return "avx512_bf16";
    case Bf16Kernel::kNone:
      break;
  }
  return "none";
}

int64_t bf16_scores_block_tokens() {
  return bf16_kernel() == Bf16Kernel::kTiles ? 2 * kRows : kDotTokens;
}

bool bf16_scores_supports(int64_t n_keys, int64_t half) {
  return n_keys > 0 && half > 0 && n_keys % (2 * kTileKeys) == 0 && half % kTileDims == 0;
}

bool has_bf16_subnormals(const uint16_t* values, int64_t n) {
  uint32_t any = 0;  // a flag per value, or-ed: no early exit, so the loop vectorises
  for (int64_t i = 0; i < n; ++i)
    any |= uint32_t((values[i] & 0x7f80u) == 0) & uint32_t((values[i] & 0x007fu) != 0);
  return any != 0;
}

// packed[g][tile][p][l][e] = keys[g][tile * 16 + l][2p + e]: per tile of 16 keys and pair
// of dimensions, the keys' two values side by side; 16 consecutive pairs are one B tile.
void pack_bf16_keys(const uint16_t* keys, int64_t g0, int64_t g1, int64_t n_keys, int64_t half,
                    uint16_t* packed) {
  const int64_t pairs = half / 2, tiles = n_keys / kTileKeys;
  uint16_t* dst = packed + g0 * n_keys * half;
  for (int64_t g = g0; g < g1; ++g)
    for (int64_t tile = 0; tile < tiles; ++tile)
      for (int64_t p = 0; p < pairs; ++p)
        for (int64_t l = 0; l < kTileKeys; ++l) {
          const uint16_t* src = keys + (g * n_keys + tile * kTileKeys + l) * half + 2 * p;
          *dst++ = src[0];
          *dst++ = src[1];
        }
}

void bf16_scores(const uint16_t* query, int64_t token_stride, const uint16_t* packed, int64_t g0,
                 int64_t g1, int64_t tokens, int64_t n_keys, int64_t half, float* out) {
#if MEMORY_EXT_HAS_BF16_KERNELS
  switch (bf16_kernel()) {
    case Bf16Kernel::kTiles:
      tile_scores(query, token_stride, packed, g0, g1, tokens, n_keys, half, out);
      return;
    case Bf16Kernel::kDot:
      dot_scores(kDotBlocks, query, token_stride, packed, g0, g1, tokens, n_keys, half, half / 2,
                 out);
      return;
    case Bf16Kernel::kNone:
      break;
  }
#else
  (void)query, (void)token_stride, (void)packed, (void)g0, (void)g1, (void)tokens, (void)n_keys,
      (void)half, (void)out;
#endif
  TORCH_CHECK(false, "memory.pk_topk: no bf16 scoring kernel runs in this process");
}

}  // namespace memory_ext::cpu
