// The factored phases of pyfuse's C++ backend: the fused Concrete merge with each segment's task vectors
// kept as low-rank factors, L_s [rows, K_s] and R_s [K_s, cols] (see pyfuse/ops/factors.py and, for the
// meaning of both phases, pyfuse/ops/reference.py). The mask phases (mask_sums, backward_logits) are the
// dense op's, unchanged; the mask regenerated here comes from the same chunk_mask (merge_common.h).
//
// Work is cut into ROW TILES: whole rows of one segment, about kFactoredTile elements (at least one row), so
// a tile is a contiguous run of flat elements. Per tile, a = (L * c) @ R is formed into a tile-sized buffer
// (a small BLAS product), then used at once; the weight gradient of component k, sum_j g_j m_j L[row_j, k]
// R[k, col_j], is the sum over the tile's rows of L[row, k] * (gm @ R^T)[row, k]. Per-tile partial sums are
// added per segment in tile order, so results are deterministic and independent of the thread count. Extra
// memory: per tile in flight, O(kFactoredTile + K_s * cols) floats (the factors widened to fp32 when stored
// in bf16 / fp16); per call, O(tiles + K).
#include <memory>

#include "merge_common.h"

namespace pyfuse {
namespace {

struct RowTile {
  int64_t seg, row0, row1;
};

// Elements per row tile: a tile's product (L * c) @ R is a BLAS call with kFactoredTile / cols rows, and
// with K = 128 (MKL, AVX2, one thread) one of 8 rows runs at 37 GFLOP/s, 64 rows at 63, 128 rows at 70;
// each tile also reads all of R_s once. 128 rows of a 2048-column weight make 1 MiB of fp32 per buffer
// and thread.
constexpr int64_t kFactoredTile = 16 * kTile;

// Segment geometry and the row tiles, built per call in O(S + tiles).
struct Factored {
  std::vector<int64_t> start, rows, cols, k0, k1, left_at, right_at;
  std::vector<RowTile> tiles;
  std::vector<int64_t> seg_first;  // [S + 1]: tiles of segment s are [seg_first[s], seg_first[s+1])
  std::vector<int64_t> part_at;    // [tiles]: where a tile's K_s component partials start
  int64_t parts = 0;
};

Factored make_factored(const at::Tensor& offsets, const at::Tensor& rows, const at::Tensor& comp_offsets,
                       int64_t D, int64_t left_numel, int64_t right_numel) {
  for (const at::Tensor* t : {&offsets, &rows, &comp_offsets}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->device().is_cpu() && t->is_contiguous() && t->dim() == 1,
                "offsets, rows and comp_offsets must be contiguous 1-D int64 CPU tensors");
  }
  const int64_t S = offsets.numel() - 1;
  TORCH_CHECK(S >= 0 && rows.numel() == S && comp_offsets.numel() == S + 1,
              "rows must be [S] and comp_offsets [S+1] with S = ", S);
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* nr = rows.data_ptr<int64_t>();
  const int64_t* ko = comp_offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[S] == D, "offsets must run from 0 to D = ", D);
  TORCH_CHECK(ko[0] == 0, "comp_offsets[0] must be 0");
  Factored f;
  f.seg_first.resize(S + 1);
  int64_t left_at = 0, right_at = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t len = off[s + 1] - off[s], r = nr[s], k = ko[s + 1] - ko[s];
    TORCH_CHECK(len > 0 && r > 0 && len % r == 0 && k >= 0, "segment ", s, ": ", len, " elements in ", r,
                " rows with ", k, " components");
    const int64_t cols = len / r;
    f.start.push_back(off[s]);
    f.rows.push_back(r);
    f.cols.push_back(cols);
    f.k0.push_back(ko[s]);
    f.k1.push_back(ko[s + 1]);
    f.left_at.push_back(left_at);
    f.right_at.push_back(right_at);
    left_at += r * k;
    right_at += k * cols;
    f.seg_first[s] = static_cast<int64_t>(f.tiles.size());
    const int64_t per_tile = std::max<int64_t>(1, kFactoredTile / cols);
    for (int64_t r0 = 0; r0 < r; r0 += per_tile) {
      f.tiles.push_back(RowTile{s, r0, std::min(r0 + per_tile, r)});
      f.part_at.push_back(f.parts);
      f.parts += k;
    }
  }
  f.seg_first[S] = static_cast<int64_t>(f.tiles.size());
  TORCH_CHECK(left_at == left_numel && right_at == right_numel, "left / right must hold ", left_at, " / ",
              right_at, " elements, got ", left_numel, " / ", right_numel);
  return f;
}

