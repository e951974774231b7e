// Depthwise ODConv layers on the CPU (groups == Cin == Cout: one input and one output channel per
// group), sixteen channels at a time (notation: csrc/odconv.h).
//
// A depthwise layer's per-sample kernel is one kh x kw plane per channel. With t = u*kw + v a tap,
// fc = f[b,c] * ch[b,c] and A[t] = sum_k a[b,k] W_k[c,t]:
//   w[t]              = fc * s[b,t] * A[t]
//   out[b,c,oh,ow]    = sum_t w[t] * x[b,c, oh*sh - ph + u*dh, ow*sw - pw + v*dw]   (taps inside the map)
// and the backward, with gy = grad_out[b,c] and gk[t] = sum_{oh,ow} gy[oh,ow] * x[b,c, (the same pixel)]
// the gradient w.r.t. w[t]:
//   grad_x[b,c, that pixel] += w[t] * gy[oh,ow]
//   gA[t]             = gk[t] * fc * s[b,t]
//   grad_W_k[c,t]    += a[b,k] * gA[t]                      (summed over the batch)
//   grad_a[b,k]      += sum_t gA[t] * W_k[c,t]              (summed over the channels)
//   grad_s[b,t]      += gk[t] * fc * A[t]                   (summed over the channels)
//   grad_f[b,c]       = ch[b,c] * sum_t gk[t] s[b,t] A[t],  grad_ch[b,c] = f[b,c] * (the same sum)
//
// Why not the convolution primitive (the path depthwise layers took before, and still take with a channel
// multiplier or ODCONV_CPU_DEPTHWISE=never): oneDNN's depthwise kernels work on channel-blocked copies, so
// each call reorders x, out and the weights, and with per-sample kernels the weights are B*C*kh*kw
// values, as many as x itself for a 7x7 kernel on a 7x7 map; its backward of per-sample kernels ran
// several times its forward. Here a block of kLanes channels of one sample is gathered into
// channels-last buffers (pixel-major, kLanes values a pixel), so that every tap of every output pixel
// is one vector multiply-add over the block's channels, and only the taps inside the map are visited
// (as a direct convolution skips the padding; an im2col product multiplies its zeros).
// Buffers per task (L = kLanes, Ho*Wo = P, H*W = the input plane):
//   xb   (H*W, L)    x of the block, channels-last (lanes past the last channel: 0)
//   yb   (P, L)      out of the block (forward), or gy of the block (backward)
//   gxb  (H*W, L)    grad_x of the block (backward)
//   A, w (taps, L)   A and the kernel of each channel; gk (taps, L) the gradient w.r.t. w
// With unit stride the backward's grad_x is the forward's loop run on gy with the kernel flipped
// (input_gradient_geometry). The forward's tasks are (sample, block) pairs. The backward's are blocks of channels for a slice of the
// batch: each sums grad_W of its block and grad_a, grad_s of its samples into its own buffer, and those
// are added up after, in task order (grad_f and grad_ch of a (sample, channel) have one writer).
#include "depthwise_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace odconv {
namespace {

constexpr int64_t kLanes = 16;  // channels per block: a float32 vector of AVX-512

// The range [lo, hi) of kernel taps along one axis that fall inside [0, size) for output position o.
inline void taps_inside(int64_t o, int64_t stride, int64_t pad, int64_t dil, int64_t kernel, int64_t size,
                        int64_t& lo, int64_t& hi) {
  const int64_t first = o * stride - pad;  // input position of tap 0
  lo = first >= 0 ? 0 : (-first + dil - 1) / dil;
  hi = size - first <= 0 ? 0 : std::min(kernel, (size - first + dil - 1) / dil);
  lo = std::min(lo, hi);
}

// Per output row and column, the taps inside the map (computed once per call).
struct TapRanges {
  std::vector<int64_t> u_lo, u_hi, v_lo, v_hi;
  explicit TapRanges(const Geometry& g)
      : u_lo(g.out_h), u_hi(g.out_h), v_lo(g.out_w), v_hi(g.out_w) {
    for (int64_t oh = 0; oh < g.out_h; ++oh)
      taps_inside(oh, g.stride_h, g.pad_h, g.dil_h, g.kernel_h, g.height, u_lo[oh], u_hi[oh]);
    for (int64_t ow = 0; ow < g.out_w; ++ow)
      taps_inside(ow, g.stride_w, g.pad_w, g.dil_w, g.kernel_w, g.width, v_lo[ow], v_hi[ow]);
  }
};

#if defined(__AVX512F__)
// (GCC 12 warns that the unpack and shuffle intrinsics' internal __Y is (or may be) used uninitialized: a false
// positive of their headers.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// out rows j < n_out (16 floats each, ldo apart) = column j of the 16 x 16 block whose row i < n_in is at
// in + i * ldi (rows past n_in: zeros).
inline void transpose_16x16(const float* in, int64_t ldi, int64_t n_in, float* out, int64_t ldo, int64_t n_out) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = i < n_in ? _mm512_loadu_ps(in + i * ldi) : _mm512_setzero_ps();
  for (int i = 0; i < 16; i += 2) {  // 32-bit interleave of row pairs
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // 64-bit interleave: r[i + j] holds columns j, j + 4, j + 8, j + 12 of rows i..i+3
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  for (int j = 0; j < 4; ++j) {  // 128-bit lanes: columns j, j + 4, j + 8, j + 12
    const __m512 v0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88), v1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xdd);
    const __m512 w0 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    const __m512 w1 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xdd);
    const __m512 c[4] = {_mm512_shuffle_f32x4(v0, w0, 0x88), _mm512_shuffle_f32x4(v1, w1, 0x88),
                         _mm512_shuffle_f32x4(v0, w0, 0xdd), _mm512_shuffle_f32x4(v1, w1, 0xdd)};
    for (int q = 0; q < 4; ++q)
      if (j + 4 * q < n_out) _mm512_storeu_ps(out + (j + 4 * q) * ldo, c[q]);
  }
}
#pragma GCC diagnostic pop
#endif

