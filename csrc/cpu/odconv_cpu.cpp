// CPU kernels of odconv::odconv2d and odconv::odconv2d_backward (notation: csrc/odconv.h).
//
// What they compute, per sample b and group g, with the kernel matrix of a group being
// (Cout/G) x J, J = (Cin/G)*kh*kw, and cols_b[g] the J x P im2col matrix of x_b (P = Ho*Wo):
//
//   A[o,j]   = sum_k a[k] * W_k[o,j]                      aggregated kernel  (a = kernel_att[b])
//   m[j]     = ch[c] * s[u,v]           for j = (c,u,v)   (ch = channel_att[b], s = spatial_att[b])
//   Wb[o,j]  = f[o] * m[j] * A[o,j]                       per-sample kernel  (f = filter_att[b])
//
//   forward:   out_b[g]   = Wb[g] @ cols_b[g]                        (Cout/G x J) @ (J x P)
//   backward:  gy = grad_out[b] as (Cout x P)
//              grad_x_b   = col2im(Wb[g]^T @ gy[g])
//              Q          = gy[g] @ cols_b[g]^T                       gradient w.r.t. Wb
//              grad_f[o]  = sum_j Q[o,j] A[o,j] m[j]
//              grad_m[j]  = sum_o Q[o,j] A[o,j] f[o]
//                grad_ch[c]   = sum_uv grad_m[c,u,v] s[u,v]
//                grad_s[u,v]  = sum_c  grad_m[c,u,v] ch[c]             (summed over groups)
//              G[o,j]     = Q[o,j] f[o] m[j]                          gradient w.r.t. A
//              grad_a[k]  = <G, W_k>
//              grad_W[k] += a[k] G                                    summed over the batch
//
// Memory: no tensor ever holds the per-sample kernels (or kernel gradients) of the whole batch.
// Samples are split over threads (at::parallel_for); each thread works on one sample at a time
// with these working buffers, T being the kernel rows of one tile:
//   cols   (Cin*kh*kw, P)   im2col of x_b; not built for 1x1, stride-1, unpadded kernels
//   gcols  (Cin*kh*kw, P)   gradient of cols (backward, when grad_x is asked for)
//   agg    (T, J)           A for the rows of the tile (accumulation type)
//   kern   (T, J)           Wb for the rows of the tile (input type; the GEMM operand)
//   q      (T, J)           Q for the rows of the tile (backward)
// The backward keeps G for a chunk of Bc samples, (Bc, Cout*J) in the accumulation type, with
// Bc = max(threads, kChunkBytes / (Cout*J*sizeof)), and adds a_chunk^T @ G_chunk to grad_W with
// one GEMM per chunk. A tile is a set of whole groups (G > 1) or a range of output channels
// (G == 1) whose K slices of W_k fit in kTileBytes: W_k is streamed from memory once per sample
// and tile, and the aggregated rows are consumed by the GEMMs while they are still in cache.
//
// The matrix products go through ATen (at::mm / at::bmm and their accumulating forms), which
// reach MKL/oneDNN/OpenBLAS; inside the parallel region they run single-threaded, one sample per
// thread, which keeps both cores busy without synchronisation.
#include "../odconv.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

