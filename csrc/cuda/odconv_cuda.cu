// CUDA kernels of odconv::odconv2d and odconv::odconv2d_backward (notation: csrc/odconv.h; the math
// is the one of csrc/cpu/odconv_cpu.cpp, mirrored here).
//
// WHAT IS COMPUTED. Per sample b and group g, with G groups, Cg = Cin/G, Cog = Cout/G, T = kh*kw
// taps, J = Cg*T kernel columns indexed by j = (c, u, v), N = Cout*J, L = Cin*T = G*J, P = Ho*Wo:
//
//   A_b[o,j]  = sum_k a[b,k] * W_k[o,j]                        aggregated kernel (a = kernel_att)
//   m_b[j]    = ch[b, g*Cg + c] * s[b,u,v]                     (ch = channel_att, s = spatial_att)
//   Wb[o,j]   = f[b,o] * m_b[j] * A_b[o,j]                     per-sample kernel (f = filter_att)
//   cols_b[g] = im2col(x_b)[g]                                 J x P
//
//   forward:   out_b[g]      = Wb[g] @ cols_b[g]                        (Cog x J) @ (J x P)
//   backward:  gy = grad_out[b] as Cout x P
//              gcols_b[g]    = Wb[g]^T @ gy[g];  grad_x_b = col2im(gcols_b)
//              Q_b[g]        = gy[g] @ cols_b[g]^T                      Cog x J, dL/dWb
//              grad_f[b,o]   = sum_j Q[o,j] A[o,j] m[j]
//              gm_b[g*J+j]   = sum_{o in g} Q[o,j] A[o,j] f[o]          dL/dm, indexed (c, u, v)
//              grad_ch[b,c]  = sum_uv gm[c,u,v] s[u,v]
//              grad_s[b,u,v] = sum_c gm[c,u,v] ch[c]                    over all Cin channels
//              G_b[o,j]      = Q[o,j] f[o] m[j]                         dL/dA_b
//              grad_a[b,k]   = <G_b, W_k>                               GEMM (Bc x N) @ (N x K)
//              grad_W       += a_chunk^T @ G_chunk                      GEMM (K x Bc) @ (Bc x N)
//
// DESIGN: bounded batch chunks + cuBLAS + simple kernels. The batch is processed in chunks of Bc
// samples. For each chunk, simple grid-stride kernels build the chunk's per-sample kernels (or
// their gradients) and im2col matrices, and the products run as one batched cuBLAS GEMM over the
// Bc*G (sample, group) pairs (at::bmm_out / at::mm_out / addmm_). This was chosen over an implicit
// GEMM that builds Wb tile by tile in shared memory because it is simple enough to be checked by
// reading (the kernels are elementwise maps and fixed-order reductions; all products are cuBLAS), it
// reaches cuBLAS/tensor-core GEMM speed for the big products, and its memory is bounded by a
// constant. The aggregation kernels read W_k once per set of kSpt samples (kSpt accumulators per
// thread), so W_k is streamed Bc/kSpt times per chunk instead of Bc times.
// Measured on an H200 (benchmarks/RESULTS.md, "CUDA on an H200"): correct everywhere, but forward +
// backward takes 1.7-2.6x cuDNN's static conv on 16x16-48x48 maps and 5-9x on 7x7/8x8 maps, where
// the per-sample GEMMs have 49-64 columns and writing Wb (then reading it back) costs as much as
// the products. The next step is the implicit GEMM this design put off: aggregate W's tiles into
// shared memory as the GEMM loads them, and gather im2col there too.
//
// BUFFERS of one chunk (T_ = the input dtype, acc = float for half/bfloat16/float, double for double):
//   kq     (Bc, Cout, J)     T_    forward: Wb. backward: Wb (for grad_x), then reused for Q
//   cols   (Bc, Cin*T, P)    T_    im2col of x; backward: first gcols, then reused for cols.
//                                  Not allocated for 1x1 / stride 1 / no padding (cols = x itself)
//   gk     (Bc, N)           acc   backward: G, the gradient w.r.t. the aggregated kernels
//   gm     (Bc, Cin*T)       acc   backward: dL/dm
// and per call (not per sample-kernel): the attentions in acc (B x (Cin + Cout + T + K)), the
// parameter-gradient accumulators in acc (grad_W: K x N, grad_ch/f/s/a), for half/bfloat16 a float
// copy of W (K x N, the operand of the grad_a GEMM), and contiguous copies of x / grad_out when the
// caller passes non-contiguous tensors.
//
// MEMORY BOUND: Bc = clamp(budget / bytes_per_sample, 1, B), budget = 256 MiB (the environment
// variable ODCONV_CUDA_CHUNK_BYTES overrides it; the tests use it to run many small chunks), and
// Bc*G <= 65535 (the batch count of one cuBLAS call). So the chunk buffers above take at most
// max(256 MiB, one sample's buffers), where one sample's buffers are
//   forward:  N*sizeof(T_) + Cin*T*P*sizeof(T_)
//   backward: N*sizeof(T_) + Cin*T*P*sizeof(T_) + N*sizeof(acc) + Cin*T*sizeof(acc)
// (terms dropped when not needed: no cols for direct 1x1 kernels; no gk/gm without parameter grads).
// No tensor ever holds the per-sample kernels, or kernel gradients, of the whole batch.
//
// DETERMINISM: there are no atomics. Every output element is written by exactly one thread, or is a
// fixed-order reduction inside one thread or one block (block_sum: per-thread strided sums in a
// fixed order, then a fixed warp-shuffle tree), or is a cuBLAS GEMM; grad_W accumulates the chunks
// in order (chunk sizes depend only on the shapes). cuBLAS results are bitwise reproducible for
// the same shapes, GPU and workspace configuration (torch versions that check it want
// CUBLAS_WORKSPACE_CONFIG=:4096:8 under torch.use_deterministic_algorithms). So the single code
// path is deterministic: at::globalContext().deterministicAlgorithms() needs no separate branch.
//
// PRECISION: half/bfloat16/float/double inputs; aggregation, scaling and all reductions accumulate
// in acc. The GEMM operands and the GEMM outputs Wb, Q and gcols are in the input dtype (cuBLAS
// accumulates half/bfloat16 products in float); G, gm and the parameter gradients stay in acc until
// the final cast. fp32 GEMMs follow torch.backends.cuda.matmul (TF32 only if the user enables it).
//
// Every kernel runs on the current stream (c10::cuda::getCurrentCUDAStream(), the stream
// at::cuda::getCurrentCUDAStream() returns; this file includes only c10/cuda headers so that it
// also builds with toolkits that lack the cuBLAS/cuSPARSE headers ATen/cuda/CUDAContext.h needs),
// under a device guard for x's device, and is followed by C10_CUDA_KERNEL_LAUNCH_CHECK().
#include "../odconv.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <tuple>

