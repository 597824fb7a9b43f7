// The C++ CPU backend of pyfuse: the fused Concrete-mask merge phases (see pyfuse/ops/reference.py for
// the meaning of every phase; this file computes the same values up to fp32 summation order).
//
// Structure (the same as the Triton backend):
//   * The element range is cut into TILES that each lie inside one segment: segment s becomes
//     ceil(len_s / kTile) tiles starting at offsets[s]. The tile list is rebuilt per call, O(S + D/kTile).
//   * `omp parallel for schedule(dynamic)` over tiles; every tile writes its partial sums into its own
//     slot, and the per-segment results are summed over the segment's tiles in tile order, so results
//     are deterministic and independent of the thread count.
//   * Inside a tile, chunks of kChunk consecutive elements: generate the uniforms for the chunk
//     (philox.h), compute the mask, apply. Chunk buffers live on the stack; nothing [D]-sized is
//     allocated (extra memory is O(tiles * (n + 1) + S * n)).
// All element arithmetic is fp32; per-chunk sums use 16 fp32 lane accumulators and are then added to
// per-tile double accumulators. Indices are 64-bit throughout. The noise of element j is drawn at the
// global index `start + j`: a shard of a longer flat model (`start` its first element) gets the mask the
// whole model would.
#include "merge_common.h"