namespace odconv {
namespace {

constexpr int64_t kTileBytes = 512 * 1024;       // K slices of W_k per tile: about a quarter of L2
constexpr int64_t kChunkBytes = 32 * 1024 * 1024;  // G of one backward chunk of samples

// Rows of the kernel matrix handled together: groups [g0, g1) and, within each, rows [r0, r1).
struct Tile {
  int64_t g0, g1, r0, r1;
  int64_t groups() const { return g1 - g0; }
  int64_t rows() const { return r1 - r0; }
};

std::vector<Tile> make_tiles(const Geometry& g, int64_t elem_size) {
  const int64_t J = g.cols_per_group();
  const int64_t row_bytes = std::max<int64_t>(1, g.kernel_num * J * elem_size);
  const int64_t rows_per_tile = std::max<int64_t>(1, kTileBytes / row_bytes);
  std::vector<Tile> tiles;
  if (g.groups == 1) {
    // Equal-sized tiles (the last one is not left with a sliver).
    const int64_t n_tiles = (g.out_channels + rows_per_tile - 1) / rows_per_tile;
    const int64_t step = (g.out_channels + n_tiles - 1) / n_tiles;
    for (int64_t r = 0; r < g.out_channels; r += step)
      tiles.push_back({0, 1, r, std::min(g.out_channels, r + step)});
  } else {
    const int64_t groups_per_tile = std::max<int64_t>(1, rows_per_tile / g.out_per_group);
    for (int64_t gi = 0; gi < g.groups; gi += groups_per_tile)
      tiles.push_back({gi, std::min(g.groups, gi + groups_per_tile), 0, g.out_per_group});
  }
  return tiles;
}

// A strided (batch, rows, cols) matrix in memory owned by a working buffer or an input.
struct Mat {
  const void* ptr;
  int64_t batch, rows, cols;
  int64_t batch_stride, row_stride, col_stride;

