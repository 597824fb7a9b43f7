// Philox-4x32-10 counter-based stream and the Concrete uniform noise, for the C++ CPU backend.
//
// Must match pyfuse/ops/philox.py (the oracle) bit for bit: for a global element index j (64-bit),
//   counter = (j mod 2^32, j >> 32, step, 0), key = (seed & 0xffffffff, seed >> 32),
//   word    = first output word of Philox-4x32-10,
//   u_j     = clamp(float(x ^ (x >> 31)) * 0x1.fffffep-32f, 2^-23, 1 - 2^-23) with x = int32(word)
// (x ^ (x >> 31) is "~x if negative"; the int -> float conversion rounds to nearest).
//
// The generator works on blocks of kLanes = 64 consecutive indices: with AVX-512 (or AVX2) the rounds
// run on whole registers via intrinsics, otherwise on a plain lane loop that GCC vectorises; the word
// -> float map is a plain lane loop either way. No state: any block can be generated independently.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace pyfuse {
namespace philox {

constexpr uint32_t kRoundA = 0xD2511F53u;
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u;
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr int kRounds = 10;
// Indices generated together by one call of the block generator: four AVX-512 registers of uint32
// lanes, interleaved to hide the latency of the multiply chain.
constexpr int kLanes = 64;

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

// Scalar uniform for one global index (a cross-check for the block generator).
inline float uniform_at(Key key, uint32_t step, uint64_t j) {
  return word_to_uniform(
      philox_word0(key, static_cast<uint32_t>(j), static_cast<uint32_t>(j >> 32), step, 0u));
}

// Map kLanes output words to uniforms (a lane loop GCC vectorises: vpsrad/vpxord/vcvtdq2ps/min/max).
// (Same arithmetic as word_to_uniform; calling that inside the loop measured 2x slower with GCC 12.)
inline void words_to_uniforms(const uint32_t* __restrict w, float* __restrict out) {
  const float scale = uniform_scale();
  for (int l = 0; l < kLanes; ++l) {
    const int32_t x = static_cast<int32_t>(w[l]);
    const int32_t nonneg = x ^ (x >> 31);
    float u = static_cast<float>(nonneg) * scale;
    u = u < kEps ? kEps : u;
    u = u > kOneMinusEps ? kOneMinusEps : u;
    out[l] = u;
  }
}

// First output words for the kLanes consecutive indices j0 .. j0 + kLanes - 1 (the block may straddle
// 2^32, so the high counter word is carried per lane).
//
// GCC does auto-vectorise the plain lane loop (the #else branch), but it widens the state to 64-bit
// lanes and multiplies with vpmullq, which measured ~3.7 ns/element on Zen 4. With AVX-512 / AVX2 the
// 32x32->64 products are written directly with vpmuludq on even and odd lanes instead, and several
// independent registers are interleaved so the dependency chain of a round is hidden: ~1 ns/element
// (3.6 GHz Zen 4), which is the vector-ALU throughput bound of ~12 zmm ops per register per round.
inline void words_block(Key key, uint32_t step, uint64_t j0, uint32_t* __restrict words) {
  const uint32_t lo0 = static_cast<uint32_t>(j0);
  const uint32_t hi0 = static_cast<uint32_t>(j0 >> 32);
#if defined(__AVX512F__)
  constexpr int V = kLanes / 16;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i vlo0 = _mm512_set1_epi32(static_cast<int>(lo0));
  const __m512i vhi0 = _mm512_set1_epi32(static_cast<int>(hi0));
  const __m512i ma = _mm512_set1_epi64(kRoundA);
  const __m512i mb = _mm512_set1_epi64(kRoundB);
  constexpr __mmask16 kEven = 0x5555, kOdd = 0xAAAA;
  // mulhilo of 16 lanes: vpmuludq on the even dwords and on the odd dwords moved down; each result
  // is then assembled with one masked in-lane dword swap (vpshufd with merge masking).
  auto mulhilo = [&](__m512i c, __m512i m, __m512i& hi, __m512i& lo) {
    const __m512i pe = _mm512_mul_epu32(c, m);                          // (lo_e, hi_e) per qword
    const __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(c, 32), m);   // (lo_o, hi_o) per qword
    hi = _mm512_mask_shuffle_epi32(po, kEven, pe, _MM_PERM_CDAB);       // (hi_e, hi_o)
    lo = _mm512_mask_shuffle_epi32(pe, kOdd, po, _MM_PERM_CDAB);        // (lo_e, lo_o)
  };
  uint32_t k0 = key.k0, k1 = key.k1;
  // Round 1 with c2 = step and c3 = 0 the same for all lanes: the B product is a scalar.
  const uint64_t pb1 = static_cast<uint64_t>(kRoundB) * step;
  const __m512i c0_xor = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(pb1 >> 32) ^ k0));
  const __m512i vk1_first = _mm512_set1_epi32(static_cast<int>(k1));
  __m512i c0[V], c1[V], c2[V], c3[V];
  for (int v = 0; v < V; ++v) {
    const __m512i lo = _mm512_add_epi32(vlo0, _mm512_add_epi32(lane, _mm512_set1_epi32(16 * v)));
    // the low word wrapped (unsigned lo < lo0): carry one into the high word
    const __mmask16 carry = _mm512_cmplt_epu32_mask(lo, vlo0);
    const __m512i hi = _mm512_mask_add_epi32(vhi0, carry, vhi0, _mm512_set1_epi32(1));
    __m512i hi_a, lo_a;
    mulhilo(lo, ma, hi_a, lo_a);
    c0[v] = _mm512_xor_si512(hi, c0_xor);
    c1[v] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(pb1)));
    c2[v] = _mm512_xor_si512(hi_a, vk1_first);
    c3[v] = lo_a;
  }
  k0 += kKeyA;
  k1 += kKeyB;