namespace pyfuse {
namespace {

// ---------------------------------------------------------------------------------------------------
// Phase 1: mask_sums

at::Tensor mask_sums(const at::Tensor& logits, const at::Tensor& offsets, uint64_t seed, uint32_t step,
                     double temperature, int64_t mode, at::Tensor m_out, uint64_t start) {
  const int64_t D = logits.numel();
  check_f32(logits, "logits", D);
  check_f32(m_out, "m_out", D);
  const TileList tl = make_tiles(offsets, D);
  const int64_t S = offsets.numel() - 1;
  const int64_t num_tiles = static_cast<int64_t>(tl.tiles.size());
  const Noise nz = make_noise(seed, step, temperature);
  const float* x = logits.data_ptr<float>();
  float* m = m_out.data_ptr<float>();
  std::vector<double> tile_sum(static_cast<size_t>(num_tiles), 0.0);

  dispatch_mode(mode, [&](auto mode_c) {
    constexpr int MODE = decltype(mode_c)::value;
    for_each_tile(num_tiles, [&](int64_t t) {
      const Tile tile = tl.tiles[t];
      double acc = 0.0;
      for (int64_t j = tile.start; j < tile.end; j += kChunk) {
        const int64_t len = std::min(kChunk, tile.end - j);
        chunk_mask<MODE>(x + j, nz, start + static_cast<uint64_t>(j), len, m + j);
        acc += chunk_sum(m + j, len);
      }
      tile_sum[t] = acc;
    });
  });

  at::Tensor seg_sum = at::empty({S}, logits.options().dtype(at::kFloat));
  float* out = seg_sum.data_ptr<float>();
  for (int64_t s = 0; s < S; ++s) {
    double acc = 0.0;
    for (int64_t t = tl.seg_first[s]; t < tl.seg_first[s + 1]; ++t) acc += tile_sum[t];
    out[s] = static_cast<float>(acc);
  }
  return seg_sum;
}

// ---------------------------------------------------------------------------------------------------
// Phase 2: merge_apply  (m_inout[j] <- base[j] + m_inout[j] * seg_scale[s] * a_j)

// a[0 .. len) = sum_i w[i] * tv[i, j0 + k], reading each task-vector element once.
template <typename TV>
inline void combine_chunk(const TV* tv, int64_t n, int64_t D, const float* w, int64_t j0, int64_t len,
                          float* __restrict a) {
  alignas(64) float buf[kChunk];
  if (n == 0) {
    for (int64_t k = 0; k < len; ++k) a[k] = 0.0f;
    return;
  }
  {
    const float* t = as_f32(tv + j0, len, buf);
    const float w0 = w[0];
    for (int64_t k = 0; k < len; ++k) a[k] = w0 * t[k];
  }
  for (int64_t i = 1; i < n; ++i) {
    const float* t = as_f32(tv + i * D + j0, len, buf);
    const float wi = w[i];
    for (int64_t k = 0; k < len; ++k) a[k] += wi * t[k];
  }
}

template <typename TV, typename TB>
void merge_apply_impl(const TB* base, const TV* tv, int64_t n, int64_t D, const float* weights, int64_t S,
                      const float* seg_scale, float* m, const TileList& tl) {
  const int64_t num_tiles = static_cast<int64_t>(tl.tiles.size());
  for_each_tile(num_tiles, [&](int64_t t) {
    const Tile tile = tl.tiles[t];
    std::vector<float> w(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) w[i] = weights[i * S + tile.seg];
    const float scale = seg_scale[tile.seg];
    alignas(64) float a[kChunk];
    alignas(64) float bbuf[kChunk];
    for (int64_t j = tile.start; j < tile.end; j += kChunk) {
      const int64_t len = std::min(kChunk, tile.end - j);
      combine_chunk(tv, n, D, w.data(), j, len, a);
      const float* b = as_f32(base + j, len, bbuf);
      float* __restrict mj = m + j;
      for (int64_t k = 0; k < len; ++k) mj[k] = b[k] + mj[k] * scale * a[k];
    }
  });
}

void merge_apply(const at::Tensor& base, const at::Tensor& task_vectors, const at::Tensor& weights,
                 const at::Tensor& offsets, const at::Tensor& seg_scale, at::Tensor m_inout) {
  const int64_t D = m_inout.numel();
  check_f32(m_inout, "m_inout", D);
  TORCH_CHECK(base.device().is_cpu() && base.is_contiguous() && base.numel() == D,
              "base must be a contiguous CPU tensor with D = ", D, " elements");
  check_tv(task_vectors, D);
  const int64_t n = task_vectors.size(0);
  const int64_t S = offsets.numel() - 1;
  check_weights(weights, n, S);
  check_f32(seg_scale, "seg_scale", S);
  const TileList tl = make_tiles(offsets, D);
  dispatch_float_type(task_vectors, "task_vectors", [&](auto tv_tag) {
    using TV = decltype(tv_tag);
    dispatch_float_type(base, "base", [&](auto base_tag) {
      using TB = decltype(base_tag);
      merge_apply_impl<TV, TB>(reinterpret_cast<const TB*>(base.data_ptr()),
                               reinterpret_cast<const TV*>(task_vectors.data_ptr()), n, D,
                               weights.data_ptr<float>(), S, seg_scale.data_ptr<float>(),
                               m_inout.data_ptr<float>(), tl);
    });
  });
}

// ---------------------------------------------------------------------------------------------------
// Phase 3: backward_accumulate

template <int MODE, typename TV>
void backward_accumulate_impl(const float* g, const TV* tv, int64_t n, int64_t D, const float* x,
                              const float* weights, int64_t S, const Noise& nz, uint64_t start, float* ga,
                              const TileList& tl, std::vector<double>& partial) {
  const int64_t num_tiles = static_cast<int64_t>(tl.tiles.size());
  const int64_t width = n + 1;  // per tile: dw[0 .. n), gam
  for_each_tile(num_tiles, [&](int64_t t) {
    const Tile tile = tl.tiles[t];
    std::vector<float> w(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) w[i] = weights[i * S + tile.seg];
    double* acc = partial.data() + t * width;
    alignas(64) float m[kChunk];
    alignas(64) float gm[kChunk];
    alignas(64) float a[kChunk];
    alignas(64) float buf[kChunk];
    for (int64_t j = tile.start; j < tile.end; j += kChunk) {
      const int64_t len = std::min(kChunk, tile.end - j);
      chunk_mask<MODE>(x + j, nz, start + static_cast<uint64_t>(j), len, m);
      const float* gj = g + j;
      for (int64_t k = 0; k < len; ++k) gm[k] = gj[k] * m[k];
      for (int64_t k = 0; k < len; ++k) a[k] = 0.0f;
      // one pass over the task vectors: a_j and the weight gradients from the same loaded chunk
      for (int64_t i = 0; i < n; ++i) {
        const float* tvi = as_f32(tv + i * D + j, len, buf);
        const float wi = w[i];
        for (int64_t k = 0; k < len; ++k) a[k] += wi * tvi[k];
        acc[i] += chunk_dot(gm, tvi, len);
      }
      acc[n] += chunk_dot(gm, a, len);
      float* __restrict gaj = ga + j;
      for (int64_t k = 0; k < len; ++k) gaj[k] = gj[k] * a[k];
    }
  });
}

std::tuple<at::Tensor, at::Tensor> backward_accumulate(const at::Tensor& grad_out, const at::Tensor& task_vectors,
                                                       const at::Tensor& logits, const at::Tensor& weights,
                                                       const at::Tensor& offsets, const at::Tensor& seg_scale,
                                                       uint64_t seed, uint32_t step, double temperature,
                                                       int64_t mode, at::Tensor ga_out, uint64_t start) {
  const int64_t D = logits.numel();
  check_f32(logits, "logits", D);
  check_f32(grad_out, "grad_out", D);
  check_f32(ga_out, "ga_out", D);
  check_tv(task_vectors, D);
  const int64_t n = task_vectors.size(0);
  const int64_t S = offsets.numel() - 1;
  check_weights(weights, n, S);
  check_f32(seg_scale, "seg_scale", S);
  const TileList tl = make_tiles(offsets, D);
  const int64_t num_tiles = static_cast<int64_t>(tl.tiles.size());
  const Noise nz = make_noise(seed, step, temperature);
  const int64_t width = n + 1;
  std::vector<double> partial(static_cast<size_t>(num_tiles * width), 0.0);

  dispatch_mode(mode, [&](auto mode_c) {
    constexpr int MODE = decltype(mode_c)::value;
    dispatch_float_type(task_vectors, "task_vectors", [&](auto tv_tag) {
      using TV = decltype(tv_tag);
      backward_accumulate_impl<MODE, TV>(grad_out.data_ptr<float>(),
                                         reinterpret_cast<const TV*>(task_vectors.data_ptr()), n, D,
                                         logits.data_ptr<float>(), weights.data_ptr<float>(), S, nz, start,
                                         ga_out.data_ptr<float>(), tl, partial);
    });
  });

  at::Tensor grad_weights = at::empty({n, S}, logits.options().dtype(at::kFloat));
  at::Tensor seg_gam = at::empty({S}, logits.options().dtype(at::kFloat));
  float* gw = grad_weights.data_ptr<float>();
  float* gam = seg_gam.data_ptr<float>();
  const float* sc = seg_scale.data_ptr<float>();
  std::vector<double> seg_acc(static_cast<size_t>(width));
  for (int64_t s = 0; s < S; ++s) {
    std::fill(seg_acc.begin(), seg_acc.end(), 0.0);
    for (int64_t t = tl.seg_first[s]; t < tl.seg_first[s + 1]; ++t) {
      for (int64_t i = 0; i < width; ++i) seg_acc[i] += partial[t * width + i];
    }
    for (int64_t i = 0; i < n; ++i) gw[i * S + s] = sc[s] * static_cast<float>(seg_acc[i]);
    gam[s] = static_cast<float>(seg_acc[n]);
  }
  return std::make_tuple(grad_weights, seg_gam);
}

// ---------------------------------------------------------------------------------------------------
// Phase 4: backward_logits  (relaxed only; ga[k] <- (ga[k] * seg_scale[s] - seg_corr[s]) * m (1 - m) / T)

void backward_logits(at::Tensor ga_inout, const at::Tensor& logits, const at::Tensor& offsets,
                     const at::Tensor& seg_scale, const at::Tensor& seg_corr, uint64_t seed, uint32_t step,
                     double temperature, uint64_t start) {
  const int64_t D = logits.numel();
  check_f32(logits, "logits", D);
  check_f32(ga_inout, "ga_inout", D);
  const int64_t S = offsets.numel() - 1;
  check_f32(seg_scale, "seg_scale", S);
  check_f32(seg_corr, "seg_corr", S);
  const TileList tl = make_tiles(offsets, D);
  const int64_t num_tiles = static_cast<int64_t>(tl.tiles.size());
  const Noise nz = make_noise(seed, step, temperature);
  const float* x = logits.data_ptr<float>();
  float* ga = ga_inout.data_ptr<float>();
  const float* sc = seg_scale.data_ptr<float>();
  const float* corr = seg_corr.data_ptr<float>();
  const float temp = nz.temperature;
  for_each_tile(num_tiles, [&](int64_t t) {
    const Tile tile = tl.tiles[t];
    const float scale = sc[tile.seg];
    const float c = corr[tile.seg];
    alignas(64) float m[kChunk];
    for (int64_t j = tile.start; j < tile.end; j += kChunk) {
      const int64_t len = std::min(kChunk, tile.end - j);
      chunk_mask<kRelaxed>(x + j, nz, start + static_cast<uint64_t>(j), len, m);
      float* __restrict gaj = ga + j;
      for (int64_t k = 0; k < len; ++k) gaj[k] = (gaj[k] * scale - c) * m[k] * (1.0f - m[k]) / temp;
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// The raw noise stream, for tests: u_j for j in [start, start + count).

at::Tensor uniform(uint64_t seed, uint32_t step, uint64_t start, int64_t count) {
  TORCH_CHECK(count >= 0, "count must be >= 0");
  TORCH_CHECK(count == 0 || start <= UINT64_MAX - static_cast<uint64_t>(count - 1),
              "start + count - 1 must fit in 64 bits");
  at::Tensor out = at::empty({count}, at::TensorOptions().dtype(at::kFloat));
  float* u = out.data_ptr<float>();
  const philox::Key key = philox::make_key(seed);
  const int64_t num_chunks = (count + kTile - 1) / kTile;
  for_each_tile(num_chunks, [&](int64_t c) {
    const int64_t k0 = c * kTile;
    philox::uniform_fill(key, step, start + static_cast<uint64_t>(k0), std::min(kTile, count - k0), u + k0);
  });
  return out;
}

}  // namespace
}  // namespace pyfuse

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyfuse C++ CPU backend: the fused Concrete-mask merge phases (see pyfuse/ops/reference.py)";
  m.def("mask_sums", &pyfuse::mask_sums, "writes the mask into m_out, returns per-segment sums [S]",
        py::arg("logits"), py::arg("offsets"), py::arg("seed"), py::arg("step"), py::arg("temperature"),
        py::arg("mode"), py::arg("m_out"), py::arg("start") = 0);
  m.def("merge_apply", &pyfuse::merge_apply,
        "in place: m_inout <- base + m_inout * seg_scale[s] * sum_i weights[i, s] * tv[i]", py::arg("base"),
        py::arg("task_vectors"), py::arg("weights"), py::arg("offsets"), py::arg("seg_scale"),
        py::arg("m_inout"));
  m.def("backward_accumulate", &pyfuse::backward_accumulate,
        "returns (grad_weights [n, S], seg_gam [S]) and writes ga_out = g * a", py::arg("grad_out"),
        py::arg("task_vectors"), py::arg("logits"), py::arg("weights"), py::arg("offsets"),
        py::arg("seg_scale"), py::arg("seed"), py::arg("step"), py::arg("temperature"), py::arg("mode"),
        py::arg("ga_out"), py::arg("start") = 0);
  m.def("backward_logits", &pyfuse::backward_logits,
        "relaxed mode, in place: ga <- (ga * seg_scale[s] - seg_corr[s]) * m (1 - m) / T", py::arg("ga_inout"),
        py::arg("logits"), py::arg("offsets"), py::arg("seg_scale"), py::arg("seg_corr"), py::arg("seed"),
        py::arg("step"), py::arg("temperature"), py::arg("start") = 0);
  m.def("uniform", &pyfuse::uniform, "the clamped Philox uniforms u_j for j in [start, start + count)",
        py::arg("seed"), py::arg("step"), py::arg("start"), py::arg("count"));
  pyfuse::register_lora(m);
}