namespace odconv {
namespace {

constexpr int kThreads = 256;                        // threads of the elementwise kernels
constexpr int64_t kMaxBlocks = 65536;                // grid-stride loops cover larger problems
constexpr int64_t kChunkBytes = 256LL * 1024 * 1024; // chunk buffer budget (see MEMORY BOUND)
constexpr int64_t kMaxGemmBatch = 65535;             // (sample, group) pairs per batched GEMM
constexpr int kSpt = 4;                              // samples per pass over W_k

// The geometry, as plain integers for the kernels.
struct Shape {
  int64_t cin, height, width;   // x: (B, cin, height, width)
  int64_t cout, cin_g, cout_g;  // channels; per group
  int64_t kh, kw, taps;         // kernel; taps = kh*kw
  int64_t J, N, L, P;           // J = cin_g*taps, N = cout*J, L = cin*taps, P = ho*wo
  int64_t ho, wo, sh, sw, ph, pw, dh, dw;
  int64_t K;                    // kernel_num
};

Shape make_shape(const Geometry& g) {
  Shape s;
  s.cin = g.in_channels;
  s.height = g.height;
  s.width = g.width;
  s.cout = g.out_channels;
  s.cin_g = g.in_per_group;
  s.cout_g = g.out_per_group;
  s.kh = g.kernel_h;
  s.kw = g.kernel_w;
  s.taps = g.taps();
  s.J = g.cols_per_group();
  s.N = g.kernel_numel();
  s.L = g.in_channels * g.taps();
  s.P = g.out_pixels();
  s.ho = g.out_h;
  s.wo = g.out_w;
  s.sh = g.stride_h;
  s.sw = g.stride_w;
  s.ph = g.pad_h;
  s.pw = g.pad_w;
  s.dh = g.dil_h;
  s.dw = g.dil_w;
  s.K = g.kernel_num;
  // The kernels index within one sample in 32 bits (see build_kernels_kernel).
  constexpr int64_t kLimit = int64_t(1) << 30;
  TORCH_CHECK(s.N < kLimit && s.L < kLimit && s.height * s.width < kLimit && s.taps * s.P < kLimit,
              "odconv2d (CUDA): one sample's sizes must stay below 2^30 elements; got Cout*Cin/G*kh*kw = ",
              s.N, ", Cin*kh*kw = ", s.L, ", H*W = ", s.height * s.width, ", kh*kw*Ho*Wo = ", s.taps * s.P);
  return s;
}

// ------------------------------------------------------------------------------------------------
// Device helpers

// The chunk's nb samples in sets of kSpt: the set starting at sample b0 holds set_size(nb, b0)
// samples (the last set of a chunk may be short).
__host__ __device__ __forceinline__ int64_t sample_sets(int64_t nb) { return (nb + kSpt - 1) / kSpt; }
__device__ __forceinline__ int set_size(int64_t nb, int64_t b0) {
  return static_cast<int>(nb - b0 < kSpt ? nb - b0 : kSpt);
}

// m_b[j] = ch[b, c] * s[b, t], the input scale of kernel column j = (c, t) of sample b.
template <typename acc_t>
__device__ __forceinline__ acc_t input_scale(const acc_t* __restrict__ ch, const acc_t* __restrict__ sp,
                                             int64_t b, int64_t c, int64_t t, const Shape& sh) {
  return ch[b * sh.cin + c] * sp[b * sh.taps + t];
}

// agg[s] = sum_k a[s*K + k] * w[k*k_stride] for the nbs (<= kSpt) samples s of a set: one read of
// each W_k element serves all samples of the set. Same summation order as the CPU kernel.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void aggregate(
    const scalar_t* __restrict__ w, int64_t k_stride, const acc_t* __restrict__ a, int64_t K,
    int nbs, acc_t (&agg)[kSpt]) {
#pragma unroll
  for (int s = 0; s < kSpt; ++s) agg[s] = acc_t(0);
  for (int64_t k = 0; k < K; ++k) {
    const acc_t wk = static_cast<acc_t>(w[k * k_stride]);
#pragma unroll
    for (int s = 0; s < kSpt; ++s)
      if (s < nbs) agg[s] += a[s * K + k] * wk;
  }
}

// Sum of v over the block, returned in thread 0 (other threads get partial sums). Every thread of
// the block must call it; blockDim.x must be a multiple of 32, at most 1024. partial: 32 slots of
// shared memory, free again when the function returns. The order of the additions is fixed.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* partial) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? partial[lane] : acc_t(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  __syncthreads();
  return v;
}