// fp32 copy (or view, for fp32) of `len` factor elements.
template <typename TF>
const float* factor_f32(const TF* src, int64_t len, std::vector<float>& buf) {
  if constexpr (std::is_same_v<TF, float>) {
    return src;
  } else {
    buf.resize(static_cast<size_t>(len));
    for (int64_t k = 0; k < len; k += kChunk) as_f32(src + k, std::min(kChunk, len - k), buf.data() + k);
    return buf.data();
  }
}

// A tile-sized buffer left uninitialised: every use writes all of it first (zeroing it would be one more pass).
std::unique_ptr<float[]> scratch(int64_t len) { return std::unique_ptr<float[]>(new float[static_cast<size_t>(len)]); }

// c[m, n] = a[m, k] @ b (b is [k, n], or [n, k] read transposed), all fp32 row-major buffers. A tile's
// products are small (m ~ kFactoredTile / cols rows) and run inside the parallel tile loop, where the BLAS
// behind at::mm stays on the calling thread; it is several times faster than a hand-written loop.
void matmul(const float* a, const float* b, float* c, int64_t m, int64_t k, int64_t n, bool b_transposed) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor ta = at::from_blob(const_cast<float*>(a), {m, k}, f32);
  const at::Tensor tb = b_transposed ? at::from_blob(const_cast<float*>(b), {n, k}, f32).t()
                                     : at::from_blob(const_cast<float*>(b), {k, n}, f32);
  at::Tensor tc = at::from_blob(c, {m, n}, f32);
  at::mm_out(tc, ta, tb);
}

void check_factors(const at::Tensor& left, const at::Tensor& right, const at::Tensor& coef) {
  TORCH_CHECK(left.device().is_cpu() && left.is_contiguous() && right.device().is_cpu() && right.is_contiguous(),
              "left and right must be contiguous CPU tensors");
  TORCH_CHECK(left.scalar_type() == right.scalar_type(), "left and right must have one dtype, got ",
              left.scalar_type(), " and ", right.scalar_type());
  check_f32(coef, "coef", coef.numel());
}

// The tile's factors in fp32: L rows [tr, K] and R [K, cols] (views when stored in fp32).
template <typename TF>
struct TileFactors {
  const float* l;
  const float* r;
  std::vector<float> lbuf, rbuf;
  TileFactors(const TF* left, const TF* right, const Factored& f, const RowTile& tile) {
    const int64_t s = tile.seg, K = f.k1[s] - f.k0[s];
    l = factor_f32(left + f.left_at[s] + tile.row0 * K, (tile.row1 - tile.row0) * K, lbuf);
    r = factor_f32(right + f.right_at[s], K * f.cols[s], rbuf);
  }
};

// a[tr, cols] = (L_tile * c) @ R_s for the tile's rows, with c the segment's component weights.
template <typename TF>
void combine_tile(const TileFactors<TF>& tf, const float* c, int64_t tr, int64_t K, int64_t cols, float* a) {
  std::vector<float> lc(static_cast<size_t>(tr * K));
  for (int64_t i = 0; i < tr; ++i) {
    for (int64_t k = 0; k < K; ++k) lc[i * K + k] = tf.l[i * K + k] * c[k];
  }
  matmul(lc.data(), tf.r, a, tr, K, cols, false);
}

// ---------------------------------------------------------------------------------------------------
// lora_merge_apply  (m_inout[j] <- base[j] + m_inout[j] * seg_scale[s] * a_j, a_s = (L_s * c) @ R_s)

template <typename TF, typename TB>
void lora_merge_apply_impl(const TB* base, const TF* left, const TF* right, const float* coef,
                           const float* seg_scale, float* m, const Factored& f) {
  for_each_tile(static_cast<int64_t>(f.tiles.size()), [&](int64_t t) {
    const RowTile tile = f.tiles[t];
    const int64_t s = tile.seg, K = f.k1[s] - f.k0[s], cols = f.cols[s], tr = tile.row1 - tile.row0;
    const int64_t j0 = f.start[s] + tile.row0 * cols, len = tr * cols;
    const std::unique_ptr<float[]> a = scratch(len);
    if (K > 0) {
      combine_tile(TileFactors<TF>(left, right, f, tile), coef + f.k0[s], tr, K, cols, a.get());
    } else {
      std::fill_n(a.get(), len, 0.0f);
    }
    const float scale = seg_scale[s];
    alignas(64) float bbuf[kChunk];
    for (int64_t o = 0; o < len; o += kChunk) {
      const int64_t n = std::min(kChunk, len - o);
      const float* b = as_f32(base + j0 + o, n, bbuf);
      float* __restrict mj = m + j0 + o;
      const float* __restrict aj = a.get() + o;
      for (int64_t k = 0; k < n; ++k) mj[k] = b[k] + mj[k] * scale * aj[k];
    }
  });
}