// dst[e * kLanes + l] = src[l * plane + e] for lanes l < n (the others 0), e < plane.
template <typename scalar_t>
void gather_lanes(const scalar_t* src, int64_t plane, int64_t n, scalar_t* dst) {
  int64_t e0 = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float>)
    for (; e0 + 16 <= plane; e0 += 16) transpose_16x16(src + e0, plane, n, dst + e0 * kLanes, kLanes, 16);
#endif
  for (int64_t e = e0; e < plane; ++e) {
    for (int64_t l = 0; l < n; ++l) dst[e * kLanes + l] = src[l * plane + e];
    for (int64_t l = n; l < kLanes; ++l) dst[e * kLanes + l] = scalar_t(0);
  }
}

// dst[l * plane + e] = src[e * kLanes + l] for lanes l < n.
template <typename scalar_t>
void scatter_lanes(const scalar_t* src, int64_t plane, int64_t n, scalar_t* dst) {
  int64_t e0 = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float>)
    for (; e0 + 16 <= plane; e0 += 16) transpose_16x16(src + e0 * kLanes, kLanes, 16, dst + e0, plane, n);
#endif
  for (int64_t l = 0; l < n; ++l)
    for (int64_t e = e0; e < plane; ++e) dst[l * plane + e] = src[e * kLanes + l];
}

// The K kernels with the channels last, block by block of kLanes channels: (K, blocks, taps, L), lanes past
// the last channel 0. A block's kernel k is then taps x L consecutive values, built from its (L, taps) rows
// of W_k by gather_lanes (16 x 16 transposes on AVX-512), in parallel over the K x blocks slices. (It was a
// serial scalar loop into (K, taps, C) while the other threads waited: benchmarks/ab_env.py with a temporary
// switch, 10 rounds, Zen 4 EPYC, results/ab_depthwise_kernels_block_major_avx512_cpu.json: forward 0.94 on
// B32 960 channels 7x7 3x3, 0.96 on 384 channels 14x14 3x3, 0.98 on 768 channels 7x7 7x7, 0.99-1.02 on
// larger maps; backward 0.97-1.03.)
template <typename scalar_t>
std::vector<scalar_t> kernels_channels_last(const at::Tensor& weight, const Geometry& g) {
  const int64_t C = g.out_channels, taps = g.taps(), K = g.kernel_num, blocks = (C + kLanes - 1) / kLanes;
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  std::vector<scalar_t> wt(K * blocks * taps * kLanes);
  at::parallel_for(0, K * blocks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t k = i / blocks, c0 = (i % blocks) * kLanes;
      gather_lanes(w + (k * C + c0) * taps, taps, std::min(kLanes, C - c0), wt.data() + i * taps * kLanes);
    }
  });
  return wt;
}

// Kernel k of the block of channels [c0, c0 + kLanes) in wt (kernels_channels_last): taps x L values.
template <typename scalar_t>
inline const scalar_t* block_kernel(const scalar_t* wt, const Geometry& g, int64_t k, int64_t c0) {
  const int64_t blocks = (g.out_channels + kLanes - 1) / kLanes;
  return wt + (k * blocks + c0 / kLanes) * g.taps() * kLanes;
}