#define ODCONV_GRID_STRIDE(i, n)                                                   \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// ------------------------------------------------------------------------------------------------
// Kernels. All pointers to per-sample data point at the first sample of the chunk; b is the sample
// within the chunk, nb the samples in the chunk. Attention tensors are contiguous, in acc_t.

// kern[b, o, j] = Wb[o, j] = f[b,o] * ch[b,c] * s[b,t] * sum_k a[b,k] W_k[o,j]    kern: (nb, N)
// Grid: x strides over n = o*J + j, y is the set of kSpt samples. The per-element index math is in
// 32 bits (N < 2^30, checked on the host): 64-bit divisions cost several times more on the GPU.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) build_kernels_kernel(
    const scalar_t* __restrict__ weight, const acc_t* __restrict__ a, const acc_t* __restrict__ f,
    const acc_t* __restrict__ ch, const acc_t* __restrict__ sp, scalar_t* __restrict__ kern,
    int64_t nb, Shape sh) {
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * kSpt;
  const int nbs = set_size(nb, b0);
  const int N = static_cast<int>(sh.N), J = static_cast<int>(sh.J), taps = static_cast<int>(sh.taps);
  const int cout_g = static_cast<int>(sh.cout_g), cin_g = static_cast<int>(sh.cin_g);
  for (int n = blockIdx.x * blockDim.x + threadIdx.x; n < N; n += gridDim.x * blockDim.x) {
    const int o = n / J, j = n - o * J;
    const int cj = j / taps;
    const int c = (o / cout_g) * cin_g + cj, t = j - cj * taps;
    acc_t agg[kSpt];
    aggregate(weight + n, sh.N, a + b0 * sh.K, sh.K, nbs, agg);
#pragma unroll
    for (int s = 0; s < kSpt; ++s) {
      if (s < nbs) {
        const int64_t b = b0 + s;
        const acc_t m = input_scale(ch, sp, b, c, t, sh);
        kern[b * sh.N + n] = static_cast<scalar_t>(agg[s] * f[b * sh.cout + o] * m);
      }
    }
  }
}

// cols[b, (c*kh + u)*kw + v, oh*wo + ow] = x[b, c, oh*sh - ph + u*dh, ow*sw - pw + v*dw] (0 outside).
// cols: (nb, L, P). One block per row r = (b*cin + c)*taps + t of cols (grid-stride over the rows),
// its threads over the row's P pixels: the row's (b, c, u, v) is decoded once, each pixel costs one
// 32-bit division.
template <typename scalar_t>
__global__ void im2col_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ cols, int64_t rows, Shape sh) {
  const int P = static_cast<int>(sh.P), wo = static_cast<int>(sh.wo);
  const int height = static_cast<int>(sh.height), width = static_cast<int>(sh.width);
  const int stride_h = static_cast<int>(sh.sh), stride_w = static_cast<int>(sh.sw);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t plane = row / sh.taps;  // b*cin + c
    const int t = static_cast<int>(row - plane * sh.taps);
    const int u = t / static_cast<int>(sh.kw), v = t - u * static_cast<int>(sh.kw);
    const int ih0 = u * static_cast<int>(sh.dh) - static_cast<int>(sh.ph);
    const int iw0 = v * static_cast<int>(sh.dw) - static_cast<int>(sh.pw);
    const scalar_t* __restrict__ src = x + plane * height * width;
    scalar_t* __restrict__ dst = cols + row * P;
    for (int p = threadIdx.x; p < P; p += blockDim.x) {
      const int oh = p / wo, ow = p - oh * wo;
      const int ih = oh * stride_h + ih0, iw = ow * stride_w + iw0;
      dst[p] = (ih >= 0 && ih < height && iw >= 0 && iw < width) ? src[ih * width + iw]
                                                                  : static_cast<scalar_t>(0);
    }
  }
}

