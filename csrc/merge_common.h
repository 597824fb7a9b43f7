// Pieces shared by the fused merge phases of pyfuse's C++ backend (csrc/concrete_merge.cpp, dense task
// vectors; csrc/lora_concrete_merge.cpp, low-rank factors): tiles, fp32 loads of fp32 / bf16 / fp16 data,
// lane-accumulated sums, the Concrete mask of a chunk from the Philox stream (philox.h), dispatch and checks.
// One definition of the mask keeps both ops on the same noise contract: the same m_j for the same
// (seed, step, flat index j), whatever the op or the chunking.
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <math.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "philox.h"

// glibc ships SIMD variants of logf / log1pf / expf (libmvec, reached through libm), but math.h only
// declares them under -ffast-math. Declaring them here (same functions, same exception spec) lets GCC
// vectorise the mask loops without -ffast-math; it also needs -fno-math-errno (in pyfuse/_build.py).
// libmvec's float variants are within a few ulp of the scalar functions.
#if defined(__GLIBC__) && defined(__x86_64__) && !defined(__FAST_MATH__) && defined(__GLIBC_PREREQ) && \
    !defined(PYFUSE_NO_LIBMVEC)
#if __GLIBC_PREREQ(2, 35)
#define PYFUSE_HAVE_LIBMVEC 1
extern "C" {
float logf(float) __THROW __attribute__((simd("notinbranch")));
float log1pf(float) __THROW __attribute__((simd("notinbranch")));
float expf(float) __THROW __attribute__((simd("notinbranch")));
}
#endif
#endif

namespace pyfuse {
namespace {

constexpr int64_t kTile = 16384;  // elements per tile (the unit of parallel work)
constexpr int64_t kChunk = 256;   // elements per inner chunk (stack buffers, L1-resident)
static_assert(kChunk % philox::kLanes == 0, "chunks are whole philox blocks");
static_assert(kTile % kChunk == 0, "tiles are whole chunks");

enum Mode : int { kRelaxed = 0, kHard = 1, kThreshold = 2, kNone = 3 };

// ---------------------------------------------------------------------------------------------------
// Tiles

struct Tile {
  int64_t seg, start, end;
};

struct TileList {
  std::vector<Tile> tiles;
  std::vector<int64_t> seg_first;  // [S + 1]: tiles of segment s are [seg_first[s], seg_first[s+1])
};

TileList make_tiles(const at::Tensor& offsets, int64_t D) {
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 1, "offsets must be 1-D with S+1 >= 1 entries");
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "offsets must be int64");
  TORCH_CHECK(offsets.device().is_cpu() && offsets.is_contiguous(), "offsets must be a contiguous CPU tensor");
  const int64_t S = offsets.numel() - 1;
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0, "offsets[0] must be 0");
  TORCH_CHECK(off[S] == D, "offsets[-1] must equal the number of elements D = ", D, ", got ", off[S]);
  TileList tl;
  tl.seg_first.resize(S + 1);
  tl.tiles.reserve(static_cast<size_t>(S + D / kTile + 1));
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(off[s + 1] > off[s], "offsets must be strictly increasing (segment ", s, " is empty)");
    tl.seg_first[s] = static_cast<int64_t>(tl.tiles.size());
    for (int64_t st = off[s]; st < off[s + 1]; st += kTile) {
      tl.tiles.push_back(Tile{s, st, std::min(st + kTile, off[s + 1])});
    }
  }
  tl.seg_first[S] = static_cast<int64_t>(tl.tiles.size());
  return tl;
}

int team_size() { return std::max(1, at::get_num_threads()); }

// Runs body(tile_index) for every tile on torch's intra-op thread count.
template <typename F>
void for_each_tile(int64_t num_tiles, const F& body) {
  const int nthreads = team_size();
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1 && num_tiles > 1)
  for (int64_t t = 0; t < num_tiles; ++t) body(t);
#else
  (void)nthreads;
  for (int64_t t = 0; t < num_tiles; ++t) body(t);
#endif
}

// ---------------------------------------------------------------------------------------------------
// Element loads: fp32 views of fp32 / bf16 / fp16 chunks

inline const float* as_f32(const float* src, int64_t /*len*/, float* /*buf*/) { return src; }

inline const float* as_f32(const c10::BFloat16* src, int64_t len, float* __restrict buf) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t k = 0; k < len; ++k) {
    const uint32_t w = static_cast<uint32_t>(bits[k]) << 16;  // bf16 is the top half of an fp32
    float f;
    std::memcpy(&f, &w, sizeof(f));
    buf[k] = f;
  }
  return buf;
}

inline const float* as_f32(const c10::Half* src, int64_t len, float* __restrict buf) {
  int64_t k = 0;
#if defined(__AVX512F__)
  for (; k + 16 <= len; k += 16) {
    _mm512_storeu_ps(buf + k, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k))));
  }
#elif defined(__F16C__)
  for (; k + 8 <= len; k += 8) {
    _mm256_storeu_ps(buf + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
  }
#endif
  for (; k < len; ++k) buf[k] = static_cast<float>(src[k]);  // exact, like the hardware conversion
  return buf;
}

// Sum of v[0 .. len) with 16 fp32 lane accumulators (vectorisable without reassociation flags).
inline double chunk_sum(const float* __restrict v, int64_t len) {
  float acc[16] = {};
  int64_t k = 0;
  for (; k + 16 <= len; k += 16) {
    for (int l = 0; l < 16; ++l) acc[l] += v[k + l];
  }
  double s = 0.0;
  for (int l = 0; l < 16; ++l) s += acc[l];
  for (; k < len; ++k) s += v[k];
  return s;
}