  at::Tensor tensor(const at::TensorOptions& options) const {
    void* p = const_cast<void*>(ptr);
    if (batch == 1) return at::from_blob(p, {rows, cols}, {row_stride, col_stride}, options);
    return at::from_blob(p, {batch, rows, cols}, {batch_stride, row_stride, col_stride}, options);
  }
  Mat t() const { return {ptr, batch, cols, rows, batch_stride, col_stride, row_stride}; }
};

// c = a @ b (accumulate == false) or c += a @ b, for each matrix of the batch. A batch of one uses
// the plain matrix product, which has less overhead.
void batched_gemm(const Mat& c, const Mat& a, const Mat& b, bool accumulate, const at::TensorOptions& options) {
  at::Tensor ct = c.tensor(options);
  const at::Tensor at_ = a.tensor(options), bt = b.tensor(options);
  if (c.batch == 1) {
    if (accumulate)
      ct.addmm_(at_, bt);
    else
      at::mm_out(ct, at_, bt);
  } else {
    if (accumulate)
      ct.baddbmm_(at_, bt);
    else
      at::bmm_out(ct, at_, bt);
  }
}

// cols[(c*kh + u)*kw + v][oh*Wo + ow] = x[c][oh*sh - ph + u*dh][ow*sw - pw + v*dw] (0 outside).
template <typename scalar_t>
void im2col(const scalar_t* x, const Geometry& g, scalar_t* cols) {
  const int64_t H = g.height, W = g.width, Ho = g.out_h, Wo = g.out_w, P = Ho * Wo;
  for (int64_t c = 0; c < g.in_channels; ++c) {
    const scalar_t* xc = x + c * H * W;
    for (int64_t u = 0; u < g.kernel_h; ++u) {
      for (int64_t v = 0; v < g.kernel_w; ++v) {
        scalar_t* row = cols + ((c * g.kernel_h + u) * g.kernel_w + v) * P;
        const int64_t w_off = v * g.dil_w - g.pad_w;
        // Output columns whose input column lies inside the image: ow in [lo, hi).
        int64_t lo = w_off >= 0 ? 0 : (-w_off + g.stride_w - 1) / g.stride_w;
        int64_t hi = W - w_off <= 0 ? 0 : (W - w_off + g.stride_w - 1) / g.stride_w;
        lo = std::min(lo, Wo);
        hi = std::max(lo, std::min(hi, Wo));
        for (int64_t oh = 0; oh < Ho; ++oh) {
          scalar_t* out = row + oh * Wo;
          const int64_t ih = oh * g.stride_h - g.pad_h + u * g.dil_h;
          if (ih < 0 || ih >= H) {
            std::fill(out, out + Wo, scalar_t(0));
            continue;
          }
          const scalar_t* in = xc + ih * W + w_off;
          std::fill(out, out + lo, scalar_t(0));
          if (g.stride_w == 1) {
            std::memcpy(out + lo, in + lo, (hi - lo) * sizeof(scalar_t));
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) out[ow] = in[ow * g.stride_w];
          }
          std::fill(out + hi, out + Wo, scalar_t(0));
        }
      }
    }
  }
}

// The adjoint of im2col: gx[c][ih][iw] = sum of the gcols entries that im2col read from it.
template <typename scalar_t>
void col2im(const scalar_t* gcols, const Geometry& g, scalar_t* gx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = g.height, W = g.width, Ho = g.out_h, Wo = g.out_w, P = Ho * Wo;
  std::fill(gx, gx + g.in_channels * H * W, scalar_t(0));
  for (int64_t c = 0; c < g.in_channels; ++c) {
    scalar_t* gxc = gx + c * H * W;
    for (int64_t u = 0; u < g.kernel_h; ++u) {
      for (int64_t v = 0; v < g.kernel_w; ++v) {
        const scalar_t* row = gcols + ((c * g.kernel_h + u) * g.kernel_w + v) * P;
        const int64_t w_off = v * g.dil_w - g.pad_w;
        int64_t lo = w_off >= 0 ? 0 : (-w_off + g.stride_w - 1) / g.stride_w;
        int64_t hi = W - w_off <= 0 ? 0 : (W - w_off + g.stride_w - 1) / g.stride_w;
        lo = std::min(lo, Wo);
        hi = std::max(lo, std::min(hi, Wo));
        for (int64_t oh = 0; oh < Ho; ++oh) {
          const int64_t ih = oh * g.stride_h - g.pad_h + u * g.dil_h;
          if (ih < 0 || ih >= H) continue;
          const scalar_t* in = row + oh * Wo;
          scalar_t* out = gxc + ih * W + w_off;
#pragma omp simd
          for (int64_t ow = lo; ow < hi; ++ow)
            out[ow * g.stride_w] = static_cast<scalar_t>(static_cast<acc_t>(out[ow * g.stride_w]) + static_cast<acc_t>(in[ow]));
        }
      }
    }
  }
}

// m[gi*J + j] = ch[gi*Cg + c] * s[u,v] for every group gi and j = (c, u, v).
template <typename scalar_t, typename acc_t>
void input_scale(const scalar_t* ch, const scalar_t* s, const Geometry& g, acc_t* m) {
  const int64_t taps = g.taps();
  for (int64_t c = 0; c < g.in_channels; ++c) {
    const acc_t chv = static_cast<acc_t>(ch[c]);
    for (int64_t t = 0; t < taps; ++t) m[c * taps + t] = chv * static_cast<acc_t>(s[t]);
  }
}

// One row of the tile: agg[j] = sum_k a[k] * w[k*k_stride + j] (if kStoreAgg) and
// kern[j] = f * m[j] * agg[j], in a single pass over the K rows (K fixed at compile time so the
// k loop unrolls and the j loop vectorises).
template <int K, bool kStoreAgg, typename scalar_t, typename acc_t>
inline void aggregate_row(const scalar_t* __restrict__ w, int64_t k_stride, const acc_t* a, int64_t J, acc_t f,
                          const acc_t* __restrict__ m, acc_t* __restrict__ agg, scalar_t* __restrict__ kern) {
  acc_t ak[K];
  for (int k = 0; k < K; ++k) ak[k] = a[k];
#pragma omp simd
  for (int64_t j = 0; j < J; ++j) {
    acc_t sum = ak[0] * static_cast<acc_t>(w[j]);
    for (int k = 1; k < K; ++k) sum += ak[k] * static_cast<acc_t>(w[k * k_stride + j]);
    if constexpr (kStoreAgg) agg[j] = sum;
    kern[j] = static_cast<scalar_t>(sum * f * m[j]);
  }
}

// The same for any K: K passes through agg.
template <typename scalar_t, typename acc_t>
inline void aggregate_row_any_k(const scalar_t* __restrict__ w, int64_t k_stride, const acc_t* a, int64_t K, int64_t J,
                                acc_t f, const acc_t* __restrict__ m, acc_t* __restrict__ agg, scalar_t* __restrict__ kern) {
  const acc_t a0 = a[0];
#pragma omp simd
  for (int64_t j = 0; j < J; ++j) agg[j] = a0 * static_cast<acc_t>(w[j]);
  for (int64_t k = 1; k < K; ++k) {
    const acc_t ak = a[k];
    const scalar_t* __restrict__ wk = w + k * k_stride;
#pragma omp simd
    for (int64_t j = 0; j < J; ++j) agg[j] += ak * static_cast<acc_t>(wk[j]);
  }
#pragma omp simd
  for (int64_t j = 0; j < J; ++j) kern[j] = static_cast<scalar_t>(agg[j] * f * m[j]);
}

template <bool kStoreAgg, typename scalar_t, typename acc_t>
void aggregate_row_dispatch(const scalar_t* w, int64_t k_stride, const acc_t* a, int64_t K, int64_t J, acc_t f,
                            const acc_t* m, acc_t* agg, scalar_t* kern) {
  switch (K) {
    case 1: return aggregate_row<1, kStoreAgg>(w, k_stride, a, J, f, m, agg, kern);
    case 2: return aggregate_row<2, kStoreAgg>(w, k_stride, a, J, f, m, agg, kern);
    case 3: return aggregate_row<3, kStoreAgg>(w, k_stride, a, J, f, m, agg, kern);
    case 4: return aggregate_row<4, kStoreAgg>(w, k_stride, a, J, f, m, agg, kern);
    case 8: return aggregate_row<8, kStoreAgg>(w, k_stride, a, J, f, m, agg, kern);
    default: return aggregate_row_any_k(w, k_stride, a, K, J, f, m, agg, kern);
  }
}

// Fills kern (Wb) and, if kStoreAgg, agg (A) for the rows of one tile of a sample; both laid out
// (groups, rows, J).
template <bool kStoreAgg, typename scalar_t, typename acc_t>
void build_tile_kernel(
    const scalar_t* weight, const acc_t* a, const acc_t* f, const acc_t* m, const Geometry& g,
    const Tile& t, acc_t* agg, scalar_t* kern) {
  const int64_t J = g.cols_per_group(), K = g.kernel_num, k_stride = g.kernel_numel();
  for (int64_t gi = t.g0; gi < t.g1; ++gi) {
    for (int64_t r = t.r0; r < t.r1; ++r) {
      const int64_t o = gi * g.out_per_group + r;
      const int64_t slot = ((gi - t.g0) * t.rows() + (r - t.r0)) * J;
      aggregate_row_dispatch<kStoreAgg>(weight + o * J, k_stride, a, K, J, f[o], m + gi * J, agg + slot, kern + slot);
    }
  }
}

template <typename scalar_t>
at::Tensor forward_kernel(
    const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& ch_in, const at::Tensor& f_in,
    const at::Tensor& s_in, const at::Tensor& a_in, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor ch = ch_in.contiguous(), s = s_in.contiguous();
  const at::Tensor f = f_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const at::Tensor a = a_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, x.options());
  if (g.batch == 0) return out;