// The adjoint of im2col, as a gather: gx[b, c, ih, iw] = sum of the gcols entries that im2col read
// from (ih, iw), in the fixed order (u, v). gx: (nb, cin, height, width). One block per plane (b, c)
// (grid-stride over the planes), its threads over the plane's pixels; 32-bit index math.
template <typename scalar_t, typename acc_t>
__global__ void col2im_kernel(
    const scalar_t* __restrict__ gcols, scalar_t* __restrict__ gx, int64_t planes, Shape sh) {
  const int P = static_cast<int>(sh.P), ho = static_cast<int>(sh.ho), wo = static_cast<int>(sh.wo);
  const int height = static_cast<int>(sh.height), width = static_cast<int>(sh.width);
  const int kh = static_cast<int>(sh.kh), kw = static_cast<int>(sh.kw);
  const int stride_h = static_cast<int>(sh.sh), stride_w = static_cast<int>(sh.sw);
  const int pad_h = static_cast<int>(sh.ph), pad_w = static_cast<int>(sh.pw);
  const int dil_h = static_cast<int>(sh.dh), dil_w = static_cast<int>(sh.dw);
  const int hw = height * width;
  for (int64_t plane = blockIdx.x; plane < planes; plane += gridDim.x) {
    const scalar_t* __restrict__ src = gcols + plane * sh.taps * P;  // the plane's taps rows
    scalar_t* __restrict__ dst = gx + plane * hw;
    for (int i = threadIdx.x; i < hw; i += blockDim.x) {
      const int ih = i / width, iw = i - ih * width;
      acc_t sum = acc_t(0);
      for (int u = 0; u < kh; ++u) {
        const int hn = ih + pad_h - u * dil_h;  // = oh * stride_h when (ih, u) is read by row oh
        if (hn < 0 || hn % stride_h != 0) continue;
        const int oh = hn / stride_h;
        if (oh >= ho) continue;
        for (int v = 0; v < kw; ++v) {
          const int wn = iw + pad_w - v * dil_w;
          if (wn < 0 || wn % stride_w != 0) continue;
          const int ow = wn / stride_w;
          if (ow >= wo) continue;
          sum += static_cast<acc_t>(src[(u * kw + v) * P + oh * wo + ow]);
        }
      }
      dst[i] = static_cast<scalar_t>(sum);
    }
  }
}

// grad_f[b, o] = sum_j Q[b,o,j] A_b[o,j] m_b[j]  and  gk[b, o, j] = Q[b,o,j] f[b,o] m_b[j].
// One block per (set of kSpt samples, o); the threads stride over j. q: (nb, N) input dtype;
// gk: (nb, N) acc; grad_f: (nb, cout) acc.
template <typename scalar_t, typename acc_t>
__global__ void filter_grad_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ weight, const acc_t* __restrict__ a,
    const acc_t* __restrict__ f, const acc_t* __restrict__ ch, const acc_t* __restrict__ sp,
    acc_t* __restrict__ gk, acc_t* __restrict__ grad_f, int64_t nb, Shape sh) {
  __shared__ acc_t partial[32];
  const int64_t sets = sample_sets(nb);
  // The loop bounds depend on blockIdx only: every thread of a block reaches each block_sum.
  for (int64_t item = blockIdx.x; item < sets * sh.cout; item += gridDim.x) {
    const int64_t o = item % sh.cout, b0 = (item / sh.cout) * kSpt;
    const int nbs = set_size(nb, b0);
    const int64_t c0 = (o / sh.cout_g) * sh.cin_g;
    acc_t sums[kSpt];
#pragma unroll
    for (int s = 0; s < kSpt; ++s) sums[s] = acc_t(0);
    const int J = static_cast<int>(sh.J), taps = static_cast<int>(sh.taps);
    for (int j = threadIdx.x; j < J; j += blockDim.x) {
      const int64_t n = o * sh.J + j;
      const int cj = j / taps;
      const int64_t c = c0 + cj, t = j - cj * taps;
      acc_t agg[kSpt];
      aggregate(weight + n, sh.N, a + b0 * sh.K, sh.K, nbs, agg);
#pragma unroll
      for (int s = 0; s < kSpt; ++s) {
        if (s < nbs) {
          const int64_t b = b0 + s;
          const acc_t m = input_scale(ch, sp, b, c, t, sh);
          const acc_t qv = static_cast<acc_t>(q[b * sh.N + n]);
          sums[s] += qv * agg[s] * m;
          gk[b * sh.N + n] = qv * f[b * sh.cout + o] * m;
        }
      }
    }
#pragma unroll
    for (int s = 0; s < kSpt; ++s) {
      const acc_t total = block_sum(sums[s], partial);
      if (threadIdx.x == 0 && s < nbs) grad_f[(b0 + s) * sh.cout + o] = total;
    }
  }
}