// Dot product of a[0 .. len) and b[0 .. len), same scheme as chunk_sum.
inline double chunk_dot(const float* __restrict a, const float* __restrict b, int64_t len) {
  float acc[16] = {};
  int64_t k = 0;
  for (; k + 16 <= len; k += 16) {
    for (int l = 0; l < 16; ++l) acc[l] += a[k + l] * b[k + l];
  }
  double s = 0.0;
  for (int l = 0; l < 16; ++l) s += acc[l];
  for (; k < len; ++k) s += static_cast<double>(a[k] * b[k]);
  return s;
}

// ---------------------------------------------------------------------------------------------------
// The mask for one chunk: m[k] for global indices j0 + k, k < len (len <= kChunk), from logits x[k].
// Mirrors reference.concrete_mask: noisy = log(u) - log1p(-u) + x; relaxed: sigmoid(noisy / T) =
// 1 / (1 + exp(-noisy / T)) (the division by the fp32-rounded T, as torch does for tensor / float);
// hard: noisy > 0; threshold: x > 0; none: 1.

struct Noise {
  philox::Key key;
  uint32_t step;
  float temperature;
};

template <int MODE>
inline void chunk_mask(const float* __restrict x, const Noise& nz, uint64_t j0, int64_t len,
                       float* __restrict m) {
  if (MODE == kNone) {
    for (int64_t k = 0; k < len; ++k) m[k] = 1.0f;
    return;
  }
  if (MODE == kThreshold) {
    for (int64_t k = 0; k < len; ++k) m[k] = x[k] > 0.0f ? 1.0f : 0.0f;
    return;
  }
  // m_j must depend on j only, not on where j falls in a chunk (segment boundaries move chunks), so
  // every element goes through the same code: whole groups of kGroup lanes, the ragged end padded
  // (extra uniforms, zero logits) and dropped. A plain remainder loop would let GCC finish the chunk
  // with the scalar or the 8-wide libm variants, whose last bits differ from the 16-wide ones.
  constexpr int64_t kGroup = 16;
  static_assert(kChunk % kGroup == 0, "chunks are whole groups");
  const int64_t padded = (len + kGroup - 1) / kGroup * kGroup;
  alignas(64) float u[kChunk];
  alignas(64) float xpad[kChunk];
  const float* xs = x;
  if (padded != len) {
    for (int64_t k = 0; k < len; ++k) xpad[k] = x[k];
    for (int64_t k = len; k < padded; ++k) xpad[k] = 0.0f;
    xs = xpad;
  }
  philox::uniform_fill(nz.key, nz.step, j0, padded, u);
  if (MODE == kHard) {
    for (int64_t g = 0; g < padded; g += kGroup) {
      for (int64_t l = 0; l < kGroup; ++l) {
        const float v = u[g + l];
        const float noisy = ::logf(v) - ::log1pf(-v) + xs[g + l];
        u[g + l] = noisy > 0.0f ? 1.0f : 0.0f;
      }
    }
  } else {
    const float t = nz.temperature;
    for (int64_t g = 0; g < padded; g += kGroup) {
      for (int64_t l = 0; l < kGroup; ++l) {
        const float v = u[g + l];
        const float noisy = ::logf(v) - ::log1pf(-v) + xs[g + l];
        u[g + l] = 1.0f / (1.0f + ::expf(-(noisy / t)));
      }
    }
  }
  for (int64_t k = 0; k < len; ++k) m[k] = u[k];
}

template <typename F>
auto dispatch_mode(int64_t mode, const F& f) {
  switch (mode) {
    case kRelaxed:
      return f(std::integral_constant<int, kRelaxed>{});
    case kHard:
      return f(std::integral_constant<int, kHard>{});
    case kThreshold:
      return f(std::integral_constant<int, kThreshold>{});
    case kNone:
      return f(std::integral_constant<int, kNone>{});
    default:
      TORCH_CHECK(false, "mode must be 0 (relaxed), 1 (hard), 2 (threshold) or 3 (none), got ", mode);
  }
}

// Calls f(T{}) with T the C++ element type of an fp32 / bf16 / fp16 tensor.
template <typename F>
auto dispatch_float_type(const at::Tensor& t, const char* what, const F& f) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return f(float{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    case at::kHalf:
      return f(c10::Half{});
    default:
      TORCH_CHECK(false, what, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// ---------------------------------------------------------------------------------------------------
// Argument checks (cheap, O(1)); the Python side validates too.

void check_f32(const at::Tensor& t, const char* what, int64_t numel) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, what, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
  TORCH_CHECK(t.numel() == numel, what, " must have ", numel, " elements, got ", t.numel());
}

void check_tv(const at::Tensor& tv, int64_t D) {
  TORCH_CHECK(tv.device().is_cpu() && tv.is_contiguous(), "task_vectors must be a contiguous CPU tensor");
  TORCH_CHECK(tv.dim() == 2 && tv.size(1) == D, "task_vectors must be [n, D] with D = ", D);
}

void check_weights(const at::Tensor& w, int64_t n, int64_t S) {
  check_f32(w, "weights", n * S);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == n && w.size(1) == S, "weights must be [n, S] = [", n, ", ", S, "]");
}

Noise make_noise(uint64_t seed, uint32_t step, double temperature) {
  return Noise{philox::make_key(seed), step, static_cast<float>(temperature)};
}


}  // namespace

// Defined in lora_concrete_merge.cpp; adds the factored op's phases to the extension module.
void register_lora(pybind11::module_& m);

}  // namespace pyfuse