// A (taps, L) and w (taps, L) of the block of channels [c0, c0 + kLanes) of sample b from wt
// (kernels_channels_last); fc (L) = f * ch of those channels (0 past the last channel).
template <typename scalar_t>
void block_kernels(const scalar_t* wt, const scalar_t* fc, const scalar_t* s, const scalar_t* a, const Geometry& g,
                   int64_t c0, scalar_t* __restrict__ A, scalar_t* __restrict__ w) {
  const int64_t taps = g.taps(), K = g.kernel_num;
  for (int64_t t = 0; t < taps; ++t) {
    scalar_t* __restrict__ At = A + t * kLanes;
    const scalar_t* __restrict__ w0 = block_kernel(wt, g, 0, c0) + t * kLanes;
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) At[l] = a[0] * w0[l];
    for (int64_t k = 1; k < K; ++k) {
      const scalar_t* __restrict__ wk = block_kernel(wt, g, k, c0) + t * kLanes;
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) At[l] += a[k] * wk[l];
    }
    const scalar_t st = s[t];
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) w[t * kLanes + l] = fc[l] * st * At[l];
  }
}

// fc[l] = f[b, c0 + l] * ch[b, c0 + l] for the block's n channels, 0 for the other lanes.
template <typename scalar_t>
inline void block_scales(const scalar_t* f, const scalar_t* ch, int64_t n, scalar_t* fc) {
  for (int64_t l = 0; l < kLanes; ++l) fc[l] = l < n ? f[l] * ch[l] : scalar_t(0);
}

// yb (P, L) = the block's output from xb and w, over the taps inside the map. Runs of output pixels whose
// taps all lie inside the map share each tap's load of w, their sums in registers (runs of kInteriorRun
// first in float32 on AVX-512, interior_run8; then of kPixels); the others, at the borders, go one by one
// over their taps inside the map.
constexpr int64_t kPixels = 4;

#if defined(__AVX512F__)
// out (8, L) = 8 consecutive output pixels of a row whose taps all lie inside the map (along the row; rows
// [u_lo, u_hi) of the kernel), their 8 sums in registers: each tap's kernel is loaded once per 8 pixels, and
// each multiply-add is one 512-bit instruction (GCC 12 compiles the kPixels loop below to pairs of 256-bit
// ones: -march=native prefers 256-bit vectors). block_forward takes it first, in float32 on AVX-512; the
// kPixels runs and single pixels finish the row. (benchmarks/ab_env.py, a temporary switch, 5 rounds,
// memory kept, Intel Xeon, results/ab_depthwise_interior_run8_intel.json: forward 0.83 on B32 144 channels
// 56x56 3x3, 0.88 on 32 channels 112x112, 0.93 on 96 channels 112x112 stride 2, 0.93 on 28x28 7x7, 0.93 on
// 14x14 3x3, 0.96 on 28x28 5x5, 0.99-1.03 with 7x7 kernels on 56x56, 14x14 and 7x7 (no run of 8 on 7x7);
// backward, whose grad_x runs this loop, 0.94-0.98, 1.01-1.03 on 112x112 stride 2 and 28x28 5x5. Against
// the build before, benchmarks/ab_builds.py --paired, one thread, 4 rounds,
// results/ab_depthwise_interior_run8_paired_intel.json: forward 0.93-0.97 on seven depthwise layers, 1.03
// [0.88-1.15] on B64 128 channels 16x16; backward 0.96-1.02. Not measured on the EPYCs, whose AVX-512 units
// split 512-bit instructions in two.)
constexpr int64_t kInteriorRun = 8;

