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
// One thread per (set of kSpt samples, n = o*J + j).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) build_kernels_kernel(
    const scalar_t* __restrict__ weight, const acc_t* __restrict__ a, const acc_t* __restrict__ f,
    const acc_t* __restrict__ ch, const acc_t* __restrict__ sp, scalar_t* __restrict__ kern,
    int64_t nb, Shape sh) {
  const int64_t sets = sample_sets(nb);
  ODCONV_GRID_STRIDE(item, sets * sh.N) {
    const int64_t n = item % sh.N, b0 = (item / sh.N) * kSpt;
    const int nbs = set_size(nb, b0);
    const int64_t o = n / sh.J, j = n % sh.J;
    const int64_t c = (o / sh.cout_g) * sh.cin_g + j / sh.taps, t = j % sh.taps;
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
// cols: (nb, L, P). One thread per element of cols.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) im2col_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ cols, int64_t nb, Shape sh) {
  ODCONV_GRID_STRIDE(item, nb * sh.L * sh.P) {
    const int64_t p = item % sh.P, r = item / sh.P;
    const int64_t row = r % sh.L, b = r / sh.L;
    const int64_t c = row / sh.taps, t = row % sh.taps;
    const int64_t u = t / sh.kw, v = t % sh.kw;
    const int64_t oh = p / sh.wo, ow = p % sh.wo;
    const int64_t ih = oh * sh.sh - sh.ph + u * sh.dh;
    const int64_t iw = ow * sh.sw - sh.pw + v * sh.dw;
    scalar_t value = static_cast<scalar_t>(0);
    if (ih >= 0 && ih < sh.height && iw >= 0 && iw < sh.width)
      value = x[((b * sh.cin + c) * sh.height + ih) * sh.width + iw];
    cols[item] = value;
  }
}

// The adjoint of im2col, as a gather: gx[b, c, ih, iw] = sum of the gcols entries that im2col read
// from (ih, iw), in the fixed order (u, v). gx: (nb, cin, height, width). One thread per element.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) col2im_kernel(
    const scalar_t* __restrict__ gcols, scalar_t* __restrict__ gx, int64_t nb, Shape sh) {
  ODCONV_GRID_STRIDE(item, nb * sh.cin * sh.height * sh.width) {
    const int64_t iw = item % sh.width, r = item / sh.width;
    const int64_t ih = r % sh.height, bc = r / sh.height;  // bc = b*cin + c
    acc_t sum = acc_t(0);
    for (int64_t u = 0; u < sh.kh; ++u) {
      const int64_t hn = ih + sh.ph - u * sh.dh;  // = oh * sh when (ih, u) is read by row oh
      if (hn < 0 || hn % sh.sh != 0) continue;
      const int64_t oh = hn / sh.sh;
      if (oh >= sh.ho) continue;
      for (int64_t v = 0; v < sh.kw; ++v) {
        const int64_t wn = iw + sh.pw - v * sh.dw;
        if (wn < 0 || wn % sh.sw != 0) continue;
        const int64_t ow = wn / sh.sw;
        if (ow >= sh.wo) continue;
        sum += static_cast<acc_t>(gcols[(bc * sh.taps + u * sh.kw + v) * sh.P + oh * sh.wo + ow]);
      }
    }
    gx[item] = static_cast<scalar_t>(sum);
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
    for (int64_t j = threadIdx.x; j < sh.J; j += blockDim.x) {
      const int64_t n = o * sh.J + j;
      const int64_t c = c0 + j / sh.taps, t = j % sh.taps;
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

// gm[b, g*J + j] = sum_{r < cout_g} Q[b,o,j] A_b[o,j] f[b,o] with o = g*cout_g + r.
// One thread per (set of kSpt samples, g*J + j); adjacent threads read adjacent j. gm: (nb, L) acc.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) scale_grad_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ weight, const acc_t* __restrict__ a,
    const acc_t* __restrict__ f, acc_t* __restrict__ gm, int64_t nb, Shape sh) {
  const int64_t sets = sample_sets(nb);
  ODCONV_GRID_STRIDE(item, sets * sh.L) {
    const int64_t idx = item % sh.L, b0 = (item / sh.L) * kSpt;
    const int nbs = set_size(nb, b0);
    const int64_t g = idx / sh.J, j = idx % sh.J;
    acc_t sums[kSpt];
#pragma unroll
    for (int s = 0; s < kSpt; ++s) sums[s] = acc_t(0);
    for (int64_t r = 0; r < sh.cout_g; ++r) {
      const int64_t o = g * sh.cout_g + r, n = o * sh.J + j;
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
#pragma unroll
    for (int s = 0; s < kSpt; ++s)
      if (s < nbs) gm[(b0 + s) * sh.L + idx] = sums[s];
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

// Threads for a block that reduces `len` values: a multiple of 32 in [32, kThreads].
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
  const int64_t items = sample_sets(nb) * sh.N;
  if (items == 0) return;
  build_kernels_kernel<scalar_t, acc_t><<<grid_for(items, kThreads), kThreads, 0, stream>>>(
      weight.const_data_ptr<scalar_t>(), att.a.const_data_ptr<acc_t>() + b0 * sh.K,
      att.f.const_data_ptr<acc_t>() + b0 * sh.cout, att.ch.const_data_ptr<acc_t>() + b0 * sh.cin,
      att.s.const_data_ptr<acc_t>() + b0 * sh.taps, kern_buf.mutable_data_ptr<scalar_t>(), nb, sh);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_im2col(
    const at::Tensor& x, at::Tensor& cols_buf, int64_t b0, int64_t nb, const Shape& sh,
    cudaStream_t stream) {
  const int64_t items = nb * sh.L * sh.P;
  if (items == 0) return;
  im2col_kernel<scalar_t><<<grid_for(items, kThreads), kThreads, 0, stream>>>(
      x.const_data_ptr<scalar_t>() + b0 * sh.cin * sh.height * sh.width,
      cols_buf.mutable_data_ptr<scalar_t>(), nb, sh);
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
        const int64_t items = nb * sh.cin * sh.height * sh.width;
        if (items > 0) {
          col2im_kernel<scalar_t, acc_t><<<grid_for(items, kThreads), kThreads, 0, stream>>>(
              cols_buf.const_data_ptr<scalar_t>(),
              grad_x.mutable_data_ptr<scalar_t>() + b0 * sh.cin * sh.height * sh.width, nb, sh);
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
      scale_grad_kernel<scalar_t, acc_t><<<grid_for(sets * sh.L, kThreads), kThreads, 0, stream>>>(
          q, w, a, f, gm, nb, sh);
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