  const int64_t J = g.cols_per_group(), P = g.out_pixels(), Cog = g.out_per_group;
  const int64_t x_stride = g.in_channels * g.height * g.width;
  const bool direct = g.im2col_is_identity();
  const std::vector<Tile> tiles = make_tiles(g, sizeof(scalar_t));
  int64_t max_tile = 0;
  for (const Tile& t : tiles) max_tile = std::max(max_tile, t.groups() * t.rows() * J);
  const auto opts = x.options();
  const auto acc_opts = opts.dtype(c10::CppTypeToScalarType<acc_t>::value);

  at::parallel_for(0, g.batch, 1, [&](int64_t b_begin, int64_t b_end) {
    at::Tensor cols_buf = direct ? at::Tensor() : at::empty({g.groups * J * P}, opts);
    at::Tensor agg_buf = at::empty({max_tile}, acc_opts);
    at::Tensor kern_buf = at::empty({max_tile}, opts);
    at::Tensor m_buf = at::empty({g.groups * J}, acc_opts);
    acc_t* agg = agg_buf.data_ptr<acc_t>();
    scalar_t* kern = kern_buf.data_ptr<scalar_t>();
    acc_t* m = m_buf.data_ptr<acc_t>();
    for (int64_t b = b_begin; b < b_end; ++b) {
      const scalar_t* xb = x.const_data_ptr<scalar_t>() + b * x_stride;
      const scalar_t* cols = xb;
      if (!direct) {
        im2col(xb, g, cols_buf.data_ptr<scalar_t>());
        cols = cols_buf.const_data_ptr<scalar_t>();
      }
      input_scale(ch.const_data_ptr<scalar_t>() + b * g.in_channels, s.const_data_ptr<scalar_t>() + b * g.taps(), g, m);
      scalar_t* yb = out.data_ptr<scalar_t>() + b * g.out_channels * P;
      for (const Tile& t : tiles) {
        build_tile_kernel</*kStoreAgg=*/false>(
            weight.const_data_ptr<scalar_t>(), a.const_data_ptr<acc_t>() + b * g.kernel_num,
            f.const_data_ptr<acc_t>() + b * g.out_channels, m, g, t, agg, kern);
        const int64_t nG = t.groups(), T = t.rows();
        batched_gemm(
            Mat{yb + (t.g0 * Cog + t.r0) * P, nG, T, P, Cog * P, P, 1},
            Mat{kern, nG, T, J, T * J, J, 1},
            Mat{cols + t.g0 * J * P, nG, J, P, J * P, P, 1},
            /*accumulate=*/false, opts);
      }
    }
  });
  return out;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_kernel(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight_in,
    const at::Tensor& ch_in, const at::Tensor& f_in, const at::Tensor& s_in, const at::Tensor& a_in,
    const Geometry& g, bool want_x, bool want_params) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor gy = grad_out_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor ch = ch_in.to(acc_type).contiguous(), s = s_in.to(acc_type).contiguous();
  const at::Tensor f = f_in.to(acc_type).contiguous(), a = a_in.to(acc_type).contiguous();
  const auto opts = x.options();
  const auto acc_opts = opts.dtype(acc_type);