// x_col points at the input column of tap v = 0 of the first pixel in row 0 of xb; input row ih0 + u * dil_h
// is read for kernel row u.
// XS is the step between the pixels' inputs (stride_w * kLanes) when known at compile time (strides 1 and 2:
// immediate offsets), 0 for the argument xs_step (GCC 12 then spills the eight offsets and reloads them
// at every tap, as many loads as the multiply-adds' own: benchmarks/ab_env.py against that with a temporary
// switch, 5 rounds, Intel Xeon, results/ab_depthwise_run8_immediate_offsets_intel.json: forward 0.97 with
// 7x7 kernels on 56x56-14x14 and on 112x112 3x3, 0.99 on the others; backward 0.98-1.02).
template <int64_t XS>
inline void interior_run8(const float* __restrict__ x_col, const float* __restrict__ w, int64_t ih0, int64_t dil_h,
                          int64_t u_lo, int64_t u_hi, int64_t kw, int64_t row_size, int64_t v_step, int64_t xs_step,
                          float* __restrict__ out) {
  const int64_t step = XS > 0 ? XS : xs_step;
  __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
  for (int64_t u = u_lo; u < u_hi; ++u) {
    const float* xr = x_col + (ih0 + u * dil_h) * row_size;
    const float* wr = w + u * kw * kLanes;
    for (int64_t v = 0; v < kw; ++v) {
      const __m512 wv = _mm512_loadu_ps(wr + v * kLanes);
      const float* xs = xr + v * v_step;
      c0 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xs), c0);
      c1 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xs + step), c1);
      c2 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xs + 2 * step), c2);
      c3 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xs + 3 * step), c3);
      c4 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xs + 4 * step), c4);
      c5 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xs + 5 * step), c5);
      c6 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xs + 6 * step), c6);
      c7 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xs + 7 * step), c7);
    }
  }
  _mm512_storeu_ps(out, c0);
  _mm512_storeu_ps(out + kLanes, c1);
  _mm512_storeu_ps(out + 2 * kLanes, c2);
  _mm512_storeu_ps(out + 3 * kLanes, c3);
  _mm512_storeu_ps(out + 4 * kLanes, c4);
  _mm512_storeu_ps(out + 5 * kLanes, c5);
  _mm512_storeu_ps(out + 6 * kLanes, c6);
  _mm512_storeu_ps(out + 7 * kLanes, c7);
}
#endif

template <typename scalar_t>
void block_forward(const scalar_t* __restrict__ xb, const scalar_t* __restrict__ w, const Geometry& g,
                   const TapRanges& r, scalar_t* __restrict__ yb) {
  const int64_t L = kLanes, kw = g.kernel_w, xs_step = g.stride_w * L, v_step = g.dil_w * L;
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    const int64_t u_lo = r.u_lo[oh], u_hi = r.u_hi[oh];
    int64_t ow = 0;
    while (ow < g.out_w) {
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (r.v_lo[ow] == 0 && ow + kInteriorRun <= g.out_w && r.v_hi[ow + kInteriorRun - 1] == kw) {
          const int64_t ih0 = oh * g.stride_h - g.pad_h;
          const float* x_col = xb + (ow * g.stride_w - g.pad_w) * L;
          float* out = yb + (oh * g.out_w + ow) * L;
          if (g.stride_w == 1)
            interior_run8<kLanes>(x_col, w, ih0, g.dil_h, u_lo, u_hi, kw, g.width * L, v_step, xs_step, out);
          else if (g.stride_w == 2)
            interior_run8<2 * kLanes>(x_col, w, ih0, g.dil_h, u_lo, u_hi, kw, g.width * L, v_step, xs_step, out);
          else
            interior_run8<0>(x_col, w, ih0, g.dil_h, u_lo, u_hi, kw, g.width * L, v_step, xs_step, out);
          ow += kInteriorRun;
          continue;
        }
      }
#endif
      if (r.v_lo[ow] == 0 && r.v_hi[ow] == kw && ow + kPixels <= g.out_w && r.v_hi[ow + kPixels - 1] == kw) {
        scalar_t a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
        for (int64_t u = u_lo; u < u_hi; ++u) {
          const int64_t ih = oh * g.stride_h - g.pad_h + u * g.dil_h;
          const scalar_t* xrow = xb + (ih * g.width + ow * g.stride_w - g.pad_w) * L;
          const scalar_t* wrow = w + u * kw * L;
          for (int64_t v = 0; v < kw; ++v) {
            const scalar_t* __restrict__ ws = wrow + v * L;
            const scalar_t* __restrict__ x0 = xrow + v * v_step;
            const scalar_t* __restrict__ x1 = x0 + xs_step;
            const scalar_t* __restrict__ x2 = x1 + xs_step;
            const scalar_t* __restrict__ x3 = x2 + xs_step;
#pragma omp simd
            for (int64_t l = 0; l < kLanes; ++l) {
              a0[l] += ws[l] * x0[l];
              a1[l] += ws[l] * x1[l];
              a2[l] += ws[l] * x2[l];
              a3[l] += ws[l] * x3[l];
            }
          }
        }
        scalar_t* out = yb + (oh * g.out_w + ow) * L;
        std::copy_n(a0, L, out);
        std::copy_n(a1, L, out + L);
        std::copy_n(a2, L, out + 2 * L);
        std::copy_n(a3, L, out + 3 * L);
        ow += kPixels;
        continue;
      }
      scalar_t acc[kLanes] = {};
      for (int64_t u = u_lo; u < u_hi; ++u) {
        const int64_t ih = oh * g.stride_h - g.pad_h + u * g.dil_h;
        for (int64_t v = r.v_lo[ow]; v < r.v_hi[ow]; ++v) {
          const int64_t iw = ow * g.stride_w - g.pad_w + v * g.dil_w;
          const scalar_t* __restrict__ xs = xb + (ih * g.width + iw) * L;
          const scalar_t* __restrict__ ws = w + (u * kw + v) * L;
#pragma omp simd
          for (int64_t l = 0; l < kLanes; ++l) acc[l] += ws[l] * xs[l];
        }
      }
      std::copy_n(acc, L, yb + (oh * g.out_w + ow) * L);
      ++ow;
    }
  }
}

