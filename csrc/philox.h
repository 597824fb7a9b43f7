// Philox-4x32-10 counter-based stream and the Concrete uniform noise, for the C++ CPU backend.
//
// Must match pyfuse/ops/philox.py (the oracle) bit for bit: for a global element index j (64-bit),
//   counter = (j mod 2^32, j >> 32, step, 0), key = (seed & 0xffffffff, seed >> 32),
//   word    = first output word of Philox-4x32-10,
//   u_j     = clamp(float(x ^ (x >> 31)) * 0x1.fffffep-32f, 2^-23, 1 - 2^-23) with x = int32(word)
// (x ^ (x >> 31) is "~x if negative"; the int -> float conversion rounds to nearest).
//
// Everything here is plain scalar C++ over small fixed-size arrays, written so that GCC vectorises the
// lane loops (uint32 x uint32 -> uint64 products become vpmuludq); no intrinsics, no state.
#pragma once

#include <cstdint>
#include <cstring>

namespace pyfuse {
namespace philox {

constexpr uint32_t kRoundA = 0xD2511F53u;
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u;
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr int kRounds = 10;
// Lanes processed together by the vectorised generator (one AVX-512 register of uint32).
constexpr int kLanes = 16;

// float32 0x2fffffff == 4.6566127342e-10f: the largest scale with INT32_MAX * scale < 1.
inline float uniform_scale() {
  const uint32_t bits = 0x2fffffffu;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
constexpr float kEps = 1.1920928955078125e-07f;        // 2^-23
constexpr float kOneMinusEps = 0.99999988079071044921875f;  // 1 - 2^-23

struct Key {
  uint32_t k0, k1;
};

inline Key make_key(uint64_t seed) { return Key{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)}; }

// One Philox-4x32-10 evaluation; returns the first output word. Scalar reference version.
inline uint32_t philox_word0(Key key, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int r = 0; r < kRounds; ++r) {
    const uint64_t pb = static_cast<uint64_t>(kRoundB) * c2;
    const uint64_t pa = static_cast<uint64_t>(kRoundA) * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n1 = static_cast<uint32_t>(pb);
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    const uint32_t n3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c1 = n1;
    c2 = n2;
    c3 = n3;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return c0;
}

// Map an output word to the clamped uniform in [2^-23, 1 - 2^-23].
inline float word_to_uniform(uint32_t w) {
  const int32_t x = static_cast<int32_t>(w);
  const int32_t nonneg = x ^ (x >> 31);  // x < 0 ? ~x : x
  float u = static_cast<float>(nonneg) * uniform_scale();
  u = u < kEps ? kEps : u;
  u = u > kOneMinusEps ? kOneMinusEps : u;
  return u;
}

// Scalar uniform for one global index (used for ragged tails and as a cross-check).
inline float uniform_at(Key key, uint32_t step, uint64_t j) {
  return word_to_uniform(
      philox_word0(key, static_cast<uint32_t>(j), static_cast<uint32_t>(j >> 32), step, 0u));
}

// Uniforms for the kLanes consecutive indices j0 .. j0 + kLanes - 1. The loops are over lanes with the
// rounds outside, so each statement is a kLanes-wide vector operation.
inline void uniform_block(Key key, uint32_t step, uint64_t j0, float* __restrict out) {
  uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  const uint32_t lo0 = static_cast<uint32_t>(j0);
  const uint32_t hi0 = static_cast<uint32_t>(j0 >> 32);
  for (int l = 0; l < kLanes; ++l) {
    // j0 + l, carried into the high word when the low word wraps (the block may straddle 2^32).
    const uint32_t lo = lo0 + static_cast<uint32_t>(l);
    c0[l] = lo;
    c1[l] = hi0 + (lo < lo0 ? 1u : 0u);
    c2[l] = step;
    c3[l] = 0u;
  }
  uint32_t k0 = key.k0, k1 = key.k1;
#pragma GCC unroll 10
  for (int r = 0; r < kRounds; ++r) {
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t pb = static_cast<uint64_t>(kRoundB) * c2[l];
      const uint64_t pa = static_cast<uint64_t>(kRoundA) * c0[l];
      const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1[l] ^ k0;
      const uint32_t n1 = static_cast<uint32_t>(pb);
      const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3[l] ^ k1;
      const uint32_t n3 = static_cast<uint32_t>(pa);
      c0[l] = n0;
      c1[l] = n1;
      c2[l] = n2;
      c3[l] = n3;
    }
    k0 += kKeyA;
    k1 += kKeyB;
  }
  const float scale = uniform_scale();
  for (int l = 0; l < kLanes; ++l) {
    const int32_t x = static_cast<int32_t>(c0[l]);
    const int32_t nonneg = x ^ (x >> 31);
    float u = static_cast<float>(nonneg) * scale;
    u = u < kEps ? kEps : u;
    u = u > kOneMinusEps ? kOneMinusEps : u;
    out[l] = u;
  }
}

// Uniforms for the `count` consecutive indices starting at j0 into out[0 .. count). Full blocks go
// through the vectorised generator, the ragged tail through a padded block (same values).
inline void uniform_fill(Key key, uint32_t step, uint64_t j0, int64_t count, float* __restrict out) {
  int64_t k = 0;
  for (; k + kLanes <= count; k += kLanes) uniform_block(key, step, j0 + static_cast<uint64_t>(k), out + k);
  if (k < count) {
    float tail[kLanes];
    uniform_block(key, step, j0 + static_cast<uint64_t>(k), tail);
    for (int64_t t = 0; k + t < count; ++t) out[k + t] = tail[t];
  }
}

}  // namespace philox
}  // namespace pyfuse