  at::Tensor grad_x = want_x ? at::empty_like(x) : at::zeros_like(x);
  // Parameter gradients accumulate in acc_t and are cast back at the end.
  at::Tensor grad_w = at::zeros({g.kernel_num, g.kernel_numel()}, acc_opts);
  at::Tensor grad_ch = at::zeros({g.batch, g.in_channels}, acc_opts);
  at::Tensor grad_f = at::zeros({g.batch, g.out_channels}, acc_opts);
  at::Tensor grad_s = at::zeros({g.batch, g.taps()}, acc_opts);
  at::Tensor grad_a = want_params ? at::empty({g.batch, g.kernel_num}, acc_opts) : at::zeros({g.batch, g.kernel_num}, acc_opts);

  const int64_t J = g.cols_per_group(), P = g.out_pixels(), Cog = g.out_per_group;
  const int64_t K = g.kernel_num, N = g.kernel_numel(), taps = g.taps();
  const int64_t x_stride = g.in_channels * g.height * g.width;
  const bool direct = g.im2col_is_identity();
  const std::vector<Tile> tiles = make_tiles(g, sizeof(scalar_t));
  int64_t max_tile = 0;
  for (const Tile& t : tiles) max_tile = std::max(max_tile, t.groups() * t.rows() * J);

  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t chunk = std::max<int64_t>(threads, kChunkBytes / std::max<int64_t>(1, N * (int64_t)sizeof(acc_t)));
  chunk = std::min(chunk, std::max<int64_t>(1, g.batch));
  at::Tensor g_chunk = want_params ? at::empty({chunk, N}, acc_opts) : at::Tensor();