// gm[b, g*J + j] = sum_{r < cout_g} Q[b,o,j] A_b[o,j] f[b,o] with o = g*cout_g + r. gm: (nb, L) acc.
// Block: kLanes x kSlices threads; grid: x strides over runs of kLanes consecutive idx = g*J + j
// (adjacent lanes read adjacent j), y is the set of kSpt samples. Slice y sums r = y, y + kSlices, ...;
// the kSlices partial sums are then added in slice order (fixed: deterministic). Splitting the sum
// over r keeps the GPU busy when a chunk holds few samples (16 samples of 512 channels: 4 sets x 4608
// idx, too few threads for a loop of 512 dependent steps each).
constexpr int kLanes = 32, kSlices = 8;
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kLanes * kSlices) scale_grad_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ weight, const acc_t* __restrict__ a,
    const acc_t* __restrict__ f, acc_t* __restrict__ gm, int64_t nb, Shape sh) {
  __shared__ acc_t partial[kSlices][kSpt][kLanes];
  const int lane = threadIdx.x, slice = threadIdx.y;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * kSpt;
  const int nbs = set_size(nb, b0);
  const int L = static_cast<int>(sh.L), J = static_cast<int>(sh.J), cout_g = static_cast<int>(sh.cout_g);
  // The loop bounds depend on blockIdx only: every thread of a block reaches each __syncthreads.
  for (int base = blockIdx.x * kLanes; base < L; base += gridDim.x * kLanes) {
    const int idx = base + lane;
    acc_t sums[kSpt];
#pragma unroll
    for (int s = 0; s < kSpt; ++s) sums[s] = acc_t(0);
    if (idx < L) {
      const int g = idx / J, j = idx - g * J;
      for (int r = slice; r < cout_g; r += kSlices) {
        const int64_t o = static_cast<int64_t>(g) * cout_g + r, n = o * sh.J + j;
        acc_t agg[kSpt];
        aggregate(weight + n, sh.N, a + b0 * sh.K, sh.K, nbs, agg);
#pragma unroll
        for (int s = 0; s < kSpt; ++s) {
          if (s < nbs) {
            const int64_t b = b0 + s;
            sums[s] += static_cast<acc_t>(q[b * sh.N + n]) * agg[s] * f[b * sh.cout + o];
          }
        }
      }
    }
#pragma unroll
    for (int s = 0; s < kSpt; ++s) partial[slice][s][lane] = sums[s];
    __syncthreads();
    if (slice == 0 && idx < L) {
#pragma unroll
      for (int s = 0; s < kSpt; ++s) {
        if (s < nbs) {
          acc_t total = acc_t(0);
#pragma unroll
          for (int y = 0; y < kSlices; ++y) total += partial[y][s][lane];
          gm[(b0 + s) * sh.L + idx] = total;
        }
      }
    }
    __syncthreads();
  }
}

// grad_ch[b, c] = sum_t gm[b, c*taps + t] * s[b, t]. One thread per (b, c). grad_ch: (nb, cin).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) channel_grad_kernel(
    const acc_t* __restrict__ gm, const acc_t* __restrict__ sp, acc_t* __restrict__ grad_ch,
    int64_t nb, Shape sh) {
  ODCONV_GRID_STRIDE(item, nb * sh.cin) {
    const int64_t b = item / sh.cin;
    const acc_t* row = gm + item * sh.taps;  // item * taps = (b*cin + c) * taps
    acc_t sum = acc_t(0);
    for (int64_t t = 0; t < sh.taps; ++t) sum += row[t] * sp[b * sh.taps + t];
    grad_ch[item] = sum;
  }
}

// grad_s[b, t] = sum_c gm[b, c*taps + t] * ch[b, c]. One block per (b, t). grad_s: (nb, taps).
template <typename acc_t>
__global__ void spatial_grad_kernel(
    const acc_t* __restrict__ gm, const acc_t* __restrict__ ch, acc_t* __restrict__ grad_s,
    int64_t nb, Shape sh) {
  __shared__ acc_t partial[32];
  for (int64_t item = blockIdx.x; item < nb * sh.taps; item += gridDim.x) {
    const int64_t t = item % sh.taps, b = item / sh.taps;
    acc_t sum = acc_t(0);
    for (int64_t c = threadIdx.x; c < sh.cin; c += blockDim.x)
      sum += gm[(b * sh.cin + c) * sh.taps + t] * ch[b * sh.cin + c];
    const acc_t total = block_sum(sum, partial);
    if (threadIdx.x == 0) grad_s[item] = total;
  }
}

// ------------------------------------------------------------------------------------------------
// Host side