// gxb (H*W, L) = the block's grad_x (if gxb) and gk (taps, L) its gradient w.r.t. w (if gk), from gyb and
// xb, over the taps inside the map.
template <typename scalar_t>
void block_backward(const scalar_t* __restrict__ xb, const scalar_t* __restrict__ gyb, const scalar_t* __restrict__ w,
                    const Geometry& g, const TapRanges& r, scalar_t* __restrict__ gxb, scalar_t* __restrict__ gk) {
  if (gxb != nullptr) std::fill_n(gxb, g.height * g.width * kLanes, scalar_t(0));
  if (gk != nullptr) std::fill_n(gk, g.taps() * kLanes, scalar_t(0));
  for (int64_t oh = 0; oh < g.out_h; ++oh)
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      const scalar_t* __restrict__ gys = gyb + (oh * g.out_w + ow) * kLanes;
      for (int64_t u = r.u_lo[oh]; u < r.u_hi[oh]; ++u) {
        const int64_t ih = oh * g.stride_h - g.pad_h + u * g.dil_h;
        for (int64_t v = r.v_lo[ow]; v < r.v_hi[ow]; ++v) {
          const int64_t iw = ow * g.stride_w - g.pad_w + v * g.dil_w, t = u * g.kernel_w + v;
          const int64_t e = (ih * g.width + iw) * kLanes;
          if (gxb != nullptr) {
            const scalar_t* __restrict__ ws = w + t * kLanes;
            scalar_t* __restrict__ gxs = gxb + e;
#pragma omp simd
            for (int64_t l = 0; l < kLanes; ++l) gxs[l] += ws[l] * gys[l];
          }
          if (gk != nullptr) {
            const scalar_t* __restrict__ xs = xb + e;
            scalar_t* __restrict__ gks = gk + t * kLanes;
#pragma omp simd
            for (int64_t l = 0; l < kLanes; ++l) gks[l] += gys[l] * xs[l];
          }
        }
      }
    }
}

// With unit stride grad_x is a forward of gy through the kernel flipped in both axes: input gy (Ho x Wo),
// output grad_x (H x W), padding dil * (k - 1) - pad. block_forward then keeps kPixels pixels' sums in
// registers, where block_backward adds into gxb at every tap. (benchmarks/ab_env.py against the adds with a
// temporary switch, 4 rounds, memory kept, Zen 4 EPYC, results/ab_depthwise_gx_by_forward_avx512_cpu.json:
// backward 0.74 on B32 96 channels 56x56 with 7x7 kernels, 0.81 on 144 channels 56x56, 0.90-0.92 on 112x112,
// 16x16 and 28x28 5x5, 0.96-1.00 on 14x14 and 7x7 3x3; 1.06 with a 7x7 kernel on 7x7 maps, which has no
// run of interior pixels and keeps the adds.)
Geometry input_gradient_geometry(const Geometry& g) {
  Geometry t = g;
  t.height = g.out_h;
  t.width = g.out_w;
  t.out_h = g.height;
  t.out_w = g.width;
  t.pad_h = g.dil_h * (g.kernel_h - 1) - g.pad_h;
  t.pad_w = g.dil_w * (g.kernel_w - 1) - g.pad_w;
  return t;
}

template <typename scalar_t>
void flip_kernel(const scalar_t* w, const Geometry& g, scalar_t* wf) {
  const int64_t taps = g.taps();
  for (int64_t t = 0; t < taps; ++t) std::copy_n(w + (taps - 1 - t) * kLanes, kLanes, wf + t * kLanes);
}