  const scalar_t* w_ptr = weight.const_data_ptr<scalar_t>();
  const at::Tensor weight_acc = want_params ? weight.to(acc_type).view({K, N}) : at::Tensor();
  for (int64_t c0 = 0; c0 < g.batch && (want_x || want_params); c0 += chunk) {
    const int64_t c1 = std::min(g.batch, c0 + chunk);
    at::parallel_for(c0, c1, 1, [&](int64_t b_begin, int64_t b_end) {
      at::Tensor cols_buf = (direct || !want_params) ? at::Tensor() : at::empty({g.groups * J * P}, opts);
      at::Tensor gcols_buf = (direct || !want_x) ? at::Tensor() : at::empty({g.groups * J * P}, opts);
      at::Tensor agg_buf = at::empty({max_tile}, acc_opts);
      at::Tensor kern_buf = at::empty({max_tile}, opts);
      at::Tensor q_buf = want_params ? at::empty({max_tile}, opts) : at::Tensor();
      at::Tensor m_buf = at::empty({g.groups * J}, acc_opts);
      at::Tensor gm_buf = at::empty({g.groups * J}, acc_opts);
      acc_t* agg = agg_buf.data_ptr<acc_t>();
      scalar_t* kern = kern_buf.data_ptr<scalar_t>();
      acc_t* m = m_buf.data_ptr<acc_t>();
      acc_t* gm = gm_buf.data_ptr<acc_t>();

      for (int64_t b = b_begin; b < b_end; ++b) {
        const scalar_t* xb = x.const_data_ptr<scalar_t>() + b * x_stride;
        const scalar_t* gyb = gy.const_data_ptr<scalar_t>() + b * g.out_channels * P;
        const acc_t* ab = a.const_data_ptr<acc_t>() + b * K;
        const acc_t* fb = f.const_data_ptr<acc_t>() + b * g.out_channels;
        const acc_t* chb = ch.const_data_ptr<acc_t>() + b * g.in_channels;
        const acc_t* sb = s.const_data_ptr<acc_t>() + b * taps;
        const scalar_t* cols = xb;
        if (want_params && !direct) {
          im2col(xb, g, cols_buf.data_ptr<scalar_t>());
          cols = cols_buf.const_data_ptr<scalar_t>();
        }
        scalar_t* gcols = direct ? grad_x.data_ptr<scalar_t>() + b * x_stride
                                 : (want_x ? gcols_buf.data_ptr<scalar_t>() : nullptr);
        input_scale(chb, sb, g, m);
        std::fill(gm, gm + g.groups * J, acc_t(0));
        acc_t* gf_b = grad_f.data_ptr<acc_t>() + b * g.out_channels;
        acc_t* gchunk_b = want_params ? g_chunk.data_ptr<acc_t>() + (b - c0) * N : nullptr;

        bool first_tile = true;
        for (const Tile& t : tiles) {
          build_tile_kernel</*kStoreAgg=*/true>(w_ptr, ab, fb, m, g, t, agg, kern);
          const int64_t nG = t.groups(), T = t.rows();
          const Mat gy_tile{gyb + (t.g0 * Cog + t.r0) * P, nG, T, P, Cog * P, P, 1};
          if (want_x) {
            // gcols[g] (+)= Wb[g]^T @ gy[g]; the tiles of one group (G == 1) accumulate.
            batched_gemm(
                Mat{gcols + t.g0 * J * P, nG, J, P, J * P, P, 1}, Mat{kern, nG, T, J, T * J, J, 1}.t(), gy_tile,
                /*accumulate=*/g.groups == 1 && !first_tile, opts);
          }
          first_tile = false;
          if (!want_params) continue;
          // Q = gy[g] @ cols[g]^T for the rows of the tile.
          scalar_t* q = q_buf.data_ptr<scalar_t>();
          batched_gemm(
              Mat{q, nG, T, J, T * J, J, 1}, gy_tile, Mat{cols + t.g0 * J * P, nG, J, P, J * P, P, 1}.t(),
              /*accumulate=*/false, opts);
          for (int64_t gi = t.g0; gi < t.g1; ++gi) {
            const acc_t* __restrict__ mg = m + gi * J;
            acc_t* __restrict__ gmg = gm + gi * J;
            for (int64_t r = t.r0; r < t.r1; ++r) {
              const int64_t o = gi * Cog + r;
              const int64_t slot = ((gi - t.g0) * T + (r - t.r0)) * J;
              const scalar_t* __restrict__ q_row = q + slot;
              const acc_t* __restrict__ agg_row = agg + slot;
              acc_t* __restrict__ g_row = gchunk_b + o * J;
              const acc_t fo = fb[o];
              acc_t gf = 0;
#pragma omp simd reduction(+ : gf)
              for (int64_t j = 0; j < J; ++j) {
                const acc_t qv = static_cast<acc_t>(q_row[j]);
                const acc_t rv = qv * agg_row[j];
                gf += rv * mg[j];
                gmg[j] += rv * fo;
                g_row[j] = qv * fo * mg[j];
              }
              gf_b[o] = gf;
            }
          }
        }
        if (want_x && !direct) col2im(gcols, g, grad_x.data_ptr<scalar_t>() + b * x_stride);
        if (want_params) {
          acc_t* gch_b = grad_ch.data_ptr<acc_t>() + b * g.in_channels;
          acc_t* gs_b = grad_s.data_ptr<acc_t>() + b * taps;
          for (int64_t c = 0; c < g.in_channels; ++c) {
            acc_t sum_c = 0;
            for (int64_t tp = 0; tp < taps; ++tp) {
              const acc_t v = gm[c * taps + tp];
              sum_c += v * sb[tp];
              gs_b[tp] += v * chb[c];
            }
            gch_b[c] = sum_c;
          }
        }
      }
    });
    if (want_params) {
      // Two products over the chunk, run by all threads:
      //   grad_W += a[c0:c1]^T @ G_chunk          (K x Bc) @ (Bc x Cout*J)
      //   grad_a[c0:c1] = G_chunk @ W^T            (Bc x Cout*J) @ (Cout*J x K)
      const at::Tensor g_rows = g_chunk.narrow(0, 0, c1 - c0);
      grad_w.addmm_(a.narrow(0, c0, c1 - c0).t(), g_rows);
      at::Tensor grad_a_rows = grad_a.narrow(0, c0, c1 - c0);
      at::mm_out(grad_a_rows, g_rows, weight_acc.t());
    }
  }