void lora_merge_apply(const at::Tensor& base, const at::Tensor& left, const at::Tensor& right,
                      const at::Tensor& rows, const at::Tensor& comp_offsets, const at::Tensor& coef,
                      const at::Tensor& offsets, const at::Tensor& seg_scale, at::Tensor m_inout) {
  const int64_t D = m_inout.numel();
  check_f32(m_inout, "m_inout", D);
  TORCH_CHECK(base.device().is_cpu() && base.is_contiguous() && base.numel() == D,
              "base must be a contiguous CPU tensor with D = ", D, " elements");
  check_factors(left, right, coef);
  const Factored f = make_factored(offsets, rows, comp_offsets, D, left.numel(), right.numel());
  TORCH_CHECK(coef.numel() == comp_offsets[-1].item<int64_t>(), "coef must have one entry per component");
  check_f32(seg_scale, "seg_scale", offsets.numel() - 1);
  dispatch_float_type(left, "left", [&](auto factor_tag) {
    using TF = decltype(factor_tag);
    dispatch_float_type(base, "base", [&](auto base_tag) {
      using TB = decltype(base_tag);
      lora_merge_apply_impl<TF, TB>(reinterpret_cast<const TB*>(base.data_ptr()),
                                    reinterpret_cast<const TF*>(left.data_ptr()),
                                    reinterpret_cast<const TF*>(right.data_ptr()), coef.data_ptr<float>(),
                                    seg_scale.data_ptr<float>(), m_inout.data_ptr<float>(), f);
    });
  });
}

// ---------------------------------------------------------------------------------------------------
// lora_backward_accumulate

template <int MODE, typename TF>
void lora_backward_accumulate_impl(const float* g, const TF* left, const TF* right, const float* coef,
                                   const float* x, const Noise& nz, int64_t start, float* ga, bool need_ga,
                                   bool need_dots, const Factored& f, std::vector<double>& part,
                                   std::vector<double>& tile_gam) {
  for_each_tile(static_cast<int64_t>(f.tiles.size()), [&](int64_t t) {
    const RowTile tile = f.tiles[t];
    const int64_t s = tile.seg, K = f.k1[s] - f.k0[s], cols = f.cols[s], tr = tile.row1 - tile.row0;
    const int64_t j0 = f.start[s] + tile.row0 * cols, len = tr * cols;
    const std::unique_ptr<float[]> gm = scratch(len);
    const std::unique_ptr<float[]> a = need_ga ? scratch(len) : nullptr;
    if (need_ga && K == 0) std::fill_n(a.get(), len, 0.0f);
    for (int64_t o = 0; o < len; o += kChunk) {
      const int64_t n = std::min(kChunk, len - o);
      float* gmo = gm.get() + o;
      chunk_mask<MODE>(x + j0 + o, nz, static_cast<uint64_t>(start + j0 + o), n, gmo);
      for (int64_t k = 0; k < n; ++k) gmo[k] *= g[j0 + o + k];
    }
    if (K > 0 && (need_ga || need_dots)) {
      const TileFactors<TF> tf(left, right, f, tile);
      if (need_ga) combine_tile(tf, coef + f.k0[s], tr, K, cols, a.get());
      if (need_dots) {
        // the weight gradient of component k: sum over rows of L[row, k] * (gm @ R^T)[row, k]
        std::vector<float> p(static_cast<size_t>(tr * K));
        matmul(gm.get(), tf.r, p.data(), tr, cols, K, true);
        double* q = part.data() + f.part_at[t];
        for (int64_t i = 0; i < tr; ++i) {
          for (int64_t k = 0; k < K; ++k) q[k] += static_cast<double>(tf.l[i * K + k]) * p[i * K + k];
        }
      }
    }
    if (!need_ga) return;
    double gam = 0.0;
    for (int64_t o = 0; o < len; o += kChunk) {
      const int64_t n = std::min(kChunk, len - o);
      gam += chunk_dot(gm.get() + o, a.get() + o, n);
      float* __restrict gaj = ga + j0 + o;
      const float* __restrict gj = g + j0 + o;
      const float* __restrict aj = a.get() + o;
      for (int64_t k = 0; k < n; ++k) gaj[k] = gj[k] * aj[k];
    }
    tile_gam[t] = gam;
  });
}