#if defined(__AVX512F__)
// float32 rows of up to 8 output pixels at a time, their 8 sums in registers, each tap's kernel loaded once per
// 8 pixels and multiplied into the pixels whose input column lies inside the map: on small maps, where
// block_forward finds few or no runs of interior pixels (a 7x7 kernel on a 7x7 map has none) and goes pixel
// by pixel. (benchmarks/ab_env.py against block_forward with a temporary switch, 4-8 rounds, memory kept,
// Zen 4 EPYC, results/ab_depthwise_forward_rows8_avx512_cpu*.json: forward 0.77-0.79 with 5x5 and 7x7
// kernels on 7x7, 0.88-0.89 on 14x14 and with 3x3 on 4x4, 0.90 with 3x3 on 7x7; 0.97-1.07 with 3x3 on
// 14x14-112x112 and 5x5/7x7 on 28x28, 1.17 with 3x3 on 10x10 (noisy, 0.95-1.33): those keep block_forward.)
// (An earlier try in plain C++ with an array of 8 sums and `#pragma GCC unroll` read 1.06-1.80: GCC kept the
// sums in memory.)
inline void block_forward_rows8(const float* __restrict__ xb, const float* __restrict__ w, const Geometry& g,
                                const TapRanges& r, float* __restrict__ yb) {
  const int64_t L = kLanes, kw = g.kernel_w, sw = g.stride_w, W = g.width;
  for (int64_t oh = 0; oh < g.out_h; ++oh)
    for (int64_t ow0 = 0; ow0 < g.out_w; ow0 += 8) {
      const int64_t nj = std::min<int64_t>(8, g.out_w - ow0);
      __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
      for (int64_t u = r.u_lo[oh]; u < r.u_hi[oh]; ++u) {
        const float* xrow = xb + (oh * g.stride_h - g.pad_h + u * g.dil_h) * W * L;
        for (int64_t v = 0; v < kw; ++v) {
          const __m512 wv = _mm512_loadu_ps(w + (u * kw + v) * L);
          const int64_t iw0 = ow0 * sw - g.pad_w + v * g.dil_w;
          const int64_t jlo = iw0 >= 0 ? 0 : (-iw0 + sw - 1) / sw;
          const int64_t jhi = std::min(nj, W - iw0 <= 0 ? int64_t(0) : (W - iw0 + sw - 1) / sw);
          const float* x0 = xrow + iw0 * L;
#define ODCONV_DW_TAP(j, c) \
  if (j >= jlo && j < jhi) c = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x0 + (j) * sw * L), c);
          ODCONV_DW_TAP(0, c0) ODCONV_DW_TAP(1, c1) ODCONV_DW_TAP(2, c2) ODCONV_DW_TAP(3, c3)
          ODCONV_DW_TAP(4, c4) ODCONV_DW_TAP(5, c5) ODCONV_DW_TAP(6, c6) ODCONV_DW_TAP(7, c7)
#undef ODCONV_DW_TAP
        }
      }
      float* out = yb + (oh * g.out_w + ow0) * L;
      const __m512 cs[8] = {c0, c1, c2, c3, c4, c5, c6, c7};
      for (int64_t j = 0; j < nj; ++j) _mm512_storeu_ps(out + j * L, cs[j]);
    }
}
#endif

template <typename scalar_t>
void forward_blocks(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& ch, const at::Tensor& f,
                    const at::Tensor& s, const at::Tensor& a, const Geometry& g, at::Tensor& out) {
  const TapRanges r(g);
  const int64_t C = g.out_channels, taps = g.taps(), blocks = (C + kLanes - 1) / kLanes;
  const int64_t in_plane = g.height * g.width, out_plane = g.out_pixels();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t *ch_ptr = ch.const_data_ptr<scalar_t>(), *f_ptr = f.const_data_ptr<scalar_t>();
  const scalar_t *s_ptr = s.const_data_ptr<scalar_t>(), *a_ptr = a.const_data_ptr<scalar_t>();
  scalar_t* y = out.data_ptr<scalar_t>();
  const std::vector<scalar_t> wt = kernels_channels_last<scalar_t>(weight, g);
  // float32 with AVX-512: rows of 8 pixels in registers on maps of at most 8 output columns, or 16 with kernels
  // 5 or more wide (block_forward_rows8)
  [[maybe_unused]] const bool rows8 = g.out_w <= 8 || (g.out_w <= 16 && g.kernel_w >= 5);  // (unused without AVX-512)
  at::parallel_for(0, g.batch * blocks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<scalar_t> xb(in_plane * kLanes), yb(out_plane * kLanes), A(taps * kLanes), w(taps * kLanes);
    scalar_t fc[kLanes];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / blocks, c0 = (i % blocks) * kLanes, n = std::min(kLanes, C - c0);
      gather_lanes(x_ptr + (b * C + c0) * in_plane, in_plane, n, xb.data());
      block_scales(f_ptr + b * C + c0, ch_ptr + b * C + c0, n, fc);
      block_kernels(wt.data(), fc, s_ptr + b * taps, a_ptr + b * g.kernel_num, g, c0, A.data(), w.data());
      bool done = false;
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (rows8) {
          block_forward_rows8(xb.data(), w.data(), g, r, yb.data());
          done = true;
        }
      }
#endif
      if (!done) block_forward(xb.data(), w.data(), g, r, yb.data());
      scatter_lanes(yb.data(), out_plane, n, y + (b * C + c0) * out_plane);
    }
  });
}