// Blocks for a grid-stride kernel over `items` elements, `threads` per block.
unsigned int grid_for(int64_t items, int threads) {
  return static_cast<unsigned int>(std::min<int64_t>((items + threads - 1) / threads, kMaxBlocks));
}

// Blocks for a kernel with one block per item (grid-stride over the items).
unsigned int blocks_for(int64_t items) {
  return static_cast<unsigned int>(std::min<int64_t>(items, kMaxBlocks));
}

// Threads for a block that reduces or walks `len` values: a multiple of 32 in [32, kThreads].
int reduce_threads(int64_t len) {
  const int64_t rounded = (len + 31) / 32 * 32;
  return static_cast<int>(std::max<int64_t>(32, std::min<int64_t>(kThreads, rounded)));
}

int64_t chunk_budget_bytes() {
  if (const char* env = std::getenv("ODCONV_CUDA_CHUNK_BYTES")) {
    char* end = nullptr;
    const long long value = std::strtoll(env, &end, 10);
    if (end != env && value > 0) return static_cast<int64_t>(value);
  }
  return kChunkBytes;
}

// Samples per chunk: as many as fit in the budget, at least one, and Bc*G <= kMaxGemmBatch.
int64_t samples_per_chunk(const Geometry& g, int64_t bytes_per_sample) {
  int64_t chunk = bytes_per_sample > 0 ? chunk_budget_bytes() / bytes_per_sample : g.batch;
  chunk = std::min(chunk, kMaxGemmBatch / g.groups);
  return std::max<int64_t>(1, std::min(chunk, g.batch));
}

// The four attentions, contiguous, in the accumulation type.
struct Attentions {
  at::Tensor ch, f, s, a;
  Attentions(const at::Tensor& ch_in, const at::Tensor& f_in, const at::Tensor& s_in,
             const at::Tensor& a_in, at::ScalarType acc_type)
      : ch(ch_in.to(acc_type).contiguous()),
        f(f_in.to(acc_type).contiguous()),
        s(s_in.to(acc_type).contiguous()),
        a(a_in.to(acc_type).contiguous()) {}
};