#pragma GCC unroll 9
  for (int r = 1; r < kRounds; ++r) {
    const __m512i vk0 = _mm512_set1_epi32(static_cast<int>(k0));
    const __m512i vk1 = _mm512_set1_epi32(static_cast<int>(k1));
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      __m512i hi_b, lo_b, hi_a, lo_a;
      mulhilo(c2[v], mb, hi_b, lo_b);
      mulhilo(c0[v], ma, hi_a, lo_a);  // dead (and dropped by the compiler) in the last round
      // three-way xor in one vpternlogd (0x96 = a ^ b ^ c)
      c0[v] = _mm512_ternarylogic_epi32(hi_b, c1[v], vk0, 0x96);
      c2[v] = _mm512_ternarylogic_epi32(hi_a, c3[v], vk1, 0x96);
      c1[v] = lo_b;
      c3[v] = lo_a;
    }
    k0 += kKeyA;
    k1 += kKeyB;
  }
  for (int v = 0; v < V; ++v) _mm512_storeu_si512(reinterpret_cast<void*>(words + 16 * v), c0[v]);
#elif defined(__AVX2__)
  // AVX2 has 16 ymm registers: the four state words of two 8-lane vectors and their temporaries fit,
  // so the block goes through all rounds two vectors at a time. All eight vectors at once spilled the
  // state to the stack every round (measured: 18% slower); the arithmetic is the same.
  constexpr int V = kLanes / 8;
  constexpr int G = 2;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i vlo0 = _mm256_set1_epi32(static_cast<int>(lo0));
  const __m256i vhi0 = _mm256_set1_epi32(static_cast<int>(hi0));
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i ma = _mm256_set1_epi64x(kRoundA);
  const __m256i mb = _mm256_set1_epi64x(kRoundB);
  for (int v0 = 0; v0 < V; v0 += G) {
    __m256i c0[G], c1[G], c2[G], c3[G];
    for (int g = 0; g < G; ++g) {
      c0[g] = _mm256_add_epi32(vlo0, _mm256_add_epi32(lane, _mm256_set1_epi32(8 * (v0 + g))));
      const __m256i wrapped =
          _mm256_cmpgt_epi32(_mm256_xor_si256(vlo0, sign), _mm256_xor_si256(c0[g], sign));
      c1[g] = _mm256_sub_epi32(vhi0, wrapped);
      c2[g] = _mm256_set1_epi32(static_cast<int>(step));
      c3[g] = _mm256_setzero_si256();
    }
    uint32_t k0 = key.k0, k1 = key.k1;
#pragma GCC unroll 10
    for (int r = 0; r < kRounds; ++r) {
      const __m256i vk0 = _mm256_set1_epi32(static_cast<int>(k0));
      const __m256i vk1 = _mm256_set1_epi32(static_cast<int>(k1));
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) {
        const __m256i pb_e = _mm256_mul_epu32(c2[g], mb);
        const __m256i pb_o = _mm256_mul_epu32(_mm256_srli_epi64(c2[g], 32), mb);
        const __m256i pa_e = _mm256_mul_epu32(c0[g], ma);
        const __m256i pa_o = _mm256_mul_epu32(_mm256_srli_epi64(c0[g], 32), ma);
        const __m256i hi_b = _mm256_blend_epi32(_mm256_srli_epi64(pb_e, 32), pb_o, 0xAA);
        const __m256i lo_b = _mm256_blend_epi32(pb_e, _mm256_slli_epi64(pb_o, 32), 0xAA);
        const __m256i hi_a = _mm256_blend_epi32(_mm256_srli_epi64(pa_e, 32), pa_o, 0xAA);
        const __m256i lo_a = _mm256_blend_epi32(pa_e, _mm256_slli_epi64(pa_o, 32), 0xAA);
        c0[g] = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1[g]), vk0);
        c2[g] = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3[g]), vk1);
        c1[g] = lo_b;
        c3[g] = lo_a;
      }
      k0 += kKeyA;
      k1 += kKeyB;
    }
    for (int g = 0; g < G; ++g)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(words + 8 * (v0 + g)), c0[g]);
  }
#else
  uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  for (int l = 0; l < kLanes; ++l) {
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
  for (int l = 0; l < kLanes; ++l) words[l] = c0[l];
#endif
}

// Uniforms for the kLanes consecutive indices j0 .. j0 + kLanes - 1.
inline void uniform_block(Key key, uint32_t step, uint64_t j0, float* __restrict out) {
  alignas(64) uint32_t words[kLanes];
  words_block(key, step, j0, words);
  words_to_uniforms(words, out);
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