template <typename scalar_t>
void backward_blocks(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& ch,
                     const at::Tensor& f, const at::Tensor& s, const at::Tensor& a, const Geometry& g, bool want_x,
                     bool want_params, at::Tensor& grad_x, at::Tensor& grad_w, at::Tensor& grad_ch, at::Tensor& grad_f,
                     at::Tensor& grad_s, at::Tensor& grad_a) {
  const TapRanges r(g);
  const int64_t B = g.batch, C = g.out_channels, taps = g.taps(), K = g.kernel_num, k_stride = C * taps;
  const int64_t blocks = (C + kLanes - 1) / kLanes, in_plane = g.height * g.width, out_plane = g.out_pixels();
  const scalar_t *gy_ptr = gy.const_data_ptr<scalar_t>(), *x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* ch_ptr = ch.const_data_ptr<scalar_t>();
  const scalar_t *f_ptr = f.const_data_ptr<scalar_t>(), *s_ptr = s.const_data_ptr<scalar_t>();
  const scalar_t* a_ptr = a.const_data_ptr<scalar_t>();
  scalar_t* gx_ptr = want_x ? grad_x.data_ptr<scalar_t>() : nullptr;
  scalar_t *gch_ptr = grad_ch.data_ptr<scalar_t>(), *gf_ptr = grad_f.data_ptr<scalar_t>();
  // tasks: each block of channels for a slice of the batch (slices only where the blocks are fewer than
  // twice the threads); task i's sums: grad_W of its block (K, taps, L), grad_a (B, K), grad_s (B, taps)
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>((2 * threads + blocks - 1) / blocks, B));
  const int64_t tasks = blocks * slices;
  const int64_t gw_elems = K * kLanes * taps, partial = gw_elems + B * (K + taps);
  std::vector<scalar_t> partials(want_params ? tasks * partial : 0, scalar_t(0));
  const std::vector<scalar_t> wt = kernels_channels_last<scalar_t>(weight, g);
  // grad_x as a forward of gy (input_gradient_geometry) where its rows have a run of kPixels pixels whose taps
  // all lie inside gy (else it is all border pixels, one at a time, and the adds into gxb were as fast)
  const bool gx_by_forward =
      g.stride_h == 1 && g.stride_w == 1 && g.out_w - (g.kernel_w - 1) * g.dil_w >= kPixels;
  const Geometry gx_geometry = input_gradient_geometry(g);
  const TapRanges gx_ranges(gx_geometry);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<scalar_t> xb(in_plane * kLanes), gyb(out_plane * kLanes), gxb(want_x ? in_plane * kLanes : 0);
    std::vector<scalar_t> A(taps * kLanes), w(taps * kLanes), gk(want_params ? taps * kLanes : 0);
    std::vector<scalar_t> wf(taps * kLanes);
    scalar_t fc[kLanes];
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t blk = task / slices, slice = task % slices;
      const int64_t c0 = blk * kLanes, n = std::min(kLanes, C - c0);
      const int64_t b0 = B * slice / slices, b1 = B * (slice + 1) / slices;
      scalar_t* part = want_params ? partials.data() + task * partial : nullptr;
      for (int64_t b = b0; b < b1; ++b) {
        gather_lanes(gy_ptr + (b * C + c0) * out_plane, out_plane, n, gyb.data());
        if (want_params) gather_lanes(x_ptr + (b * C + c0) * in_plane, in_plane, n, xb.data());
        block_scales(f_ptr + b * C + c0, ch_ptr + b * C + c0, n, fc);
        block_kernels(wt.data(), fc, s_ptr + b * taps, a_ptr + b * K, g, c0, A.data(), w.data());
        const bool correlate = want_x && gx_by_forward;
        if (correlate) {
          flip_kernel(w.data(), g, wf.data());
          block_forward(gyb.data(), wf.data(), gx_geometry, gx_ranges, gxb.data());
        }
        block_backward(xb.data(), gyb.data(), w.data(), g, r, want_x && !correlate ? gxb.data() : nullptr,
                       want_params ? gk.data() : nullptr);
        if (want_x) scatter_lanes(gxb.data(), in_plane, n, gx_ptr + (b * C + c0) * in_plane);
        if (!want_params) continue;
        scalar_t* gw = part;                          // (K, taps, L)
        scalar_t* ga = part + gw_elems + b * K;       // grad_a[b]
        scalar_t* gs = part + gw_elems + B * K + b * taps;  // grad_s[b]
        // over the block's lanes (0 past its last channel, through fc and A): gA = gk fc s, grad_W's sums,
        // grad_a's and grad_s's, and per channel sum_t gk s A for grad_f and grad_ch
        scalar_t sum_sA[kLanes] = {};
        const scalar_t* sb = s_ptr + b * taps;
        for (int64_t t = 0; t < taps; ++t) {
          const scalar_t* __restrict__ gkt = gk.data() + t * kLanes;
          const scalar_t* __restrict__ At = A.data() + t * kLanes;
          const scalar_t st = sb[t];
          scalar_t gA[kLanes], gs_t = 0;
#pragma omp simd reduction(+ : gs_t)
          for (int64_t l = 0; l < kLanes; ++l) {
            gA[l] = gkt[l] * fc[l] * st;
            sum_sA[l] += gkt[l] * st * At[l];
            gs_t += gkt[l] * fc[l] * At[l];
          }
          gs[t] += gs_t;
          for (int64_t k = 0; k < K; ++k) {
            const scalar_t ak = a_ptr[b * K + k];
            const scalar_t* __restrict__ wk = block_kernel(wt.data(), g, k, c0) + t * kLanes;
            scalar_t* __restrict__ gwk = gw + (k * taps + t) * kLanes;
            scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t l = 0; l < kLanes; ++l) {
              gwk[l] += ak * gA[l];
              dot += gA[l] * wk[l];
            }
            ga[k] += dot;
          }
        }
        for (int64_t l = 0; l < n; ++l) {
          const int64_t p = b * C + c0 + l;
          gf_ptr[p] = ch_ptr[p] * sum_sA[l];
          gch_ptr[p] = f_ptr[p] * sum_sA[l];
        }
      }
    }
  });
  if (!want_params) return;
  scalar_t *gw_ptr = grad_w.data_ptr<scalar_t>(), *ga_ptr = grad_a.data_ptr<scalar_t>();
  scalar_t* gs_ptr = grad_s.data_ptr<scalar_t>();
  for (int64_t task = 0; task < tasks; ++task) {
    const scalar_t* part = partials.data() + task * partial;
    const int64_t c0 = (task / slices) * kLanes, n = std::min(kLanes, C - c0);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t l = 0; l < n; ++l)
        for (int64_t t = 0; t < taps; ++t)
          gw_ptr[k * k_stride + (c0 + l) * taps + t] += part[(k * taps + t) * kLanes + l];
    for (int64_t i = 0; i < B * K; ++i) ga_ptr[i] += part[gw_elems + i];
    for (int64_t i = 0; i < B * taps; ++i) gs_ptr[i] += part[gw_elems + B * K + i];
  }
}

}  // namespace