// kern (the first nb rows of kern_buf) = the per-sample kernels of samples [b0, b0 + nb).
template <typename scalar_t, typename acc_t>
void launch_build_kernels(
    const at::Tensor& weight, const Attentions& att, at::Tensor& kern_buf, int64_t b0, int64_t nb,
    const Shape& sh, cudaStream_t stream) {
  if (nb == 0 || sh.N == 0) return;
  const dim3 grid(grid_for(sh.N, kThreads), static_cast<unsigned int>(sample_sets(nb)));
  build_kernels_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
      weight.const_data_ptr<scalar_t>(), att.a.const_data_ptr<acc_t>() + b0 * sh.K,
      att.f.const_data_ptr<acc_t>() + b0 * sh.cout, att.ch.const_data_ptr<acc_t>() + b0 * sh.cin,
      att.s.const_data_ptr<acc_t>() + b0 * sh.taps, kern_buf.mutable_data_ptr<scalar_t>(), nb, sh);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_im2col(
    const at::Tensor& x, at::Tensor& cols_buf, int64_t b0, int64_t nb, const Shape& sh,
    cudaStream_t stream) {
  const int64_t rows = nb * sh.L;
  if (rows == 0 || sh.P == 0) return;
  im2col_kernel<scalar_t><<<blocks_for(rows), reduce_threads(sh.P), 0, stream>>>(
      x.const_data_ptr<scalar_t>() + b0 * sh.cin * sh.height * sh.width,
      cols_buf.mutable_data_ptr<scalar_t>(), rows, sh);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
at::Tensor forward_impl(
    const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& ch_in,
    const at::Tensor& f_in, const at::Tensor& s_in, const at::Tensor& a_in, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, x.options());
  if (g.batch == 0) return out;
  const Attentions att(ch_in, f_in, s_in, a_in, acc_type);

  const Shape sh = make_shape(g);
  const int64_t G = g.groups, Cog = g.out_per_group;
  const bool direct = g.im2col_is_identity();
  const int64_t es = sizeof(scalar_t);
  const int64_t chunk = samples_per_chunk(g, sh.N * es + (direct ? 0 : sh.L * sh.P * es));
  at::Tensor kern_buf = at::empty({chunk, sh.N}, x.options());
  at::Tensor cols_buf = direct ? at::Tensor() : at::empty({chunk, sh.L, sh.P}, x.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
    const int64_t nb = std::min(chunk, g.batch - b0);
    launch_build_kernels<scalar_t, acc_t>(weight, att, kern_buf, b0, nb, sh, stream);
    if (!direct) launch_im2col<scalar_t>(x, cols_buf, b0, nb, sh, stream);
    const at::Tensor cols = direct ? x.narrow(0, b0, nb) : cols_buf.narrow(0, 0, nb);
    // out_b[g] = Wb[g] @ cols_b[g] for the nb*G (sample, group) pairs.
    at::Tensor out_view = out.narrow(0, b0, nb).view({nb * G, Cog, sh.P});
    at::bmm_out(
        out_view, kern_buf.narrow(0, 0, nb).view({nb * G, Cog, sh.J}),
        cols.view({nb * G, sh.J, sh.P}));
  }
  return out;
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename scalar_t>
Grads backward_impl(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight_in,
    const at::Tensor& ch_in, const at::Tensor& f_in, const at::Tensor& s_in, const at::Tensor& a_in,
    const Geometry& g, bool want_x, bool want_params) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const auto dtype = x_in.scalar_type();
  const auto opts = x_in.options();
  const auto acc_opts = opts.dtype(acc_type);
  const Shape sh = make_shape(g);
  if (g.batch == 0 || (!want_x && !want_params)) {
    return std::make_tuple(
        at::zeros(x_in.sizes(), opts), at::zeros(weight_in.sizes(), opts),
        at::zeros(ch_in.sizes(), opts), at::zeros(f_in.sizes(), opts), at::zeros(s_in.sizes(), opts),
        at::zeros(a_in.sizes(), opts));
  }
  const at::Tensor gy = grad_out_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const Attentions att(ch_in, f_in, s_in, a_in, acc_type);

  // Outputs. Every element of those that are asked for is written by the chunk loop.
  at::Tensor grad_x = want_x ? at::empty({g.batch, sh.cin, sh.height, sh.width}, opts)
                             : at::zeros({g.batch, sh.cin, sh.height, sh.width}, opts);
  at::Tensor grad_w = at::zeros({sh.K, sh.N}, acc_opts);
  at::Tensor grad_ch = want_params ? at::empty({g.batch, sh.cin}, acc_opts) : at::zeros({g.batch, sh.cin}, acc_opts);
  at::Tensor grad_f = want_params ? at::empty({g.batch, sh.cout}, acc_opts) : at::zeros({g.batch, sh.cout}, acc_opts);
  at::Tensor grad_s = want_params ? at::empty({g.batch, sh.taps}, acc_opts) : at::zeros({g.batch, sh.taps}, acc_opts);
  at::Tensor grad_a = want_params ? at::empty({g.batch, sh.K}, acc_opts) : at::zeros({g.batch, sh.K}, acc_opts);

  const int64_t G = g.groups, Cog = g.out_per_group;
  const bool direct = g.im2col_is_identity();
  const int64_t es = sizeof(scalar_t), acc_es = sizeof(acc_t);
  const int64_t bytes_per_sample = sh.N * es + (direct ? 0 : sh.L * sh.P * es) +
      (want_params ? sh.N * acc_es + sh.L * acc_es : 0);
  const int64_t chunk = samples_per_chunk(g, bytes_per_sample);
  at::Tensor kq_buf = at::empty({chunk, sh.N}, opts);                              // Wb, then Q
  at::Tensor cols_buf = direct ? at::Tensor() : at::empty({chunk, sh.L, sh.P}, opts);  // gcols, then cols
  at::Tensor gk_buf = want_params ? at::empty({chunk, sh.N}, acc_opts) : at::Tensor();
  at::Tensor gm_buf = want_params ? at::empty({chunk, sh.L}, acc_opts) : at::Tensor();
  // The operand of grad_a = G @ W^T, in acc (a copy only for half / bfloat16).
  const at::Tensor w_acc = want_params ? weight.to(acc_type).view({sh.K, sh.N}) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
    const int64_t nb = std::min(chunk, g.batch - b0);
    const at::Tensor gy_view = gy.narrow(0, b0, nb).view({nb * G, Cog, sh.P});
    at::Tensor kq = kq_buf.narrow(0, 0, nb).view({nb * G, Cog, sh.J});

    if (want_x) {
      // gcols_b[g] = Wb[g]^T @ gy[g]; grad_x_b = col2im(gcols_b) (gcols is grad_x itself when direct).
      launch_build_kernels<scalar_t, acc_t>(weight, att, kq_buf, b0, nb, sh, stream);
      at::Tensor gcols = direct ? grad_x.narrow(0, b0, nb).view({nb * G, sh.J, sh.P})
                                : cols_buf.narrow(0, 0, nb).view({nb * G, sh.J, sh.P});
      at::bmm_out(gcols, kq.transpose(1, 2), gy_view);
      if (!direct) {
        const int64_t planes = nb * sh.cin;
        if (planes > 0 && sh.height * sh.width > 0) {
          col2im_kernel<scalar_t, acc_t><<<blocks_for(planes), reduce_threads(sh.height * sh.width), 0, stream>>>(
              cols_buf.const_data_ptr<scalar_t>(),
              grad_x.mutable_data_ptr<scalar_t>() + b0 * sh.cin * sh.height * sh.width, planes, sh);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
    }
    if (!want_params) continue;

    // Q_b[g] = gy[g] @ cols_b[g]^T, into kq (the kernels are no longer needed).
    if (!direct) launch_im2col<scalar_t>(x, cols_buf, b0, nb, sh, stream);
    const at::Tensor cols = direct ? x.narrow(0, b0, nb) : cols_buf.narrow(0, 0, nb);
    at::bmm_out(kq, gy_view, cols.view({nb * G, sh.J, sh.P}).transpose(1, 2));

    const scalar_t* q = kq_buf.const_data_ptr<scalar_t>();
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const acc_t* a = att.a.const_data_ptr<acc_t>() + b0 * sh.K;
    const acc_t* f = att.f.const_data_ptr<acc_t>() + b0 * sh.cout;
    const acc_t* ch = att.ch.const_data_ptr<acc_t>() + b0 * sh.cin;
    const acc_t* sp = att.s.const_data_ptr<acc_t>() + b0 * sh.taps;
    acc_t* gk = gk_buf.mutable_data_ptr<acc_t>();
    acc_t* gm = gm_buf.mutable_data_ptr<acc_t>();
    const int64_t sets = sample_sets(nb);

    // grad_f and G (dL/dA).
    filter_grad_kernel<scalar_t, acc_t>
        <<<blocks_for(sets * sh.cout), reduce_threads(sh.J), 0, stream>>>(
            q, w, a, f, ch, sp, gk, grad_f.mutable_data_ptr<acc_t>() + b0 * sh.cout, nb, sh);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // dL/dm, then grad_ch and grad_s from it.
    if (sh.L > 0) {
      const dim3 grid(grid_for(sh.L, kLanes), static_cast<unsigned int>(sets));
      scale_grad_kernel<scalar_t, acc_t><<<grid, dim3(kLanes, kSlices), 0, stream>>>(q, w, a, f, gm, nb, sh);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      channel_grad_kernel<acc_t><<<grid_for(nb * sh.cin, kThreads), kThreads, 0, stream>>>(
          gm, sp, grad_ch.mutable_data_ptr<acc_t>() + b0 * sh.cin, nb, sh);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // (with Cin == 0, L == 0: grad_ch is empty and grad_s is the sum of nothing, 0)
    spatial_grad_kernel<acc_t><<<blocks_for(nb * sh.taps), reduce_threads(sh.cin), 0, stream>>>(
        gm, ch, grad_s.mutable_data_ptr<acc_t>() + b0 * sh.taps, nb, sh);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // grad_a[b, k] = <G_b, W_k> and grad_W += a_chunk^T @ G_chunk.
    const at::Tensor gk_view = gk_buf.narrow(0, 0, nb);
    at::Tensor ga_view = grad_a.narrow(0, b0, nb);
    at::mm_out(ga_view, gk_view, w_acc.t());
    grad_w.addmm_(att.a.narrow(0, b0, nb).t(), gk_view);
  }

  return std::make_tuple(
      grad_x, grad_w.view(weight_in.sizes()).to(dtype), grad_ch.to(dtype), grad_f.to(dtype),
      grad_s.view({g.batch, g.kernel_h, g.kernel_w}).to(dtype), grad_a.to(dtype));
}

at::Tensor odconv2d_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& channel_att,
    const at::Tensor& filter_att, const at::Tensor& spatial_att, const at::Tensor& kernel_att,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const Geometry g = check_inputs(
      "odconv2d", x, weight, channel_att, filter_att, spatial_att, kernel_att, stride, padding,
      dilation, groups);
  TORCH_CHECK(x.is_cuda(), "odconv2d: the CUDA kernel got x on ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  // The ATen calls below are implementation details: keep autograd out of them even when the op
  // is called directly (not through its autograd formula) on tensors that require grad.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "odconv2d_cuda", [&] {
    out = forward_impl<scalar_t>(x, weight, channel_att, filter_att, spatial_att, kernel_att, g);
  });
  return out;
}

Grads odconv2d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& channel_att, const at::Tensor& filter_att, const at::Tensor& spatial_att,
    const at::Tensor& kernel_att, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, std::array<bool, 2> output_mask) {
  const Geometry g = check_inputs(
      "odconv2d_backward", x, weight, channel_att, filter_att, spatial_att, kernel_att, stride,
      padding, dilation, groups);
  check_grad_out("odconv2d_backward", grad_out, x, g);
  TORCH_CHECK(x.is_cuda(), "odconv2d_backward: the CUDA kernel got x on ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  Grads grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "odconv2d_backward_cuda", [&] {
    grads = backward_impl<scalar_t>(
        grad_out, x, weight, channel_att, filter_att, spatial_att, kernel_att, g, output_mask[0],
        output_mask[1]);
  });
  return grads;
}

} // namespace
} // namespace odconv

TORCH_LIBRARY_IMPL(odconv, CUDA, m) {
  m.impl("odconv2d", &odconv::odconv2d_cuda);
  m.impl("odconv2d_backward", &odconv::odconv2d_backward_cuda);
}