  const auto dtype = x.scalar_type();
  return std::make_tuple(
      grad_x, grad_w.view(weight.sizes()).to(dtype), grad_ch.to(dtype), grad_f.to(dtype),
      grad_s.view({g.batch, g.kernel_h, g.kernel_w}).to(dtype), grad_a.to(dtype));
}

at::Tensor odconv2d_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& channel_att,
    const at::Tensor& filter_att, const at::Tensor& spatial_att, const at::Tensor& kernel_att,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const Geometry g = check_inputs(
      "odconv2d", x, weight, channel_att, filter_att, spatial_att, kernel_att, stride, padding,
      dilation, groups);
  TORCH_CHECK(x.device().is_cpu(), "odconv2d: the CPU kernel got x on ", x.device());
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "odconv2d_cpu", [&] {
    out = forward_kernel<scalar_t>(x, weight, channel_att, filter_att, spatial_att, kernel_att, g);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> odconv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& channel_att, const at::Tensor& filter_att, const at::Tensor& spatial_att,
    const at::Tensor& kernel_att, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, std::array<bool, 2> output_mask) {
  const Geometry g = check_inputs(
      "odconv2d_backward", x, weight, channel_att, filter_att, spatial_att, kernel_att, stride,
      padding, dilation, groups);
  check_grad_out("odconv2d_backward", grad_out, x, g);
  TORCH_CHECK(x.device().is_cpu(), "odconv2d_backward: the CPU kernel got x on ", x.device());
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "odconv2d_backward_cpu", [&] {
    grads = backward_kernel<scalar_t>(
        grad_out, x, weight, channel_att, filter_att, spatial_att, kernel_att, g, output_mask[0],
        output_mask[1]);
  });
  return grads;
}

} // namespace
} // namespace odconv

TORCH_LIBRARY_IMPL(odconv, CPU, m) {
  m.impl("odconv2d", &odconv::odconv2d_cpu);
  m.impl("odconv2d_backward", &odconv::odconv2d_backward_cpu);
}