at::Tensor depthwise_forward_cpu(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& ch_in,
                                 const at::Tensor& f_in, const at::Tensor& s_in, const at::Tensor& a_in,
                                 const Geometry& g) {
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor ch = ch_in.contiguous(), f = f_in.contiguous(), s = s_in.contiguous(), a = a_in.contiguous();
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "odconv2d_cpu_depthwise", [&] {
    forward_blocks<scalar_t>(x, weight, ch, f, s, a, g, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> depthwise_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& ch_in,
    const at::Tensor& f_in, const at::Tensor& s_in, const at::Tensor& a_in, const Geometry& g, bool want_x,
    bool want_params) {
  const at::Tensor gy = grad_out.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor ch = ch_in.contiguous(), f = f_in.contiguous(), s = s_in.contiguous(), a = a_in.contiguous();
  at::Tensor grad_x = want_x ? at::empty_like(x) : at::zeros_like(x);
  at::Tensor grad_w = at::zeros_like(weight), grad_ch = at::zeros_like(ch), grad_f = at::zeros_like(f);
  at::Tensor grad_s = at::zeros({g.batch, g.taps()}, x.options()), grad_a = at::zeros_like(a);
  if (want_x || want_params) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "odconv2d_backward_cpu_depthwise", [&] {
      backward_blocks<scalar_t>(gy, x, weight, ch, f, s, a, g, want_x, want_params, grad_x, grad_w, grad_ch, grad_f,
                                grad_s, grad_a);
    });
  }
  return std::make_tuple(grad_x, grad_w, grad_ch, grad_f, grad_s.view({g.batch, g.kernel_h, g.kernel_w}), grad_a);
}

}  // namespace odconv