std::tuple<at::Tensor, at::Tensor> lora_backward_accumulate(
    const at::Tensor& grad_out, const at::Tensor& left, const at::Tensor& right, const at::Tensor& rows,
    const at::Tensor& comp_offsets, const at::Tensor& coef, const at::Tensor& logits, const at::Tensor& offsets,
    uint64_t seed, uint32_t step, double temperature, int64_t mode, at::Tensor ga_out, bool need_ga,
    bool need_dots, int64_t start) {
  const int64_t D = logits.numel();
  check_f32(logits, "logits", D);
  check_f32(grad_out, "grad_out", D);
  check_f32(ga_out, "ga_out", D);
  check_factors(left, right, coef);
  const Factored f = make_factored(offsets, rows, comp_offsets, D, left.numel(), right.numel());
  const int64_t S = offsets.numel() - 1, K = coef.numel();
  TORCH_CHECK(K == comp_offsets[-1].item<int64_t>(), "coef must have one entry per component");
  const Noise nz = make_noise(seed, step, temperature);
  std::vector<double> part(static_cast<size_t>(f.parts), 0.0);
  std::vector<double> tile_gam(f.tiles.size(), 0.0);
  dispatch_mode(mode, [&](auto mode_c) {
    constexpr int MODE = decltype(mode_c)::value;
    dispatch_float_type(left, "left", [&](auto factor_tag) {
      using TF = decltype(factor_tag);
      lora_backward_accumulate_impl<MODE, TF>(
          grad_out.data_ptr<float>(), reinterpret_cast<const TF*>(left.data_ptr()),
          reinterpret_cast<const TF*>(right.data_ptr()), coef.data_ptr<float>(), logits.data_ptr<float>(), nz,
          start, ga_out.data_ptr<float>(), need_ga, need_dots, f, part, tile_gam);
    });
  });
  at::Tensor comp_dot = at::empty({K}, logits.options().dtype(at::kFloat));
  at::Tensor seg_gam = at::empty({S}, logits.options().dtype(at::kFloat));
  float* dot = comp_dot.data_ptr<float>();
  float* gam = seg_gam.data_ptr<float>();
  for (int64_t s = 0; s < S; ++s) {
    const int64_t ks = f.k1[s] - f.k0[s];
    std::vector<double> acc(static_cast<size_t>(ks), 0.0);
    double gs = 0.0;
    for (int64_t t = f.seg_first[s]; t < f.seg_first[s + 1]; ++t) {
      for (int64_t k = 0; k < ks; ++k) acc[k] += part[f.part_at[t] + k];
      gs += tile_gam[t];
    }
    for (int64_t k = 0; k < ks; ++k) dot[f.k0[s] + k] = static_cast<float>(acc[k]);
    gam[s] = static_cast<float>(gs);
  }
  return std::make_tuple(comp_dot, seg_gam);
}

}  // namespace

void register_lora(pybind11::module_& m) {
  m.def("lora_merge_apply", &lora_merge_apply,
        "in place: m_inout <- base + m_inout * seg_scale[s] * ((L_s * coef) @ R_s) (factored task vectors)",
        py::arg("base"), py::arg("left"), py::arg("right"), py::arg("rows"), py::arg("comp_offsets"),
        py::arg("coef"), py::arg("offsets"), py::arg("seg_scale"), py::arg("m_inout"));
  m.def("lora_backward_accumulate", &lora_backward_accumulate,
        "returns (comp_dot [K], seg_gam [S]) and writes ga_out = g * a (factored task vectors); need_ga / "
        "need_dots false skip ga_out and seg_gam / comp_dot (left zero); the mask's noise is drawn from the global "
        "index start on",
        py::arg("grad_out"), py::arg("left"), py::arg("right"), py::arg("rows"), py::arg("comp_offsets"),
        py::arg("coef"), py::arg("logits"), py::arg("offsets"), py::arg("seed"), py::arg("step"),
        py::arg("temperature"), py::arg("mode"), py::arg("ga_out"), py::arg("need_ga"), py::arg("need_dots"),
        py::arg("start") = 0);
}

}  // namespace pyfuse
