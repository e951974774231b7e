// CPU kernels of odconv::odconv2d and odconv::odconv2d_backward (notation: csrc/odconv.h).
//
// What they compute, per sample b and group g, with the kernel matrix of a group being
// (Cout/G) x J, J = (Cin/G)*kh*kw, cols_b the (G*J) x P im2col matrix of x_b (P = Ho*Wo) and
// rows_b = cols_b^T its P x (G*J) transpose ("im2row"):
//
//   A[o,j]   = sum_k a[k] * W_k[o,j]                      aggregated kernel  (a = kernel_att[b])
//   m[j]     = ch[c] * s[u,v]           for j = (c,u,v)   (ch = channel_att[b], s = spatial_att[b])
//   Wb[o,j]  = f[o] * m[j] * A[o,j]                       per-sample kernel  (f = filter_att[b])
//
//   forward:   out_b[g]   = Wb[g] @ cols_b[g]                        (Cout/G x J) @ (J x P)
//   backward:  gy = grad_out[b] as (Cout x P)
//              grad_x_b   = col2im(Wb[g]^T @ gy[g])                   (J x Cout/G) @ (Cout/G x P)
//              Q          = gy[g] @ rows_b[g]                         gradient w.r.t. Wb
//              grad_f[o]  = sum_j Q[o,j] A[o,j] m[j]
//              grad_m[j]  = sum_o Q[o,j] A[o,j] f[o]
//                grad_ch[c]   = sum_uv grad_m[c,u,v] s[u,v]
//                grad_s[u,v]  = sum_c  grad_m[c,u,v] ch[c]             (summed over groups)
//              G[o,j]     = Q[o,j] f[o] m[j]                          gradient w.r.t. A
//              grad_a[k]  = <G, W_k>
//              grad_W[k] += a[k] G                                    summed over the batch
//
// Work split and memory. No tensor ever holds the per-sample kernels (or kernel gradients) of the
// whole batch. The forward gives each thread (at::parallel_for) a contiguous range of the batch,
// which it works through n <= kMaxSamplesPerThread samples at a time, n sized so its im2col buffers
// stay within kForwardThreadBytes; the backward processes the batch in chunks, and in a chunk each
// thread takes a run of n samples within kBackwardThreadBytes (less for small layers: see
// backward_kernel's run_bytes). The kernel matrix is cut into
// tiles: whole groups (G > 1) or ranges of output channels (G == 1) whose K slices of W_k fit in
// kTileBytes, for deep layers with small maps a range of rows and a range of J (make_tiles). A
// thread handles a tile for all of its samples before the next tile, so a tile of W_k is read from
// memory once per thread and run and then served from cache; the aggregated rows are consumed by
// the GEMMs while still in cache. (The float32 forward on maps like 6x6, which needs Wb^T, first
// transposes the tile's K slices of W once per run of at least kMinSamplesPerWeightTranspose
// samples, and its runs are sized by kTransposedForwardThreadBytes. The float32 forward on 4x4 and
// 8x8 maps builds A instead of Wb, the scales m and f applied to cols_b and out_b, for four samples
// per pass over a tile: build_folded_tile; and so do those runs, with A^T from the transposed
// slices and m on rows_b: build_folded_tile_transposed; with fewer than
// kMinSamplesPerWeightTranspose samples per thread that forward shares the ranges of tile rows
// between threads for every sample instead: "Tiles between threads".) A forward with fewer samples
// than threads (one image in the GUI) splits each sample's output rows between threads instead:
// im2col by input channels, then the (sample, row range) pairs in parallel. The backward of layers
// without groups gives each thread a range of input channels for every sample instead of a run of
// samples ("The backward by columns" below); the buffers and the grad_W reduction described next
// are those of the split by samples.
// Working buffers per thread (T x Jt = rows x columns of a tile, n = the thread's samples):
//   cols   (n, G*J, P)    im2col of x (forward); not built for 1x1, stride-1, unpadded kernels
//   rows   (n, P, G*J)    im2row of x (backward, for Q; float32 forward on maps like 6x6 and 7x7,
//                         which multiplies out^T = rows @ Wb^T into out_t (n, P, Cout), its columns
//                         in (tap, channel) order, of each tile's channels: "Tap-major columns"; dense
//                         layers whose tiles are cut in J hold one column block's (n, P, Jt) at a time,
//                         from x channels-last (n, H*W, Cin): "Column-block runs")
//   gcols  (n, G*J, P)    gradient of cols (backward; for the im2col-free case grad_x itself)
//   folded (4, T, Jt)     A of the tile for four samples (float32 forward on 4x4 and 8x8 maps), or
//                         A^T (4, Jt, T) (float32 forward on maps like 6x6, in runs of 5+ samples)
//   kern   (T, Jt)        Wb of the tile for one sample (forward), or its transpose (Jt, T) (the
//                         float32 forward on maps like 6x6; backward: (n, Jt, T)): in the forward's
//                         runs of 5+ samples folded (above), otherwise float rows built
//                         8 at a time and stored transposed from registers, others through a
//                         (T, Jt) scratch and a blocked transpose
//   wt     (K, Jt, T)     W_k of the tile transposed, per group (float32 forward on maps like 6x6)
//   q      (n, T, Jt)     Q of the tile (backward)
//   gbuf   (n, T, Jt)     G of the tile, accumulation type (backward; the backward by columns keeps
//                         G of a block's tiles for up to kGradWSamplesBytes of samples)
//   gW     (K, T*Jt)      the run's share of grad_W for the tile (backward; not for the first run)
// grad_a is reduced row by row while G and W_k are in cache; after each tile, G of the thread's
// samples goes into grad_W at once: grad_W[:, tile] += a^T @ G. The backward runs one parallel
// region per tile so these shares are summed in a fixed order into grad_W itself: no copy of
// grad_W per thread (it was 36 MiB per thread for 512->512 3x3, K = 4).
//
// Products: all matrices are row-major with leading dimensions. float32 goes through oneDNN's
// brgemm micro-kernel where torch exposes it (at::native::cpublas::brgemm, torch >= 2.7 on x86;
// about 1.5-2x MKL's sgemm on AMD CPUs), one call per group (the forward's products wider than 64
// columns, and without AVX-512 the backward's Q products: one per 48 or 24 columns,
// brgemm_column_block()); other dtypes, tiny groups and older torch use at::mm / at::bmm, which reach
// MKL/oneDNN/OpenBLAS. The backward of bfloat16 and float16
// inputs runs the float32 kernels on float32 copies (odconv2d_backward_cpu), and so does their forward
// on maps of at most 16x16 (odconv2d_cpu). Depthwise layers (one channel in and out per group) run
// csrc/cpu/depthwise_cpu.cpp instead (use_direct_depthwise); depthwise-like layers with a channel
// multiplier, and the float32 forward and backward of most layers on maps of 256 pixels or more, take the
// convolution primitive (see "Convolution path" below). Inside the parallel region these run
// single-threaded, one thread per run of samples. Before any of this, kernel rows and columns that read
// only padding for every output pixel (a 3x3 kernel on 1x1 maps, dilations as large as the map) are
// dropped from both ends, and the layer runs as the smaller kernel's ("Kernel rows and columns that read
// only padding" below).
#include "../odconv.h"
#include "depthwise_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <numeric>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

namespace odconv {
namespace {

constexpr int64_t kTileBytes = 512 * 1024;         // K slices of W_k per tile
constexpr int64_t kTileKernelsAtLeast = 4;         // the plain forward's tiles are sized for at least this K
constexpr int64_t kWholeGroupTileMaxBytes = 1024 * 1024;  // a group's Wb larger than this is cut (make_tiles)
constexpr int64_t kMinTileRows = 32;               // rows of a tile cut in J (see make_tiles)
constexpr int64_t kForwardLargeIm2colTileRows = 128;  // ... in the forward with a large im2col matrix
constexpr int64_t kForwardLargeIm2colBytes = 4 * 1024 * 1024;
constexpr int64_t kTransposedDirectTileRows = 64;  // ... in the transposed forward of 1x1 layers (make_tiles)
constexpr int64_t kTransposedDirectTileMinPixels = 36;
constexpr int64_t kMinSplitRows = 8;               // rows of a range split between threads, at least
constexpr int64_t kForwardCutRows = 16;            // the forward cuts J below this many rows (make_tiles)
// One sample's im2col matrix (J x P) up to this size stays in cache (L2) while a thread works on it.
constexpr int64_t kSmallIm2colBytes = 1024 * 1024;
// Working buffers per thread and chunk. The forward does better with fewer samples per run (its
// per-tile products re-read each sample's im2col matrix, which then stays nearer in cache): with
// 2 MB instead of 8 the forward took 0.54-0.86x the time on 7 of the 12 shapes of bench_op's suite
// and was unchanged beyond noise on the others (benchmarks/ab_builds.py, results in
// benchmarks/results/ab_forward_budget_cpu.json). The backward keeps 8 MB: with 2 MB, 512->512 4x4
// took 1.26x as long (more chunks, each re-reading the K kernels), and the mid-size maps did not
// change beyond noise.
constexpr int64_t kForwardThreadBytes = 2 * 1024 * 1024;
// The transposed float32 forward (maps like 6x6 and 7x7) takes more samples per run: each run
// streams the K kernels once per tile, and transposes its tiles' slices of W once
// (transpose_weight_tile) when it has at least kMinSamplesPerWeightTranspose samples. Below that
// the transposes of the K slices cost more than those of the built Wb^T they replace (K per element
// of the tile against one per sample). With 16 MB and 5 instead of 2 MB and none: forward 0.86-0.92
// of its time on B128 128->256 6x6, B32 512->512 7x7, B64 256->256 5x5 and a 7x7 layer with groups
// (benchmarks/ab_builds.py, 5 rounds of 15 calls; results/ab_weight_transposed_forward_cpu.json).
// The whole of W transposed once per call was slower on B32 512->512 7x7 (1.16): 38 MB of fresh
// pages per call. Those runs fold the scales out as the 4x4 and 8x8 forward does (below): A^T for
// four samples per pass from the transposed slices, m on each sample's rows, f on its output
// (benchmarks/ab_builds.py against building Wb^T sample by sample, 5 rounds, two runs,
// results/ab_folded_transposed_forward_cpu.json: forward 0.89-0.93 on B128 128->256 6x6 and B64
// 256->256 5x5, 0.86 on B64 512->512 3x3, 0.85-0.86 on B32 512->512 7x7 with K = 8; with K = 4
// 0.85 in one run and 1.05 in the other, 0.95-0.96 in alternated timings). Multiplying Wb @ cols
// folded on these maps instead, ragged block and all, with no transposes of W, was slower on 6x6,
// 5x5 and 3x3 (1.1-1.2) and no faster on 7x7.
constexpr int64_t kTransposedForwardThreadBytes = 16 * 1024 * 1024;
constexpr int64_t kMinSamplesPerWeightTranspose = 5;
// The forward on maps of at most kMaxFoldedPixels pixels that multiply Wb @ cols (8x8, 4x4 and
// stride-2 outputs of these sizes; 6x6, 7x7 and smaller maps take the transposed product) builds the
// kernels with the scales folded out, kFoldedSamples samples per pass over a tile
// (build_folded_tile), in runs of up to kFoldedThreadBytes of im2col matrices: on B64 512->512 4x4
// (forward 28.3 ms, the static convolution 9.5) 22 ms (in-process timings, 2 cores; HISTORY.md in
// benchmarks/). A run streams the K kernels once, so its budget is their size within
// [kForwardThreadBytes, kFoldedThreadBytes]: 8 MB for every layer made B64 128->128 8x8 (2.4 MB of
// kernels) hold 16 samples' im2col per thread, and its training step's peak memory 1.33x the static
// convolution's (1.07x sized by the kernels; forward 0.93-1.03 on three 8x8 layers against 8 MB,
// benchmarks/ab_builds.py, results/ab_folded_runs_by_weight_cpu.json).
// A pass over a tile holds, for its kFoldedSamples samples, their A of the tile and their im2col
// columns of it beside the tile's K slices of W, so folded tiles are sized for all three to fit
// kFoldedPassBytes (this machine's L2), not for the K slices alone to fit kTileBytes: with 512 KB
// of K slices an 8x8 pass held ~2 MB, and the folded path was no faster than building Wb sample by
// sample there. Sized for the pass, 8x8 maps take the folded path too (benchmarks/ab_builds.py,
// 5 rounds, results/ab_folded_forward_8x8_cpu.json: forward 0.77 and 0.62 on B32 512->512 8x8 with
// K = 4 and 8, 0.96 on B32 256->256 and B64 128->128 8x8, 1.03-1.04 on B8 256->256 8x8 and on
// B32 128->256 stride 2 onto 8x8 (0.94 in a first run); 1.00-1.05 on three 4x4 layers, whose tiles
// changed size too). Tiles of whole groups (G > 1) are not sized by the budget, and fold even where
// their pass exceeds it: B32 256->256 7x7 with 4 groups (1.6 MB passes) and B64 256->512 6x6 with 2
// (3.4 MB) timed 2.3-2.7 and 14.8-15.2 ms folded against 2.4-3.0 and 15.6-16.0 unfolded, alternated.
constexpr int64_t kMaxFoldedPixels = 64;
constexpr int64_t kFoldedSamples = 4;
constexpr int64_t kTransposedForwardMinGroupRows = 12;  // without AVX-512: see forward_kernel
constexpr int64_t kTransposedGradXMinGroupRows = 64;    // see backward_kernel
constexpr int64_t kFoldedThreadBytes = 8 * 1024 * 1024;
constexpr int64_t kFoldedPassBytes = 1024 * 1024;
constexpr int64_t kBackwardThreadBytes = 8 * 1024 * 1024;
constexpr int64_t kBackwardThreadMinBytes = 1024 * 1024;
constexpr int64_t kMaxSamplesPerThread = 16;
constexpr int64_t kGradWAddGrain = 16384;          // columns of a grad_W tile per thread, at least
// Groups whose products are smaller than this many multiply-adds (depthwise, ...) are multiplied
// in one batched call rather than one call per group, which would be dominated by call overhead.
constexpr int64_t kMinGroupGemm = 16384;
// bfloat16/float16 forwards with at most this many output pixels run the float32 kernels
// (odconv2d_cpu); larger maps keep 16-bit products.
constexpr int64_t kHalfForwardMaxPixelsIn16Bit = 256;

// Outputs (out, grad_x, grad_W) of at least this size come from the system as fresh pages on every
// call: glibc serves allocations above its largest mmap threshold (32 MiB on 64-bit) with mmap,
// whatever was freed before, and each 4 KiB page then faults when the op first writes it. The
// gradient of the K kernels is K times the static convolution's (36 MiB for 512->512 3x3, K = 4:
// ~9,200 faults per backward, 13 % of that layer's backward on B64 4x4 maps in perf, where the
// static convolution's 9 MiB gradient is recycled by the allocator).
constexpr int64_t kHugePageAdviceBytes = int64_t{32} << 20;

// Asks Linux to back t's storage with transparent huge pages (where THP is set to "madvise", many
// distributions' default): 2 MiB faults instead of 512 small ones. Only a hint: an error, or
// another system, leaves the pages as they are.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (t.nbytes() < static_cast<size_t>(kHugePageAdviceBytes)) return;
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + t.nbytes()) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// The value of the environment variable `name`, "auto" when unset, which must be one of `choices`
// (the first "auto"): the overrides of the kernels' choices of path (ODCONV_CPU_TAP_MAJOR,
// ODCONV_CPU_SKIP_PADDED_ROWS, ODCONV_CPU_BACKWARD_SPLIT, ODCONV_CPU_BACKWARD_TRANSPOSED_GX,
// ODCONV_CPU_CONV_PATH, ODCONV_CPU_TRANSPOSED_FORWARD, ODCONV_CPU_FORWARD_SPLIT, ODCONV_CPU_MASKED_TAPS,
// ODCONV_CPU_RAGGED_TAIL, ODCONV_CPU_SHARED_KERNEL, ODCONV_CPU_DEAD_TAPS, ODCONV_CPU_DEPTHWISE) that tests and
// A/B runs use.
std::string path_override(const char* name, std::initializer_list<const char*> choices) {
  const char* env = std::getenv(name);
  const std::string mode = env == nullptr ? "auto" : env;
  std::string listed;
  bool known = false;
  size_t i = 0;
  for (const char* choice : choices) {
    known = known || mode == choice;
    listed += i == 0 ? "" : (i + 1 == choices.size() ? " or " : ", ");
    listed += choice;
    ++i;
  }
  TORCH_CHECK(known, name, " must be ", listed, ", got '", mode, "'");
  return mode;
}

// Bytes of one sample's im2col matrix (G*J x P).
inline int64_t im2col_bytes(const Geometry& g, int64_t elem_size) {
  return g.groups * g.cols_per_group() * g.out_pixels() * elem_size;
}

// Bytes of the batch's activations, x and out.
inline int64_t activation_bytes(const Geometry& g, int64_t elem_size) {
  return g.batch * (g.in_channels * g.height * g.width + g.out_channels * g.out_pixels()) * elem_size;
}

// Part of the kernel matrix handled together: groups [g0, g1) and, within each, rows [r0, r1) and
// columns [j0, j1) of the group's J.
struct Tile {
  int64_t g0, g1, r0, r1, j0, j1;
  int64_t groups() const { return g1 - g0; }
  int64_t rows() const { return r1 - r0; }
  int64_t cols() const { return j1 - j0; }
  int64_t first_row(int64_t out_per_group) const { return g0 * out_per_group + r0; }
};

// [0, n) cut into pieces of at most `most` (at least 1), as equal as possible: the last one is not
// left with a sliver. Returns the step.
inline int64_t even_step(int64_t n, int64_t most) {
  const int64_t pieces = (n + most - 1) / std::max<int64_t>(1, most);
  return std::max<int64_t>(1, (n + pieces - 1) / std::max<int64_t>(1, pieces));
}

// even_step(n, most), rounded up to a multiple of 16 (a vector of floats, a block of brgemm) where it
// is at least kMinVectorStep, so that every piece but the last has no ragged block: cutting the
// J = 4608 columns of a 512-channel 3x3 layer into pieces of 922 made the float32 forward on 4x4
// maps 1.11-1.15x as slow as pieces of 928 (benchmarks/ab_builds.py, 5 rounds,
// results/ab_vector_step_cpu.json: forward 0.87-0.90 on B64 and B128 512->512 and B64 512->256 4x4
// with the rounding, 1.01 on 256->256 4x4, whose pieces were multiples of 16 already; 1.03-1.07 in
// two runs on the 512->512 7x7 forward, whose alternated timings were 33.3-34.9 ms either way). The
// last piece loses at most 15 columns per piece before it.
constexpr int64_t kMinVectorStep = 128;
inline int64_t round_up_16(int64_t step, int64_t n) { return std::min(n, (step + 15) / 16 * 16); }
inline int64_t vector_step(int64_t n, int64_t most) {
  const int64_t step = even_step(n, most);
  return step >= kMinVectorStep ? round_up_16(step, n) : step;
}
// Whole channels of `taps` columns each whose columns make a multiple of 16 (a vector, a brgemm block).
inline int64_t channels_per_16_columns(int64_t taps) { return 16 / std::gcd<int64_t>(taps, 16); }

// The budget of a folded tile's K slices of W (see kFoldedPassBytes): per column of a tile cut in J
// (kMinTileRows rows), a pass holds K * rows values of W, kFoldedSamples * rows of A and
// kFoldedSamples * P of the samples' im2col matrices.
inline int64_t folded_tile_bytes(const Geometry& g, int64_t P) {
  const int64_t K = g.kernel_num, rows = kMinTileRows;
  return kFoldedPassBytes * K * rows / (K * rows + kFoldedSamples * (rows + P));
}

// Tiles. With G > 1 a tile is whole groups. With G == 1 it is a range of output channels over all
// of J when at least kMinTileRows rows fit in tile_bytes (kTileBytes, or folded_tile_bytes), or
// when one sample's im2col matrix is large (see the grad_x panels below). Otherwise (deep layers
// with small maps: 7 rows of 512->512 3x3 fill 512 KB) the rows alone make thin products
// (7 x 4608 @ 4608 x 16 at 4x4) that re-read the sample's im2col matrix for every 7 rows, and the
// tile is cut in J as well:
// kMinTileRows rows by as many columns as fit. The products then accumulate over the column
// blocks of a row range, which are consecutive in the tile order. (A/B on 2 cores,
// benchmarks/results/ab_cut_columns_cpu.json: B64 512->512 4x4 forward 118 -> 58 ms, backward
// 353 -> 222 ms; 256->256 8x8 backward 80 -> 66 ms. With large maps, 16x16 and the 5x5 layer on
// 24x24, cutting J made the backward 1.1-1.2x slower in a trial: its grad_x product then re-reads a
// block of gcols for every 32 rows instead of every 128.)
// The forward (for_forward) has no grad_x product and cuts J on large im2col matrices too when
// fewer than kForwardCutRows rows fit: 256->256 14x14 thin tiles re-read 1.8 MB of im2col for
// every 14 rows (A/B, benchmarks/results/ab_forward_cut_large_cpu.json: forward 0.61-0.76x on
// 128->128 16x16 5x5, 256->256 14x14 and 28x28; 0.94 on the 96->96 5x5 layer; with 28 rows,
// 128->128 3x3 on 28x28, cutting was slower in a trial, 39 -> 42-47 ms).
// min_row_blocks > 1 asks for at least that many ranges of rows (or of groups), of at least
// kMinSplitRows rows: the forward of batches smaller than the thread count splits the rows of a
// sample between threads.
// rows_are_columns: the tiles' rows are the columns (N) of the products, as in the transposed
// forward (out^T = rows @ Wb^T): the row ranges are then multiples of 16 (a block of brgemm), but
// for the last. Cut evenly, the 960 rows of a 160->960 1x1 layer on 7x7 made tiles of 107 rows,
// N = 6 blocks of 16 and a ragged 11, and its forward ran 1.3x as slow as the plain orientation.
// whole_channels: tiles cut in J hold whole input channels (a multiple of taps columns; of 16 too where
// that is at most a vector_step piece's channels rounded up), as the tap-major columns need (see there).
// cut_groups (the forward's products Wb @ cols, plain and folded): with G > 1 a group whose Wb (Cout/G x J) is
// larger than kWholeGroupTileMaxBytes, the L2 of the CPUs this was tuned on, is cut into tiles of its
// rows and columns as a dense layer's; before, a tile was always whole groups, and each sample's Wb
// tile (9.8 MB on 384->1024 5x5 with two groups) streamed through L3 for its product.
// (benchmarks/ab_env.py against whole groups with a temporary switch, 6 rounds, Zen 4 EPYC,
// results/ab_forward_cut_groups_avx512_cpu*.json, two runs: forward 0.35-0.47 on B4 384->1024 24x24 5x5
// stride 2, B16 1024->256 28x28 stride 2 and B16 768->768 14x14, all with two groups, 0.89 on 1024->1024
// 14x14 with four, 0.99-1.03 on 512->512 7x7 with two; unchanged on grouped layers whose groups are
// smaller, ResNeXt's 32 groups of 32 rows among them. Cutting every group larger than a tile's K slices, as a first run did, read 1.06 and 1.17 on
// 256->256 14x14 with two groups and 512->512 14x14 with four (590 KB of Wb a group), 0.94 on 512->96
// 12x12 with two (442 KB): those keep whole groups. The folded forward (maps of at most 64 pixels) the
// same way, ..._folded_avx512_cpu*.json, two runs of 6 and 8 rounds: 0.27 on B4 512->1024 4x4 5x5 with
// two groups, 0.61-0.62 on B64 512->512 4x4 with two, 0.63-0.74 on 1024->1024 4x4 with four, 0.78 on
// B32 512->512 7x7 with two, 0.82 on 8x8 with two; 0.99-1.04 on 256->512 8x8 and 6x6 with two.)
// The forward's tiles cut in J take kForwardLargeIm2colTileRows rows instead of kMinTileRows where a
// sample's im2col matrix (one group's, J x P) is kForwardLargeIm2colBytes or more: each range of rows
// re-reads that matrix from beyond L2, 16 times a sample for 512 rows in tiles of 32 (each tile then
// holds 256 columns of J instead of 1024, accumulated over more products). (benchmarks/ab_env.py with a
// temporary switch, 3 rounds, Zen 4 EPYC, results/ab_forward_tile_rows_large_im2col_avx512_cpu*.json:
// forward 0.79-0.90 with 128 rows on B4 384->512 and B16 512->512 14x14 5x5, B32 1024->512 10x10 5x5,
// B16 1024->256 12x12 5x5 and B8 1024->1024 14x14 3x3 (7-15 MB of im2col a sample), 64 rows 0.84-0.99;
// 0.98-1.09 on layers with 0.3-3.6 MB (4x4, 12x12, 10x10, 14x14 3x3), which keep 32. Only the plain
// products on maps of more than kMaxFoldedPixels pixels, where it was measured: not the folded forward's
// tiles nor the transposed forward's, whose rows are the products' columns.)
// The transposed forward's tiles cut in J take kTransposedDirectTileRows rows (N of its products, against
// M = P) on 1x1 layers without im2col on maps of kTransposedDirectTileMinPixels pixels or more: deep 1x1
// layers on 6x6 and 7x7 (ResNet-50's last stage, ConvNeXt's last MLPs). (benchmarks/ab_env.py with a
// temporary switch, 4 rounds, memory kept, Zen 4 EPYC, results/ab_forward_transposed_tile_rows_avx512_cpu*.json:
// forward 0.90-0.94 on 2048->512 7x7 at B4 and B8 and with K = 8 at B32, 3072->768 and 1024->256 on 7x7, 1024->256
// 6x6; 1.02 on 1536->384 7x7; on 5x5 and 3x3 maps 0.99 and 1.01; with 3x3 and 5x5 kernels on 5x5-7x7 maps
// 0.99-1.05, which keep 32 rows.)
std::vector<Tile> make_tiles(const Geometry& g, int64_t elem_size, int64_t min_row_blocks = 1, bool for_forward = false,
                             int64_t tile_bytes = kTileBytes, bool rows_are_columns = false,
                             bool whole_channels = false, bool cut_groups = false) {
  const int64_t J = g.cols_per_group();
  const int64_t row_bytes = std::max<int64_t>(1, g.kernel_num * J * elem_size);
  const int64_t rows_per_tile = std::max<int64_t>(1, tile_bytes / row_bytes);
  std::vector<Tile> tiles;
  const int64_t Cog = g.out_per_group;
  if (g.groups == 1 || (cut_groups && Cog * J * elem_size > kWholeGroupTileMaxBytes)) {
    // each group (a dense layer's one; with cut_groups, groups whose Wb exceeds kWholeGroupTileMaxBytes)
    // in tiles of its rows, cut in J where the rows alone would be thin (see above)
    const bool cut_columns =
        rows_per_tile < kMinTileRows && Cog > rows_per_tile &&
        (J * g.out_pixels() * elem_size <= kSmallIm2colBytes || (for_forward && rows_per_tile < kForwardCutRows));
    const bool large_im2col = for_forward && !rows_are_columns && g.out_pixels() > kMaxFoldedPixels &&
                              J * g.out_pixels() * elem_size >= kForwardLargeIm2colBytes;
    const bool wide_direct = for_forward && rows_are_columns && g.im2col_is_identity() &&
                             g.out_pixels() >= kTransposedDirectTileMinPixels;
    const int64_t rows_wanted =
        cut_columns ? (large_im2col ? kForwardLargeIm2colTileRows
                                    : (wide_direct ? kTransposedDirectTileRows : kMinTileRows))
                    : rows_per_tile;
    const int64_t rows =
        min_row_blocks > g.groups
            ? std::min(rows_wanted, std::max(kMinSplitRows, (Cog * g.groups + min_row_blocks - 1) / min_row_blocks))
            : rows_wanted;
    const int64_t cols = cut_columns ? std::max<int64_t>(16, tile_bytes / (g.kernel_num * rows * elem_size)) : J;
    int64_t row_step = even_step(Cog, rows);
    if (rows_are_columns) row_step = round_up_16(row_step, Cog);
    int64_t col_step = vector_step(J, cols);
    if (whole_channels && col_step < J) {  // a multiple of taps columns, of 16 where it can
      const int64_t taps = g.taps(), align = channels_per_16_columns(taps);
      int64_t channels = even_step(g.in_per_group, std::max<int64_t>(1, cols / taps));
      if (channels >= align) channels = std::min(g.in_per_group, (channels + align - 1) / align * align);
      col_step = channels * taps;
    }
    for (int64_t gi = 0; gi < g.groups; ++gi)
      for (int64_t r = 0; r < Cog; r += row_step)
        for (int64_t j = 0; j < J; j += col_step)
          tiles.push_back({gi, gi + 1, r, std::min(Cog, r + row_step), j, std::min(J, j + col_step)});
  } else {
    const int64_t groups_per_tile =
        std::clamp<int64_t>(rows_per_tile / Cog, 1, (g.groups + min_row_blocks - 1) / min_row_blocks);
    for (int64_t gi = 0; gi < g.groups; gi += groups_per_tile)
      tiles.push_back({gi, std::min(g.groups, gi + groups_per_tile), 0, Cog, 0, J});
  }
  return tiles;
}

// The backward's grad_x product, gcols (+)= Wb[rows]^T @ gy[rows], has the tile's rows as its inner
// dimension. With G == 1 and a large gcols matrix (J x P larger than kSmallIm2colBytes) the tiles
// can be thin (13 rows for the 5x5 96->96 layer), and one product per tile would stream the whole
// gcols matrix through memory once per tile for only T multiply-adds per element. So there
// consecutive tiles are gathered into panels of at least kGradXRows rows: their transposed kernels
// are collected, and multiplied once per panel. (Measured on 2 cores, 5x5 96->96 24x24: backward
// 630 -> 320 ms; on 256->256 8x8, where gcols fits in cache, panels were slower: the larger buffers
// leave fewer samples per thread.) Tiles cut in J are never gathered: they have kMinTileRows rows.
// The backward by columns gathers its tiles (a block's columns) likewise (see "Panels" there).
constexpr int64_t kGradXRows = 128;

struct Panel {
  size_t last_tile;  // the panel's product runs after this tile
  int64_t g0, r0, rows, cols;  // cols: of J, those of its tiles
};

// panel_of[i]: the panel of tiles[i]. Where `gather`, a tile extends the panel of the tile before it
// when it has the same groups and columns and starts at the row where that one ended (so tiles cut
// in J, whose neighbours have other columns, are never gathered), until the panel has kGradXRows
// rows; otherwise, and with G > 1, every tile is its own panel.
std::vector<Panel> make_panels(const std::vector<Tile>& tiles, bool gather, std::vector<size_t>& panel_of) {
  std::vector<Panel> panels;
  panel_of.assign(tiles.size(), 0);
  for (size_t i = 0; i < tiles.size(); ++i) {
    const Tile& t = tiles[i];
    const bool extend = gather && i > 0 && t.g0 == tiles[i - 1].g0 && t.g1 == tiles[i - 1].g1 &&
                        t.j0 == tiles[i - 1].j0 && t.j1 == tiles[i - 1].j1 && t.r0 == tiles[i - 1].r1 &&
                        panels.back().rows < kGradXRows;
    if (extend) {
      panels.back().rows += t.rows();
      panels.back().last_tile = i;
    } else {
      panels.push_back({i, t.g0, t.r0, t.rows(), t.cols()});
    }
    panel_of[i] = panels.size() - 1;
  }
  return panels;
}

// Ranges of rows: [first, last) of consecutive tiles with the same groups and first row (a range's
// column blocks, which accumulate into the same outputs, so one thread takes all of them).
std::vector<std::pair<size_t, size_t>> row_ranges(const std::vector<Tile>& tiles) {
  std::vector<std::pair<size_t, size_t>> ranges;
  for (size_t ti = 0; ti < tiles.size(); ++ti) {
    if (ti > 0 && tiles[ti].g0 == tiles[ti - 1].g0 && tiles[ti].r0 == tiles[ti - 1].r0)
      ranges.back().second = ti + 1;
    else
      ranges.emplace_back(ti, ti + 1);
  }
  return ranges;
}

int64_t max_tile_elems(const std::vector<Tile>& tiles) {
  int64_t m = 0;
  for (const Tile& t : tiles) m = std::max(m, t.groups() * t.rows() * t.cols());
  return m;
}

// Samples a thread takes at a time: at most kMaxSamplesPerThread, whose buffers fit thread_bytes.
inline int64_t samples_per_run(int64_t bytes_per_sample, int64_t thread_bytes) {
  return std::clamp<int64_t>(thread_bytes / std::max<int64_t>(1, bytes_per_sample), 1, kMaxSamplesPerThread);
}

// Samples per chunk (the backward split by samples): each thread gets samples_per_run of them, and
// the chunks split the batch evenly so no thread idles in the last one.
int64_t chunk_size(int64_t batch, int64_t bytes_per_sample, int64_t thread_bytes) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_thread = samples_per_run(bytes_per_sample, thread_bytes);
  const int64_t n_chunks = std::max<int64_t>(1, (batch + per_thread * threads - 1) / (per_thread * threads));
  const int64_t per_chunk = (batch + n_chunks - 1) / n_chunks;
  return std::max<int64_t>(1, (per_chunk + threads - 1) / threads * threads);
}

// Threads taking one contiguous range of the batch each: at most one per sample.
inline int64_t batch_ranges(int64_t batch) {
  return std::min<int64_t>(std::max<int64_t>(1, at::get_num_threads()), batch);
}

// body(r, b_begin, b_end) for each range r of batch_ranges(batch), in one parallel region.
template <typename F>
void for_each_batch_range(int64_t batch, const F& body) {
  const int64_t runs = batch_ranges(batch);
  at::parallel_for(0, runs, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) body(r, batch * r / runs, batch * (r + 1) / runs);
  });
}

// brgemm runs a product with more than kBrgemmMaxWholeColumns columns faster as several products
// of brgemm_column_block() columns each (on AVX-512, 48: three vectors of 16 floats) when it has at least
// kBrgemmMinSplitRows rows. One core of an Intel Xeon, python benchmarks/bench_brgemm_blocks.py
// (results/bench_brgemm_blocks_cpu.json: (32 x 576) @ (576 x N), the tile shared, B and C cycling
// over four samples' buffers, median GFLOP/s of 8 interleaved rounds, whole / in blocks of 48):
// N = 80 91 / 107, 96 97 / 117, 100 99 / 118, 128 115 / 127, 144 118 / 143, 196 119 / 133,
// 256 87 / 98, 576 73 / 94; 8 rows at N = 144 85 / 128; N = 64 116 whole, 109 in blocks. In the op
// the forward's Wb @ cols products take blocks (grouped_gemm's in_column_blocks), N being the map's
// P: rdtsc around them on B128 128->128 12x12 read 45-47 flop per cycle whole and 50-54 in blocks,
// and benchmarks/ab_builds.py --paired (8 rounds, one thread, results/ab_brgemm_column_blocks_cpu.json)
// forward 0.85-0.87 on B128 128->128 12x12, B32 256->256 14x14 and B64 128->128 10x10, 1.01 on B128
// 64->128 12x12 (0.95 in a first run), against 0.99-1.00 on two layers whose forward has no such
// product (8x8, P = 64; 16x16, the convolution path); single rounds ranged over +-30 %. The
// backward's products stay whole: in the op they ran no faster in blocks (rdtsc, 12x12: 44-49
// against 48-49 flop per cycle; alone, (576 x 32) @ (32 x 144) for grad_x 104 / 101, (32 x 144) @
// (144 x 576) for Q 93 / 103), and grad_W's (4 x n) @ (n x 576) ran 25 whole and 7 in blocks.
// A block is three vectors of the micro-kernel oneDNN picks for the CPU it runs on: on one without
// AVX-512 (an AMD EPYC, Zen 3, 2026-12-06: vectors of 8 floats) blocks of 48 ran little faster than
// whole products, blocks of 24 (or 16) 1.1-1.6x faster (GFLOP/s whole / in 48s / in 24s, M = 32):
// N = 196 (K = 768) 53 / 59 / 84; N = 144 (K = 576) 72 / 77 / 91; N = 100 52 / 55 / 77; N = 64
// 75 / 69 / 83 (bench_brgemm_blocks.py, results/bench_brgemm_blocks_avx2_cpu.json). Forward 0.78 on
// B32 256->256 14x14, 0.68 on B64 128->128 10x10, 0.89-0.94 on three 12x12 layers (ab_builds.py
// --paired, 6 rounds, results/ab_brgemm_column_blocks_avx2_cpu.json).
constexpr int64_t kBrgemmColumnBlockAvx512 = 48;
constexpr int64_t kBrgemmColumnBlockAvx2 = 24;
constexpr int64_t kBrgemmMaxWholeColumns = 64;
constexpr int64_t kBrgemmMinSplitRows = 8;
// Nor with an inner dimension below kBrgemmMinSplitInner, where each block's call does too little
// work: (32 x 27) @ (27 x 4096), the 3-channel stem's product, ran 32-37 GFLOP/s whole and 24-25 in
// blocks of 24 or of 48 on the Zen 3 EPYC (bench_brgemm_blocks.py, 5 rounds). In the op, forward of
// B32 3->32 64x64 and B64 3->32 48x48 (ab_builds.py --paired, 7 and 9 rounds,
// results/ab_brgemm_min_split_inner_cpu.json): fastest medians 0.83-0.93 of the time in blocks, the
// rounds' ratios of these 5-7 ms calls spread over 0.3-2.6.
constexpr int64_t kBrgemmMinSplitInner = 64;

// Whether the CPU this runs on has AVX-512 (not the one the extension was compiled for: oneDNN picks
// its micro-kernel at run time). Elsewhere than x86 with gcc or clang, taken as yes: the blocks tuned
// on AVX-512 and no blocked backward products, as before the AVX2 measurements.
inline bool cpu_has_avx512() {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return true;
#endif
}

inline int64_t brgemm_column_block() { return cpu_has_avx512() ? kBrgemmColumnBlockAvx512 : kBrgemmColumnBlockAvx2; }

// The backward's Q = gy @ rows products, (T x P) @ (P x Jt) with Jt in the hundreds of columns, go in
// column blocks too where the CPU has no AVX-512 (and, as every blocked product, only where their
// inner dimension P is at least kBrgemmMinSplitInner). Alone on
// the Zen 3 EPYC (bench_brgemm_blocks.py, GFLOP/s whole / in 24s): (32 x 196) @ (196 x 768) 59 / 86,
// (32 x 144) @ (144 x 1152) 49 / 76, (32 x 64) @ (64 x 768) 68 / 75, but (32 x 16) @ (16 x 1152) 62 /
// 44. In the op (ab_builds.py --paired, 9 rounds, results/ab_backward_q_blocks_avx2_cpu.json): backward
// 0.89 [0.72-1.12] on B32 256->256 14x14, 0.94 on B128 128->128 12x12, 0.95-0.97 on 8x8, 10x10 and
// B128 64->128 12x12 layers; a 6-round run before read 0.93-1.09. On the Intel Xeon the backward's
// products in blocks were no faster in the op (above), so CPUs with AVX-512 keep them whole.
inline bool backward_q_in_column_blocks() { return !cpu_has_avx512(); }

#if defined(__AVX512F__)
// (not _mm512_reduce_add_ps: gcc 12 warns about the undefined vector inside it)
inline float horizontal_sum(__m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  float sum = 0;
  for (int l = 0; l < 16; ++l) sum += lanes[l];
  return sum;
}

// Ragged tails. brgemm covers N in blocks of 16 columns and runs a ragged last block at the cost of a
// full one or more: on one core of the Zen 4 EPYC (bench_brgemm_blocks.py) (128 x 1152) @ (1152 x 49)
// ran at 76 GFLOP/s against 114 for 48 columns, so the 49th column took half the time of the other
// 48; likewise (64 x 576) @ (576 x 36) 74 against 112 for 32. tail_columns_product multiplies the last
// nt <= kMaxTailColumns columns itself, R rows at a time, each of A's vectors loaded once for the nt
// columns: C[:, 0:nt] (+)= A @ B[:, 0:nt], A (M x K, lda), B (K x nt, ldb), C (M x nt, ldc); bt
// (nt x K) holds B's columns transposed. (benchmarks/ab_env.py, ODCONV_CPU_RAGGED_TAIL=never against
// auto, 14 rounds, Zen 4 EPYC, results/ab_ragged_tail_avx512_cpu.json: forward 0.78-0.81 on B32
// 256->256 7x7 with 2 and 4 groups and 384->384 7x7 with 12, whose forward multiplies Wb @ cols with
// N = 49; 0.88 on B64 256->256 6x6 with 4 groups, 0.86 on dense B64 256->256 9x9 (N = 81), 0.93 on
// B32 96->96 7x7 with 8; backward and the other layers 0.98-1.03.) Only with an inner dimension of at
// least kMinTailInner and kMinTailRows rows: with fewer its per-element sums cost more than brgemm's
// ragged block (B64 48->96 7x7 with 12 groups, products of 8 rows or an inner dimension of 8: backward
// 1.07-1.09 in trials). Those were 64 and none until the narrow groups' backward by columns, whose
// grad_x product Wb^T @ gy has K = a group's 16-32 rows (ab_env.py, the same variants, 12 rounds,
// results/ab_ragged_tail_inner16_avx512_cpu.json, K >= 16 and M >= 16 against K >= 64: backward 0.91-0.96
// on B32 1024->1024 7x7 with 32 groups, B64 512->512 7x7 with 16 and B32 with 32; on four layers of 4-12
// rows per group 0.98-1.09, within their spread).
// And tails of at most kMaxTailColumns: the kernel runs at best at brgemm's rate per column, so its
// gain shrinks as the tail grows. (In-process alternations of a temporary switch, forward of B64
// 256->256 with 4 groups: against tails of one column only, 0.83, 0.81, 0.94 and 0.89 with tails of 2,
// 3, 4 and 4 (3x6, 5x7, 4x5, 6x6 maps), 0.86 with 2 (5x10); tails of up to 8 against up to 4, 1.10-1.35
// with tails of 6 and 8 (2x11, 4x6, 5x8, 7x8); up to 12 against up to 8, 1.10-1.13 on dense 11x11 and
// 13x13 and 1.35-1.44 on 5x5 with groups, tails of 9.)
constexpr int64_t kMaxTailColumns = 4;
constexpr int64_t kMinTailInner = 16;
constexpr int64_t kMinTailRows = 16;

template <int NT, int R>
void tail_columns_rows(const float* A, int64_t lda, const float* bt, int64_t K, float* C, int64_t ldc,
                       bool accumulate) {
  __m512 acc[R][NT];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NT; ++c) acc[i][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    __m512 a[R];
    for (int i = 0; i < R; ++i) a[i] = _mm512_maskz_loadu_ps(mask, A + i * lda + k);
    for (int c = 0; c < NT; ++c) {
      const __m512 b = _mm512_maskz_loadu_ps(mask, bt + c * K + k);
      for (int i = 0; i < R; ++i) acc[i][c] = _mm512_fmadd_ps(a[i], b, acc[i][c]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NT; ++c) {
      const float v = horizontal_sum(acc[i][c]);
      C[i * ldc + c] = accumulate ? C[i * ldc + c] + v : v;
    }
}

template <int NT>
void tail_columns_product_nt(int64_t M, int64_t K, const float* A, int64_t lda, const float* bt, float* C,
                             int64_t ldc, bool accumulate) {
  constexpr int R = 4;  // R * NT accumulators, R vectors of A, one of B: within 32 registers
  int64_t r = 0;
  for (; r + R <= M; r += R) tail_columns_rows<NT, R>(A + r * lda, lda, bt, K, C + r * ldc, ldc, accumulate);
  for (; r < M; ++r) tail_columns_rows<NT, 1>(A + r * lda, lda, bt, K, C + r * ldc, ldc, accumulate);
}

inline void tail_columns_product(int64_t M, int64_t nt, int64_t K, const float* A, int64_t lda, const float* B,
                                 int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  thread_local std::vector<float> bt;
  bt.resize(nt * K);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < nt; ++c) bt[c * K + k] = B[k * ldb + c];
  static_assert(kMaxTailColumns == 4, "one case per tail width");
  switch (nt) {
    case 1: tail_columns_product_nt<1>(M, K, A, lda, bt.data(), C, ldc, accumulate); break;
    case 2: tail_columns_product_nt<2>(M, K, A, lda, bt.data(), C, ldc, accumulate); break;
    case 3: tail_columns_product_nt<3>(M, K, A, lda, bt.data(), C, ldc, accumulate); break;
    default: tail_columns_product_nt<4>(M, K, A, lda, bt.data(), C, ldc, accumulate); break;
  }
}
#endif

// ODCONV_CPU_RAGGED_TAIL=auto (default) | never: whether products take their ragged tails apart (tests
// and A/B runs); read at each call of the ops, as ODCONV_CPU_MASKED_TAPS.
std::atomic<bool> ragged_tail_enabled{true};

void read_ragged_tail_override() {
  ragged_tail_enabled.store(path_override("ODCONV_CPU_RAGGED_TAIL", {"auto", "never"}) == "auto",
                            std::memory_order_relaxed);
}

// The columns of an (M x K) @ (K x N) product that tail_columns_product takes (0: none): the ragged
// last block of 16, where there is a whole block before it, the tail has at most kMaxTailColumns
// columns, K is at least kMinTailInner and M at least kMinTailRows; on CPUs with AVX-512 only (the
// kernel is AVX-512).
inline int64_t tail_columns(int64_t M, int64_t N, int64_t K) {
#if defined(__AVX512F__)
  const int64_t nt = N % 16;
  return cpu_has_avx512() && ragged_tail_enabled.load(std::memory_order_relaxed) && N > 16 &&
                 nt <= kMaxTailColumns && K >= kMinTailInner && M >= kMinTailRows
             ? nt
             : 0;
#else
  (void)M;
  (void)N;
  (void)K;
  return 0;
#endif
}

// For each of `batch` groups i: C_i = A_i @ B_i, or C_i += A_i @ B_i, with A_i (M x K), B_i (K x N)
// and C_i (M x N) row-major at A + i*sa (leading dimension lda), and likewise for B and C.
// in_column_blocks: through brgemm, wide products go in blocks of brgemm_column_block() columns.
template <typename scalar_t>
void grouped_gemm(int64_t batch, int64_t M, int64_t N, int64_t K,
                  const scalar_t* A, int64_t lda, int64_t sa,
                  const scalar_t* B, int64_t ldb, int64_t sb,
                  scalar_t* C, int64_t ldc, int64_t sc, bool accumulate, const at::TensorOptions& opts,
                  bool in_column_blocks = false) {
  if (batch == 0 || M == 0 || N == 0) return;
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (K > 0 && (batch == 1 || M * N * K >= kMinGroupGemm)) {
      const int64_t block =
          in_column_blocks && N > kBrgemmMaxWholeColumns && M >= kBrgemmMinSplitRows && K >= kBrgemmMinSplitInner
              ? brgemm_column_block()
              : N;
      const int64_t nt = tail_columns(M, N, K), Nb = N - nt;  // brgemm takes Nb columns, the tail the rest
      for (int64_t i = 0; i < batch; ++i) {
        for (int64_t n0 = 0; n0 < Nb; n0 += block)
          at::native::cpublas::brgemm(M, std::min(block, Nb - n0), K, lda, ldb, ldc, accumulate, A + i * sa,
                                      B + i * sb + n0, C + i * sc + n0, false);
#if defined(__AVX512F__)
        if (nt > 0)
          tail_columns_product(M, nt, K, A + i * sa, lda, B + i * sb + Nb, ldb, C + i * sc + Nb, ldc, accumulate);
#endif
      }
      return;
    }
  }
#endif
  auto view = [&](const scalar_t* p, int64_t rows, int64_t cols, int64_t ld, int64_t s) {
    return batch == 1 ? at::from_blob(const_cast<scalar_t*>(p), {rows, cols}, {ld, 1}, opts)
                      : at::from_blob(const_cast<scalar_t*>(p), {batch, rows, cols}, {s, ld, 1}, opts);
  };
  at::Tensor c = view(C, M, N, ldc, sc);
  const at::Tensor a = view(A, M, K, lda, sa), b = view(B, K, N, ldb, sb);
  if (batch == 1) {
    if (accumulate)
      c.addmm_(a, b);
    else
      at::mm_out(c, a, b);
  } else {
    if (accumulate)
      c.baddbmm_(a, b);
    else
      at::bmm_out(c, a, b);
  }
}

// Output columns [lo, hi) whose input column ow*stride_w + w_off lies inside [0, W).
inline void valid_columns(int64_t w_off, const Geometry& g, int64_t& lo, int64_t& hi) {
  lo = w_off >= 0 ? 0 : (-w_off + g.stride_w - 1) / g.stride_w;
  hi = g.width - w_off <= 0 ? 0 : (g.width - w_off + g.stride_w - 1) / g.stride_w;
  lo = std::min(lo, g.out_w);
  hi = std::max(lo, std::min(hi, g.out_w));
}

#if defined(__AVX512F__)
// Stride-2 rows of im2col and col2im (those not split into phases, see ContiguousTap: stride 2 in
// one direction only, or padding other than "same"), 16 outputs at a time: the scalar loops move
// one element per iteration, and on narrow maps (Wo = 10) that was a fifth of the time of a strided layer
// (B16 48->96 20x20 stride 2: im2col 22 % of the forward, im2col + col2im 20 % of the backward).
// Masked loads and stores touch in[0 .. 2n-2] (out[0 .. 2n-2]) only, never the element past the
// last one used, which may lie past the end of the tensor. (benchmarks/ab_builds.py against the
// scalar loops, 7 rounds, results/ab_stride2_rows_cpu.json: backward 0.78 on that layer, 0.83 on
// B64 64->128 24x24 and 0.92 on B32 96->192 16x16, all stride 2; forward 0.93-0.99.)
inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// out[i] = in[2i] for i < n.
inline void gather_stride2(const float* in, int64_t n, float* out) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t m = std::min<int64_t>(16, n - i), span = 2 * m - 1;
    const __m512 lo = _mm512_maskz_loadu_ps(first_lanes(span), in + 2 * i);
    const __m512 hi = _mm512_maskz_loadu_ps(first_lanes(std::max<int64_t>(0, span - 16)), in + 2 * i + 16);
    _mm512_mask_storeu_ps(out + i, first_lanes(m), _mm512_permutex2var_ps(lo, even, hi));
  }
}

// out[2i] += in[i] for i < n.
inline void scatter_add_stride2(const float* in, int64_t n, float* out) {
  const __m512i spread_lo = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i spread_hi = _mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
  constexpr __mmask16 even_lanes = 0x5555;
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t m = std::min<int64_t>(16, n - i), span = 2 * m - 1;
    const __mmask16 lo_mask = first_lanes(span), hi_mask = first_lanes(std::max<int64_t>(0, span - 16));
    const __m512 v = _mm512_maskz_loadu_ps(first_lanes(m), in + i);
    __m512 lo = _mm512_maskz_loadu_ps(lo_mask, out + 2 * i);
    __m512 hi = _mm512_maskz_loadu_ps(hi_mask, out + 2 * i + 16);
    lo = _mm512_mask_add_ps(lo, even_lanes, lo, _mm512_maskz_permutexvar_ps(even_lanes, spread_lo, v));
    hi = _mm512_mask_add_ps(hi, even_lanes, hi, _mm512_maskz_permutexvar_ps(even_lanes, spread_hi, v));
    _mm512_mask_storeu_ps(out + 2 * i, lo_mask, lo);
    _mm512_mask_storeu_ps(out + 2 * i + 16, hi_mask, hi);
  }
}
#endif

// out[i] = in[i * stride] for i < n where a vector loop exists for this type and stride (float,
// stride 2, AVX-512); false, with nothing written, elsewhere.
template <typename scalar_t>
inline bool vector_gather_row(const scalar_t* in, int64_t stride, int64_t n, scalar_t* out) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (stride == 2) {
      gather_stride2(in, n, out);
      return true;
    }
  }
#endif
  return false;
}

// out[i * stride] += in[i] for i < n, under the same conditions.
template <typename scalar_t>
inline bool vector_scatter_add_row(const scalar_t* in, int64_t stride, int64_t n, scalar_t* out) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (stride == 2) {
      scatter_add_stride2(in, n, out);
      return true;
    }
  }
#endif
  return false;
}

// Stride 1 with outputs as wide as the input ("same" padding in width): the output pixel
// oh*W + ow of tap (u, v) reads x at its own index plus a constant, d = (u*dh - ph)*W + v*dw - pw,
// so a tap's valid output rows [oh0, oh1) are one contiguous run of the plane, from the first valid
// element (oh0, lo) to the last (oh1 - 1, hi - 1), and the few elements of that run that lie past
// the map's left or right edge (columns [0, lo) and [hi, W) of each row, 0-2 per row for 3x3 and
// 5x5 kernels) are the only ones to fix. im2col copied, and col2im added, row by row: 12 calls of
// 11-12 floats per tap on a 12x12 map, where im2col was a sixth of the forward (perf: im2col 11 %
// plus 6 % in the memcpy it called, B64 128->128 12x12).
// Stride 2 in both directions with Wo = ceil(W/2) ("same" padding) is brought to the same form: x
// is split into its four phases x_pq[i][j] = x[2i + p][2j + q] (planes of Hp = ceil(H/2) rows by
// Wp = ceil(W/2) = Wo columns, zero past the map), and output pixel (oh, ow) of tap (u, v) reads
// phase (h_off & 1, w_off & 1) at (oh + floor(h_off/2), ow + floor(w_off/2)), h_off = u*dh - ph and
// w_off = v*dw - pw: a constant offset within the phase's plane again. (Row by row, stride-2 im2col
// was 20 % of the forward of B16 48->96 20x20 stride 2 and 10 % of B32 256->512 14x14 stride 2 in
// perf, for rows of 10 and 7 outputs.)
struct ContiguousTap {
  int64_t oh0, oh1;  // valid output rows (input row inside the map), oh0 <= oh1
  int64_t lo, hi;    // valid output columns
  int64_t d;         // index in the source plane - output index
  int64_t phase;     // the source plane: 0 (x itself) for stride 1, p*2 + q for stride 2
  bool empty() const { return oh0 >= oh1 || lo >= hi; }
};

enum class TapLayout { kRows, kContiguous, kPhases };

inline TapLayout tap_layout(const Geometry& g) {
  if (g.stride_h == 1 && g.stride_w == 1 && g.out_w == g.width) return TapLayout::kContiguous;
  if (g.stride_h == 2 && g.stride_w == 2 && g.out_w == (g.width + 1) / 2) return TapLayout::kPhases;
  return TapLayout::kRows;
}

inline ContiguousTap contiguous_tap(const Geometry& g, TapLayout layout, int64_t u, int64_t v) {
  ContiguousTap t;
  const int64_t h_off = u * g.dil_h - g.pad_h, w_off = v * g.dil_w - g.pad_w;
  if (layout == TapLayout::kContiguous) {
    t.oh0 = std::clamp<int64_t>(-h_off, 0, g.out_h);
    t.oh1 = std::clamp<int64_t>(g.height - h_off, t.oh0, g.out_h);
    valid_columns(w_off, g, t.lo, t.hi);
    t.d = h_off * g.width + w_off;
    t.phase = 0;
    return t;
  }
  const int64_t p = h_off & 1, q = w_off & 1, hh = h_off >> 1, ww = w_off >> 1;  // >> 1: floor(/2)
  const int64_t rows = (g.height - p + 1) / 2, cols = (g.width - q + 1) / 2;   // of phase (p, q) in the map
  t.oh0 = std::clamp<int64_t>(-hh, 0, g.out_h);
  t.oh1 = std::clamp<int64_t>(rows - hh, t.oh0, g.out_h);
  t.lo = std::clamp<int64_t>(-ww, 0, g.out_w);
  t.hi = std::clamp<int64_t>(cols - ww, t.lo, g.out_w);
  t.d = hh * g.out_w + ww;
  t.phase = p * 2 + q;
  return t;
}

// Elements of the source planes per channel: x's own plane, or the four phase planes.
inline int64_t tap_plane_elems(const Geometry& g) { return ((g.height + 1) / 2) * ((g.width + 1) / 2); }

// planes[(p*2 + q)*Hp*Wp + i*Wp + j] = xc[(2i + p)*W + 2j + q], 0 past the map.
// (plane_stride: elements from one phase's plane to the next, Hp*Wp by default.)
template <typename scalar_t>
void split_phases(const scalar_t* xc, int64_t H, int64_t W, scalar_t* planes, int64_t plane_stride = -1) {
  const int64_t Hp = (H + 1) / 2, Wp = (W + 1) / 2;
  if (plane_stride < 0) plane_stride = Hp * Wp;
  for (int64_t p = 0; p < 2; ++p) {
    for (int64_t i = 0; i < Hp; ++i) {
      scalar_t* even = planes + (p * 2) * plane_stride + i * Wp;
      scalar_t* odd = planes + (p * 2 + 1) * plane_stride + i * Wp;
      const int64_t ih = 2 * i + p;
      if (ih >= H) {
        std::fill(even, even + Wp, scalar_t(0));
        std::fill(odd, odd + Wp, scalar_t(0));
        continue;
      }
      const scalar_t* in = xc + ih * W;
      for (int64_t j = 0; j < W / 2; ++j) {
        even[j] = in[2 * j];
        odd[j] = in[2 * j + 1];
      }
      if (W % 2 == 1) {
        even[Wp - 1] = in[W - 1];
        odd[Wp - 1] = scalar_t(0);
      }
    }
  }
}

// The adjoint: gxc[(2i + p)*W + 2j + q] = planes[(p*2 + q)*Hp*Wp + i*Wp + j] inside the map.
template <typename scalar_t>
void merge_phases(const scalar_t* planes, int64_t H, int64_t W, scalar_t* gxc) {
  const int64_t Hp = (H + 1) / 2, Wp = (W + 1) / 2;
  for (int64_t ih = 0; ih < H; ++ih) {
    const int64_t p = ih % 2, i = ih / 2;
    const scalar_t* even = planes + ((p * 2) * Hp + i) * Wp;
    const scalar_t* odd = planes + ((p * 2 + 1) * Hp + i) * Wp;
    scalar_t* out = gxc + ih * W;
    for (int64_t j = 0; j < W / 2; ++j) {
      out[2 * j] = even[j];
      out[2 * j + 1] = odd[j];
    }
    if (W % 2 == 1) out[W - 1] = even[Wp - 1];
  }
}

// ---- Masked taps (small maps) -------------------------------------------------------------------
// With contiguous taps every tap's row of im2col is src[p + d] for all P output pixels, where src is
// the channel's plane (or phase plane) and d the tap's constant offset, except at the pixels whose input
// lies past the map, which are 0. On small maps the per-tap work of copy_tap (the tap's bounds, a fill,
// a memcpy and a fill per tap, a fix per row: 2-5 library calls for runs of 16-64 floats) cost more than
// the copies: im2col was 15 % of a one-thread forward of B64 64->64 4x4 and im2col + col2im 15 % of its
// backward, as much as the reduction (perf, 2026-12-07). Here im2col copies the channel's plane once
// into a buffer ext with zeros around it, so that src[p + d] exists for every pixel and tap, and each
// tap's row is one loop, row[p] = valid[p] ? ext[p + d] : 0, whose loads are plain vector loads (masked
// loads from the plane itself, vmaskmovps, took im2col from 4.4 to 7.5 % of that forward's cycles). The
// taps' offsets and masks are computed once per geometry and thread (masked_taps). col2im gathers per
// element of the plane instead, gx[e] += valid'[e] ? row[e - d] : 0 tap by tap (in add_tap's order), so
// that no tap's loads read what the tap before it stored a few elements away: added as a scatter into
// ext (ext[p + d] += row[p]) every vector load waited on a store forward that could not be made (82 % of
// col2im's cycles on one store in perf); the gather's masked loads cost less than that.
// ext: planes planes of ext_elems each (the phase planes for stride 2); plane i's element e is at
// ext[i * ext_elems + lead + e], and a tap's row reads ext[offset[tap] + p].
struct MaskedTaps {
  std::array<int64_t, 12> key{};     // the geometry they were computed for (masked_taps compares it)
  std::vector<int64_t> d, phase;     // per tap: its offset in the source plane, and which plane (stride 2)
  std::vector<int32_t> valid;        // taps x P: 1 where the tap's input pixel lies inside the map
  std::vector<int32_t> plane_valid;  // taps x plane_elems: 1 where plane element e is read by pixel e - d
  std::vector<int64_t> offset;       // per tap: phase * ext_elems + lead + d
  int64_t plane_elems = 0, planes = 1, lead = 0, ext_elems = 0;
};
// (The masks are 32-bit, as float: the loops then vectorise 8 pixels wide, not 32 with epilogues.)

// Masked taps on maps of at most this many output pixels. (benchmarks/ab_env.py, never against auto, 16
// rounds, results/ab_masked_taps_avx2_cpu.json: forward 0.69-0.86 and backward 0.78-0.90 on layers of
// 1-8 ms on 4x4-8x8 maps; 0.87-0.90 with stride 2 onto 10x10; 0.92-0.99 on B64 512->512 4x4, 256->256
// 8x8, 128->128 12x12, 512->512 7x7, 256->256 14x14 and stride 2 onto 7x7; 0.98-1.00 on 6x6, whose
// forward builds tap-major rows, and on 16x16. An earlier version forced on 24x24 and 32x32 maps read
// 0.97-1.05.)
constexpr int64_t kMaskedTapsMaxPixels = 256;

// ODCONV_CPU_MASKED_TAPS=auto (default) | always | never overrides the choice (tests run all three). It
// is read at each op call's entry (read_masked_taps_override), not in im2col, which runs once per
// sample or per few channels: getenv and the check cost ~0.1 us a time.
enum class MaskedTapsMode { kAuto, kAlways, kNever };
std::atomic<MaskedTapsMode> masked_taps_mode{MaskedTapsMode::kAuto};

void read_masked_taps_override() {
  const std::string mode = path_override("ODCONV_CPU_MASKED_TAPS", {"auto", "always", "never"});
  masked_taps_mode.store(mode == "always" ? MaskedTapsMode::kAlways
                                          : (mode == "never" ? MaskedTapsMode::kNever : MaskedTapsMode::kAuto),
                         std::memory_order_relaxed);
}

inline bool use_masked_taps(const Geometry& g, TapLayout layout) {
  if (layout == TapLayout::kRows) return false;
  switch (masked_taps_mode.load(std::memory_order_relaxed)) {
    case MaskedTapsMode::kAlways:
      return true;
    case MaskedTapsMode::kNever:
      return false;
    default:
      return g.out_pixels() <= kMaskedTapsMaxPixels;
  }
}

// The masked taps of g (layout kContiguous or kPhases), computed on a thread's first call for the
// geometry and kept for its next calls.
inline const MaskedTaps& masked_taps(const Geometry& g, TapLayout layout) {
  thread_local MaskedTaps cache;
  const std::array<int64_t, 12> key = {g.height,   g.width,    g.out_h, g.out_w, g.kernel_h, g.kernel_w,
                                       g.stride_h, g.stride_w, g.pad_h, g.pad_w, g.dil_h,    g.dil_w};
  if (cache.key == key) return cache;  // (the empty cache's key, all zeros, is no geometry's)
  MaskedTaps mt;
  const int64_t P = g.out_pixels(), taps = g.taps();
  mt.planes = layout == TapLayout::kPhases ? 4 : 1;
  mt.plane_elems = layout == TapLayout::kPhases ? tap_plane_elems(g) : g.height * g.width;
  mt.d.resize(taps);
  mt.phase.resize(taps);
  mt.valid.assign(taps * P, 0);
  mt.plane_valid.assign(taps * mt.plane_elems, 0);
  for (int64_t u = 0; u < g.kernel_h; ++u)
    for (int64_t v = 0; v < g.kernel_w; ++v) {
      // the tap's valid pixels are copy_tap's: rows [oh0, oh1), columns [lo, hi)
      const int64_t tap = u * g.kernel_w + v;
      const ContiguousTap t = contiguous_tap(g, layout, u, v);
      mt.d[tap] = t.d;
      mt.phase[tap] = t.phase;
      for (int64_t oh = t.oh0; oh < t.oh1; ++oh)
        for (int64_t p = oh * g.out_w + t.lo; p < oh * g.out_w + t.hi; ++p) {
          TORCH_INTERNAL_ASSERT(p + t.d >= 0 && p + t.d < mt.plane_elems, "masked tap outside its plane");
          mt.valid[tap * P + p] = 1;
          mt.plane_valid[tap * mt.plane_elems + p + t.d] = 1;
        }
    }
  const int64_t d_min = std::min<int64_t>(0, *std::min_element(mt.d.begin(), mt.d.end()));
  const int64_t d_max = std::max<int64_t>(0, *std::max_element(mt.d.begin(), mt.d.end()));
  mt.lead = -d_min;  // ext[lead + p + d] for p in [0, P) and every tap: indices 0 to lead + P - 1 + d_max
  mt.ext_elems = mt.lead + std::max(mt.plane_elems, P + d_max);
  mt.offset.resize(taps);
  for (int64_t tap = 0; tap < taps; ++tap) mt.offset[tap] = mt.phase[tap] * mt.ext_elems + mt.lead + mt.d[tap];
  mt.key = key;
  cache = std::move(mt);
  return cache;
}

// im2col of the input channels [c0, c1) by masked taps.
template <typename scalar_t>
void im2col_masked(const scalar_t* x, const Geometry& g, const MaskedTaps& mt, scalar_t* cols, int64_t c0,
                   int64_t c1) {
  const int64_t HW = g.height * g.width, P = g.out_pixels(), taps = g.taps();
  std::vector<scalar_t> ext(mt.planes * mt.ext_elems, scalar_t(0));  // zeros around the planes, kept
  for (int64_t c = c0; c < c1; ++c) {
    const scalar_t* xc = x + c * HW;
    if (mt.planes == 4)
      split_phases(xc, g.height, g.width, ext.data() + mt.lead, mt.ext_elems);
    else
      std::memcpy(ext.data() + mt.lead, xc, HW * sizeof(scalar_t));
    for (int64_t tap = 0; tap < taps; ++tap) {
      const scalar_t* __restrict__ src = ext.data() + mt.offset[tap];
      const int32_t* __restrict__ valid = mt.valid.data() + tap * P;
      scalar_t* __restrict__ row = cols + ((c - c0) * taps + tap) * P;
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) {
        const scalar_t v = src[p];  // loaded whatever valid[p] (ext has every src[p]): a plain vector load
        row[p] = valid[p] != 0 ? v : scalar_t(0);
      }
    }
  }
}

// col2im of the input channels [c_begin, c_end) by masked taps: gx's planes of those channels are
// written, the taps' rows added in tap order.
template <typename scalar_t>
void col2im_masked(const scalar_t* gcols, const Geometry& g, const MaskedTaps& mt, scalar_t* gx, int64_t c_begin,
                   int64_t c_end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = g.height * g.width, P = g.out_pixels(), taps = g.taps(), n = mt.plane_elems;
  std::vector<scalar_t> planes(mt.planes == 4 ? 4 * n : 0);
  for (int64_t c = c_begin; c < c_end; ++c) {
    scalar_t* gxc = gx + c * HW;
    scalar_t* sums = mt.planes == 4 ? planes.data() : gxc;
    std::fill(sums, sums + mt.planes * n, scalar_t(0));
    for (int64_t tap = 0; tap < taps; ++tap) {
      scalar_t* __restrict__ dst = sums + mt.phase[tap] * n;
      const int32_t* __restrict__ valid = mt.plane_valid.data() + tap * n;
      const scalar_t* __restrict__ row = gcols + ((c - c_begin) * taps + tap) * P;
      const int64_t d = mt.d[tap];
#pragma omp simd
      for (int64_t e = 0; e < n; ++e)
        dst[e] = static_cast<scalar_t>(static_cast<acc_t>(dst[e]) +
                                       (valid[e] != 0 ? static_cast<acc_t>(row[e - d]) : acc_t(0)));
    }
    if (mt.planes == 4) merge_phases(planes.data(), g.height, g.width, gxc);
  }
}

// Zeroes the elements of a tap's run that lie past the map's left and right edges: columns [0, lo)
// and [hi, Wo) of its rows after the first and before the last (the run starts at (oh0, lo) and
// ends at (oh1 - 1, hi)).
template <typename scalar_t>
void zero_run_edges(const ContiguousTap& t, int64_t Wo, scalar_t* row) {
  for (int64_t oh = t.oh0; oh < t.oh1; ++oh) {
    if (oh > t.oh0) std::fill(row + oh * Wo, row + oh * Wo + t.lo, scalar_t(0));
    if (oh + 1 < t.oh1) std::fill(row + oh * Wo + t.hi, row + (oh + 1) * Wo, scalar_t(0));
  }
}

// row[k] = src[k + t.d] on the tap's valid pixels, 0 elsewhere (row: Ho x Wo).
template <typename scalar_t>
void copy_tap(const scalar_t* src, const ContiguousTap& t, int64_t Ho, int64_t Wo, scalar_t* row) {
  const int64_t P = Ho * Wo;
  if (t.empty()) {
    std::fill(row, row + P, scalar_t(0));
    return;
  }
  const int64_t begin = t.oh0 * Wo + t.lo, end = (t.oh1 - 1) * Wo + t.hi;
  std::fill(row, row + begin, scalar_t(0));
  std::memcpy(row + begin, src + begin + t.d, (end - begin) * sizeof(scalar_t));
  std::fill(row + end, row + P, scalar_t(0));
  zero_run_edges(t, Wo, row);  // the copied elements past the map's edges
}

// dst[k + t.d] += row[k] on the tap's valid pixels; row's other elements in the run are zeroed
// first (they belong to no input pixel), so the run is added in one loop.
template <typename scalar_t>
void add_tap(scalar_t* row, const ContiguousTap& t, int64_t Wo, scalar_t* dst) {
  using acc_t = at::opmath_type<scalar_t>;
  if (t.empty()) return;
  zero_run_edges(t, Wo, row);
  const int64_t begin = t.oh0 * Wo + t.lo, end = (t.oh1 - 1) * Wo + t.hi;
  scalar_t* out = dst + (begin + t.d);  // begin + t.d >= 0: the run's first pixel is inside the map
  const scalar_t* in = row + begin;
#pragma omp simd
  for (int64_t k = 0; k < end - begin; ++k)
    out[k] = static_cast<scalar_t>(static_cast<acc_t>(out[k]) + static_cast<acc_t>(in[k]));
}

// cols[(c*kh + u)*kw + v][oh*Wo + ow] = x[c][oh*sh - ph + u*dh][ow*sw - pw + v*dw] (0 outside),
// for the input channels c in [c0, c1) (rows numbered from c0), all of them by default.
template <typename scalar_t>
void im2col(const scalar_t* x, const Geometry& g, scalar_t* cols, int64_t c0 = 0, int64_t c1 = -1) {
  const int64_t H = g.height, W = g.width, Ho = g.out_h, Wo = g.out_w, P = Ho * Wo;
  if (c1 < 0) c1 = g.in_channels;
  const TapLayout layout = tap_layout(g);
  if (use_masked_taps(g, layout)) {
    im2col_masked(x, g, masked_taps(g, layout), cols, c0, c1);
    return;
  }
  std::vector<scalar_t> planes(layout == TapLayout::kPhases ? 4 * tap_plane_elems(g) : 0);
  for (int64_t c = c0; c < c1; ++c) {
    const scalar_t* xc = x + c * H * W;
    if (layout == TapLayout::kPhases) split_phases(xc, H, W, planes.data());
    for (int64_t u = 0; u < g.kernel_h; ++u) {
      for (int64_t v = 0; v < g.kernel_w; ++v) {
        scalar_t* row = cols + (((c - c0) * g.kernel_h + u) * g.kernel_w + v) * P;
        if (layout != TapLayout::kRows) {
          const ContiguousTap t = contiguous_tap(g, layout, u, v);
          copy_tap(layout == TapLayout::kPhases ? planes.data() + t.phase * tap_plane_elems(g) : xc, t, Ho, Wo, row);
          continue;
        }
        const int64_t w_off = v * g.dil_w - g.pad_w;
        int64_t lo, hi;
        valid_columns(w_off, g, lo, hi);
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
          } else if (!vector_gather_row(in + lo * g.stride_w, g.stride_w, hi - lo, out + lo)) {
            for (int64_t ow = lo; ow < hi; ++ow) out[ow] = in[ow * g.stride_w];
          }
          std::fill(out + hi, out + Wo, scalar_t(0));
        }
      }
    }
  }
}

#if defined(__AVX__)
// dst[c * ldd + i] = r[i][c] for 8 rows of 8 floats held in registers.
inline void store_transposed_8x8(const __m256 (&r)[8], float* dst, int64_t ldd) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {  // interleave row pairs: (r0[0], r1[0], r0[1], r1[1] | ...)
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // then pairs of pairs: 4 rows per 128-bit lane
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {  // and the lanes of rows 0-3 with those of rows 4-7
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
  }
}

// dst[c * ldd + r] = src[r * lds + c] for an 8 x 8 block of floats, in registers.
inline void transpose_8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  store_transposed_8x8(r, dst, ldd);
}
#endif

// dst[p * ld + j] = src[j * P + p] for j < n: a transpose in cache-sized blocks. For float with AVX,
// 8 x 8 blocks go through registers: 5-6x faster than element by element here, and im2row (the
// transpose of every sample's im2col matrix) was a third of the backward on 24x24 maps.
// (The same with rows of src lds apart: dst[p * ld + j] = src[j * lds + p].)
template <typename scalar_t>
void transpose_strided(const scalar_t* src, int64_t n, int64_t P, int64_t lds, scalar_t* dst, int64_t ld) {
  constexpr int64_t kBlock = 32;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t j1 = std::min(n, j0 + kBlock);
    for (int64_t p0 = 0; p0 < P; p0 += kBlock) {
      const int64_t p1 = std::min(P, p0 + kBlock);
      int64_t j = j0;
#if defined(__AVX__)
      if constexpr (std::is_same_v<scalar_t, float>) {
        for (; j + 8 <= j1; j += 8) {
          int64_t p = p0;
          for (; p + 8 <= p1; p += 8) transpose_8x8(src + j * lds + p, lds, dst + p * ld + j, ld);
          for (int64_t jj = j; jj < j + 8; ++jj)
            for (int64_t pp = p; pp < p1; ++pp) dst[pp * ld + jj] = src[jj * lds + pp];
        }
      }
#endif
      for (; j < j1; ++j)
        for (int64_t p = p0; p < p1; ++p) dst[p * ld + j] = src[j * lds + p];
    }
  }
}

template <typename scalar_t>
void transpose_into(const scalar_t* src, int64_t n, int64_t P, scalar_t* dst, int64_t ld) {
  transpose_strided(src, n, P, P, dst, ld);
}

// im2row goes through im2col a few input channels (about 32 cols rows) at a time, so its scratch
// is small: the whole cols matrix would add another im2col-sized buffer per thread.
inline int64_t im2row_channels_per_block(const Geometry& g) {
  return std::clamp<int64_t>(32 / g.taps(), 1, g.in_channels);
}
inline int64_t im2row_scratch_elems(const Geometry& g) {
  return g.im2col_is_identity() ? 0 : im2row_channels_per_block(g) * g.taps() * g.out_pixels();
}

// rows[p][j] = cols[j][p]: the transpose of im2col, for the input channels [c_begin, c_end) (all by
// default; columns numbered from c_begin), rows ld apart (default: the columns written).
// scratch: im2row_scratch_elems(g) elements.
template <typename scalar_t>
void im2row(const scalar_t* x, const Geometry& g, scalar_t* scratch, scalar_t* rows, int64_t c_begin = 0,
            int64_t c_end = -1, int64_t ld = -1) {
  if (c_end < 0) c_end = g.in_channels;
  const int64_t taps = g.taps(), P = g.out_pixels();
  if (ld < 0) ld = (c_end - c_begin) * taps;
  if (g.im2col_is_identity()) {  // x itself is the (Cin x H*W) cols matrix
    transpose_into(x + c_begin * P, c_end - c_begin, P, rows, ld);
    return;
  }
  const int64_t step = im2row_channels_per_block(g);
  for (int64_t c0 = c_begin; c0 < c_end; c0 += step) {
    const int64_t c1 = std::min(c_end, c0 + step);
    im2col(x, g, scratch, c0, c1);
    transpose_into(scratch, (c1 - c0) * taps, P, rows + (c0 - c_begin) * taps, ld);
  }
}

// The adjoint of im2col: gx[c][ih][iw] = sum of the gcols entries that im2col read from it, for the
// input channels [c_begin, c_end) (all by default; gcols rows numbered from c_begin). gx is the
// whole sample; only those channels are written. With contiguous taps (stride 1 or 2, see
// ContiguousTap) gcols is scratch: its entries for pixels past the map's left and right edges are
// zeroed so that each tap's valid rows are added in one run (add_tap); stride 2 adds into the four
// phase planes, then interleaves them into gx.
template <typename scalar_t>
void col2im(scalar_t* gcols, const Geometry& g, scalar_t* gx, int64_t c_begin = 0, int64_t c_end = -1) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = g.height, W = g.width, Ho = g.out_h, Wo = g.out_w, P = Ho * Wo;
  if (c_end < 0) c_end = g.in_channels;
  const TapLayout layout = tap_layout(g);
  if (use_masked_taps(g, layout)) {
    col2im_masked(gcols, g, masked_taps(g, layout), gx, c_begin, c_end);
    return;
  }
  std::vector<scalar_t> planes(layout == TapLayout::kPhases ? 4 * tap_plane_elems(g) : 0);
  if (layout != TapLayout::kPhases) std::fill(gx + c_begin * H * W, gx + c_end * H * W, scalar_t(0));
  for (int64_t c = c_begin; c < c_end; ++c) {
    scalar_t* gxc = gx + c * H * W;
    if (layout == TapLayout::kPhases) std::fill(planes.begin(), planes.end(), scalar_t(0));
    for (int64_t u = 0; u < g.kernel_h; ++u) {
      for (int64_t v = 0; v < g.kernel_w; ++v) {
        scalar_t* row = gcols + (((c - c_begin) * g.kernel_h + u) * g.kernel_w + v) * P;
        if (layout != TapLayout::kRows) {
          const ContiguousTap t = contiguous_tap(g, layout, u, v);
          add_tap(row, t, Wo, layout == TapLayout::kPhases ? planes.data() + t.phase * tap_plane_elems(g) : gxc);
          continue;
        }
        const int64_t w_off = v * g.dil_w - g.pad_w;
        int64_t lo, hi;
        valid_columns(w_off, g, lo, hi);
        for (int64_t oh = 0; oh < Ho; ++oh) {
          const int64_t ih = oh * g.stride_h - g.pad_h + u * g.dil_h;
          if (ih < 0 || ih >= H) continue;
          const scalar_t* in = row + oh * Wo;
          scalar_t* out = gxc + ih * W + w_off;
          if (vector_scatter_add_row(in + lo, g.stride_w, hi - lo, out + lo * g.stride_w)) continue;
#pragma omp simd
          for (int64_t ow = lo; ow < hi; ++ow)
            out[ow * g.stride_w] =
                static_cast<scalar_t>(static_cast<acc_t>(out[ow * g.stride_w]) + static_cast<acc_t>(in[ow]));
        }
      }
    }
    if (layout == TapLayout::kPhases) merge_phases(planes.data(), H, W, gxc);
  }
}

// m[gi*J + j] = ch[gi*Cg + c] * s[u,v] for every group gi and j = (c, u, v), for the input channels
// [c_begin, c_end) (all by default).
template <typename acc_t>
void input_scale(const acc_t* ch, const acc_t* s, const Geometry& g, acc_t* m, int64_t c_begin = 0,
                 int64_t c_end = -1) {
  const int64_t taps = g.taps();
  if (c_end < 0) c_end = g.in_channels;
  for (int64_t c = c_begin; c < c_end; ++c)
    for (int64_t t = 0; t < taps; ++t) m[c * taps + t] = ch[c] * s[t];
}

// ---- Tap-major columns (the transposed float32 forward) -------------------------------------------
// The transposed forward multiplies rows_b = im2row(x_b) (P x G*J). Built from im2col, each row is
// gathered through a transpose of the (J x P) im2col matrix in 8 x 8 blocks. With a group's columns
// in (tap, channel) order instead, j = t * Cin/G + c, a row of rows_b is, per tap, a run of Cin/G
// consecutive channels of one input pixel: copies from x_b transposed to channels-last once (Cin x H*W
// values, a ninth of im2row's for 3x3). W's columns are permuted to the same order once per call, and
// the input scale m with them; the products sum over j, so the output does not change. (A timing trial
// on the Intel Xeon: 6x6 forward 0.83, HISTORY.md.) The permuted W is built already transposed tile
// by tile, as the runs' products read it (transpose_weight_tiles_tap_major), so that no run transposes
// slices of W: it was a tap-major copy of W, and every thread transposed each tile's slices of that
// copy again in each of its runs (benchmarks/ab_env.py with a temporary switch, 12 rounds, Zen 4 EPYC,
// results/ab_forward_tap_major_weight_pretransposed_avx512_cpu.json: forward 0.88 on B256 64->128 6x6,
// 0.97 on the GTSRB 128->256 6x6 layer and B128 128->128 7x7, 0.99 on B64 256->256 7x7 and B8 128->256
// 6x6).
// Layouts: weight_tiles_t (see transpose_weight_tiles_tap_major); m (G*J) with m[g*J + t*Cin/G + c] =
// ch[g*Cin/G + c] * s[t] (in blocks of channels, below: m[g*J + c0*taps + t*Cb + c] = ch[g*Cin/G + c0 +
// c] * s[t]); x_t (H*W, Cin) scratch; rows (P, ld) with ld >= G*J, its columns as m's.
// Only where the permuted copy of W is no larger than the output the call allocates anyway, and
// within kTapMajorMaxWeightBytes. Without those rules, against 7a59409 (benchmarks/ab_builds.py
// --paired, 8 rounds, one thread, results/ab_tap_major_forward_cpu.json): forward 0.87 on B128
// 128->256 6x6 (the GTSRB network's layer; 4.7 MB of W, as large as its output), 0.84 on B128
// 256->256 6x6 (9.4 MB, twice its output), 0.69 on B32 256->256 7x7 with 4 groups, 0.96 on B64
// 256->256 5x5, but 1.21 on B32 512->512 7x7 (37.7 MB: above glibc's largest mmap threshold, fresh
// pages on every call); on two threads the GTSRB layer read 0.96-0.97 (paired and alternated runs).
// And the copy made the training step's peak memory of 256->256 6x6 1.26x the static convolution's
// (1.11x without; 128->256 6x6 1.09x against 1.07x, bench_op.py --modes mem): the forward's working
// set then outgrew the backward's. With the copy transposed (above), tap-major columns forced on
// (ODCONV_CPU_TAP_MAJOR=always against auto, 10 rounds, the table not kept) read 0.85-0.90 on B128
// 256->256 6x6, B64 256->256 5x5, B32 128->128 7x7 and B256 512->512 7x7, still 1.17 on B32 512->512
// 7x7, and the training step's peak memory (bench_op.py --modes mem, results/bench_op_cpu_mem_tap_major_
// {auto,always}_avx512.json) 1.10 -> 1.24x static on 256->256 6x6, 1.88 -> 2.28x on 5x5, 2.78 -> 3.18x
// on 128->128 7x7 (0.89x both ways on B256 512->512 7x7): the rules stay for the copy.
// Per run. Where the rules keep no copy, the columns are tap-major all the same when each thread has
// runs of at least kMinSamplesPerWeightTranspose samples, which transpose every tile's slices of W anyway
// (transpose_weight_tile), or when the threads share the tiles (small batches, "Tiles between threads"),
// which transpose them once per chunk: the tiles of a layer cut in J then hold whole channels (make_tiles'
// whole_channels), the columns are tap-major within each tile's block of channels (j = its first column
// + t * Cb + c for its Cb channels; the whole group's J, as above, where the tiles are not cut), and a
// run permutes each tile's slices as it transposes them (transpose_weight_tile_tap_major), with no copy
// of W and no more traffic than the transposes it made before. The padded kernel rows are skipped
// tile by tile (tap_major_product), each tile holding every kernel row of its channels. (ab_env.py,
// ODCONV_CPU_TAP_MAJOR=never against auto, Zen 4 EPYC, 16 rounds,
// results/ab_forward_tap_major_per_run_avx512_cpu.json: forward 0.90 on B128 256->256 6x6, 0.94 on B64
// 256->256 5x5, 0.95-0.96 on B16, B32 and B256 512->512 7x7, 1.01 on B32 256->512 stride 2 onto 7x7
// (one padded row of 21 skipped; 0.98 in a 10-round run before); the copy stays where the rules allow
// it: "runs" read 0.95 on the GTSRB 128->256 6x6 layer against 0.90 for the copy, both against never.
// Small batches sharing the tiles, 12 rounds, the table not kept: 0.93 on B8 512->512 7x7 and B8 256->256
// 6x6, 0.99 on B4 512->512 7x7.)
// ODCONV_CPU_TAP_MAJOR=auto (default) | always (the copy) | runs | never overrides the choice (tests
// run each).
constexpr int64_t kTapMajorMaxWeightBytes = 16 * 1024 * 1024;

enum class TapMajor { kNo, kPerRun, kOnce };

TapMajor tap_major_columns(const Geometry& g, int64_t elem_size, int64_t share, bool tiles_shared) {
  const std::string mode = path_override("ODCONV_CPU_TAP_MAJOR", {"auto", "always", "runs", "never"});
  if (mode != "auto") return mode == "always" ? TapMajor::kOnce : (mode == "runs" ? TapMajor::kPerRun : TapMajor::kNo);
  const int64_t weight_bytes = g.kernel_num * g.kernel_numel() * elem_size;
  const int64_t out_bytes = g.batch * g.out_channels * g.out_pixels() * elem_size;
  if (weight_bytes <= kTapMajorMaxWeightBytes && weight_bytes <= out_bytes) return TapMajor::kOnce;
  // per run where the runs transpose W's slices anyway: runs of at least kMinSamplesPerWeightTranspose
  // samples (a thread's share of the batch at most), or the threads sharing the tiles
  return share >= kMinSamplesPerWeightTranspose || tiles_shared ? TapMajor::kPerRun : TapMajor::kNo;
}

template <typename acc_t>
void input_scale_tap_major(const acc_t* ch, const acc_t* s, const Geometry& g, int64_t block_channels, acc_t* m) {
  const int64_t taps = g.taps(), Cg = g.in_per_group, J = g.cols_per_group();
  for (int64_t gi = 0; gi < g.groups; ++gi)
    for (int64_t c0 = 0; c0 < Cg; c0 += block_channels) {
      const int64_t Cb = std::min(block_channels, Cg - c0);
      acc_t* mb = m + gi * J + c0 * taps;
      for (int64_t t = 0; t < taps; ++t)
        for (int64_t c = 0; c < Cb; ++c) mb[t * Cb + c] = ch[gi * Cg + c0 + c] * s[t];
    }
}

// The tap-major rows of the input channels [c0, c0 + Cb) (one block of a group's channels) from x_t, x_b
// channels-last (H*W x Cin): rows[p * ld + t * Cb + c] = x_b[c0 + c] at tap t's input pixel of output pixel p
// (0 in the padding).
template <typename scalar_t>
void im2row_tap_major_channels(const scalar_t* x_t, const Geometry& g, int64_t c0, int64_t Cb, scalar_t* rows,
                               int64_t ld) {
  const int64_t Cin = g.in_channels, H = g.height, W = g.width;
  for (int64_t oh = 0; oh < g.out_h; ++oh)
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      scalar_t* row = rows + (oh * g.out_w + ow) * ld;
      for (int64_t u = 0; u < g.kernel_h; ++u) {
        const int64_t ih = oh * g.stride_h - g.pad_h + u * g.dil_h;
        for (int64_t v = 0; v < g.kernel_w; ++v) {
          const int64_t iw = ow * g.stride_w - g.pad_w + v * g.dil_w;
          scalar_t* dst = row + (u * g.kernel_w + v) * Cb;
          if (ih >= 0 && ih < H && iw >= 0 && iw < W)
            std::copy_n(x_t + (ih * W + iw) * Cin + c0, Cb, dst);
          else
            std::fill_n(dst, Cb, scalar_t(0));
        }
      }
    }
}

template <typename scalar_t>
void im2row_tap_major(const scalar_t* x, const Geometry& g, int64_t block_channels, scalar_t* x_t, scalar_t* rows,
                      int64_t ld) {
  const int64_t Cg = g.in_per_group, J = g.cols_per_group();
  transpose_into(x, g.in_channels, g.height * g.width, x_t, g.in_channels);
  for (int64_t gi = 0; gi < g.groups; ++gi)
    for (int64_t c0 = 0; c0 < Cg; c0 += block_channels)
      im2row_tap_major_channels(x_t, g, gi * Cg + c0, std::min(block_channels, Cg - c0), rows + gi * J + c0 * g.taps(),
                                ld);
}

struct RowClass {
  int64_t oh0, oh1, u0, u1;  // output rows [oh0, oh1), kernel rows [u0, u1) inside the map
};

std::vector<RowClass> row_classes(const Geometry& g) {
  std::vector<RowClass> out;
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    const int64_t top = oh * g.stride_h - g.pad_h;  // input row of u = 0
    // u0: the first u with top + u*dil >= 0; u1: the first with top + u*dil >= H
    const int64_t u0 = std::min(g.kernel_h, top >= 0 ? 0 : (-top + g.dil_h - 1) / g.dil_h);
    const int64_t u1 = std::clamp<int64_t>(g.height - top <= 0 ? 0 : (g.height - top + g.dil_h - 1) / g.dil_h, u0,
                                           g.kernel_h);
    if (!out.empty() && out.back().u0 == u0 && out.back().u1 == u1)
      out.back().oh1 = oh + 1;
    else
      out.push_back({oh, oh + 1, u0, u1});
  }
  return out;
}

// The transposed product of tile t over tap-major columns, class by class: for each group i < nG,
// C_i[pixels of the class] (+)= A_i[those pixels, the class's columns of t] @ B_i[those columns], with
// A (P x t.cols(), row p at A + p*lda) the tile's columns of rows_b, B (t.cols() x N) and C (P x N).
// A class with no kernel row inside the map (u1 = u0) gets zeros (or keeps C, accumulating).
template <typename scalar_t>
void tap_major_product(const std::vector<RowClass>& classes, const Geometry& g, const Tile& t, int64_t nG, int64_t N,
                       const scalar_t* A, int64_t lda, int64_t sa, const scalar_t* B, int64_t ldb, int64_t sb,
                       scalar_t* C, int64_t ldc, int64_t sc, bool accumulate, const at::TensorOptions& opts) {
  const int64_t row_cols = g.kernel_w * (t.cols() / g.taps()), Wo = g.out_w;  // of the tile's channels
  for (const RowClass& rc : classes) {
    const int64_t lo = t.j0 + rc.u0 * row_cols, hi = t.j0 + rc.u1 * row_cols;
    const int64_t p0 = rc.oh0 * Wo, M = (rc.oh1 - rc.oh0) * Wo;
    if (hi <= lo) {
      if (!accumulate)
        for (int64_t i = 0; i < nG; ++i)
          for (int64_t p = p0; p < p0 + M; ++p) std::fill_n(C + i * sc + p * ldc, N, scalar_t(0));
      continue;
    }
    grouped_gemm<scalar_t>(nG, M, N, hi - lo, A + p0 * lda + (lo - t.j0), lda, sa, B + (lo - t.j0) * ldb, ldb, sb,
                           C + p0 * ldc, ldc, sc, accumulate, opts);
  }
}

// One kernel row: out[j] = f * m[j] * sum_k a[k] * w[k*k_stride + j], in one pass over the K rows
// (K fixed at compile time so the k loop unrolls and the j loop vectorises).
template <int K, typename scalar_t, typename acc_t>
inline void aggregate_row(const scalar_t* __restrict__ w, int64_t k_stride, const acc_t* a, int64_t J, acc_t f,
                          const acc_t* __restrict__ m, scalar_t* __restrict__ out) {
  acc_t ak[K];
  for (int k = 0; k < K; ++k) ak[k] = a[k];
#pragma omp simd
  for (int64_t j = 0; j < J; ++j) {
    acc_t sum = ak[0] * static_cast<acc_t>(w[j]);
    for (int k = 1; k < K; ++k) sum += ak[k] * static_cast<acc_t>(w[k * k_stride + j]);
    out[j] = static_cast<scalar_t>(sum * f * m[j]);
  }
}

// sum[j] (+)= sum_{k < KC} a[k] * w[k*k_stride + j] (kFirst: =), one pass over KC rows of W.
template <int KC, bool kFirst, typename w_t, typename acc_t>
inline void add_kernel_rows(const w_t* __restrict__ w, int64_t k_stride, const acc_t* a, int64_t J,
                            acc_t* __restrict__ sum) {
  acc_t ak[KC];
  for (int k = 0; k < KC; ++k) ak[k] = a[k];
#pragma omp simd
  for (int64_t j = 0; j < J; ++j) {
    acc_t s = kFirst ? acc_t(0) : sum[j];
    for (int k = 0; k < KC; ++k) s += ak[k] * static_cast<acc_t>(w[k * k_stride + j]);
    sum[j] = s;
  }
}

// Kernels per pass of the loops for any K (sum_kernel_rows, reduce_row_any_k, the folded reduction):
// as many as the unrolled loops of K <= 4 keep in registers. (Against one pass per kernel, which read
// and wrote the row's sums, or G, K times: benchmarks/ab_builds.py, 2 threads, 4 rounds,
// results/ab_kernel_chunks_avx512_cpu.json: backward 0.81-0.82 on B64 256->256 8x8 with K = 8, 4x4
// with K = 6 and B128 128->256 6x6 with K = 5 (folded), 0.79 on B128 128->128 12x12 with K = 8,
// 0.95 on B64 128->128 16x16 with K = 8, 0.88 on B32 128->128 16x16 with K = 16; forward 0.72 there,
// 0.87 and 0.95 on the 4x4 and 6x6 layers; K <= 4, whose loops did not change, 0.95-1.05.)
constexpr int64_t kKernelsPerPass = 4;

// Runs body(std::integral_constant<int, KC>{}, k0) for the chunks [k0, k0 + KC) of K kernels, KC =
// kKernelsPerPass but for a shorter last chunk.
template <typename Body>
inline void for_kernel_chunks(int64_t K, Body&& body) {
  static_assert(kKernelsPerPass == 4, "one case per chunk width");
  for (int64_t k0 = 0; k0 < K; k0 += kKernelsPerPass) {
    switch (std::min<int64_t>(kKernelsPerPass, K - k0)) {
      case 1: body(std::integral_constant<int, 1>{}, k0); break;
      case 2: body(std::integral_constant<int, 2>{}, k0); break;
      case 3: body(std::integral_constant<int, 3>{}, k0); break;
      default: body(std::integral_constant<int, 4>{}, k0); break;
    }
  }
}

// sum[j] = sum_k a[k] * w[k*k_stride + j] for any K (A of one row, for the K without an unrolled
// loop), in passes of kKernelsPerPass kernels: sum is read and written once per pass, not once per
// kernel.
template <typename w_t, typename acc_t>
inline void sum_kernel_rows(const w_t* __restrict__ w, int64_t k_stride, const acc_t* a, int64_t K, int64_t J,
                            acc_t* __restrict__ sum) {
  for_kernel_chunks(K, [&](auto kc, int64_t k0) {
    constexpr int KC = decltype(kc)::value;
    if (k0 == 0)
      add_kernel_rows<KC, true>(w, k_stride, a, J, sum);
    else
      add_kernel_rows<KC, false>(w + k0 * k_stride, k_stride, a + k0, J, sum);
  });
}

// The same as aggregate_row for any K, through `sum` (J elements).
template <typename scalar_t, typename acc_t>
inline void aggregate_row_any_k(const scalar_t* __restrict__ w, int64_t k_stride, const acc_t* a, int64_t K, int64_t J,
                                acc_t f, const acc_t* __restrict__ m, acc_t* __restrict__ sum,
                                scalar_t* __restrict__ out) {
  sum_kernel_rows(w, k_stride, a, K, J, sum);
#pragma omp simd
  for (int64_t j = 0; j < J; ++j) out[j] = static_cast<scalar_t>(sum[j] * f * m[j]);
}

// Runs body(std::integral_constant<int, K>{}) for the K whose loops are unrolled at compile time
// (1, 2, 3, 4 and 8: the K of the paper and its ablations) and returns true; false for the others,
// which take a loop over K.
template <typename Body>
inline bool with_unrolled_k(int64_t K, Body&& body) {
  switch (K) {
    case 1: body(std::integral_constant<int, 1>{}); return true;
    case 2: body(std::integral_constant<int, 2>{}); return true;
    case 3: body(std::integral_constant<int, 3>{}); return true;
    case 4: body(std::integral_constant<int, 4>{}); return true;
    case 8: body(std::integral_constant<int, 8>{}); return true;
    default: return false;
  }
}

template <typename scalar_t, typename acc_t>
void aggregate_row_dispatch(const scalar_t* w, int64_t k_stride, const acc_t* a, int64_t K, int64_t J, acc_t f,
                            const acc_t* m, acc_t* scratch, scalar_t* out) {
  if (!with_unrolled_k(K, [&](auto k) { aggregate_row<decltype(k)::value>(w, k_stride, a, J, f, m, out); }))
    aggregate_row_any_k(w, k_stride, a, K, J, f, m, scratch, out);
}

#if defined(__AVX2__) && defined(__FMA__)
// Eight kernel rows written transposed: out[j * ld + i] = f[i] * m[j] * sum_k a[k] * w[k*k_stride + i*J + j]
// for rows i < 8 (row stride J) and j < Jt. Each 8 x 8 block is aggregated into registers and stored
// transposed from them: no row scratch to write and transpose again (that transpose was 12 % of the
// forward's samples in perf on B128 128->256 6x6).
template <int K>
void aggregate_8_rows_transposed(const float* __restrict__ w, int64_t J, int64_t k_stride, const float* a,
                                 int64_t Jt, const float* f, const float* __restrict__ m, float* __restrict__ out,
                                 int64_t ld) {
  __m256 ak[K], fi[8];
  for (int k = 0; k < K; ++k) ak[k] = _mm256_set1_ps(a[k]);
  for (int i = 0; i < 8; ++i) fi[i] = _mm256_set1_ps(f[i]);
  int64_t j = 0;
  for (; j + 8 <= Jt; j += 8) {
    const __m256 mj = _mm256_loadu_ps(m + j);
    __m256 r[8];
    for (int i = 0; i < 8; ++i) {
      const float* wi = w + i * J + j;
      __m256 sum = _mm256_mul_ps(ak[0], _mm256_loadu_ps(wi));
      for (int k = 1; k < K; ++k) sum = _mm256_fmadd_ps(ak[k], _mm256_loadu_ps(wi + k * k_stride), sum);
      r[i] = _mm256_mul_ps(_mm256_mul_ps(sum, fi[i]), mj);
    }
    store_transposed_8x8(r, out + j * ld, ld);
  }
  for (; j < Jt; ++j) {
    for (int i = 0; i < 8; ++i) {
      float sum = a[0] * w[i * J + j];
      for (int k = 1; k < K; ++k) sum += a[k] * w[k * k_stride + i * J + j];
      out[j * ld + i] = sum * f[i] * m[j];
    }
  }
}

// aggregate_8_rows_transposed for the K with an unrolled version; false for the others.
inline bool aggregate_8_rows_transposed_dispatch(const float* w, int64_t J, int64_t k_stride, const float* a,
                                                 int64_t K, int64_t Jt, const float* f, const float* m, float* out,
                                                 int64_t ld) {
  return with_unrolled_k(K, [&](auto k) {
    aggregate_8_rows_transposed<decltype(k)::value>(w, J, k_stride, a, Jt, f, m, out, ld);
  });
}
#endif

#if defined(__AVX__)
// dst[p * ld + j] = src[j * lds + p] for j < n, p < P, floats, for sources whose rows are far apart
// (transpose_weight_tile: T rows of a tile, J apart, 18 KB on 512->512 3x3): 8 rows at a time over
// all P columns, each row's line kAhead floats on prefetched. transpose_strided's 32 x 32 blocks
// read 32 such rows at once, more streams than the prefetchers follow, and rows 18 KB apart fall
// into two sets of L1. (A whole W of 512->512 3x3, K = 4, in tiles of 32 x 566 on one core of the
// Zen 3 EPYC: 4.7-5.3 ms in 32 x 32 blocks, 3.2-4.1 in panels of 8 rows, 3.1 with the prefetches;
// perf put transpose_weight_tile's 8 x 8 transposes at 12.5 % of the B32 512->512 7x7 forward.
// benchmarks/ab_env.py against the blocks, a temporary switch alternated call by call, 30 rounds,
// results/ab_env_weight_transpose_panels_avx2_cpu.json: forward 0.93-0.95 on B32 512->512 7x7 in
// three runs, 0.87-0.93 on B64 256->256 5x5, 0.92-0.95 on B32 256->512 stride 2, 0.96-1.00 on B128
// 128->256 6x6; 0.995-1.003 on 256->256 8x8, which transposes no W. Every transpose in panels,
// im2row's and the backward's too, gained nothing more: 0.97-1.04 on six layers' backward.)
inline void transpose_row_panels(const float* src, int64_t n, int64_t P, int64_t lds, float* dst, int64_t ld) {
  constexpr int64_t kAhead = 64;  // floats: four lines ahead on each row
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    int64_t p = 0;
    for (; p + 8 <= P; p += 8) {
      if (p + kAhead < P)
        for (int i = 0; i < 8; ++i)
          _mm_prefetch(reinterpret_cast<const char*>(src + (j + i) * lds + p + kAhead), _MM_HINT_T0);
      transpose_8x8(src + j * lds + p, lds, dst + p * ld + j, ld);
    }
    for (int64_t jj = j; jj < j + 8; ++jj)
      for (int64_t pp = p; pp < P; ++pp) dst[pp * ld + jj] = src[jj * lds + pp];
  }
  for (; j < n; ++j)
    for (int64_t p = 0; p < P; ++p) dst[p * ld + j] = src[j * lds + p];
}
#endif

// dst[c * ld + r] = src[r * lds + c] for r < rows, c < cols: float32 in prefetched 8 x 8 panels where
// AVX is compiled in, otherwise element by element.
template <typename scalar_t>
inline void transpose_rows(const scalar_t* src, int64_t rows, int64_t cols, int64_t lds, scalar_t* dst, int64_t ld) {
#if defined(__AVX__)
  if constexpr (std::is_same_v<scalar_t, float>) return transpose_row_panels(src, rows, cols, lds, dst, ld);
#endif
  transpose_strided(src, rows, cols, lds, dst, ld);
}

// The K slices of W on one tile, transposed: wt[((gi - t.g0) * K + k) * Jt * T + jj * T + r] =
// W_k[gi * Cout/G + t.r0 + r, t.j0 + jj]. The transposed float32 forward builds every sample's Wb^T of
// the tile from these rows (build_tile_kernel_from_transposed), which need no transposes of their own.
template <typename scalar_t>
void transpose_weight_tile(const scalar_t* weight, const Geometry& g, const Tile& t, scalar_t* wt) {
  const int64_t J = g.cols_per_group(), K = g.kernel_num, k_stride = g.kernel_numel(), T = t.rows(), Jt = t.cols();
  for (int64_t gi = t.g0; gi < t.g1; ++gi)
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* src = weight + k * k_stride + (gi * g.out_per_group + t.r0) * J + t.j0;
      transpose_rows(src, T, Jt, J, wt + ((gi - t.g0) * K + k) * Jt * T, T);
    }
}

// One tile's K slices of W in tap-major column order (see "Tap-major columns"), transposed as
// transpose_weight_tile lays them out: wt[((gi - t.g0) * K + k) * Jt * T + jj * T + r] = W_k[gi * Cout/G +
// t.r0 + r, t.j0 + c * taps + tap] for the tile's tap-major column jj = tap * Cb + c, Cb = Jt / taps its
// channels (a tile holds whole channels): each group's and kernel's slice (T x Jt, rows J apart)
// transposed into scratch (Jt x T, the tile's columns in im2col's order), then its rows copied into wt
// in the tile's tap-major order, T values each.
template <typename scalar_t>
void transpose_weight_tile_tap_major(const scalar_t* weight, const Geometry& g, const Tile& t, scalar_t* wt,
                                     scalar_t* scratch) {
  const int64_t J = g.cols_per_group(), K = g.kernel_num, k_stride = g.kernel_numel(), T = t.rows(), Jt = t.cols();
  const int64_t taps = g.taps(), Cb = Jt / taps;
  for (int64_t gi = t.g0; gi < t.g1; ++gi)
    for (int64_t k = 0; k < K; ++k) {
      transpose_rows(weight + k * k_stride + (gi * g.out_per_group + t.r0) * J + t.j0, T, Jt, J, scratch, T);
      scalar_t* dst = wt + ((gi - t.g0) * K + k) * Jt * T;
      for (int64_t tap = 0; tap < taps; ++tap)
        for (int64_t c = 0; c < Cb; ++c) std::copy_n(scratch + (c * taps + tap) * T, T, dst + (tap * Cb + c) * T);
    }
}

// Every tile's slices as transpose_weight_tile_tap_major lays them out, tile ti's at out + offsets[ti]:
// built once per call, for all the threads' runs, where the call keeps a permuted copy of W (else each
// run builds its tiles' slices itself). The transposed forward had copied W to tap-major order and then
// transposed each tile's slices in every run of samples.
template <typename scalar_t>
void transpose_weight_tiles_tap_major(const scalar_t* weight, const Geometry& g, const std::vector<Tile>& tiles,
                                      const std::vector<int64_t>& offsets, scalar_t* out) {
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t t0, int64_t t1) {
    std::vector<scalar_t> scratch;
    for (int64_t ti = t0; ti < t1; ++ti) {
      const Tile& t = tiles[ti];
      scratch.resize(std::max<size_t>(scratch.size(), t.rows() * t.cols()));
      transpose_weight_tile_tap_major(weight, g, t, out + offsets[ti], scratch.data());
    }
  });
}

// One row jj of Wb^T on a tile from the transposed slices: out[r] = f[r] * sum_k (a[k] m) wt_k[r], r < T
// (K fixed at compile time so the k loop unrolls and the r loop vectorises).
template <int K>
inline void aggregate_transposed_row(const float* __restrict__ wt, int64_t k_stride, const float* a, float m,
                                     int64_t T, const float* __restrict__ f, float* __restrict__ out) {
  float ak[K];
  for (int k = 0; k < K; ++k) ak[k] = a[k] * m;
#pragma omp simd
  for (int64_t r = 0; r < T; ++r) {
    float sum = ak[0] * wt[r];
    for (int k = 1; k < K; ++k) sum += ak[k] * wt[k * k_stride + r];
    out[r] = sum * f[r];
  }
}

// Wb^T of one sample on a tile, (groups, Jt, T) in kern, from transpose_weight_tile's wt: what
// build_tile_kernel(..., transposed = true, ..., ld = T, col0 = 0) writes, without its transposes.
inline void build_tile_kernel_from_transposed(const float* wt, const float* a, const float* f, const float* m,
                                              const Geometry& g, const Tile& t, float* kern) {
  const int64_t J = g.cols_per_group(), K = g.kernel_num, T = t.rows(), Jt = t.cols(), ks = Jt * T;
  for (int64_t gi = t.g0; gi < t.g1; ++gi) {
    const float* wg = wt + (gi - t.g0) * K * ks;
    const float* fg = f + gi * g.out_per_group + t.r0;
    const float* mg = m + gi * J + t.j0;
    float* out = kern + (gi - t.g0) * ks;
    const bool unrolled = with_unrolled_k(K, [&](auto k) {  // K chosen once per group, not per row
      for (int64_t jj = 0; jj < Jt; ++jj)
        aggregate_transposed_row<decltype(k)::value>(wg + jj * T, ks, a, mg[jj], T, fg, out + jj * T);
    });
    if (unrolled) continue;
    for (int64_t jj = 0; jj < Jt; ++jj) {
      float* o = out + jj * T;
      sum_kernel_rows(wg + jj * T, ks, a, K, T, o);
      const float mj = mg[jj];
#pragma omp simd
      for (int64_t r = 0; r < T; ++r) o[r] *= mj * fg[r];
    }
  }
}

// ---- The folded build (the float32 forward on 4x4 and 8x8 maps, see kMaxFoldedPixels). There
// building the kernels, not the products, is most of the forward (perf, B64 512->512 4x4: 47 % of
// the cycles building, 32 % in the products), so it is cheapened two ways:
//   - the scales are folded out: Wb @ cols_b = f * (A @ (m * cols_b)), so m goes onto the sample's
//     im2col matrix and f onto its output (J*P + Cout*P multiplies per sample), and building a tile
//     is a plain sum of K blocks of W, A = sum_k a[k] W_k;
//   - kFoldedSamples samples are built in one pass over a tile, each value of W loaded once for all.
// (Copying each tile cut in J contiguous once per run, so that a pass streams K blocks rather than
// K*T rows J apart, helped with one sample per pass but was 1-4 % slower with four.)

// out[q * out_stride + e] = sum_k a[q * K + k] * w[k * k_stride + e] for e < n and samples q < S.
template <int K, int S>
void sum_kernels_for_samples(const float* __restrict__ w, int64_t k_stride, const float* a, int64_t n,
                             float* __restrict__ out, int64_t out_stride) {
  float ak[S][K];
  for (int q = 0; q < S; ++q)
    for (int k = 0; k < K; ++k) ak[q][k] = a[q * K + k];
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) {
    float wk[K];
    for (int k = 0; k < K; ++k) wk[k] = w[k * k_stride + e];
    for (int q = 0; q < S; ++q) {
      float sum = ak[q][0] * wk[0];
      for (int k = 1; k < K; ++k) sum += ak[q][k] * wk[k];
      out[q * out_stride + e] = sum;
    }
  }
}

// The same for any K and S <= kFoldedSamples: kFoldedSamples at once, fewer one at a time (and one
// at a time for the K without an unrolled loop).
inline void sum_kernels_for_samples_dispatch(const float* w, int64_t k_stride, const float* a, int64_t K, int64_t S,
                                             int64_t n, float* out, int64_t out_stride) {
  const bool unrolled = with_unrolled_k(K, [&](auto k) {
    constexpr int KK = decltype(k)::value;
    if (S == kFoldedSamples) return sum_kernels_for_samples<KK, kFoldedSamples>(w, k_stride, a, n, out, out_stride);
    for (int64_t q = 0; q < S; ++q) sum_kernels_for_samples<KK, 1>(w, k_stride, a + q * KK, n, out + q * out_stride, 0);
  });
  if (!unrolled)
    for (int64_t q = 0; q < S; ++q) sum_kernel_rows(w, k_stride, a + q * K, K, n, out + q * out_stride);
}

// A = sum_k a[k] W_k on one tile for S samples (a: S x K), sample q's (groups, rows, Jt) block at
// kern + q * (tile elements): in one pass where the tile's block is contiguous in W (whole rows of
// J: the tile's groups or rows follow each other), else row by row (a tile cut in J).
inline void build_folded_tile(const float* weight, const float* a, int64_t S, const Geometry& g, const Tile& t,
                              float* kern) {
  const int64_t J = g.cols_per_group(), K = g.kernel_num, Jt = t.cols();
  const int64_t elems = t.groups() * t.rows() * Jt;
  const float* w = weight + (t.g0 * g.out_per_group + t.r0) * J + t.j0;
  if (Jt == J) return sum_kernels_for_samples_dispatch(w, g.kernel_numel(), a, K, S, elems, kern, elems);
  for (int64_t r = 0; r < t.rows(); ++r)  // cut in J (G == 1): rows J apart
    sum_kernels_for_samples_dispatch(w + r * J, g.kernel_numel(), a, K, S, Jt, kern + r * Jt, elems);
}

// mat[r, c] *= s[r] on a rows x cols row-major matrix.
template <typename T>
inline void scale_rows(T* mat, int64_t rows, int64_t cols, const T* s) {
  for (int64_t r = 0; r < rows; ++r) {
    const T sr = s[r];
    T* __restrict__ row = mat + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) row[c] *= sr;
  }
}

// mat[r, c] *= s[c] on a rows x cols row-major matrix.
template <typename T, typename S>
inline void scale_columns(T* mat, int64_t rows, int64_t cols, const S* __restrict__ s) {
  for (int64_t r = 0; r < rows; ++r) {
    T* __restrict__ row = mat + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) row[c] *= s[c];
  }
}

// A^T of one tile for S samples from transpose_weight_tile's wt (per group, K slices of Jt x T):
// sample q's (groups, Jt, T) block at kern + q * (tile elements).
inline void build_folded_tile_transposed(const float* wt, const float* a, int64_t S, const Geometry& g,
                                         const Tile& t, float* kern) {
  const int64_t K = g.kernel_num, ks = t.cols() * t.rows(), elems = t.groups() * ks;
  for (int64_t gi = 0; gi < t.groups(); ++gi)
    sum_kernels_for_samples_dispatch(wt + gi * K * ks, ks, a, K, S, ks, kern + gi * ks, elems);
}

// Wb on one tile of one sample (Jt = t.cols()). Wb goes to kern as (groups, rows, Jt), or
// transposed (the backward's grad_x product needs Wb^T row-major) into columns [col0, col0 + rows)
// of a (groups, Jt, ld) matrix when `transposed`: then float rows are built 8 at a time in registers
// and stored transposed (AVX2), and the others are built in rows_scratch (rows x Jt elements) and
// transposed in blocks, not written column by column. scratch holds J elements. m holds the input
// scale of the columns from m_col0 on (G == 1), or of all G*J columns (m_col0 = 0).
template <typename scalar_t, typename acc_t>
void build_tile_kernel(const scalar_t* weight, const acc_t* a, const acc_t* f, const acc_t* m, const Geometry& g,
                       const Tile& t, bool transposed, scalar_t* kern, scalar_t* rows_scratch, acc_t* scratch,
                       int64_t ld = 0, int64_t col0 = 0, int64_t m_col0 = 0) {
  const int64_t J = g.cols_per_group(), K = g.kernel_num, k_stride = g.kernel_numel(), T = t.rows(), Jt = t.cols();
  for (int64_t gi = t.g0; gi < t.g1; ++gi) {
    const int64_t o0 = gi * g.out_per_group;
    const auto build_row = [&](int64_t r, scalar_t* out) {  // Wb[o0 + r, tile columns] into out
      aggregate_row_dispatch(weight + (o0 + r) * J + t.j0, k_stride, a, K, Jt, f[o0 + r], m + gi * J + t.j0 - m_col0,
                             scratch, out);
    };
    if (!transposed) {
      for (int64_t r = t.r0; r < t.r1; ++r) build_row(r, kern + ((gi - t.g0) * T + (r - t.r0)) * Jt);
      continue;
    }
    scalar_t* kern_t = kern + (gi - t.g0) * Jt * ld + col0;  // column r - t.r0 holds row r
    int64_t r = t.r0;
#if defined(__AVX2__) && defined(__FMA__)
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
      for (; r + 8 <= t.r1; r += 8) {
        if (!aggregate_8_rows_transposed_dispatch(weight + (o0 + r) * J + t.j0, J, k_stride, a, K, Jt, f + o0 + r,
                                                  m + gi * J + t.j0 - m_col0, kern_t + (r - t.r0), ld))
          break;
      }
    }
#endif
    if (r == t.r1) continue;
    for (int64_t q = r; q < t.r1; ++q) build_row(q, rows_scratch + (q - r) * Jt);
    transpose_into(rows_scratch, t.r1 - r, Jt, kern_t + (r - t.r0), ld);
  }
}

// Whether rounding n columns up to brgemm's 16-column blocks wastes more than a fifth of them (maps
// like 7x7, 6x6 and 5x5: the last block is ragged and runs slowly; see forward_kernel).
inline bool ragged_column_blocks(int64_t n) { return (n + 15) / 16 * 16 * 4 > 5 * n; }

template <typename scalar_t>
constexpr bool uses_brgemm() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  return std::is_same_v<scalar_t, float>;
#else
  return false;
#endif
}

template <typename scalar_t>
at::Tensor forward_kernel(
    const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& ch_in, const at::Tensor& f_in,
    const at::Tensor& s_in, const at::Tensor& a_in, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor ch = ch_in.to(acc_type).contiguous(), s = s_in.to(acc_type).contiguous();
  const at::Tensor f = f_in.to(acc_type).contiguous(), a = a_in.to(acc_type).contiguous();
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, x.options());
  advise_huge_pages(out);
  if (g.batch == 0) return out;

  const int64_t J = g.cols_per_group(), P = g.out_pixels(), Cog = g.out_per_group, Cout = g.out_channels;
  const int64_t GJ = g.groups * J, K = g.kernel_num;
  const int64_t x_stride = g.in_channels * g.height * g.width;
  const bool direct = g.im2col_is_identity();
  // A batch smaller than the thread count (one image in the GUI) would leave threads idle with one
  // run of samples per thread: then the output rows of a sample are split between threads too.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const bool split_rows = g.batch < threads;
  // brgemm's micro-kernel covers N in blocks of 16 columns and runs a ragged last block slowly: on one
  // core a (32 x 576) @ (576 x 36) product ran at 75 GFLOP/s against 112 for its transpose
  // (36 x 576) @ (576 x 32), and with 49 columns at 78 against 114. Where rounding P up to 16 would
  // waste more than a fifth of the columns (6x6, 7x7, 5x5 maps), the float32 forward multiplies
  // out^T = im2row @ Wb^T instead (N = the tile's rows) and transposes each sample's output at the
  // end. (2 cores, benchmarks/ab_builds.py, results/ab_transposed_forward_cpu.json: forward 0.75 on
  // B128 128->256 6x6, 0.89 on B32 512->512 7x7, 0.85 on a 7x7 layer with groups, 1.00 on 5x5; on
  // 10x10 and 14x14, where the ragged block is a small part of N, a trial showed no change.)
  // Grouped layers of at most kTransposedForwardMinGroupRows - 1 rows per group keep the plain product:
  // their transposed products have N = the group's rows, less than one AVX2 vector of columns.
  // (benchmarks/ab_env.py, ODCONV_CPU_TRANSPOSED_FORWARD=never against auto on the GEMM path, 10 rounds,
  // results/ab_transposed_forward_small_groups_avx2_cpu.json: forward 0.21-0.37 with 4 rows per group
  // (B32 256->256 7x7 with 64 groups, 128->128 7x7 with 32), 0.36-0.40 with 8 rows and 4 input
  // channels (B128 128->256 6x6 with 32 groups), 0.56-0.99 with 8 rows and 8 channels; with 12-64
  // rows the transposed product stays faster: 1.06-1.39 for never.)
  // On AVX-512 (brgemm's 16-column blocks, a vector each) grouped layers keep the plain product whatever
  // their rows per group: ODCONV_CPU_TRANSPOSED_FORWARD=never against auto, Zen 4 EPYC, 10 rounds,
  // results/ab_transposed_forward_groups_avx512_cpu.json and ..._dense_avx512_cpu.json: forward 0.35-0.46
  // with 12-16 rows per group on 7x7 maps, 0.68 with 24, 0.80 with 32, 0.85-0.86 with 64, 0.96 with 128
  // (B32 256->256 7x7, two groups); dense layers stay transposed (never: 1.11-1.37 on 6x6, 7x7, 5x5).
  // ODCONV_CPU_TRANSPOSED_FORWARD=auto (default) | always | never overrides the choice (tests run both).
  const std::string transposed_mode = path_override("ODCONV_CPU_TRANSPOSED_FORWARD", {"auto", "always", "never"});
  const std::string split_mode = path_override("ODCONV_CPU_FORWARD_SPLIT", {"auto", "samples", "tiles"});  // below
  const std::string skip_rows_mode = path_override("ODCONV_CPU_SKIP_PADDED_ROWS", {"auto", "never"});  // below
  const bool transposed =
      uses_brgemm<scalar_t>() &&
      (transposed_mode == "auto"
           ? ragged_column_blocks(P) &&
                 (g.groups == 1 || (!cpu_has_avx512() && g.out_per_group >= kTransposedForwardMinGroupRows))
           : transposed_mode == "always");
  const bool reads_x = direct && !transposed;  // the products read x itself: no cols buffer
  // the folded build (see build_folded_tile): float32 on maps of at most kMaxFoldedPixels pixels, with
  // an im2col matrix to scale
  constexpr bool is_float = std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>;
  const bool folded = !split_rows && is_float && !transposed && !reads_x && P <= kMaxFoldedPixels;
  // the transposed products fold the scales too, in runs that transpose W's slices (see
  // build_folded_tile_transposed): out_b^T = ((rows_b m) @ A^T) f
  const bool folded_transposed = !split_rows && is_float && transposed;
  // the transposed products over tap-major columns (see "Tap-major columns"); not with im2col-free
  // kernels, whose rows are x itself transposed, nor for the split of rows, which multiplies Wb @ cols
  // The plain products' tiles with fewer than kTileKernelsAtLeast kernels: kTileBytes budgets a tile's K
  // slices of W, and the sample's Wb tile that the product reads is one slice, so with K = 1 a tile of
  // 512->512 3x3 on 14x14 was 28 rows by all 4608 columns, a 516 KB Wb next to the 3.6 MB im2col matrix
  // it re-read for every 28 rows. Such layers size their tiles as if they had kTileKernelsAtLeast
  // kernels (Wb at most a quarter of kTileBytes), so they take the tiles cut in J that K = 4 takes.
  // (benchmarks/ab_env.py against the old budget with a temporary switch, Zen 4 EPYC, 12 and 16 rounds,
  // results/ab_forward_tiles_small_k_avx512_cpu*.json: forward 0.31-0.34 on B32 512->512 10x10 and
  // B16 512->512 14x14 with K = 1, 0.78-0.83 on 256->256 9x9, 10x10 and 14x14 with K = 1, 0.82-0.83
  // with K = 2 and 3 on 14x14, 0.90 on 256->256 12x12 with K = 2; 0.98-1.03 on the 128-channel 12x12
  // and 28x28 layers, the 64->64 32x32 layer and a grouped K = 2 layer. Layers without im2col keep the
  // old budget: 1.08 and 1.10 on a 256->1024 1x1 layer on 14x14 in the two runs.)
  const int64_t plain_tile_bytes = direct ? kTileBytes : kTileBytes * K / std::max<int64_t>(K, kTileKernelsAtLeast);
  const auto tiles_for = [&](bool whole_channels) {
    return make_tiles(g, sizeof(scalar_t), split_rows ? (2 * threads + g.batch - 1) / g.batch : 1,
                      /*for_forward=*/true, folded || folded_transposed ? folded_tile_bytes(g, P) : plain_tile_bytes,
                      /*rows_are_columns=*/transposed && !split_rows, whole_channels,
                      /*cut_groups=*/!transposed);
  };
  std::vector<Tile> tiles = tiles_for(false);
  // whether the threads share the tiles' ranges of rows ("Tiles between threads" below; the ranges do
  // not depend on the tiles' cuts in J)
  const int64_t share = (g.batch + threads - 1) / threads;  // a thread's samples
  const int64_t n_ranges = static_cast<int64_t>(row_ranges(tiles).size());
  const bool even_ranges = n_ranges % threads == 0 || n_ranges >= 4 * threads;
  const bool tiles_shared = folded_transposed && threads > 1 && split_mode != "samples" &&
                            (split_mode == "tiles" || (share < kMinSamplesPerWeightTranspose && even_ranges));
  const TapMajor tap_major_kind =
      transposed && !split_rows && !direct ? tap_major_columns(g, sizeof(scalar_t), share, tiles_shared)
                                           : TapMajor::kNo;
  const bool tap_major = tap_major_kind != TapMajor::kNo;
  const bool tap_major_once = tap_major_kind == TapMajor::kOnce;  // W permuted once per call, else per run
  if (tap_major) tiles = tiles_for(/*whole_channels=*/true);
  // the tap-major products skip the padded kernel rows of the first and last output rows (see
  // "Padded rows skipped")
  const std::vector<RowClass> classes = tap_major ? row_classes(g) : std::vector<RowClass>();
  const bool skip_rows = tap_major && classes.size() > 1 && skip_rows_mode == "auto";
  // tap-major: the channels of a tile cut in J (all of a group's otherwise), whose columns it orders
  const int64_t block_channels = tap_major ? tiles.front().cols() / g.taps() : 0;
  const int64_t max_tile = max_tile_elems(tiles);
  const auto opts = x.options();
  const auto acc_opts = opts.dtype(acc_type);
  // tap-major, once: every tile's K slices of W, permuted and transposed once for all the runs (the
  // products then take no slices of W itself: wt is always this); per run: each run permutes and
  // transposes them into its wt_buf
  std::vector<int64_t> tile_offsets(tiles.size() + 1, 0);
  for (size_t ti = 0; ti < tiles.size(); ++ti)
    tile_offsets[ti + 1] = tile_offsets[ti] + K * tiles[ti].groups() * tiles[ti].rows() * tiles[ti].cols();
  at::Tensor weight_tiles_t;
  if (tap_major_once) {
    weight_tiles_t = at::empty({tile_offsets.back()}, opts);
    transpose_weight_tiles_tap_major(weight.const_data_ptr<scalar_t>(), g, tiles, tile_offsets,
                                     weight_tiles_t.data_ptr<scalar_t>());
  }
  // the tile's K slices of W transposed: from weight_tiles_t (tap-major, once), else transposed into
  // wt_buf (K * max_tile elements; tap-major per run: max_tile more of scratch after them) (generic: the
  // folded products below are float32 code in every instantiation)
  const auto weight_tile_t = [&](size_t ti, auto* wt_buf) {
    using T = std::remove_pointer_t<decltype(wt_buf)>;
    if (tap_major_once) return weight_tiles_t.const_data_ptr<T>() + tile_offsets[ti];
    if (tap_major)
      transpose_weight_tile_tap_major(weight.const_data_ptr<T>(), g, tiles[ti], wt_buf, wt_buf + K * max_tile);
    else
      transpose_weight_tile(weight.const_data_ptr<T>(), g, tiles[ti], wt_buf);
    return static_cast<const T*>(wt_buf);
  };
  const int64_t wt_buf_elems = (K + (tap_major ? 1 : 0)) * max_tile;
  const scalar_t* w_ptr = weight.const_data_ptr<scalar_t>();
  scalar_t* y = out.data_ptr<scalar_t>();

  // out[b][g][rows of t] (+)= Wb[g][rows, cols of t] @ cols_b[g][cols of t, :], with Wb of the tile
  // built into kern first; the column blocks of a row range (tiles cut in J) accumulate.
  const auto multiply_tile = [&](const Tile& t, int64_t b, const scalar_t* cols_b, const acc_t* m_b, scalar_t* kern,
                                 acc_t* scratch) {
    const int64_t nG = t.groups(), T = t.rows(), Jt = t.cols(), row0 = t.first_row(Cog);
    build_tile_kernel(w_ptr, a.const_data_ptr<acc_t>() + b * K, f.const_data_ptr<acc_t>() + b * Cout, m_b, g, t,
                      /*transposed=*/false, kern, static_cast<scalar_t*>(nullptr), scratch);
    grouped_gemm<scalar_t>(nG, T, P, Jt, kern, Jt, T * Jt, cols_b + t.g0 * J * P + t.j0 * P, P, J * P,
                           y + b * Cout * P + row0 * P, P, Cog * P, /*accumulate=*/t.j0 > 0, opts,
                           /*in_column_blocks=*/true);
  };

  if (split_rows) {
    // im2col of every sample, split by input channels; then the (sample, row range) pairs in parallel.
    const int64_t Cin = g.in_channels, taps = g.taps(), B = g.batch;
    at::Tensor cols_buf = direct ? at::Tensor() : at::empty({B * GJ * P}, opts);
    at::Tensor m_buf = at::empty({B * GJ}, acc_opts);
    const scalar_t* cols = direct ? x.const_data_ptr<scalar_t>() : cols_buf.const_data_ptr<scalar_t>();
    const int64_t cols_stride = direct ? x_stride : GJ * P;
    if (!direct) {
      at::parallel_for(0, B * Cin, 1, [&](int64_t u0, int64_t u1) {
        for (int64_t u = u0; u < u1;) {
          const int64_t b = u / Cin, c0 = u % Cin, c1 = std::min(Cin, c0 + (u1 - u));
          im2col(x.const_data_ptr<scalar_t>() + b * x_stride, g,
                 cols_buf.data_ptr<scalar_t>() + b * GJ * P + c0 * taps * P, c0, c1);
          u += c1 - c0;
        }
      });
    }
    for (int64_t b = 0; b < B; ++b)
      input_scale(ch.const_data_ptr<acc_t>() + b * Cin, s.const_data_ptr<acc_t>() + b * taps, g,
                  m_buf.data_ptr<acc_t>() + b * GJ);
    const std::vector<std::pair<size_t, size_t>> ranges = row_ranges(tiles);
    at::parallel_for(0, B * n_ranges, 1, [&](int64_t u0, int64_t u1) {
      at::Tensor kern_buf = at::empty({max_tile}, opts);
      at::Tensor scratch_buf = at::empty({J}, acc_opts);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / n_ranges;
        const auto [first, last] = ranges[u % n_ranges];
        for (size_t ti = first; ti < last; ++ti)
          multiply_tile(tiles[ti], b, cols + b * cols_stride, m_buf.const_data_ptr<acc_t>() + b * GJ,
                        kern_buf.data_ptr<scalar_t>(), scratch_buf.data_ptr<acc_t>());
      }
      if constexpr (uses_brgemm<scalar_t>()) at::native::cpublas::brgemm_release(false);
    });
    return out;
  }

  // One parallel region: each thread works through its range of the batch, n samples at a time,
  // with buffers allocated once (allocated per chunk they went back to the allocator and came back
  // as fresh pages: B64 64->64 32x32, ~400 page faults per forward). It had one region per chunk of
  // n samples per thread, whose barriers made the threads wait for each other after every chunk:
  // libgomp's share of a perf profile fell from 6.2 to 4.7 % (B64 64->64 32x32, 32 chunks) and from
  // 5.5 to 2.5 % (B64 512->512 4x4) with one region.
  // out_b^T[:, rows of t] (+)= rows_b[:, cols of t] @ Wb[rows, cols of t]^T, with Wb^T of the tile built
  // into kern (through kern_rows); out_t_b is the sample's (P x Cout) transposed output.
  // wt: the tile's K slices of W transposed (transpose_weight_tile), or null: then Wb^T is built from W.
  // rows_b's row p holds its columns from col_base on at rows_b + p * ld (ld 0: all G*J columns, GJ apart).
  const auto multiply_tile_transposed = [&](const Tile& t, int64_t b, const scalar_t* rows_b, const acc_t* m_b,
                                            scalar_t* kern, scalar_t* kern_rows, acc_t* scratch, scalar_t* out_t_b,
                                            const scalar_t* wt, int64_t ld = 0, int64_t col_base = 0) {
    const int64_t nG = t.groups(), T = t.rows(), Jt = t.cols(), row0 = t.first_row(Cog);
    const int64_t lda = ld > 0 ? ld : GJ;
    const scalar_t* rows_t = rows_b + t.g0 * J + (t.j0 - col_base);  // the tile's columns
    bool built = false;
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
      if (wt != nullptr) {
        build_tile_kernel_from_transposed(wt, a.const_data_ptr<acc_t>() + b * K, f.const_data_ptr<acc_t>() + b * Cout,
                                          m_b, g, t, kern);
        built = true;
      }
    }
    if (!built)
      build_tile_kernel(w_ptr, a.const_data_ptr<acc_t>() + b * K, f.const_data_ptr<acc_t>() + b * Cout, m_b, g, t,
                        /*transposed=*/true, kern, kern_rows, scratch, /*ld=*/T, /*col0=*/0);
    if (skip_rows)
      tap_major_product<scalar_t>(classes, g, t, nG, T, rows_t, lda, J, kern, T, Jt * T, out_t_b + row0, Cout, Cog,
                                  /*accumulate=*/t.j0 > 0, opts);
    else
      grouped_gemm<scalar_t>(nG, P, T, Jt, rows_t, lda, J, kern, T, Jt * T, out_t_b + row0, Cout, Cog,
                             /*accumulate=*/t.j0 > 0, opts);
  };
  // The transposed product's rows_b (im2row, or over tap-major columns) and input scale m_b of sample b;
  // scratch: a channels-last copy of x_b (tap-major) or im2row's blocks, none without im2col.
  const auto transposed_rows = [&](int64_t b, scalar_t* scratch, scalar_t* rows_b, acc_t* m_b) {
    const scalar_t* x_b = x.const_data_ptr<scalar_t>() + b * x_stride;
    const acc_t *ch_b = ch.const_data_ptr<acc_t>() + b * g.in_channels, *s_b = s.const_data_ptr<acc_t>() + b * g.taps();
    if (tap_major) {
      im2row_tap_major(x_b, g, block_channels, scratch, rows_b, GJ);
      input_scale_tap_major(ch_b, s_b, g, block_channels, m_b);
    } else {
      im2row(x_b, g, scratch, rows_b);
      input_scale(ch_b, s_b, g, m_b);
    }
  };
  // The folded products of tile t (float32) for the samples [s0, s0 + n), whose scaled cols matrices
  // (with wt: rows matrices) lie cols_stride apart from cols: A of the tile for up to kFoldedSamples
  // samples per pass, then out_b (+)= A @ (m cols_b) into out; with wt, W's slices of the tile first
  // transposed into wt, A^T built from them, and out_b^T (+)= (rows_b m) @ A^T into ot, P x Cout per
  // sample from the run's first. With wt, a rows matrix's row p may hold its columns from col_base on, at
  // cols + p * ld (ld 0: all G*J columns).
  const auto multiply_tile_folded = [&](size_t ti, int64_t s0, int64_t n, const float* w, const float* cols,
                                        int64_t cols_stride, bool with_wt, float* wt_buf, float* kern, float* out,
                                        float* ot, int64_t ld = 0, int64_t col_base = 0) {
    const Tile& t = tiles[ti];
    const int64_t nG = t.groups(), T = t.rows(), Jt = t.cols(), elems = nG * T * Jt, row0 = t.first_row(Cog);
    const int64_t lda = ld > 0 ? ld : GJ, col0 = t.g0 * J + (t.j0 - col_base);  // the tile's first column
    const float* wt = with_wt ? weight_tile_t(ti, wt_buf) : nullptr;
    for (int64_t i0 = 0; i0 < n; i0 += kFoldedSamples) {
      const int64_t S = std::min(kFoldedSamples, n - i0);
      const float* a_pass = a.const_data_ptr<float>() + (s0 + i0) * K;
      if (wt != nullptr)
        build_folded_tile_transposed(wt, a_pass, S, g, t, kern);
      else
        build_folded_tile(w, a_pass, S, g, t, kern);
      for (int64_t q = 0; q < S; ++q) {
        const float* cols_q = cols + (i0 + q) * cols_stride;
        if (wt != nullptr && skip_rows)  // as below, class by class
          tap_major_product<float>(classes, g, t, nG, T, cols_q + col0, lda, J, kern + q * elems, T, Jt * T,
                                   ot + (i0 + q) * P * Cout + row0, Cout, Cog, /*accumulate=*/t.j0 > 0, opts);
        else if (wt != nullptr)  // out_q^T[:, rows of t] (+)= (rows_q m)[:, cols of t] @ A^T
          grouped_gemm<float>(nG, P, T, Jt, cols_q + col0, lda, J, kern + q * elems, T, Jt * T,
                              ot + (i0 + q) * P * Cout + row0, Cout, Cog, /*accumulate=*/t.j0 > 0, opts);
        else  // out_q[rows of t] (+)= A @ (m cols_q)[cols of t]
          grouped_gemm<float>(nG, T, P, Jt, kern + q * elems, Jt, T * Jt, cols_q + t.g0 * J * P + t.j0 * P, P, J * P,
                              out + (s0 + i0 + q) * Cout * P + row0 * P, P, Cog * P, /*accumulate=*/t.j0 > 0, opts);
      }
    }
  };
  // Column-block runs. A run over tap-major columns permutes and transposes every tile's slices of W
  // (per run, not once per call: W larger than 16 MB or than the output), and its rows matrices, P x J a
  // sample, bound it to kTransposedForwardThreadBytes: 3 samples of 512->512 with 7x7 kernels on 7x7
  // (4.9 MB each), so 11 passes over its 205 MB of W per call on two threads, a third of the forward
  // in perf. Where the tiles are cut in J (dense layers; whole channels per column block), a run instead
  // holds its samples' x channels-last and goes column block by column block: the rows of the block's
  // channels (P x its columns, a sample), then every tile of that block (its range of rows) over all of
  // the run's samples, into their transposed outputs. Its samples cost P * Cout + Cin * H * W + P *
  // (a block's columns) elements each, so runs take up to kMaxSamplesPerThread samples where W is large,
  // and fold their builds (at least kMinSamplesPerWeightTranspose samples); the products and the sums
  // are the same. (benchmarks/ab_env.py against a temporary switch, 4 rounds, memory kept, Zen 4 EPYC,
  // results/ab_forward_block_runs_avx512_cpu*.json: forward 0.60-0.64 on B32 512->512 7x7 with 7x7
  // kernels, 0.70-0.71 on B16 2048->512 7x7, 0.77 on B32 256->256 7x7 with 5x5 kernels, 0.86-0.90 on
  // B16 384->384 6x6 5x5, B128 256->256 6x6, B16 1024->1024 7x7 and B256 512->512 7x7, 0.87-0.96 on
  // B32 512->512 7x7, 0.93-0.97 on B64 256->256 5x5, B32 1024->1024 3x3, K = 8 and stride 2 onto 7x7;
  // K = 1 1.02.)
  const int64_t block_cols = block_channels * g.taps();  // a column block's columns, at most
  const bool block_runs =
      is_float && tap_major && !tap_major_once && !tiles_shared && g.groups == 1 && block_cols < J;
  const int64_t per_run = samples_per_run(
      block_runs ? (P * Cout + g.in_channels * g.height * g.width + P * block_cols) * static_cast<int64_t>(sizeof(scalar_t))
                 : (reads_x ? 0 : im2col_bytes(g, sizeof(scalar_t))),
      transposed ? kTransposedForwardThreadBytes
                 : (folded ? std::clamp<int64_t>(K * Cout * J * static_cast<int64_t>(sizeof(scalar_t)),
                                                 kForwardThreadBytes, kFoldedThreadBytes)
                           : kForwardThreadBytes));
  // Tiles between threads, for small batches. A thread's run transposes W's slices only when it has
  // at least kMinSamplesPerWeightTranspose samples; with a smaller share of the batch (B < 10 on 2
  // threads, B < 80 on 16) each thread built every sample's Wb^T from the K kernels, and folded
  // nothing. Here the threads share the tiles instead: they build the chunk's rows' = rows m sample by
  // sample, then take ranges of tile rows (all of a range's column blocks, which accumulate into the
  // same columns of out^T) through every sample of the chunk, W's slices transposed once per chunk
  // (the whole batch, unless its im2row exceeds the threads' budgets) and A^T built for four samples
  // per pass, and transpose and scale those rows of the outputs.
  // (benchmarks/ab_env.py, 24 rounds, results/ab_forward_split_tiles_avx2_cpu.json: forward 0.67-0.87
  // on B2-B8 512->512 7x7 and B4-B8 2048->512 1x1 on 7x7, 0.91-0.94 on B8 128->256 6x6, B6 256->256
  // 5x5 and B8 256->512 stride 2 onto 7x7; B10 and B32 512->512 7x7, which keep the runs, 1.00-1.01.)
  // Larger batches keep the threads' runs: sharing tiles there transposes W once per chunk instead of
  // once per thread, and read 0.90-0.96 on B32 512->512 7x7 and 0.96-1.00 on the GTSRB 6x6 and
  // 256->256 5x5 layers in four runs, but 1.04-1.15 on those three in two others
  // (results/ab_forward_split_tiles_avx2_cpu_slow_period.json), in periods when the machine ran
  // everything slower: it has two parallel regions per chunk where the runs have one per call.
  // It takes layers whose ranges of rows the threads share evenly: a multiple of the thread count,
  // or at least four per thread (160 rows in five ranges of 32 would leave a thread idle for a
  // fifth of the time). ODCONV_CPU_FORWARD_SPLIT=auto (default) | samples |
  // tiles overrides the choice (tiles: every float32 transposed forward of a batch of at least the
  // thread count, in chunks of up to threads x per_run samples; tests run both).
  if constexpr (is_float) {
    const std::vector<std::pair<size_t, size_t>> ranges = row_ranges(tiles);
    const int64_t chunk = even_step(g.batch, threads * per_run);
    if (tiles_shared) {
      at::Tensor rows_buf = at::empty({chunk * GJ * P}, opts), m_buf = at::empty({chunk * GJ}, acc_opts);
      at::Tensor out_t = at::empty({chunk * P * Cout}, opts);
      float *rows = rows_buf.data_ptr<float>(), *m = m_buf.data_ptr<float>(), *ot = out_t.data_ptr<float>();
      const float* f_ptr = f.const_data_ptr<float>();
      for (int64_t s0 = 0; s0 < g.batch; s0 += chunk) {
        const int64_t n = std::min(chunk, g.batch - s0);
        at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {  // rows' = rows m, sample by sample
          const int64_t scratch_elems = tap_major ? g.in_channels * g.height * g.width : im2row_scratch_elems(g);
          at::Tensor scratch = direct ? at::Tensor() : at::empty({scratch_elems}, opts);
          for (int64_t i = i0; i < i1; ++i) {
            transposed_rows(s0 + i, direct ? nullptr : scratch.data_ptr<float>(), rows + i * GJ * P, m + i * GJ);
            scale_columns(rows + i * GJ * P, P, GJ, m + i * GJ);
          }
        });
        at::parallel_for(0, n_ranges, 1, [&](int64_t r0, int64_t r1) {  // out^T's columns, range by range
          at::Tensor wt_buf = tap_major_once ? at::Tensor() : at::empty({wt_buf_elems}, opts);
          at::Tensor kern_buf = at::empty({kFoldedSamples * max_tile}, opts);
          float *wt = tap_major_once ? nullptr : wt_buf.data_ptr<float>(), *kern = kern_buf.data_ptr<float>();
          for (int64_t r = r0; r < r1; ++r) {
            for (size_t ti = ranges[r].first; ti < ranges[r].second; ++ti)
              multiply_tile_folded(ti, s0, n, w_ptr, rows, GJ * P, /*with_wt=*/true, wt, kern, y, ot);
            // the range's rows of each output: out_b[rows] = f[rows] (out_b^T[:, rows])^T
            const Tile& t = tiles[ranges[r].first];
            const int64_t row0 = t.first_row(Cog), R = t.groups() * t.rows();
            for (int64_t i = 0; i < n; ++i) {
              float* y_rows = y + (s0 + i) * Cout * P + row0 * P;
              transpose_strided(ot + i * P * Cout + row0, P, R, Cout, y_rows, P);
              scale_rows(y_rows, R, P, f_ptr + (s0 + i) * Cout + row0);
            }
          }
          if constexpr (uses_brgemm<scalar_t>()) at::native::cpublas::brgemm_release(false);
        });
      }
      return out;
    }
  }
  for_each_batch_range(g.batch, [&](int64_t, int64_t b_begin, int64_t b_end) {
    const int64_t step = even_step(b_end - b_begin, per_run);
    // the run's rows (block runs: of one column block)
    const int64_t rows_stride = block_runs ? P * block_cols : GJ * P;
    at::Tensor cols_buf = reads_x ? at::Tensor() : at::empty({step * rows_stride}, opts);
    at::Tensor kern_buf = at::empty({max_tile}, opts);  // Wb of one sample's tile
    at::Tensor scratch_buf = at::empty({J}, acc_opts), m_buf = at::empty({step * GJ}, acc_opts);
    at::Tensor im2row_scratch, kern_rows, out_t, wt_buf;
    if (transposed) {
      // tap-major: x_b channels-last (H*W x Cin); otherwise im2row's im2col blocks
      // (block runs: every sample's x_b channels-last)
      const int64_t scratch_elems = tap_major ? g.in_channels * g.height * g.width : im2row_scratch_elems(g);
      if (!direct) im2row_scratch = at::empty({(block_runs ? step : 1) * scratch_elems}, opts);
      kern_rows = at::empty({max_tile}, opts);
      out_t = at::empty({step * P * Cout}, opts);
      if ((step >= kMinSamplesPerWeightTranspose || tap_major) && !tap_major_once)
        wt_buf = at::empty({wt_buf_elems}, opts);
    }
    // kFoldedSamples samples' A of a tile
    at::Tensor folded_kern = folded || folded_transposed ? at::empty({kFoldedSamples * max_tile}, opts) : at::Tensor();
    acc_t* m = m_buf.data_ptr<acc_t>();
    scalar_t* buf = reads_x ? nullptr : cols_buf.data_ptr<scalar_t>();
    scalar_t* ot = transposed ? out_t.data_ptr<scalar_t>() : nullptr;
    for (int64_t s0 = b_begin; s0 < b_end; s0 += step) {
      const int64_t n = std::min(step, b_end - s0);
      // the cols matrix (transposed: the rows matrix) of sample s0 + i is at cols + i * cols_stride
      const scalar_t* cols = reads_x ? x.const_data_ptr<scalar_t>() + s0 * x_stride : buf;
      const int64_t cols_stride = reads_x ? x_stride : GJ * P;
      // runs that transpose W's slices build A^T instead of Wb^T
      const bool fold_run = folded_transposed && n >= kMinSamplesPerWeightTranspose;
      scalar_t* wt_space = wt_buf.defined() ? wt_buf.data_ptr<scalar_t>() : nullptr;  // none with tap-major once
      if constexpr (is_float) {
        if (block_runs) {
          const int64_t Cin = g.in_channels, HW = g.height * g.width, taps = g.taps();
          float* x_t = im2row_scratch.data_ptr<float>();
          for (int64_t i = 0; i < n; ++i) {
            const int64_t b = s0 + i;
            transpose_into(x.const_data_ptr<float>() + b * x_stride, Cin, HW, x_t + i * Cin * HW, Cin);
            input_scale_tap_major(ch.const_data_ptr<float>() + b * Cin, s.const_data_ptr<float>() + b * taps, g,
                                  block_channels, m + i * GJ);
          }
          // tiles[r * n_blocks + jb]: row range r, column block jb
          const size_t n_blocks = static_cast<size_t>((J + block_cols - 1) / block_cols);
          for (size_t jb = 0; jb < n_blocks; ++jb) {
            const int64_t j0 = tiles[jb].j0, Jt = tiles[jb].cols();
            for (int64_t i = 0; i < n; ++i) {
              im2row_tap_major_channels(x_t + i * Cin * HW, g, j0 / taps, Jt / taps, buf + i * rows_stride, Jt);
              if (fold_run) scale_columns(buf + i * rows_stride, P, Jt, m + i * GJ + j0);  // rows_b * m
            }
            for (size_t ti = jb; ti < tiles.size(); ti += n_blocks) {
              if (fold_run) {
                multiply_tile_folded(ti, s0, n, w_ptr, buf, rows_stride, /*with_wt=*/true, wt_space,
                                     folded_kern.data_ptr<float>(), y, ot, /*ld=*/Jt, /*col_base=*/j0);
                continue;
              }
              const float* wt = weight_tile_t(ti, wt_space);
              for (int64_t i = 0; i < n; ++i)
                multiply_tile_transposed(tiles[ti], s0 + i, buf + i * rows_stride, m + i * GJ,
                                         kern_buf.data_ptr<float>(), kern_rows.data_ptr<float>(),
                                         scratch_buf.data_ptr<float>(), ot + i * P * Cout, wt, /*ld=*/Jt,
                                         /*col_base=*/j0);
            }
          }
        }
      }
      for (int64_t i = 0; i < n && !block_runs; ++i) {
        const int64_t b = s0 + i;
        if (transposed) {
          transposed_rows(b, direct ? nullptr : im2row_scratch.data_ptr<scalar_t>(), buf + i * GJ * P, m + i * GJ);
        } else {
          if (!direct) im2col(x.const_data_ptr<scalar_t>() + b * x_stride, g, buf + i * GJ * P);
          input_scale(ch.const_data_ptr<acc_t>() + b * g.in_channels, s.const_data_ptr<acc_t>() + b * g.taps(), g,
                      m + i * GJ);
        }
        if constexpr (is_float) {
          if (folded) scale_rows(buf + i * GJ * P, GJ, P, m + i * GJ);  // m * cols_b
          if (fold_run) scale_columns(buf + i * GJ * P, P, GJ, m + i * GJ);  // rows_b * m
        }
      }
      // the tiles' slices of W transposed (runs of enough samples to pay for transposing them, and every
      // run over tap-major columns), else null
      const bool with_wt = transposed && (tap_major || n >= kMinSamplesPerWeightTranspose);
      for (size_t ti = 0; ti < tiles.size() && !block_runs; ++ti) {
        const Tile& t = tiles[ti];
        if constexpr (is_float) {
          if (folded || fold_run) {
            multiply_tile_folded(ti, s0, n, w_ptr, cols, cols_stride, /*with_wt=*/fold_run, wt_space,
                                 folded_kern.data_ptr<float>(), y, ot);
            continue;
          }
        }
        const scalar_t* wt = with_wt ? weight_tile_t(ti, wt_space) : nullptr;
        for (int64_t i = 0; i < n; ++i) {
          if (transposed)
            multiply_tile_transposed(t, s0 + i, cols + i * cols_stride, m + i * GJ, kern_buf.data_ptr<scalar_t>(),
                                     kern_rows.data_ptr<scalar_t>(), scratch_buf.data_ptr<acc_t>(),
                                     ot + i * P * Cout, wt);
          else
            multiply_tile(t, s0 + i, cols + i * cols_stride, m + i * GJ, kern_buf.data_ptr<scalar_t>(),
                          scratch_buf.data_ptr<acc_t>());
        }
      }
      // out_b = (out_b^T)^T
      if (transposed)
        for (int64_t i = 0; i < n; ++i) transpose_into(ot + i * P * Cout, P, Cout, y + (s0 + i) * Cout * P, P);
      if constexpr (is_float) {
        if (folded || fold_run)  // f * (A @ (m * cols_b)), or the transpose of ((rows_b * m) @ A^T) times f
          for (int64_t i = 0; i < n; ++i)
            scale_rows(y + (s0 + i) * Cout * P, Cout, P, f.const_data_ptr<float>() + (s0 + i) * Cout);
      }
    }
    if constexpr (uses_brgemm<scalar_t>()) at::native::cpublas::brgemm_release(false);
  });
  return out;
}

// Column j of the K (<= 4) rows of W_k in a tile row, and A[j] = sum_k a[k] W_k[o,j]: the head of
// the omp simd loops of reduce_row and reduce_row_folded, inlined into them (the values of kernels
// beyond K are zeros the compiler drops). add_to accumulates g * W_k[o,j] into K named sums.
template <int K, typename T>
struct KernelColumn {
  static_assert(K >= 1 && K <= 4, "one sum per kernel in a named register");
  T w0, w1, w2, w3, agg;
  KernelColumn(const T* w, int64_t k_stride, int64_t j, T a0, T a1, T a2, T a3)
      : w0(w[j]), w1(K > 1 ? w[k_stride + j] : 0), w2(K > 2 ? w[2 * k_stride + j] : 0),
        w3(K > 3 ? w[3 * k_stride + j] : 0) {
    agg = a0 * w0;
    if constexpr (K > 1) agg += a1 * w1;
    if constexpr (K > 2) agg += a2 * w2;
    if constexpr (K > 3) agg += a3 * w3;
  }
  void add_to(T g, T& d0, T& d1, T& d2, T& d3) const {
    d0 += g * w0;
    if constexpr (K > 1) d1 += g * w1;
    if constexpr (K > 2) d2 += g * w2;
    if constexpr (K > 3) d3 += g * w3;
  }
};

// out[k] += d_k for the K named sums of a KernelColumn loop.
template <int K, typename T>
inline void add_kernel_sums(T* out, T d0, T d1, T d2, T d3) {
  out[0] += d0;
  if constexpr (K > 1) out[1] += d1;
  if constexpr (K > 2) out[2] += d2;
  if constexpr (K > 3) out[3] += d3;
}

// One row o of a tile of one sample, in one pass over the K rows of W (see the header), with
// A[j] = sum_k a[k] W_k[o,j] recomputed rather than stored by the build (it is K loads of rows
// that the grad_a dot products read anyway):
//   gf      += sum_j Q[j] A[j] m[j]            (grad_f[o])
//   gm[j]   += Q[j] A[j] f                     (grad_m)
//   G[j]     = Q[j] f m[j]                     (gradient w.r.t. A)
//   grad_a[k] += sum_j G[j] W_k[o,j]
//   wb[j]     = A[j] f m[j]                    (Wb, when kWriteWb: the grad_x product's kernel)
// K is fixed at compile time (up to 4) so that every sum is a register of the vectorised loop.
template <int K, bool kWriteWb, typename scalar_t, typename acc_t>
inline void reduce_row(const scalar_t* __restrict__ q, const acc_t* __restrict__ w, int64_t k_stride,
                       const acc_t* a, const acc_t* __restrict__ m, acc_t f, int64_t J, acc_t* __restrict__ gm,
                       acc_t* __restrict__ g_out, acc_t& gf, acc_t* grad_a, scalar_t* __restrict__ wb) {
  static_assert(K >= 1 && K <= 4, "reduce_row keeps one sum per kernel in a named register");
  const acc_t a0 = a[0], a1 = K > 1 ? a[1] : 0, a2 = K > 2 ? a[2] : 0, a3 = K > 3 ? a[3] : 0;
  acc_t sf = 0, d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : sf, d0, d1, d2, d3)
  for (int64_t j = 0; j < J; ++j) {
    const KernelColumn<K, acc_t> col(w, k_stride, j, a0, a1, a2, a3);
    if constexpr (kWriteWb) wb[j] = static_cast<scalar_t>(col.agg * f * m[j]);  // as aggregate_row
    const acc_t qv = static_cast<acc_t>(q[j]);
    const acc_t rv = qv * col.agg;
    sf += rv * m[j];
    gm[j] += rv * f;
    const acc_t gv = qv * f * m[j];
    g_out[j] = gv;
    col.add_to(gv, d0, d1, d2, d3);
  }
  gf += sf;
  add_kernel_sums<K>(grad_a, d0, d1, d2, d3);
}

// One pass of reduce_row_any_k over the KC kernels of w (a: their attentions): partial[j] (+)= their
// share of A[j], grad_a[k] += sum_j G[j] W_k[o,j]; the first pass (kFirst) writes G[j] = Q[j] f m[j]
// into g_out, the others read it.
template <int KC, bool kFirst, typename scalar_t, typename acc_t>
inline void reduce_row_kernel_chunk(const scalar_t* __restrict__ q, const acc_t* __restrict__ w, int64_t k_stride,
                                    const acc_t* a, const acc_t* __restrict__ m, acc_t f, int64_t J,
                                    acc_t* __restrict__ partial, acc_t* __restrict__ g_out, acc_t* grad_a) {
  const acc_t a0 = a[0], a1 = KC > 1 ? a[1] : 0, a2 = KC > 2 ? a[2] : 0, a3 = KC > 3 ? a[3] : 0;
  acc_t d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
  for (int64_t j = 0; j < J; ++j) {
    const KernelColumn<KC, acc_t> col(w, k_stride, j, a0, a1, a2, a3);
    acc_t gv;
    if constexpr (kFirst) {
      gv = static_cast<acc_t>(q[j]) * f * m[j];
      g_out[j] = gv;
      partial[j] = col.agg;
    } else {
      gv = g_out[j];
      partial[j] += col.agg;
    }
    col.add_to(gv, d0, d1, d2, d3);
  }
  add_kernel_sums<KC>(grad_a, d0, d1, d2, d3);
}

// reduce_row for any K (`scratch`: J elements), in passes of kKernelsPerPass kernels
// (reduce_row_kernel_chunk: each of the K rows of W read once, A summed in scratch), then one pass
// from A for grad_f, grad_m and Wb.
template <typename scalar_t, typename acc_t>
inline void reduce_row_any_k(const scalar_t* __restrict__ q, const acc_t* __restrict__ w, int64_t k_stride,
                             const acc_t* a, int64_t K, const acc_t* __restrict__ m, acc_t f, int64_t J,
                             acc_t* __restrict__ scratch, acc_t* __restrict__ gm, acc_t* __restrict__ g_out, acc_t& gf,
                             acc_t* grad_a, scalar_t* __restrict__ wb) {
  for_kernel_chunks(K, [&](auto kc, int64_t k0) {
    constexpr int KC = decltype(kc)::value;
    if (k0 == 0)
      reduce_row_kernel_chunk<KC, true>(q, w, k_stride, a, m, f, J, scratch, g_out, grad_a);
    else
      reduce_row_kernel_chunk<KC, false>(q, w + k0 * k_stride, k_stride, a + k0, m, f, J, scratch, g_out,
                                         grad_a + k0);
  });
  acc_t sf = 0;
  if (wb != nullptr)
#pragma omp simd
    for (int64_t j = 0; j < J; ++j) wb[j] = static_cast<scalar_t>(scratch[j] * f * m[j]);  // as aggregate_row
#pragma omp simd reduction(+ : sf)
  for (int64_t j = 0; j < J; ++j) {
    const acc_t rv = static_cast<acc_t>(q[j]) * scratch[j];
    sf += rv * m[j];
    gm[j] += rv * f;
  }
  gf += sf;
}

// One sample's gradients from Q on tile t (reduce_row for each of its rows): grad_f[o] += the
// tile's share for its rows, gm[j] += its share of grad_m, G into gbuf, grad_a[k] += its share, and
// the tile's Wb into wb unless it is null. q, gbuf and wb are (groups, rows, Jt) blocks of the
// tile; m and gm hold all G*J columns, or (G == 1) those from m_col0 on; f and grad_f all Cout rows;
// a the sample's K kernel attentions; w_acc is W as (K, N) in acc_t; scratch holds J elements.
template <typename scalar_t, typename acc_t>
void reduce_tile_gradients(const Tile& t, const Geometry& g, const scalar_t* q, const acc_t* a, const acc_t* w_acc,
                           const acc_t* m, const acc_t* f, acc_t* scratch, acc_t* gm, acc_t* gbuf, acc_t* grad_f,
                           acc_t* grad_a, scalar_t* wb = nullptr, int64_t m_col0 = 0) {
  const int64_t J = g.cols_per_group(), N = g.kernel_numel(), T = t.rows(), Jt = t.cols(), K = g.kernel_num;
  for (int64_t gi = t.g0; gi < t.g1; ++gi) {
    for (int64_t r = t.r0; r < t.r1; ++r) {
      const int64_t o = gi * g.out_per_group + r;
      const int64_t slot = ((gi - t.g0) * T + (r - t.r0)) * Jt;
      const acc_t* w = w_acc + o * J + t.j0;
      const acc_t* mg = m + gi * J + t.j0 - m_col0;
      acc_t* gmg = gm + gi * J + t.j0 - m_col0;
      scalar_t* wb_row = wb == nullptr ? nullptr : wb + slot;
#define ODCONV_REDUCE_ROW(KK)                                                                           \
  (wb_row != nullptr                                                                                    \
       ? reduce_row<KK, true>(q + slot, w, N, a, mg, f[o], Jt, gmg, gbuf + slot, grad_f[o], grad_a, wb_row) \
       : reduce_row<KK, false>(q + slot, w, N, a, mg, f[o], Jt, gmg, gbuf + slot, grad_f[o], grad_a, wb_row))
      switch (K) {
        case 1: ODCONV_REDUCE_ROW(1); break;
        case 2: ODCONV_REDUCE_ROW(2); break;
        case 3: ODCONV_REDUCE_ROW(3); break;
        case 4: ODCONV_REDUCE_ROW(4); break;
        default:
          reduce_row_any_k(q + slot, w, N, a, K, mg, f[o], Jt, scratch, gmg, gbuf + slot, grad_f[o], grad_a, wb_row);
      }
#undef ODCONV_REDUCE_ROW
    }
  }
}

// One row o of one sample for the folded backward (see "The backward by columns"), from Q'[j] =
// Q[o,j] m[j], the row of the gradient w.r.t. Wb with the input scale folded in, and K <= 4 kernels
// (more go in chunks of kKernelsPerPass, each call given its chunk's rows of W and attentions):
//   A[j]       = sum_k a[k] W_k[o,j]           into wb (kAddToWb: added to it, the chunks after the first):
//                                              the grad_x product's kernel, f and m folded out
//   gf        += sum_j Q'[j] A[j]              (grad_f[o]; the chunk's share of A)
//   d[k]      += sum_j Q'[j] W_k[o,j]          (grad_a[k] += f[o] d[k], by the caller)
// One store per element where reduce_row has three (Wb, G and grad_m).
template <int K, bool kAddToWb, typename T>
inline void reduce_row_folded(const T* __restrict__ q, const T* __restrict__ w, int64_t k_stride, const T* a,
                              int64_t J, T* __restrict__ wb, T& gf, T* d) {
  static_assert(K >= 1 && K <= 4, "one sum per kernel in a named register");
  const T a0 = a[0], a1 = K > 1 ? a[1] : 0, a2 = K > 2 ? a[2] : 0, a3 = K > 3 ? a[3] : 0;
  T sf = 0, d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : sf, d0, d1, d2, d3)
  for (int64_t j = 0; j < J; ++j) {
    const KernelColumn<K, T> col(w, k_stride, j, a0, a1, a2, a3);
    if constexpr (kAddToWb)
      wb[j] += col.agg;
    else
      wb[j] = col.agg;
    const T qv = q[j];
    sf += qv * col.agg;
    col.add_to(qv, d0, d1, d2, d3);
  }
  gf += sf;
  add_kernel_sums<K>(d, d0, d1, d2, d3);
}

// reduce_row_folded for S samples at once on the same row o, so that the K rows of W are read once
// for the S samples: q[s], wb[s] are sample s's rows, a[s] its K attentions; gf[s] and d[s][k]
// accumulate as in reduce_row_folded.
constexpr int kFoldedBackwardSamples = 4;

template <int K, int S, bool kAddToWb, typename T>
inline void reduce_rows_folded_portable(const T* const* q, const T* __restrict__ w, int64_t k_stride,
                                        const T (*a)[4], int64_t J, T* const* wb, T* gf, T (*d)[4]) {
  for (int s = 0; s < S; ++s) reduce_row_folded<K, kAddToWb>(q[s], w, k_stride, a[s], J, wb[s], gf[s], d[s]);
}

#if defined(__AVX512F__)
// On AVX-512 the pass adds the row's grad_W too, from the same vectors of Q': gw[k * gw_stride + j]
// (+)= sum_s c[s][k] Q'_s[j], c[s][k] = a_s[k] f_s[o] (accumulate false: written), where the chunk
// otherwise multiplies C_o @ Q'[:, o] after the reduction, a (K x S) @ (S x Jt) product per row whose
// K rows of grad_W lie a kernel apart and were read and written from beyond L2 (perf shares by rdtsc
// around each step of the folded chunk, B64 512->512 4x4, one thread: the reduction 24 % of its
// cycles, those products 20 %; see grad_w_in_folded_reduction for the timings). grad_f comes from the
// dot products, sum_j Q'[j] A[j] = sum_k a[k] <Q', W_k>, which frees the registers of gw.
template <int K, int S, bool kGradW, bool kAddToWb>
void reduce_rows_folded_avx512(const float* const* q_in, const float* __restrict__ w, int64_t k_stride,
                               const float (*a)[4], const float (*c)[4], int64_t J, float* const* wb_in, float* gf,
                               float (*d)[4], float* __restrict__ gw, int64_t gw_stride, bool accumulate) {
  const float* q[S];
  float* wb[S];
  __m512 dv[S][K];
#pragma GCC unroll 4
  for (int s = 0; s < S; ++s) {
    q[s] = q_in[s], wb[s] = wb_in[s];
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) dv[s][k] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < J; j += 16) {
    const __mmask16 lanes = first_lanes(J - j);
    __m512 wv[K], gv[K];
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {
      wv[k] = _mm512_maskz_loadu_ps(lanes, w + k * k_stride + j);
      if constexpr (kGradW)
        gv[k] = accumulate ? _mm512_maskz_loadu_ps(lanes, gw + k * gw_stride + j) : _mm512_setzero_ps();
    }
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) {
      __m512 agg = kAddToWb ? _mm512_fmadd_ps(_mm512_set1_ps(a[s][0]), wv[0], _mm512_maskz_loadu_ps(lanes, wb[s] + j))
                            : _mm512_mul_ps(_mm512_set1_ps(a[s][0]), wv[0]);
#pragma GCC unroll 4
      for (int k = 1; k < K; ++k) agg = _mm512_fmadd_ps(_mm512_set1_ps(a[s][k]), wv[k], agg);
      _mm512_mask_storeu_ps(wb[s] + j, lanes, agg);
      const __m512 qv = _mm512_maskz_loadu_ps(lanes, q[s] + j);
#pragma GCC unroll 4
      for (int k = 0; k < K; ++k) {
        dv[s][k] = _mm512_fmadd_ps(qv, wv[k], dv[s][k]);
        if constexpr (kGradW) gv[k] = _mm512_fmadd_ps(_mm512_set1_ps(c[s][k]), qv, gv[k]);
      }
    }
    if constexpr (kGradW)
#pragma GCC unroll 4
      for (int k = 0; k < K; ++k) _mm512_mask_storeu_ps(gw + k * gw_stride + j, lanes, gv[k]);
  }
#pragma GCC unroll 4
  for (int s = 0; s < S; ++s) {
    float sf = 0;
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {
      const float dot = horizontal_sum(dv[s][k]);
      sf += a[s][k] * dot;
      d[s][k] += dot;
    }
    gf[s] += sf;
  }
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// The first min(n, 8) of eight float lanes, as a mask for _mm256_maskload_ps / _mm256_maskstore_ps.
inline __m256i first_lanes_8(int64_t n) {
  static const int32_t kLanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kLanes + 8 - std::min<int64_t>(n, 8)));
}

inline float horizontal_sum(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}

// reduce_rows_folded on AVX2, S <= 2 samples per pass: with 16 vector registers, the K row values,
// A, Q' and S*K dot products fill them at S = 2 (four samples spill). grad_f comes from the dot
// products, sum_j Q'[j] A[j] = sum_k a[k] <Q', W_k>, so it needs no register of its own. (The
// portable loops compiled to scalar code here, gcc 12: a fifth of the backward's cycles on
// B128 128->256 6x6.)
template <int K, int S, bool kAddToWb>
void reduce_rows_folded_avx2(const float* const* q, const float* __restrict__ w, int64_t k_stride,
                             const float (*a)[4], int64_t J, float* const* wb, float* gf, float (*d)[4]) {
  static_assert(S >= 1 && S <= 2, "the dot products of two samples fill the registers");
  __m256 dv[S][K];
#pragma GCC unroll 2
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) dv[s][k] = _mm256_setzero_ps();
  const auto step = [&](int64_t j, auto load, auto store) {
    __m256 wv[K];
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) wv[k] = load(w + k * k_stride + j);
#pragma GCC unroll 2
    for (int s = 0; s < S; ++s) {
      __m256 agg = kAddToWb ? _mm256_fmadd_ps(_mm256_set1_ps(a[s][0]), wv[0], load(wb[s] + j))
                            : _mm256_mul_ps(_mm256_set1_ps(a[s][0]), wv[0]);
#pragma GCC unroll 4
      for (int k = 1; k < K; ++k) agg = _mm256_fmadd_ps(_mm256_set1_ps(a[s][k]), wv[k], agg);
      store(wb[s] + j, agg);
      const __m256 qv = load(q[s] + j);
#pragma GCC unroll 4
      for (int k = 0; k < K; ++k) dv[s][k] = _mm256_fmadd_ps(qv, wv[k], dv[s][k]);
    }
  };
  int64_t j = 0;
  for (; j + 8 <= J; j += 8)
    step(j, [](const float* p) { return _mm256_loadu_ps(p); }, [](float* p, __m256 v) { _mm256_storeu_ps(p, v); });
  if (j < J) {
    const __m256i lanes = first_lanes_8(J - j);
    step(j, [&](const float* p) { return _mm256_maskload_ps(p, lanes); },
         [&](float* p, __m256 v) { _mm256_maskstore_ps(p, lanes, v); });
  }
#pragma GCC unroll 2
  for (int s = 0; s < S; ++s) {
    float sf = 0;
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {
      const float dot = horizontal_sum(dv[s][k]);
      sf += a[s][k] * dot;
      d[s][k] += dot;
    }
    gf[s] += sf;
  }
}
#endif

// S (1..kFoldedBackwardSamples) samples of one row for K <= kKernelsPerPass kernels (callers pass more
// in chunks: w, a and c those of the chunk, add_to_wb for every chunk after the first). With
// with_grad_w (only where grad_w_in_folded_reduction) it adds the row's grad_W too: c, gw, gw_stride,
// accumulate as in reduce_rows_folded_avx512.
template <typename T>
void reduce_rows_folded_dispatch(const T* const* q, const T* w, int64_t k_stride, const T (*a)[4], int64_t K, int S,
                                 int64_t J, T* const* wb, T* gf, T (*d)[4], bool add_to_wb, bool with_grad_w,
                                 const T (*c)[4], T* gw, int64_t gw_stride, bool accumulate) {
  static_assert(kKernelsPerPass == 4, "one case per chunk width");
  TORCH_CHECK(K >= 1 && K <= kKernelsPerPass, "reduce_rows_folded_dispatch: ", K,
              " kernels in one pass, expected 1 to ", kKernelsPerPass);
  const auto with_k = [&](auto kc) {
    constexpr int KK = decltype(kc)::value;
    const auto run = [&](auto sc, auto add) {
      constexpr int SS = decltype(sc)::value;
      constexpr bool kAdd = decltype(add)::value;
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<T, float>) {
        if (with_grad_w)
          return reduce_rows_folded_avx512<KK, SS, true, kAdd>(q, w, k_stride, a, c, J, wb, gf, d, gw, gw_stride,
                                                              accumulate);
        return reduce_rows_folded_avx512<KK, SS, false, kAdd>(q, w, k_stride, a, c, J, wb, gf, d, gw, gw_stride,
                                                             accumulate);
      }
#elif defined(__AVX2__) && defined(__FMA__)
      if constexpr (std::is_same_v<T, float>) {
        for (int s0 = 0; s0 < SS; s0 += 2) {  // pairs; the second reads the row of W_k again, from L1 or L2
          if (SS - s0 >= 2)
            reduce_rows_folded_avx2<KK, 2, kAdd>(q + s0, w, k_stride, a + s0, J, wb + s0, gf + s0, d + s0);
          else
            reduce_rows_folded_avx2<KK, 1, kAdd>(q + s0, w, k_stride, a + s0, J, wb + s0, gf + s0, d + s0);
        }
        return;
      }
#endif
      reduce_rows_folded_portable<KK, SS, kAdd>(q, w, k_stride, a, J, wb, gf, d);
    };
    const auto with_s = [&](auto sc) {
      if (add_to_wb)
        run(sc, std::true_type{});
      else
        run(sc, std::false_type{});
    };
    switch (S) {
      case 1: with_s(std::integral_constant<int, 1>{}); break;
      case 2: with_s(std::integral_constant<int, 2>{}); break;
      case 3: with_s(std::integral_constant<int, 3>{}); break;
      default: with_s(std::integral_constant<int, 4>{}); break;
    }
  };
  switch (K) {
    case 1: with_k(std::integral_constant<int, 1>{}); break;
    case 2: with_k(std::integral_constant<int, 2>{}); break;
    case 3: with_k(std::integral_constant<int, 3>{}); break;
    default: with_k(std::integral_constant<int, 4>{}); break;
  }
}

// Whether the folded backward adds grad_W in its reduction pass (reduce_rows_folded_avx512: AVX-512,
// float32; K > 4 in chunks of kKernelsPerPass) rather than by the products after it.
// (benchmarks/ab_env.py, Zen 4 EPYC, backward,
// results/ab_folded_backward_grad_w_in_reduction_avx512_cpu.json, 10 rounds, ODCONV_CPU_FOLDED_GRAD_W
// =reduction against products: 0.94-0.98 on B64 512->512 4x4, B32 512->512 7x7, B32 2048->512 1x1
// on 7x7, 256->512 stride 2 onto 7x7, B32 256->256 7x7 with 4 groups, B128 128->128 6x6, B64 96->96
// 7x7 and 128->128 1x1 on 7x7, 0.99 on B64 256->256 7x7 and B128 64->64 6x6, 1.07 on the GTSRB
// 128->256 6x6 layer; ..._small_avx512_cpu.json, 20 rounds: that layer 0.96, 128->128 6x6 0.93,
// 96->96 7x7 0.95, B128 64->64 4x4 0.99. Two runs with a temporary switch before (the first not kept):
// 0.91-0.96 on nine layers of 256-2048 rows, 0.94-0.97 on the GTSRB layer; the second, in a period
// when every call took 1.5-2x as long, 1.06-1.19 on five layers of 64-128 rows, 0.95 on 128->128 1x1
// on 7x7, ..._slow_period_avx512_cpu.json, ODCONV_TMP_GW_GEMM=1 there meaning products.)
// With K = 5-8 in chunks of four kernels (ab_env.py, 12 rounds,
// results/ab_folded_grad_w_kernel_chunks_avx512_cpu.json): products 1.07-1.09x the reduction's time
// on B64 256->256 8x8 and 4x4, the 6x6 layer with K = 5 and B32 512->512 7x7, 1.02 on B128 64->64 6x6.
// ODCONV_CPU_FOLDED_GRAD_W=auto (default: reduction where it can) | reduction | products overrides
// it (tests run both).
template <typename T>
bool grad_w_in_folded_reduction() {
  const std::string mode = path_override("ODCONV_CPU_FOLDED_GRAD_W", {"auto", "reduction", "products"});
#if defined(__AVX512F__)
  return std::is_same_v<T, float> && mode != "products";
#else
  return false;
#endif
}

// One sample's grad_ch[c] = sum_t gm[c*taps + t] s[t] and grad_s[t] += sum_c gm[c*taps + t] ch[c], for
// the input channels [c_begin, c_end) (all by default).
template <typename acc_t>
void reduce_scale_gradient(const Geometry& g, const acc_t* gm, const acc_t* ch, const acc_t* s, acc_t* grad_ch,
                           acc_t* grad_s, int64_t c_begin = 0, int64_t c_end = -1) {
  const int64_t taps = g.taps();
  if (c_end < 0) c_end = g.in_channels;
  for (int64_t c = c_begin; c < c_end; ++c) {
    acc_t sum_c = 0;
    for (int64_t tp = 0; tp < taps; ++tp) {
      const acc_t v = gm[c * taps + tp];
      sum_c += v * s[tp];
      grad_s[tp] += v * ch[c];
    }
    grad_ch[c] = sum_c;
  }
}

// ---- The backward by columns ----------------------------------------------------------------------
//
// The backward above splits the samples of a chunk between threads, and so needs one parallel
// region per tile (the threads' shares of a tile of grad_W are summed in a fixed order: 80 regions
// per chunk for 512->512 3x3 on 4x4, whose waits were ~9 % of its backward in perf), and every
// thread streams all of W_k. The backward by columns instead gives each thread a range of input
// channels -- the columns [c0*taps, c1*taps) of J -- for every sample of a chunk: its im2row columns,
// its rows of gcols and so its channels of grad_x, its columns of grad_m and of grad_W. Only grad_f,
// grad_a and grad_s sum over columns: each part keeps its share per sample, added in part order
// at the end (deterministic for a thread count). Each part works through the batch in chunks of n
// samples (its buffers' size) inside one parallel region per call, with no barrier between chunks
// (one region per chunk: libgomp's share of a perf profile of B64 512->512 4x4 was 6.4 %, now 3.2 %);
// its first chunk writes its columns of grad_W, so grad_W is never zeroed. A tile of W_k
// is read by one thread, and a batch of one (Grad-CAM in the GUI) runs on every thread. Tiles are
// kMinTileRows rows by the columns of a block ("Blocks" below). (2 cores, benchmarks/ab_builds.py against
// the samples split, results/ab_backward_columns*_cpu.json: backward 0.74 on 128->128 12x12,
// 0.83-0.87 on 512->512 7x7, 0.87-0.93 on 4x4, 0.87-0.97 on 32->32 48x48, 0.90 on 256->256 8x8
// (5 rounds), 0.70-1.02 on the other dense layers of bench_op's suite and of the GTSRB network.)
// It needs as many parts as threads (at least kMinColumnsPerPart columns each, of the G*J columns of
// all groups); with fewer (many cores, narrow layers) the samples split keeps every thread busy.
// Groups. A part's channels are cut at the groups' boundaries into blocks of one group each: a
// block's tiles are rows of its group by columns of that group's J (Tile::g0), so a part may hold
// the last channels of one group and the first of the next. Grouped layers took the samples split
// until 2026-12-07 (the samples split multiplies several groups per call, and its per-group products
// seemed to need that), but there every thread streams every tile of W_k and the grad_W partials are
// summed per tile, as on dense layers, and B32 256->256 7x7 with 4 groups took 2.7x the floor forward
// + backward where the dense layer took 1.6x. (benchmarks/ab_env.py, ODCONV_CPU_BACKWARD_SPLIT=samples
// against auto, 14 rounds, Zen 4 EPYC, results/ab_backward_columns_groups_avx512_cpu.json: backward
// 0.55-0.82 on B32 256->256 7x7 with 2 and 4 groups, B64 256->256 6x6 and 5x5 with 4, 0.66 on
// 256->256 14x14 with 4, 0.75 on B64 128->128 12x12 with 2, and with 4-12 rows per group 0.76 on B64
// 48->96 7x7 with 12 groups, 0.81 on B128 128->256 6x6 with 32, 0.92 on B32 96->96 7x7 with 8.) Narrow
// groups of 16-32 rows on small maps take it too on AVX-512 (narrow_group_backward_by_columns).
// On maps of at most Cog/2 pixels the grad_x product runs transposed: gcols^T (P x Jt) (+)=
// gy[tile rows]^T @ Wb[tile], (P x T) @ (T x Jt), so each sample's Wb is built as it is and only gy's
// T x P rows are transposed per tile (and each sample's gcols^T, Jr x P, once), where the product
// above needs Wb^T, a transpose of every element of every sample's kernel: Cout*J per sample against
// P*(Cout*(tiles per row block) + Jr). (perf, B64 512->512 4x4: the transposes were 5.5 % of the
// backward, the aggregation that feeds them, through a scratch, 14 %.) So do 1x1 kernels without
// im2col, whose grad_x the plain product writes directly: the transposed one writes gcols^T, then
// transposed into grad_x. (They took the plain product until 2026-12-06: building Wb^T was 23 % of the
// backward of B32 2048->512 1x1 on 7x7, rdtsc around each step. benchmarks/ab_env.py with a temporary
// switch, 20 rounds: backward 0.76 on that layer, 0.78 on 512->2048, 0.86-0.87 on MobileNetV2's
// 160->960 and 960->160 on 7x7, 0.89 on 128->256 on 6x6.) So does a group of at least
// kTransposedGradXMinGroupRows rows on maps like 7x7, 6x6 and 5x5, where brgemm's last block of 16
// columns of the plain product (N = P) would be ragged (the runs of samples' rule, see backward_kernel):
// ODCONV_CPU_BACKWARD_TRANSPOSED_GX=never against auto, 14 rounds, Zen 4 EPYC,
// results/ab_backward_columns_transposed_gx_64_rows_avx512_cpu.json: backward 0.89 on B32 64->64 7x7,
// 0.85 on B64 96->96 7x7, 0.88 on B128 64->64 6x6 (dense layers of 64-97 rows); with 64 rows per group
// 0.80-0.90 on B64 256->256 6x6 with 4 groups, B32 256->256 7x7 with 4 and 384->384 7x7 with 6
// (ODCONV_CPU_BACKWARD_SPLIT=columns with a temporary switch, 30 rounds).
// The folded backward. When both gradient groups are wanted on such maps of at most
// kFoldedBackwardMaxPixels pixels (folded_backward_max_pixels), the scales come out of the reduction
// pass (backward_folded_chunk). With rows' = rows m (each sample's im2row scaled by its input scale
// once per chunk) the products give Q' = gy @ rows' = Q m, and
//   A        = sum_k a[k] W_k              the grad_x product's kernel: Y^T (+)= (f gy)^T @ A
//   grad_f[o] = sum_j Q'[o,j] A[o,j]        grad_a[k] = sum_o f[o] sum_j Q'[o,j] W_k[o,j]
//   grad_W_k[o, :] (+)= sum_i a_i[k] f_i[o] Q'_i[o, :]     a (K x n) @ (n x Jt) product per row,
//                                                           straight from the chunk's Q' (on AVX-512
//                                                           in the reduction's pass over the row)
//   gcols = Y m,  grad_m[j] = sum_p rows[p,j] Y^T[p,j] = (sum_p rows'[p,j] Y^T[p,j]) / m[j]
// (grad_m from x itself for the columns whose m is too small to divide by: below the square root of
// the smallest normal number). The reduction then stores one element (A) where reduce_row stores
// three (Wb, G and grad_m), and it runs row by row over the chunk's samples,
// kFoldedBackwardSamples at a time, so a row of W_k is read once per chunk from L1: per pass over
// the tile for a few samples the tile did not stay in L2 next to their Q' and A, and streamed from
// L3 (12 of the 21 ms of the reduction per thread on B64 512->512 4x4, rdtsc around each step).
// (benchmarks/ab_builds.py against the reduction of reduce_row, 5 rounds,
// results/ab_folded_backward_cpu.json: backward 0.91-0.93 on three 4x4 layers, K = 4 and 8, and
// 0.91-0.92 on two 6x6 layers; on 8x8 maps 0.93-0.99 and on 512->512 7x7 1.03-1.07 in other runs,
// within the noise: hence kFoldedBackwardMaxPixels. A chunk holds Q' and A of each sample, so fewer
// samples fit the same budget: peak memory does not change.) 1x1 kernels without im2col are folded
// too since they take the transposed grad_x product (2026-12-06): gcols = Y m is then grad_x itself.
// (benchmarks/ab_env.py with a temporary switch, 20 rounds: backward 0.92-0.94 on 512->2048,
// 2048->512 on 4x4 and 256->1024 on 6x6, 0.98 on B128 128->256 on 6x6.) They fold on maps of up to
// kFoldedBackwardMaxPixelsDirect pixels: with no im2row to scale and no col2im, their 7x7 and 8x8 maps
// gain from the one-store reduction where 3x3 kernels' did not (ab_env.py with a temporary switch, 30
// and 20 rounds, results/ab_folded_backward_1x1_avx2_cpu*.json: backward 0.94-0.98 on ResNet-50's
// 2048->512 and 512->2048 and MobileNetV2's 960->160 and 160->960 on 7x7, 0.95 on B32 512->512 8x8,
// 0.98-0.99 on B64 256->256 8x8 and the stride-2 1024->2048 onto 7x7; a run of 14 rounds before read
// 0.93-0.99 on the 7x7 layers; ab_builds.py --paired, 6 rounds,
// results/ab_folded_backward_1x1_paired_avx2_cpu.json: 0.90-1.00 on the four 7x7 layers and 0.95 on
// 8x8, the GTSRB 6x6 control 1.00. Peak memory of the training step 0.95-1.1x what it was, at most
// 1.04x the static convolution's. On 10x10 and 12x12 maps a 14-round run read 0.94-1.06: unfolded.
// A session before had read 0.95-1.03 for 1x1 on 7x7 and 3x3 on 7x7 and 8x8 together, and left them
// unfolded.)
// Blocks. A part works block by block of its channels, and inside a block chunk by chunk of the
// batch: the buffers below hold the block's columns only (Jr = the block's), so a chunk holds more
// samples in the same memory, and the block's slices of W_k and grad_W, which every chunk reads (and
// grad_W writes) once more, come from the last-level cache after its first chunk. A part is cut into
// as few blocks as keep those two slices within kBlockBytes (column_blocks): B64 512->512 4x4 in
// blocks of 64 channels, 8 MB of 3x3 kernels per thread, streamed from memory once per call instead of
// once per chunk. (benchmarks/ab_builds.py --paired against the whole part per chunk, 4 rounds,
// results/ab_backward_blocks_cpu.json: backward 0.73 with K = 8 (B32 512->512 4x4), 0.88 on 512->512
// 7x7, 0.91-0.92 on 256->256 14x14 and the 6x6 layers, 0.95-0.98 on the K = 4 4x4 layers and 12x12,
// 1.04 on 256->256 8x8 with its forward control at 1.07. Blocks of 288 columns for every layer were
// 1.08-1.10 on B128 128->256 6x6 and B64 256->512 4x4, whose parts' kernels fit the cache anyway;
// kBlockBytes of 2 MB 1.25-1.38 on 512->512 4x4 and 7x7, of 16 MB 1.14-1.21 on the 4x4 layers.)
// Per part (Jr = a block's columns, n = samples of the chunk, T x Jt = rows x columns of a tile):
//   rows   (n, P, Jr)   im2row of its channels          gcols (n, Jr, P)  gradient of its cols
//                                                        (transposed: (n, P, Jr), and gcols_t (Jr, P)
//                                                        one sample's, for col2im)
//   kern   (n, Jt, PR)  Wb^T of a panel, every sample    q     (T, Jt)     Q of a tile, one sample
//                       (transposed: Wb (T, Jt), one)    gy_t  (P, T)      gy's tile rows, transposed
//   gbuf   (n, T, Jt)   G of a tile, accumulation type   m, gm (n, Jr)     input scale, grad_m (block)
//                       (folded: Q' of S = min(n, kFoldedSubSamples) samples, in slots of a tile + kColumnsSlotPad)
//   kern (folded)       A of those S samples, as gbuf    coef  (K, S)      a_i[k] f_i[o] of a row (folded)
//   gf (n, Cout), ga (n, K), gs (n, taps)                its shares of grad_f, grad_a, grad_s
// n fits a budget per part as large as the part's slice of the K kernels (K x Cout x its columns,
// which every chunk streamed once more before the blocks), within [kColumnsMinThreadBytes,
// kColumnsThreadBytes] (folded: see "Sub-chunks" below; the others were set before): deep
// layers need large chunks (4 MB: 1 MB made B64 512->512 4x4 1.45x and B32 256->256 8x8 1.2x
// slower, 2 and 8 MB were slower too), while the buffers of a small layer's large chunk made most
// of its training step's memory: B16 48->96 20x20 stride 2 held 6.4 MB of them, its step's peak 2.2x
// the static convolution's. (Against 4 MB for all, benchmarks/ab_builds.py, 7 rounds: backward 0.92
// on that layer, 0.79 on B32 96->96 10x10, 0.99-1.01 on B64 64->64 and B128 64->128 and 128->128
// 12x12 and B128 128->256 6x6.)
// Sub-chunks (folded). Each chunk writes, and after the first reads back, the block's slice of grad_W
// once more (the grad_W products, row by row: 21 % of the B64 512->512 4x4 backward's cycles on the
// Zen 3 EPYC, rdtsc around each step; the same products into a small buffer took 60 % fewer). So the
// folded backward holds Q' and A of kFoldedSubSamples samples at a time, and works a tile through its
// chunk's samples that many at a time (backward_folded_chunk): a chunk then costs the im2row and
// gcols of its samples, and Q' and A of a sub-chunk once, and where the part's slice of the kernels
// exceeds 8 MB the budget grows to a quarter of it, at most kFoldedMaxThreadBytesBackward (below 8 MB,
// kFoldedThreadBytesBackward at most, as before). B64 512->512 4x4 takes chunks of 32 samples
// instead of 8 (grad_W's slice is read and written twice per call instead of 8 times).
// (benchmarks/ab_builds.py against chunks that held every sample's Q' and A, 8 rounds of 5 calls,
// results/ab_folded_sub_chunks_avx2_cpu*.json: backward 0.86 and 0.80 on B64 512->512 4x4 in two
// runs, 0.88 with K = 8 in the second (1.18 in the first, whose forward, unchanged, read 1.15), 0.93
// on B64 256->512 4x4; the 6x6 layers, whose budgets did not change, 0.99-1.00. Peak memory of the
// training step (bench_op.py --modes mem, results/bench_op_cpu_mem_*sub_chunks_avx2.json): B64
// 512->512 4x4 44.2 -> 48.9 MiB, 2.02 -> 2.23 x the static convolution's (47.6 MiB since m and gm
// hold a block's columns only); 256->512 4x4 25.2 -> 26.1 MiB; the 6x6 layers unchanged. In-process
// alternations of a prototype on B64 512->512 4x4: chunks of 16 keeping every sample's Q' and A, at
// 3.5 and 4 MB, 0.93-0.94, against 0.88-0.91 for sub-chunks of 8 at those budgets; sub-chunks within
// the old 2 MB budget 0.96-0.99.)
// Panels. The plain grad_x product, gcols (+)= Wb^T @ gy, has the tile's rows as its inner dimension:
// (576 x 32) @ (32 x 196) per tile on 256->256 14x14. Each sample's Wb^T is collected over
// consecutive tiles of a block into panels of about kGradXRows rows (make_panels; kern, one per sample of the
// chunk), multiplied once per panel, and in brgemm blocks of columns where the Q products take them.
// On the Zen 3 EPYC (rdtsc around each step of the 14x14 backward, 2 threads) that product's cycles
// fell by 29 % (15.9 -> 22.3 flop per TSC cycle, the Q product 7 % faster in the same two runs; 12x12:
// -5 %), in wall-clock time (benchmarks/ab_builds.py,
// 8 rounds of 5 calls, fastest medians, results/ab_backward_gx_panels_avx2_cpu*.json) backward 0.90
// and 0.96 on B32 256->256 14x14 in two runs (its forward, unchanged, 1.05 and 0.94), 0.95-0.99 on
// 10x10, 12x12 and 24x24 layers.
// ODCONV_CPU_BACKWARD_SPLIT=auto (default) | samples | columns overrides the choice (tests run both
// on the same layers; columns with fewer parts than threads).
constexpr int64_t kMinColumnsPerPart = 64;
constexpr int64_t kMaxColumnsChunk = 32;
constexpr int64_t kColumnsMinThreadBytes = 1024 * 1024;
constexpr int64_t kColumnsThreadBytes = 4 * 1024 * 1024;
// G of the samples since the unfolded backward's last grad_W products, per thread: those products,
// (K x samples) @ (samples x the tile's columns) for each row, read and write the part's grad_W, and
// with G of one chunk only (one sample on the GTSRB 128->128 12x12 layer, whose im2row and gcols take
// the chunk's budget) that was a pass over 1.2 MB of grad_W per sample and thread, from L3. Keeping
// G for kGradWSamplesBytes of samples (whole chunks), benchmarks/ab_env.py with a temporary switch,
// 10 rounds, Zen 4 EPYC (results/ab_grad_w_samples_avx512_cpu.json): backward 0.96 on B128 128->128
// 12x12, 0.90 on B64 128->128 12x12, 0.98 on B64 128->128 16x16, 1.00-1.03 on four other layers
// (4 MB: 0.97, 0.86, 0.99). A first run (table not kept) fell in a slow period of the machine, when
// the layers without it took 1.1-1.7x their usual time: 0.63 on B128 128->128 12x12, 0.76 on B128
// 64->128 12x12, 0.81 on B64 128->128 16x16, 1.01 on B32 256->256 14x14 (4 MB: 0.62, 0.77, 0.77,
// 0.99): the old passes over grad_W were what a busy memory system slowed. Peak memory of the training
// step (bench_op.py --modes mem) 0.62 -> 0.71, 0.63 -> 0.75 and 0.66 -> 0.76 x static on the
// slow run's first three layers (4 MB: 0.82-0.89).
constexpr int64_t kGradWSamplesBytes = 2 * 1024 * 1024;
constexpr int64_t kColumnsSlotPad = 16;  // floats between the samples' slots: their rows do not share cache sets
constexpr int64_t kFoldedBackwardMaxPixels = 36;
constexpr int64_t kFoldedBackwardMaxPixelsDirect = 64;  // 1x1 kernels without im2col
constexpr int64_t kBlockBytes = 8 * 1024 * 1024;  // a block's slices of W_k and grad_W, at most
// The folded backward's blocks are at least kFoldedMinBlockColumns wide (a part's whole columns where it has
// fewer; the tile's kTileBytes still caps them), whatever kBlockBytes would allow. Its per-row and per-tile
// work does not shrink with a block: each row of a tile ends its pass over the row with S x K horizontal
// sums (reduce_rows_folded_avx512), and each tile transposes and scales every sample's rows of gy; on
// layers of many rows kBlockBytes cut blocks of 48-144 columns (2 x K x Cog x 4 bytes per column: 80 on
// ConvNeXt's 768->3072 1x1 on 7x7), where these took a third of the backward's own code (perf, B32
// 768->3072 7x7: reduce_rows_folded 20 % and backward_folded_chunk's own loops 6 % of the cycles, 17 % and
// 2 % with one block per part). There the chunks' re-reads of the wider blocks' slices cost less than
// that: a block of 384 columns of that layer holds 19 MB of W_k and grad_W, and two chunks of 16 read it.
// (benchmarks/ab_env.py with a temporary switch, Zen 4 EPYC, results/ab_folded_min_block_columns_avx512_cpu.json.)
constexpr int64_t kFoldedMinBlockColumns = 384;
constexpr int64_t kFoldedThreadBytesBackward = 2 * 1024 * 1024;     // the folded backward's budget (see above)
constexpr int64_t kFoldedMaxThreadBytesBackward = 4 * 1024 * 1024;  // and its most, for parts of > 16 MB of kernels
constexpr int64_t kFoldedSubSamples = 8;  // samples whose Q' and A the folded backward holds at a time

// On AVX-512 3x3 kernels fold on 7x7 maps too, since the sub-chunks: benchmarks/ab_env.py with a
// temporary switch (49 against 36 pixels), Zen 4 EPYC, two runs of 8 and 14 rounds,
// results/ab_folded_backward_7x7_avx512_cpu.json (the second): backward 0.93-0.96 on B16, B32 and B256
// 512->512 7x7 and on 256->512 stride 2 onto 7x7, 0.995 on B64 256->256 7x7; the training step's peak
// memory 2.04 -> 2.06x static on B32 512->512 7x7, 1.53 -> 1.40x on the strided layer.
// And on maps of up to 12x12 since the reduction pass adds grad_W (grad_w_in_folded_reduction), where
// the grad_x product is transposed (maps of at most half a group's rows, see above): ab_env.py with a
// temporary switch against 49 pixels, 10 rounds, results/ab_folded_backward_144_pixels_avx512_cpu.json:
// backward 0.73 on B32 512->512 8x8, 0.90 on 256->256 8x8, 0.94 on B64 256->256 9x9 and 10x10 and B32
// 512->512 12x12, 0.98 with K = 8 (grad_W by the products), 0.99 on 256->512 stride 2 onto 8x8, B128
// 128->128 12x12 (not transposed: unchanged) 1.00; B64 128->128 8x8 1.22 in that run, 0.93-0.95 in
// two of 16 rounds (..._128_rows_avx512_cpu.json, the second; B128 128->128 8x8 0.96-0.98, B32
// 64->128 8x8 0.93-0.94). Earlier runs, tables not kept: 0.87-0.91 on 9x9 and 10x10 with 144 and 200
// pixels, B16 512->512 14x14 0.98 with 200 (left unfolded), 1x1 kernels on 10x10 1.02 (they keep
// kFoldedBackwardMaxPixelsDirect). The training step's peak memory
// (bench_op.py --modes mem) 2.12 -> 1.65x static on B32 256->256 8x8, 1.09 -> 0.94x on B64 256->256
// 10x10, 1.39 -> 1.40x on B32 512->512 12x12.
constexpr int64_t kFoldedBackwardMaxPixelsAvx512 = 144;

inline int64_t folded_backward_max_pixels(const Geometry& g) {
  if (g.im2col_is_identity()) return kFoldedBackwardMaxPixelsDirect;
  return cpu_has_avx512() ? kFoldedBackwardMaxPixelsAvx512 : kFoldedBackwardMaxPixels;
}

// Parts of J for the backward by columns: at most one per thread, of at least kMinColumnsPerPart
// columns (and one input channel); 0 when the backward splits the samples instead.
int64_t column_parts(const Geometry& g) {
  const std::string mode = path_override("ODCONV_CPU_BACKWARD_SPLIT", {"auto", "samples", "columns"});
  if (mode == "samples") return 0;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t parts = std::clamp<int64_t>(g.groups * g.cols_per_group() / kMinColumnsPerPart, 1,
                                            std::min(threads, g.in_channels));
  return mode == "columns" || parts == threads ? parts : 0;
}

// A block of whole input channels [c0, c1) of a part, the unit of work of the backward by columns
// (see above), and its tiles: kMinTileRows rows by all of its columns.
struct ColumnBlock {
  int64_t c0 = 0, c1 = 0;  // of one group (a block never spans two: its tiles' g0)
  std::vector<Tile> tiles;
  std::vector<Panel> panels;  // of the plain grad_x product (make_panels), panel_of[i] that of tiles[i]
  std::vector<size_t> panel_of;
};

// The channels [c_begin, c_end) in blocks of whole channels, as few as keep each block's slices of
// W_k and grad_W within kBlockBytes (or, where that is narrower, min_columns wide: the folded
// backward's kFoldedMinBlockColumns) and its tile of W_k within kTileBytes; blocks of several
// channels take a multiple of 16 columns (a vector of floats, a block of brgemm) where they can.
// With groups the channels are first cut at the groups' boundaries: a block's tiles are rows of its
// group (Tile::g0) by columns of that group's J.
std::vector<ColumnBlock> column_blocks(const Geometry& g, int64_t elem_size, int64_t c_begin, int64_t c_end,
                                       int64_t min_columns = 1) {
  const int64_t taps = g.taps(), Cog = g.out_per_group, Cig = g.in_per_group, K = g.kernel_num;
  const int64_t rows = std::min(kMinTileRows, Cog);
  const int64_t most_columns = std::max<int64_t>(
      1, std::min(kTileBytes / (K * rows * elem_size),
                  std::max(min_columns, kBlockBytes / (2 * K * Cog * elem_size))));
  const int64_t align = channels_per_16_columns(taps);
  const int64_t row_step = even_step(Cog, rows);
  std::vector<ColumnBlock> out;
  for (int64_t s0 = c_begin; s0 < c_end;) {  // the part's channels of one group: [s0, s1)
    const int64_t gi = s0 / Cig, s1 = std::min(c_end, (gi + 1) * Cig);
    const int64_t channels_total = s1 - s0;
    const int64_t blocks = (channels_total * taps + most_columns - 1) / most_columns;
    int64_t channels = (channels_total + blocks - 1) / blocks;
    if (blocks > 1 && channels > align) channels = (channels + align - 1) / align * align;
    for (int64_t c = s0; c < s1; c += channels) {
      ColumnBlock b{c, std::min(s1, c + channels), {}, {}, {}};
      const int64_t j0 = (b.c0 - gi * Cig) * taps, j1 = (b.c1 - gi * Cig) * taps;  // of the group's J
      for (int64_t r = 0; r < Cog; r += row_step)
        b.tiles.push_back({gi, gi + 1, r, std::min(Cog, r + row_step), j0, j1});
      b.panels = make_panels(b.tiles, /*gather=*/true, b.panel_of);
      out.push_back(std::move(b));
    }
    s0 = s1;
  }
  return out;
}

// One part's channels [c0, c1), its blocks and its buffers (shapes above).
struct ColumnPart {
  int64_t c0 = 0, c1 = 0;
  std::vector<ColumnBlock> blocks;
  at::Tensor rows, im2row_scratch, gcols, gcols_t, gy_t, kern, kern_rows, q, gbuf, m, gm, gf, ga, gs, scratch, coef;
};

// Whether the backward runs its grad_x product transposed: both splits where a group has at least
// kTransposedGradXMinGroupRows rows on maps whose brgemm blocks would be ragged (see backward_kernel),
// and the backward by columns also on maps of at most Cog/2 pixels (see above), and on AVX-512, where
// it would then fold (`folds`: both gradient groups on a map the folded backward takes), on maps of up
// to kFoldedRaggedMaxPixels pixels that are not a multiple of 16 (9x9, 10x10), with as many rows:
// ODCONV_CPU_BACKWARD_TRANSPOSED_GX=always against auto (which took the plain product there), Zen 4
// EPYC, two runs of 12 and 14 rounds, results/ab_backward_transposed_gx_folded_8x8_10x10_avx512_cpu.json
// and ..._ragged_avx512_cpu.json: backward 0.86 on B64 128->128 9x9, 0.88-0.94 on B64 96->96 and
// 128->128 10x10 and 0.91 on B128 64->128 10x10; 0.97 on 11x11 (121 pixels), 0.98-1.05 on the aligned
// 8x8 and 12x12 maps (B128 64->64 and 32->64 8x8, the GTSRB 12x12 layers), which keep the plain product.
// ODCONV_CPU_BACKWARD_TRANSPOSED_GX=always | never overrides it in both.
constexpr int64_t kFoldedRaggedMaxPixels = 100;

inline bool grad_x_by_transposed_product(const Geometry& g, bool by_columns, bool folds = false) {
  const std::string mode = path_override("ODCONV_CPU_BACKWARD_TRANSPOSED_GX", {"auto", "always", "never"});
  if (mode != "auto") return mode == "always";
  const int64_t P = g.out_pixels(), Cog = g.out_per_group;
  const bool folds_ragged = by_columns && folds && cpu_has_avx512() && P <= kFoldedRaggedMaxPixels && P % 16 != 0;
  return (by_columns && 2 * P <= Cog) ||
         ((ragged_column_blocks(P) || folds_ragged) && Cog >= kTransposedGradXMinGroupRows);
}

// The folded backward of one chunk [c0, c0 + n) of one part (see "The backward by columns"). rows
// holds rows' = rows m of each sample, m and gm (zeroed) the samples' input scales and grad_m of the
// block's columns (m_ld apart), gf
// and ga their shares of grad_f and grad_a; gbuf and kern hold Q' and A of `sub` samples, q_slot
// apart (a tile is worked through the chunk's samples sub at a time: "Sub-chunks" above);
// x_chunk and gx_chunk point at the chunk's first sample; gw_in_reduction: grad_W comes from the
// reduction pass (grad_w_in_folded_reduction), else from products after it.
template <typename T>
void backward_folded_chunk(ColumnPart& pt, const ColumnBlock& blk, const Geometry& g, int64_t c0, int64_t n,
                           int64_t sub, int64_t q_slot, const T* gy_ptr, const T* x_chunk, const T* w_acc,
                           const T* a_ptr, const T* f_ptr, const T* rows, const T* m, int64_t m_ld, T* gbuf, T* gcols,
                           T* gm, T* gf, T* ga, T* grad_w_ptr, T* gx_chunk, bool gw_in_reduction,
                           const at::TensorOptions& opts) {
  // the block's first column: of x's im2row (all groups) and of its group's J
  const int64_t j_begin = blk.c0 * g.taps(), j_local = blk.tiles.front().j0, Jr = (blk.c1 - blk.c0) * g.taps();
  const int64_t J = g.cols_per_group(), P = g.out_pixels(), Cout = g.out_channels, K = g.kernel_num;
  const int64_t N = g.kernel_numel(), taps = g.taps(), x_stride = g.in_channels * g.height * g.width;
  const int64_t Cog = g.out_per_group;
  T* kern = pt.kern.data_ptr<T>();  // A of every sample, q_slot apart
  T* gy_t = pt.gy_t.data_ptr<T>();
  T* coef = pt.coef.data_ptr<T>();
  for (const Tile& t : blk.tiles) {
    const int64_t rows_t = t.rows(), Jt = t.cols(), jo = t.j0 - j_local, row0 = t.first_row(Cog);
    for (int64_t s0 = 0; s0 < n; s0 += sub) {  // the chunk's samples, sub at a time (Q' and A in gbuf and kern)
      const int64_t ns = std::min(sub, n - s0);
      // Q'_i = gy_i[tile rows] @ rows'_i[:, tile cols]: (T x P) @ (P x Jt), every sample's, kept for grad_W below
      for (int64_t i = s0; i < s0 + ns; ++i)
        grouped_gemm<T>(1, rows_t, Jt, P, gy_ptr + (c0 + i) * Cout * P + row0 * P, P, 0, rows + i * P * Jr + jo, Jr,
                        0, gbuf + (i - s0) * q_slot, Jt, 0, /*accumulate=*/false, opts);
      // Row by row, every sample's A, grad_f and grad_a, kFoldedBackwardSamples samples per pass over the row
      // of W_k, which stays in L1 for all of them (the tile does not stay in L2 next to the samples' Q'
      // and A: read once per pass over the tile it streamed from L3, 12 of the 21 ms of these rows per
      // thread on B64 512->512 4x4); more than kKernelsPerPass kernels in chunks of them, each chunk
      // adding its share of A to the samples' rows
      for (int64_t r = 0; r < rows_t; ++r) {
        const int64_t o = row0 + r;
        for (int64_t i0 = s0; i0 < s0 + ns; i0 += kFoldedBackwardSamples) {
          const int S = static_cast<int>(std::min<int64_t>(kFoldedBackwardSamples, s0 + ns - i0));
          const T* qs[kFoldedBackwardSamples] = {};
          T* wbs[kFoldedBackwardSamples] = {};
          T fo[kFoldedBackwardSamples] = {};
          for (int s = 0; s < S; ++s) {
            qs[s] = gbuf + (i0 - s0 + s) * q_slot + r * Jt;
            wbs[s] = kern + (i0 - s0 + s) * q_slot + r * Jt;
            fo[s] = f_ptr[(c0 + i0 + s) * Cout + o];
          }
          for (int64_t k0 = 0; k0 < K; k0 += kKernelsPerPass) {
            const int64_t KC = std::min(kKernelsPerPass, K - k0);
            T as[kFoldedBackwardSamples][4] = {}, gfs[kFoldedBackwardSamples] = {}, ds[kFoldedBackwardSamples][4] = {};
            T cs[kFoldedBackwardSamples][4] = {};  // a_i[k] f_i[o], where the reduction adds grad_W
            for (int s = 0; s < S; ++s)
              for (int64_t k = 0; k < KC; ++k) {
                as[s][k] = a_ptr[(c0 + i0 + s) * K + k0 + k];
                cs[s][k] = as[s][k] * fo[s];
              }
            reduce_rows_folded_dispatch<T>(qs, w_acc + k0 * N + o * J + t.j0, N, as, KC, S, Jt, wbs, gfs, ds,
                                           /*add_to_wb=*/k0 > 0, gw_in_reduction, cs,
                                           grad_w_ptr + k0 * N + o * J + t.j0, N, /*accumulate=*/c0 + i0 > 0);
            for (int s = 0; s < S; ++s) {
              const int64_t i = i0 + s;
              gf[i * Cout + o] += gfs[s];
              for (int64_t k = 0; k < KC; ++k) ga[i * K + k0 + k] += fo[s] * ds[s][k];
            }
          }
        }
      }
      // Y_i^T[:, tile cols] (+)= (f_i gy_i[tile rows])^T @ A_i: (P x T) @ (T x Jt); row blocks accumulate
      for (int64_t i = s0; i < s0 + ns; ++i) {
        const int64_t b = c0 + i;
        const T* gy_rows = gy_ptr + b * Cout * P + row0 * P;
        transpose_into(gy_rows, rows_t, P, gy_t, rows_t);
        const T* __restrict__ fr = f_ptr + b * Cout + row0;
        for (int64_t p = 0; p < P; ++p) {
          T* __restrict__ row = gy_t + p * rows_t;
#pragma omp simd
          for (int64_t r = 0; r < rows_t; ++r) row[r] *= fr[r];
        }
        grouped_gemm<T>(1, P, Jt, rows_t, gy_t, rows_t, 0, kern + (i - s0) * q_slot, Jt, 0, gcols + i * Jr * P + jo,
                        Jr, 0, /*accumulate=*/t.r0 > 0, opts);
      }
      // grad_W[:, o, tile cols] (+)= C_o @ Q'[:, o], C_o[k, i] = a_i[k] f_i[o]: (K x ns) @ (ns x Jt), row by
      // row; the batch's first samples write it (the reduction above did, where it adds grad_W)
      if (!gw_in_reduction)
        for (int64_t r = 0; r < rows_t; ++r) {
          const int64_t o = row0 + r;
          for (int64_t k = 0; k < K; ++k)
            for (int64_t i = 0; i < ns; ++i)
              coef[k * ns + i] = a_ptr[(c0 + s0 + i) * K + k] * f_ptr[(c0 + s0 + i) * Cout + o];
          grouped_gemm<T>(1, K, Jt, ns, coef, ns, 0, gbuf + r * Jt, q_slot, 0, grad_w_ptr + o * J + t.j0, N, 0,
                          /*accumulate=*/c0 + s0 > 0, opts);
        }
    }
  }
  // Per sample: grad_m[j] = sum_p rows[p, j] Y^T[p, j], from rows' as (sum_p rows'[p, j] Y^T[p, j]) / m[j]
  // where m[j] is at least the square root of the smallest normal number (rows' m loses nothing to
  // underflow there), otherwise from x itself; then gcols = (Y^T)^T m into grad_x.
  const bool direct = g.im2col_is_identity();
  T* gcols_t = direct ? nullptr : pt.gcols_t.data_ptr<T>();  // col2im's input; none without im2col
  const T smallest = std::sqrt(std::numeric_limits<T>::min());
  for (int64_t i = 0; i < n; ++i) {
    const T* yt = gcols + i * Jr * P;
    const T* rw = rows + i * P * Jr;
    const T* mi = m + i * m_ld;
    T* __restrict__ gmi = gm + i * m_ld;
    for (int64_t p = 0; p < P; ++p) {
      const T* __restrict__ rp = rw + p * Jr;
      const T* __restrict__ yp = yt + p * Jr;
#pragma omp simd
      for (int64_t jj = 0; jj < Jr; ++jj) gmi[jj] += rp[jj] * yp[jj];
    }
    for (int64_t jj = 0; jj < Jr; ++jj) {
      if (mi[jj] >= smallest) {
        gmi[jj] /= mi[jj];
        continue;
      }
      const int64_t j = j_begin + jj, c = j / taps, u = (j % taps) / g.kernel_w, v = (j % taps) % g.kernel_w;
      const T* xc = x_chunk + i * x_stride + c * g.height * g.width;
      T sum = 0;
      for (int64_t oy = 0; oy < g.out_h; ++oy) {
        const int64_t iy = oy * g.stride_h - g.pad_h + u * g.dil_h;
        if (iy < 0 || iy >= g.height) continue;
        for (int64_t ox = 0; ox < g.out_w; ++ox) {
          const int64_t ix = ox * g.stride_w - g.pad_w + v * g.dil_w;
          if (ix >= 0 && ix < g.width) sum += xc[iy * g.width + ix] * yt[(oy * g.out_w + ox) * Jr + jj];
        }
      }
      gmi[jj] = sum;
    }
    // without im2col (1x1 kernels) grad_x's channels are gcols itself
    T* gc = direct ? gx_chunk + i * x_stride + blk.c0 * P : gcols_t;
    transpose_into(yt, P, Jr, gc, P);
    scale_rows(gc, Jr, P, mi);
    if (!direct) col2im(gc, g, gx_chunk + i * x_stride, blk.c0, blk.c1);
  }
}

template <typename scalar_t>
void backward_by_columns(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& weight_acc, const at::Tensor& ch, const at::Tensor& f, const at::Tensor& s,
                         const at::Tensor& a, const Geometry& g, bool want_x, bool want_params, int64_t parts,
                         at::Tensor& grad_x, at::Tensor& grad_w, at::Tensor& grad_ch, at::Tensor& grad_f,
                         at::Tensor& grad_s, at::Tensor& grad_a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t J = g.cols_per_group(), P = g.out_pixels(), Cout = g.out_channels, Cin = g.in_channels;
  const int64_t K = g.kernel_num, N = g.kernel_numel(), taps = g.taps(), B = g.batch;
  const int64_t x_stride = Cin * g.height * g.width;
  const bool direct = g.im2col_is_identity();
  // the folded backward: both gradient groups, the transposed grad_x product, maps of at most
  // folded_backward_max_pixels
  const bool folds = want_params && P <= folded_backward_max_pixels(g) && std::is_same_v<scalar_t, acc_t>;
  const bool gx_transposed = want_x && grad_x_by_transposed_product(g, /*by_columns=*/true, folds);
  const bool folded = folds && gx_transposed;
  // the folded reduction adds grad_W itself, else the products after it do
  const bool gw_in_reduction = folded && grad_w_in_folded_reduction<scalar_t>();
  // gcols: the gradient of the im2col matrix, or with the transposed grad_x product its transpose
  const bool has_gcols = want_x && (!direct || gx_transposed);
  const auto opts = x.options();
  const bool q_in_blocks = backward_q_in_column_blocks();
  const auto acc_opts = opts.dtype(c10::CppTypeToScalarType<acc_t>::value);

  std::vector<ColumnPart> part(parts);
  // columns of a part and of a block, elements of a tile and of a panel
  int64_t part_columns = 0, widest = 0, max_tile = 0, max_panel = 0;
  for (int64_t p = 0; p < parts; ++p) {
    part[p].c0 = Cin * p / parts;
    part[p].c1 = Cin * (p + 1) / parts;
    part_columns = std::max(part_columns, (part[p].c1 - part[p].c0) * taps);
    part[p].blocks = column_blocks(g, sizeof(scalar_t), part[p].c0, part[p].c1,
                                   folded ? kFoldedMinBlockColumns : 1);
    for (const ColumnBlock& blk : part[p].blocks) {
      widest = std::max(widest, (blk.c1 - blk.c0) * taps);
      max_tile = std::max(max_tile, max_tile_elems(blk.tiles));
      for (const Panel& pn : blk.panels) max_panel = std::max(max_panel, pn.rows * pn.cols);
    }
  }
  // the folded backward keeps its samples' Q' on a tile in slots a little longer than a tile, so
  // that the samples' rows do not all fall in the same cache sets
  const int64_t q_slot = folded ? max_tile + kColumnsSlotPad : max_tile;
  // the plain grad_x product gathers a sample's Wb^T over a panel's tiles, one buffer per sample of a chunk
  const int64_t panel_slot = want_x && !gx_transposed ? max_panel : 0;
  const int64_t slice_bytes = K * Cout * part_columns * (int64_t)sizeof(scalar_t);  // a part's slice of the K kernels
  int64_t chunk = 1;
  if (folded) {
    // every sample's im2row and gcols, Q' and A of kFoldedSubSamples of them at a time ("Sub-chunks")
    const int64_t qa_bytes = 2 * q_slot * (int64_t)sizeof(acc_t), xs_bytes = 2 * widest * P * (int64_t)sizeof(scalar_t);
    const int64_t budget =
        std::clamp<int64_t>(std::max(slice_bytes / 4, std::min(slice_bytes, kFoldedThreadBytesBackward)),
                            kColumnsMinThreadBytes, kFoldedMaxThreadBytesBackward);
    chunk = budget / (qa_bytes + xs_bytes);
    if (chunk > kFoldedSubSamples) chunk = (budget - kFoldedSubSamples * qa_bytes) / xs_bytes;
  } else {
    const int64_t bytes_per_sample =
        (want_params ? widest * P * (int64_t)sizeof(scalar_t) + q_slot * (int64_t)sizeof(acc_t) : 0) +
        (has_gcols ? widest * P * (int64_t)sizeof(scalar_t) : 0) + panel_slot * (int64_t)sizeof(scalar_t);
    chunk = std::clamp<int64_t>(slice_bytes, kColumnsMinThreadBytes, kColumnsThreadBytes) /
            std::max<int64_t>(1, bytes_per_sample);
  }
  chunk = std::clamp<int64_t>(chunk, 1, std::min(B, kMaxColumnsChunk));
  chunk = (B + (B + chunk - 1) / chunk - 1) / ((B + chunk - 1) / chunk);  // even chunks
  // samples whose Q' (G) and kernels the buffers hold: the folded backward's sub-chunk, or the chunk
  const int64_t q_samples = folded ? std::min(chunk, kFoldedSubSamples) : chunk;
  // the unfolded backward keeps G of every tile of a block for gw_samples samples (whole chunks) and
  // multiplies grad_W's share once per gw_samples
  int64_t block_elems = 0;  // a block's tiles, end to end
  for (const ColumnPart& pt : part)
    for (const ColumnBlock& blk : pt.blocks) {
      int64_t e = 0;
      for (const Tile& t : blk.tiles) e += t.rows() * t.cols();
      block_elems = std::max(block_elems, e);
    }
  int64_t gw_samples = chunk;
  if (want_params && !folded) {
    const int64_t fit = kGradWSamplesBytes / std::max<int64_t>(1, block_elems * (int64_t)sizeof(acc_t));
    gw_samples = std::max<int64_t>(1, std::min(fit, B) / chunk) * chunk;
  }
  for (ColumnPart& pt : part) {
    const int64_t Jr = widest;
    if (want_params) {
      pt.rows = at::empty({chunk * P * Jr}, opts);
      if (!direct) pt.im2row_scratch = at::empty({im2row_scratch_elems(g)}, opts);
      if (!folded) pt.q = at::empty({max_tile}, opts);
      pt.gbuf = at::empty({folded ? q_samples * q_slot : gw_samples * block_elems}, acc_opts);
      if (folded) pt.coef = at::empty({K * q_samples}, acc_opts);
      pt.gm = at::empty({chunk * widest}, acc_opts);
      pt.gf = at::zeros({B * Cout}, acc_opts);
      pt.ga = at::zeros({B * K}, acc_opts);
      pt.gs = at::zeros({B * taps}, acc_opts);
    }
    if (want_x) {
      if (has_gcols) pt.gcols = at::empty({chunk * Jr * P}, opts);
      pt.kern = at::empty({folded ? q_samples * q_slot : (gx_transposed ? max_tile : chunk * panel_slot)}, opts);
      if (gx_transposed) {
        if (!direct) pt.gcols_t = at::empty({Jr * P}, opts);  // for col2im: 1x1 kernels write grad_x itself
        pt.gy_t = at::empty({P * std::min(kMinTileRows, Cout)}, opts);
      } else {
        pt.kern_rows = at::empty({max_tile}, opts);
      }
    }
    pt.m = at::empty({chunk * widest}, acc_opts);
    pt.scratch = at::empty({J}, acc_opts);
  }

  const scalar_t* w_ptr = weight.const_data_ptr<scalar_t>();
  const acc_t* w_acc = want_params ? weight_acc.const_data_ptr<acc_t>() : nullptr;
  const acc_t *a_ptr = a.const_data_ptr<acc_t>(), *f_ptr = f.const_data_ptr<acc_t>();
  const acc_t *ch_ptr = ch.const_data_ptr<acc_t>(), *s_ptr = s.const_data_ptr<acc_t>();
  const scalar_t *gy_ptr = gy.const_data_ptr<scalar_t>(), *x_ptr = x.const_data_ptr<scalar_t>();
  scalar_t* gx_ptr = grad_x.data_ptr<scalar_t>();
  acc_t* grad_w_ptr = grad_w.data_ptr<acc_t>();
  acc_t* grad_ch_ptr = grad_ch.data_ptr<acc_t>();

  const at::Tensor a_t = want_params ? a.t().contiguous() : at::Tensor();  // (K x B)
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t pi = p0; pi < p1; ++pi) {
      ColumnPart& pt = part[pi];
      acc_t* m = pt.m.data_ptr<acc_t>();
      acc_t* scratch = pt.scratch.data_ptr<acc_t>();
      scalar_t* rows = want_params ? pt.rows.data_ptr<scalar_t>() : nullptr;
      scalar_t* gcols = has_gcols ? pt.gcols.data_ptr<scalar_t>() : nullptr;
      scalar_t* im2row_scratch = want_params && !direct ? pt.im2row_scratch.data_ptr<scalar_t>() : nullptr;
      acc_t* gm = want_params ? pt.gm.data_ptr<acc_t>() : nullptr;
      acc_t* gbuf = want_params ? pt.gbuf.data_ptr<acc_t>() : nullptr;
      for (const ColumnBlock& blk : pt.blocks) {
        // the block's first column: of x's im2row (all groups; m's columns start there) and of its group's J
        const int64_t j_begin = blk.c0 * taps, j_local = blk.tiles.front().j0, Jr = (blk.c1 - blk.c0) * taps;
        for (int64_t c0 = 0; c0 < B; c0 += chunk) {
          const int64_t n = std::min(chunk, B - c0);
          acc_t *gf = nullptr, *ga = nullptr, *gs = nullptr;
          if (want_params) {
            gf = pt.gf.data_ptr<acc_t>() + c0 * Cout;
            ga = pt.ga.data_ptr<acc_t>() + c0 * K;
            gs = pt.gs.data_ptr<acc_t>() + c0 * taps;
          }
          for (int64_t i = 0; i < n; ++i) {
            const int64_t b = c0 + i;
            // the block's columns of m and grad_m, widest apart
            input_scale(ch_ptr + b * Cin + blk.c0, s_ptr + b * taps, g, m + i * widest, 0, blk.c1 - blk.c0);
            if (!want_params) continue;
            std::fill_n(gm + i * widest, Jr, acc_t(0));
            scalar_t* ri = rows + i * P * Jr;
            im2row(x_ptr + b * x_stride, g, im2row_scratch, ri, blk.c0, blk.c1, Jr);
            if (folded) scale_columns(ri, P, Jr, m + i * widest);  // rows' = rows m: the products give Q' = Q m
          }
          if (folded) {  // grad_x comes out of it too
            if constexpr (std::is_same_v<scalar_t, acc_t>)
              backward_folded_chunk<scalar_t>(pt, blk, g, c0, n, q_samples, q_slot, gy_ptr, x_ptr + c0 * x_stride,
                                              w_acc, a_ptr, f_ptr, rows, m, widest, gbuf, gcols, gm, gf, ga,
                                              grad_w_ptr, gx_ptr + c0 * x_stride, gw_in_reduction, opts);
          } else {
            // G of the chunk's samples goes to their slots of gbuf (block_elems each, from the first sample
            // since the last grad_W products), tile by tile
            const int64_t gw_first = c0 / gw_samples * gw_samples, slot0 = c0 - gw_first;
            int64_t tile_offset = 0;
            for (size_t ti = 0; ti < blk.tiles.size(); ++ti) {
              const Tile& t = blk.tiles[ti];
              const Panel& pn = blk.panels[blk.panel_of[ti]];
              const int64_t T = t.rows(), Jt = t.cols(), tile = T * Jt, jo = t.j0 - j_local;
              const int64_t row0 = t.first_row(g.out_per_group);
              acc_t* g_tile = want_params ? gbuf + tile_offset : nullptr;
              tile_offset += tile;
              for (int64_t i = 0; i < n; ++i) {
                const int64_t b = c0 + i;
                const scalar_t* gy_rows = gy_ptr + b * Cout * P + row0 * P;
                if (want_params) {
                  // Q = gy[tile rows] @ rows_x[:, tile cols]: (T x P) @ (P x Jt), reduced at once (with the
                  // transposed grad_x product, the same pass over W builds the tile's Wb for it)
                  scalar_t* q = pt.q.data_ptr<scalar_t>();
                  grouped_gemm<scalar_t>(1, T, Jt, P, gy_rows, P, 0, rows + i * P * Jr + jo, Jr, 0, q, Jt, 0,
                                         /*accumulate=*/false, opts, /*in_column_blocks=*/q_in_blocks);
                  reduce_tile_gradients(t, g, q, a_ptr + b * K, w_acc, m + i * widest, f_ptr + b * Cout, scratch,
                                        gm + i * widest, g_tile + (slot0 + i) * block_elems, gf + i * Cout,
                                        ga + i * K,
                                        gx_transposed ? pt.kern.data_ptr<scalar_t>() : nullptr, /*m_col0=*/j_begin);
                }
                if (gx_transposed) {
                  // gcols^T[:, tile cols] (+)= gy[tile rows]^T @ Wb[tile]: (P x T) @ (T x Jt); row blocks accumulate
                  scalar_t *kern = pt.kern.data_ptr<scalar_t>(), *gy_t = pt.gy_t.data_ptr<scalar_t>();
                  if (!want_params)
                    build_tile_kernel(w_ptr, a_ptr + b * K, f_ptr + b * Cout, m + i * widest, g, t,
                                      /*transposed=*/false, kern, static_cast<scalar_t*>(nullptr), scratch,
                                      /*ld=*/0, /*col0=*/0, /*m_col0=*/j_begin);
                  transpose_into(gy_rows, T, P, gy_t, T);
                  grouped_gemm<scalar_t>(1, P, Jt, T, gy_t, T, 0, kern, Jt, 0, gcols + i * Jr * P + jo, Jr, 0,
                                         /*accumulate=*/t.r0 > 0, opts);
                } else if (want_x) {
                  // Wb[tile]^T into the sample's panel (Jt x PR, PR = the panel's rows), then after the
                  // panel's last tile gcols[tile cols] (+)= Wb[panel]^T @ gy[panel rows]: (Jt x PR) @ (PR x P);
                  // the panels accumulate
                  scalar_t* kern = pt.kern.data_ptr<scalar_t>() + i * panel_slot;
                  build_tile_kernel(w_ptr, a_ptr + b * K, f_ptr + b * Cout, m + i * widest, g, t, /*transposed=*/true,
                                    kern, pt.kern_rows.data_ptr<scalar_t>(), scratch, /*ld=*/pn.rows,
                                    /*col0=*/t.r0 - pn.r0, /*m_col0=*/j_begin);
                  if (ti == pn.last_tile) {
                    scalar_t* dst = direct ? gx_ptr + b * x_stride + (j_begin + jo) * P : gcols + i * Jr * P + jo * P;
                    const scalar_t* gy_panel = gy_ptr + b * Cout * P + (pn.g0 * g.out_per_group + pn.r0) * P;
                    grouped_gemm<scalar_t>(1, Jt, P, pn.rows, kern, pn.rows, 0, gy_panel, P, 0,
                                           dst, P, 0, /*accumulate=*/pn.r0 > 0, opts, /*in_column_blocks=*/q_in_blocks);
                  }
                }
              }
              // once gbuf is full (or the batch done): grad_W[:, row, tile cols] (+)= a[gw_first:c0+n]^T @
              // G[:, row], (K x ns) @ (ns x Jt), row by row
              const int64_t ns = c0 + n - gw_first;
              if (want_params && (ns == gw_samples || c0 + n == B))
                for (int64_t r = 0; r < T; ++r)
                  grouped_gemm<acc_t>(1, K, Jt, ns, a_t.const_data_ptr<acc_t>() + gw_first, B, 0, g_tile + r * Jt,
                                      block_elems, 0, grad_w_ptr + (row0 + r) * J + t.j0, N, 0,
                                      /*accumulate=*/gw_first > 0, acc_opts);
            }
          }
          for (int64_t i = 0; i < n; ++i) {
            const int64_t b = c0 + i;
            if (folded) {  // its grad_x is done
            } else if (gx_transposed) {
              // without im2col (1x1 kernels) grad_x's channels are gcols itself
              scalar_t* gc = direct ? gx_ptr + b * x_stride + blk.c0 * P : pt.gcols_t.data_ptr<scalar_t>();
              transpose_into(gcols + i * Jr * P, P, Jr, gc, P);
              if (!direct) col2im(gc, g, gx_ptr + b * x_stride, blk.c0, blk.c1);
            } else if (want_x && !direct) {
              col2im(gcols + i * Jr * P, g, gx_ptr + b * x_stride, blk.c0, blk.c1);
            }
            if (want_params)
              reduce_scale_gradient(g, gm + i * widest, ch_ptr + b * Cin + blk.c0, s_ptr + b * taps,
                                    grad_ch_ptr + b * Cin + blk.c0, gs + i * taps, 0, blk.c1 - blk.c0);
          }
        }
      }
    }
    if constexpr (uses_brgemm<scalar_t>()) at::native::cpublas::brgemm_release(false);
  });
  if (want_params) {
    // the parts' shares of grad_f, grad_a and grad_s, in part order
    for (const ColumnPart& pt : part) {
      grad_f.add_(pt.gf.view({B, Cout}));
      grad_a.add_(pt.ga.view({B, K}));
      grad_s.add_(pt.gs.view({B, taps}));
    }
  }
}

// The backward's working buffers for one run of samples [s0, s0 + n) (shapes in the header).
struct BackwardRun {
  int64_t s0 = 0, n = 0;
  at::Tensor rows, cols_scratch, gcols, kern, q, gbuf, rows_scratch, scratch, m, gm, a_t, gw;
  at::Tensor gy_t, gcols_t;  // the transposed grad_x product's gy^T of a tile, col2im's input (see below)
};

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

  const int64_t J = g.cols_per_group(), P = g.out_pixels(), Cog = g.out_per_group, Cout = g.out_channels;
  const int64_t GJ = g.groups * J, K = g.kernel_num, N = g.kernel_numel(), taps = g.taps();
  const int64_t x_stride = g.in_channels * g.height * g.width;
  const bool direct = g.im2col_is_identity();
  const std::vector<Tile> tiles = make_tiles(g, sizeof(scalar_t));
  const int64_t max_tile = max_tile_elems(tiles);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const bool q_in_blocks = backward_q_in_column_blocks();

  at::Tensor grad_x = want_x ? at::empty_like(x) : at::zeros_like(x);
  if (want_x) advise_huge_pages(grad_x);
  // Parameter gradients accumulate in acc_t. grad_W has no per-thread copies: a tile's share of
  // the first run of samples goes straight into it, the other runs' shares into tile-sized
  // partials that are added in run order after the tile (deterministic for a thread count).
  // The split by columns writes every element of grad_W in its first chunk: no zeroing pass (for
  // 512->512 3x3 it is 36 MiB, fresh pages from the system on every call), and its pages are first
  // touched by the threads that own them.
  const int64_t parts = g.batch > 0 && (want_x || want_params) ? column_parts(g) : 0;
  at::Tensor grad_w = at::empty({K, N}, acc_opts);
  advise_huge_pages(grad_w);  // before its first write
  if (!(parts > 0 && want_params)) grad_w.zero_();
  at::Tensor grad_ch = at::zeros({g.batch, g.in_channels}, acc_opts);
  at::Tensor grad_f = at::zeros({g.batch, Cout}, acc_opts);
  at::Tensor grad_s = at::zeros({g.batch, taps}, acc_opts);
  at::Tensor grad_a = at::zeros({g.batch, K}, acc_opts);
  const at::Tensor weight_acc = want_params ? weight.to(acc_type).view({K, N}) : at::Tensor();

  const auto results = [&] {
    const auto dtype = x.scalar_type();
    return std::make_tuple(
        grad_x, grad_w.view(weight.sizes()).to(dtype), grad_ch.to(dtype), grad_f.to(dtype),
        grad_s.view({g.batch, g.kernel_h, g.kernel_w}).to(dtype), grad_a.to(dtype));
  };
  if (parts > 0) {
    backward_by_columns<scalar_t>(gy, x, weight, weight_acc, ch, f, s, a, g, want_x, want_params, parts, grad_x, grad_w,
                                  grad_ch, grad_f, grad_s, grad_a);
    return results();
  }

  // The grad_x product transposed, gcols^T[:, tile cols] (+)= gy[tile rows]^T @ Wb[tile] (P x T) @ (T x Jt),
  // where brgemm's last block of 16 columns would be ragged in gcols = Wb^T @ gy (N = P: maps like 7x7,
  // 6x6 and 5x5, the forward's rule) and a group has at least kTransposedGradXMinGroupRows rows (the
  // inner dimension T): then Wb is built row-major (no transposes in the build) and each sample's gcols^T
  // transposed once before col2im. The runs of samples took grouped layers until 2026-12-07 (the
  // backward by columns takes them now where it has a part per thread, with the same rule); B32
  // 256->256 7x7 with 4 groups took 3.1x the static convolution's forward + backward on the Zen 4
  // EPYC, against 1.65x without groups, 14 % of its one-thread backward in the transposed build of
  // Wb. (benchmarks/ab_env.py, never against auto, 10 rounds, Zen 4 EPYC,
  // results/ab_backward_transposed_gx_groups_avx512_cpu.json: backward 0.92 on B32 256->256 7x7 with two
  // groups, 0.95 with four, 0.94 on B64 256->256 5x5 with four; with 12 rows per group it was 1.07, with
  // 8 rows and 4 input channels 1.58, so those keep the plain product; narrow groups of 8-32 multiples
  // of 8 take the convolution path.) ODCONV_CPU_BACKWARD_TRANSPOSED_GX=auto (default) | always | never
  // overrides the choice (tests and A/B runs).
  const bool gx_transposed = want_x && !direct && grad_x_by_transposed_product(g, /*by_columns=*/false);
  std::vector<size_t> panel_of;
  const std::vector<Panel> panels = make_panels(
      tiles, /*gather=*/!gx_transposed && g.groups == 1 && im2col_bytes(g, sizeof(scalar_t)) > kSmallIm2colBytes,
      panel_of);
  // per sample, when grad_x is wanted: Wb of a tile (transposed), or of a whole panel
  int64_t kern_elems = max_tile;
  if (want_x)
    for (const Panel& pn : panels) kern_elems = std::max(kern_elems, tiles[pn.last_tile].groups() * pn.cols * pn.rows);
  const int64_t cols_bytes = im2col_bytes(g, sizeof(scalar_t));
  // per sample: rows and gcols, and the tile buffers kern, q, gbuf
  const int64_t bytes_per_sample =
      (want_params ? cols_bytes + max_tile * (int64_t)(sizeof(acc_t) + sizeof(scalar_t)) : 0) +
      (want_x ? (direct ? 0 : cols_bytes) + kern_elems * (int64_t)sizeof(scalar_t) : 0);
  // A run's buffers get at most a thread's share of the batch's activations (x and out), within
  // [kBackwardThreadMinBytes, kBackwardThreadBytes]: small layers (grouped ones on 7x7 maps: 0.6-2 MB of
  // activations) had runs of 16 samples whose im2row and gcols took 8 MB per thread, a training step
  // 2.4-8.2x the static one's peak memory, and buffers beyond L2. (benchmarks/ab_env.py, 12 rounds,
  // results/ab_backward_runs_by_activations_avx2_cpu.json: backward 0.44 on B32 128->128 7x7 with 32
  // groups, 0.87-0.94 on three other grouped 6x6-7x7 layers, 0.99-1.03 on five layers up to 14x14 whose
  // runs changed less or not; peak memory of the training step 8.2 -> 1.9x static on the first, 2.4-4.2
  // -> 1.15-1.6x on three others, 3.2 -> 2.1x on B8 256->256 14x14 with 4 groups, bench_op.py --modes
  // mem, results/bench_op_cpu_mem_backward_runs_*_avx2.json.)
  const int64_t run_bytes = std::clamp<int64_t>(activation_bytes(g, sizeof(scalar_t)) / threads,
                                                kBackwardThreadMinBytes, kBackwardThreadBytes);
  const int64_t chunk = chunk_size(g.batch, bytes_per_sample, run_bytes);
  const scalar_t* w_ptr = weight.const_data_ptr<scalar_t>();
  acc_t* grad_w_ptr = grad_w.data_ptr<acc_t>();

  // One run of samples per thread and chunk; each run's buffers are allocated at the first chunk, for
  // the longest run, and reused (as in forward_kernel: B128 32->32 48x48 split by samples took 99 K
  // page faults per call with buffers per chunk, 9.7 K now, those of grad_x itself).
  const int64_t max_runs = std::min(threads, chunk), max_n = (chunk + max_runs - 1) / max_runs;
  std::vector<BackwardRun> run_state(max_runs);
  for (int64_t c0 = 0; c0 < g.batch && (want_x || want_params); c0 += chunk) {
    const int64_t c1 = std::min(g.batch, c0 + chunk);
    // The tiles are the outer loop (one parallel region each) so that the runs' shares of a tile of
    // grad_W can be summed in a fixed order without a copy of grad_W per thread; a thread still
    // streams a tile of W_k once for all of its samples.
    const int64_t runs = std::min(threads, c1 - c0);
    auto for_each_run = [&](const auto& body) {
      at::parallel_for(0, runs, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) body(run_state[r]);
        if constexpr (uses_brgemm<scalar_t>()) at::native::cpublas::brgemm_release(false);
      });
    };

    // 1. buffers, im2row of x and the input scale m of every sample
    for (int64_t r = 0; r < runs; ++r) {
      run_state[r].s0 = c0 + (c1 - c0) * r / runs;
      run_state[r].n = c0 + (c1 - c0) * (r + 1) / runs - run_state[r].s0;
    }
    for_each_run([&](BackwardRun& run) {
      const int64_t s0 = run.s0, n = run.n;
      if (!run.scratch.defined()) {
        if (want_params) {
          run.rows = at::empty({max_n * GJ * P}, opts);
          if (!direct) run.cols_scratch = at::empty({im2row_scratch_elems(g)}, opts);
          run.q = at::empty({max_n * max_tile}, opts);
          run.gbuf = at::empty({max_n * max_tile}, acc_opts);
          if (&run != &run_state[0]) run.gw = at::empty({K, max_tile}, acc_opts);
        }
        if (want_x && !direct) run.gcols = at::empty({max_n * GJ * P}, opts);
        if (want_x) {
          run.kern = at::empty({max_n * kern_elems}, opts);
          run.rows_scratch = at::empty({max_tile}, opts);  // one group's rows of a tile: rows x Jt <= max_tile
        }
        if (gx_transposed) {
          run.gy_t = at::empty({Cout * P}, opts);
          // col2im's input: im2row's buffer where there is one (free once the tiles are done)
          if (!want_params) run.gcols_t = at::empty({GJ * P}, opts);
        }
        run.scratch = at::empty({J}, acc_opts);
        run.m = at::empty({max_n * GJ}, acc_opts);
        run.gm = at::empty({max_n * GJ}, acc_opts);
      }
      // a[s0:s1]^T, (K x n): the left operand of the grad_W product
      if (want_params) run.a_t = a.narrow(0, s0, n).t().contiguous();
      run.gm.narrow(0, 0, n * GJ).zero_();
      for (int64_t i = 0; i < n; ++i) {
        const int64_t b = s0 + i;
        if (want_params) {
          im2row(x.const_data_ptr<scalar_t>() + b * x_stride, g,
                 direct ? nullptr : run.cols_scratch.data_ptr<scalar_t>(), run.rows.data_ptr<scalar_t>() + i * GJ * P);
        }
        input_scale(ch.const_data_ptr<acc_t>() + b * g.in_channels, s.const_data_ptr<acc_t>() + b * taps, g,
                    run.m.data_ptr<acc_t>() + i * GJ);
      }
    });

    // 2. tile by tile: grad_x products, Q, the attention gradients and grad_W
    for (size_t ti = 0; ti < tiles.size(); ++ti) {
      const Tile& t = tiles[ti];
      const int64_t nG = t.groups(), T = t.rows(), Jt = t.cols(), tile = nG * T * Jt, row0 = t.first_row(Cog);
      const size_t pi = panel_of[ti];
      const Panel& pn = panels[pi];
      for_each_run([&](BackwardRun& run) {
        const int64_t s0 = run.s0, n = run.n;
        scalar_t* kern = want_x ? run.kern.data_ptr<scalar_t>() : nullptr;
        const acc_t* m = run.m.const_data_ptr<acc_t>();
        acc_t* gm = run.gm.data_ptr<acc_t>();
        const scalar_t* gy_s = gy.const_data_ptr<scalar_t>() + s0 * Cout * P;
        const scalar_t* rows = want_params ? run.rows.const_data_ptr<scalar_t>() : nullptr;
        scalar_t* gcols = direct ? grad_x.data_ptr<scalar_t>() + s0 * x_stride
                                 : (want_x ? run.gcols.data_ptr<scalar_t>() : nullptr);
        const int64_t gcols_stride = direct ? x_stride : GJ * P;
        scalar_t* q = want_params ? run.q.data_ptr<scalar_t>() : nullptr;
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* gy_i = gy_s + i * Cout * P + row0 * P;
          // Wb is only an operand of the grad_x product (the parameter gradients recompute A)
          if (gx_transposed) {
            // gcols^T[g][:, tile cols] (+)= gy[g][tile rows]^T @ Wb[g][tile rows, tile cols]; the row
            // blocks of one group (G == 1) accumulate
            scalar_t* kern_i = kern + i * kern_elems;
            scalar_t* gy_t = run.gy_t.data_ptr<scalar_t>();
            build_tile_kernel(w_ptr, a.const_data_ptr<acc_t>() + (s0 + i) * K,
                              f.const_data_ptr<acc_t>() + (s0 + i) * Cout, m + i * GJ, g, t, /*transposed=*/false,
                              kern_i, static_cast<scalar_t*>(nullptr), run.scratch.data_ptr<acc_t>());
            for (int64_t gi = 0; gi < nG; ++gi)
              transpose_into(gy_s + i * Cout * P + ((t.g0 + gi) * Cog + t.r0) * P, T, P, gy_t + gi * P * T, T);
            grouped_gemm<scalar_t>(nG, P, Jt, T, gy_t, T, P * T, kern_i, Jt, T * Jt,
                                   gcols + i * gcols_stride + t.g0 * J + t.j0, GJ, J, /*accumulate=*/t.r0 > 0, opts);
          } else if (want_x) {
            build_tile_kernel(w_ptr, a.const_data_ptr<acc_t>() + (s0 + i) * K,
                              f.const_data_ptr<acc_t>() + (s0 + i) * Cout, m + i * GJ, g, t, /*transposed=*/true,
                              kern + i * kern_elems, run.rows_scratch.data_ptr<scalar_t>(),
                              run.scratch.data_ptr<acc_t>(), /*ld=*/pn.rows, /*col0=*/t.r0 - pn.r0);
          }
          if (want_x && !gx_transposed && ti == pn.last_tile) {
            // gcols[g][panel cols] (+)= Wb[g][panel rows, cols]^T @ gy[g][panel rows]; the panels of
            // later rows of one group (G == 1) accumulate.
            grouped_gemm<scalar_t>(nG, Jt, P, pn.rows, kern + i * kern_elems, pn.rows, Jt * pn.rows,
                                   gy_s + i * Cout * P + (pn.g0 * Cog + pn.r0) * P, P, Cog * P,
                                   gcols + i * gcols_stride + t.g0 * J * P + t.j0 * P, P, J * P,
                                   /*accumulate=*/g.groups == 1 && pn.r0 > 0, opts);
          }
          if (want_params) {
            // Q = gy[g][rows] @ rows_x[g][:, cols]: (T x P) @ (P x Jt)
            grouped_gemm<scalar_t>(nG, T, Jt, P, gy_i, P, Cog * P, rows + i * GJ * P + t.g0 * J + t.j0, GJ, J,
                                   q + i * tile, Jt, T * Jt, /*accumulate=*/false, opts,
                                   /*in_column_blocks=*/q_in_blocks);
          }
        }
        if (!want_params) return;
        for (int64_t i = 0; i < n; ++i) {
          const int64_t b = s0 + i, slot = i * tile;
          reduce_tile_gradients(t, g, q + slot, a.const_data_ptr<acc_t>() + b * K, weight_acc.const_data_ptr<acc_t>(),
                                m + i * GJ, f.const_data_ptr<acc_t>() + b * Cout, run.scratch.data_ptr<acc_t>(),
                                gm + i * GJ, run.gbuf.data_ptr<acc_t>() + slot, grad_f.data_ptr<acc_t>() + b * Cout,
                                grad_a.data_ptr<acc_t>() + b * K);
        }
        // grad_W[:, tile] (+)= a[s0:s1]^T @ G        (K x n) @ (n x tile)
        // the first run into grad_W itself, the others into their partial (added below). A tile of
        // whole rows is one contiguous block of each W_k; a tile of part of J is a product per row.
        const bool first = run.s0 == c0;
        const int64_t seg = Jt == J ? tile : Jt;
        for (int64_t e = 0; e < tile; e += seg) {
          acc_t* dst = first ? grad_w_ptr + (row0 + e / Jt) * J + t.j0 : run.gw.data_ptr<acc_t>() + e;
          grouped_gemm<acc_t>(1, K, seg, n, run.a_t.const_data_ptr<acc_t>(), n, 0, run.gbuf.data_ptr<acc_t>() + e, tile,
                              0, dst, first ? N : max_tile, 0, /*accumulate=*/first, acc_opts);
        }
      });
      if (want_params && runs > 1) {
        // grad_W[:, tile] += the other runs' partials, in run order for every element; the columns
        // are split between the threads (one parallel region, not one ATen add per run: those were
        // ~6 % of a training step of the GTSRB network, more on a busy machine).
        // Element e of a partial is row e / Jt, column t.j0 + e % Jt of the tile.
        at::parallel_for(0, tile, kGradWAddGrain, [&](int64_t e0, int64_t e1) {
          for (int64_t r = 1; r < runs; ++r) {
            const acc_t* part = run_state[r].gw.const_data_ptr<acc_t>();
            for (int64_t k = 0; k < K; ++k) {
              for (int64_t e = e0; e < e1;) {
                const int64_t row = e / Jt, col = e % Jt, len = std::min(e1 - e, Jt - col);
                acc_t* __restrict__ dst = grad_w_ptr + k * N + (row0 + row) * J + t.j0 + col;
                const acc_t* __restrict__ src = part + k * max_tile + e;
#pragma omp simd
                for (int64_t l = 0; l < len; ++l) dst[l] += src[l];
                e += len;
              }
            }
          }
        });
      }
    }

    // 3. grad_x from gcols, and grad_m -> grad_ch, grad_s
    for_each_run([&](BackwardRun& run) {
      for (int64_t i = 0; i < run.n; ++i) {
        const int64_t b = run.s0 + i;
        if (gx_transposed) {  // gcols = (gcols^T)^T, into a sample's slot of im2row's buffer when it has one
          scalar_t* gc = (want_params ? run.rows : run.gcols_t).data_ptr<scalar_t>();
          transpose_into(run.gcols.data_ptr<scalar_t>() + i * GJ * P, P, GJ, gc, P);
          col2im(gc, g, grad_x.data_ptr<scalar_t>() + b * x_stride);
        } else if (want_x && !direct) {
          col2im(run.gcols.data_ptr<scalar_t>() + i * GJ * P, g, grad_x.data_ptr<scalar_t>() + b * x_stride);
        }
        if (want_params)
          reduce_scale_gradient(g, run.gm.const_data_ptr<acc_t>() + i * GJ,
                                ch.const_data_ptr<acc_t>() + b * g.in_channels, s.const_data_ptr<acc_t>() + b * taps,
                                grad_ch.data_ptr<acc_t>() + b * g.in_channels,
                                grad_s.data_ptr<acc_t>() + b * taps);
      }
    });
  }

  return results();
}

// ---- Convolution path: depthwise-like layers, and dense layers on large maps ---------------------
//
// When each group's kernel matrix is tiny (Cog * J <= kConvPathMaxMacs multiply-adds per output
// pixel: depthwise, channel multipliers, small groups), the im2col GEMMs above are all overhead:
// im2col expands x by kh*kw for 1xJ @ JxP products. Such layers instead run, for a chunk of n
// samples, the convolution primitive with groups = n*G on x viewed as (1, n*Cin, H, W) and the
// chunk's per-sample kernels (n*Cout, Cin/G, kh, kw) -- the official formulation, but on a bounded
// chunk: the per-sample kernels of a chunk, and its activations (the convolution returns a chunk of
// out or grad_x that is then copied), take at most kConvPathChunkBytes each.
// The float32 forward of other layers takes the convolution primitive too on maps of at least
// kSampleConvMinPixels output pixels (so that building each sample's whole kernel, K * Cout * J
// reads, stays small next to its Cout * J * P multiply-adds) whose im2col matrix is not x itself:
// the GEMM path writes and reads that matrix, kh*kw times the activations, for every sample, where
// oneDNN's direct convolution reads x itself. There each thread takes a run of samples and, c at a
// time (samples_per_call: about kSampleConvCallMacs multiply-adds per call, so small layers make
// fewer calls), builds their kernels into its own buffer and calls the convolution single-threaded
// with groups = c*G (forward_by_sample_convolutions). Layers with fewer than
// kSampleConvMinCallChannels input channels per group (one sample per call), and layers with
// groups (at most kSampleConvMaxGroupedCall samples per call), take it only when a sample's im2col
// matrix reaches kSampleConvMinIm2colBytes: oneDNN's convolution of 3 channels ran the stem-like
// B32 3->32 64x64 1.23-1.38x the GEMM path's time, and B128 32->64 32x32 with two groups (1.2 MB)
// ran 1.00x with two samples per call but 1.80x with four (8 groups of 16 channels). (2 cores, float32, the two
// forwards alternated in one process, fastest of 4 rounds, new/GEMM path: B32 32->32 112x112
// 0.43-0.46, B16 256->256 28x28 0.77, B64 128->128 32x32 0.77, B64 96->96 24x24 5x5 0.70, B128
// 32->32 48x48 0.70, B64 64->64 32x32 0.83-0.89, B16 64->64 56x56 stride 2 0.85-0.88, B64 128->128
// 20x20 0.90, B64 128->128 16x16 5x5 0.83-0.90, with one or two samples per call; calls sized by
// multiply-adds took these layers on smaller im2col matrices as well, against the build before:
// B64 16->16 32x32 0.80, B128 64->64 24x24 0.88, B128 32->64 24x24 0.91, B64 128->128 16x16 0.97,
// and 0.93-1.01 on the layers that took pairs before. On maps of
// 14x14 and less, where each sample's kernel is large next to its products, it was slower:
// 1.04-1.66.) 1x1 kernels without im2col, whose GEMM path multiplies x itself, take it on maps of
// kSampleConvMinDirectPixels to kSampleConvMaxDirectPixels pixels with at least
// kSampleConvMinDirectChannels input channels: there the products' long inner dimension (Wb @ x_b in
// blocks of 24 columns, each block reading Cin rows of x_b P floats apart) ran at 11 flop per TSC
// cycle on B32 1024->256 14x14, and oneDNN's 1x1 convolution was faster. (benchmarks/ab_env.py,
// ODCONV_CPU_CONV_PATH=always against the GEMM path, 8-15 rounds, forward: 0.68-0.70 on 1024->256 and
// 1024->512 on 14x14 (ResNet-50) and 768->192 on 17x17, 0.81 on 1024->256 12x12, 0.88 on 640->160
// 16x16, 0.91-0.95 on 512->512 16x16, 512->128 28x28 (B32 and B64) and 512->256 14x14; with fewer input
// channels 1.02-1.10 (256->256 and 128->512 on 28x28, 256->1024 on 14x14; but 256->128 32x32 0.56),
// on 56x56 maps 0.95-1.13, on 7x7 1.40.)
// Grouped layers of narrow groups (narrow_groups: at most kNarrowGroupMaxRows output channels per
// group, and both group widths multiples of kNarrowGroupChannelStep, oneDNN's channel block on AVX2;
// ResNeXt's 32 groups, RegNet's group widths of 8-32) take the path on any map, in float32: the GEMM
// path multiplies each group's Cog x J kernel on its own, products of 8-32 rows whose per-call
// overhead dominates, where oneDNN's grouped convolution blocks the groups' channels. The backward
// takes it at stride 1, the forward with at least kNarrowGroupMinGroupsForward groups or
// kNarrowGroupMinTapsForward taps, at most kNarrowGroupMaxRowsForwardAvx2 rows per group (without
// AVX-512; see below) and kNarrowGroupMinSampleMacs multiply-adds per sample, on batches of at least a
// sample per thread.
// (benchmarks/ab_env.py, ODCONV_CPU_CONV_PATH=always against never, 8 rounds, 2 threads, AVX2 (Zen 3),
// results/ab_narrow_groups_paths*_avx2_cpu.json: backward 0.31-0.84 on layers of 8-32 channel groups
// on 7x7-28x28 maps (B32 256->256 14x14 with 32 groups 0.33-0.39, 512->512 14x14 0.45, 1024->1024
// 7x7 0.75, 384->384 7x7 with 24 groups 0.53, 128->128 8x8 with 16 groups 0.42, two groups of 32
// 0.66-1.02, 5x5 and 7x7 kernels 0.29-0.50); but 1.05-1.47 where a group's width is not a multiple
// of 8 (12 or 20 channels), 0.81-1.62 with 64 or 128 rows per group, 0.97-1.31 at stride 2 (0.52-0.56
// with 8 rows per group), 1.30-2.06 with 4 input channels per group (one sample per call) and
// 1.67-1.85 on 1x1 kernels. Forward 0.64-0.93 with 16-32 groups (0.73-0.97 at stride 2), 0.51-0.70
// with 5x5 and 7x7 kernels and 8-16 groups; but 0.85-1.38 with 2-14 groups of 3x3 kernels, 1.05-1.11
// with 20-32 rows per group, 1.19-1.39 on samples of 0.6 M multiply-adds, 1.19 at batch 1. Held out
// of the choice of these bounds, auto against never (results/ab_narrow_groups_held_out_avx2_cpu.json):
// B64 256->256 14x14 with 16 groups forward 0.87 and backward 0.51, B32 384->384 14x14 with 16
// groups 0.84 and 0.63, B2 512->512 14x14 with 32 groups 0.84 and 0.55; backward of B32 512->512 7x7
// with 16 groups 0.77, of B128 64->64 12x12 with 4 groups 0.57, of B64 128->128 7x7 with 16 groups
// 0.44.) On AVX-512, where oneDNN's channel block is 16, the forward takes groups of 32 rows too
// (narrow_group_max_rows_forward; ODCONV_CPU_CONV_PATH=always against auto, 12 rounds, Zen 4 EPYC,
// results/ab_narrow_groups_32_rows_avx512_cpu.json: forward 0.64-0.73 on 1024->1024 7x7 with 32 groups
// at B8 and B32 (ResNeXt-50's last stage) and on B64 512->512 7x7 with 16, 0.78 on its stride-2 layer
// onto 7x7, 0.91-0.96 on 14x14 with 8 and 16 groups, 1.00 on 28x28; the other choices held there,
// results/ab_narrow_groups_avx512_cpu.json). Since the GEMM path's ragged tails have their own kernel
// (tail_columns_product) it is the faster one again for groups of 25-32 rows on maps of under
// kNarrowGroupMinPixelsForward32 pixels: ODCONV_CPU_CONV_PATH=never against auto, 12 rounds, Zen 4
// EPYC, results/ab_narrow_groups_32_rows_forward_tail_avx512_cpu.json: forward 0.76 and 0.86 on B8
// and B32 1024->1024 7x7 with 32 groups, 0.87 on B64 512->512 7x7 with 16, 0.63 on the stride-2
// 1024->1024 onto 7x7; 1.00-1.01 on 14x14 with 8 and 16 groups, 1.41 on 28x28.
// On AVX-512 the backward by columns (since 2026-12-07 with groups, see "The backward by columns")
// beats it on small maps with 16+ rows per group: the backward of narrow groups of at least
// kNarrowGroupMinRowsByColumns rows on maps of at most 4.5 pixels per row of a group stays on the
// GEMM path where it splits by columns (narrow_group_backward_by_columns). (benchmarks/ab_env.py,
// ODCONV_CPU_CONV_PATH=always against auto, 14 rounds, Zen 4 EPYC,
// results/ab_backward_columns_narrow_groups_avx512_cpu.json: backward 0.52 on B32 1024->1024 7x7
// with 32 groups (ResNeXt-50's last stage), 0.54 on 384->384 7x7 with 12, 0.77 on B64 512->512 7x7
// with 16, 0.83-0.85 on 512->512 8x8 with 32 and 10x10 with 16, 0.95 on 512->512 7x7 with 32 (16
// rows); left on the convolution path, 8 rows on 7x7 1.00 and 16 rows on 14x14 1.02 there, 1.15 and
// 1.38 on the GEMM path in the trials before, and 16 rows on 9x9 and 12x12, 32 rows on 12x12-16x16
// 0.89-1.01. Without AVX-512 (unmeasured against the columns) they keep the convolution path.)
// A batch smaller than the thread count (one image in the GUI) takes one convolution
// call on the chunk instead, which oneDNN spreads over the threads: at batch 1, against the GEMM
// path's split of output rows, 0.46 at 32->32 112x112, 0.69 at 32->32 48x48, 0.78-0.83 at 64->64
// 56x56 and 32x32 and on the 5x5 96->96 24x24 layer (same method, 5 rounds).
// The float32 backward of dense layers takes it where the map has at least kSampleConvMinPixels output
// pixels (more on AVX-512: sample_conv_min_pixels_backward; and im2col is not x itself, 1x1 unpadded
// kernels), and that of any layer whose im2col matrix reaches kConvPathIm2colBytes: the GEMM
// path streams im2row and gcols, kh*kw times the activations, through memory for every sample, where
// the convolution's backward reads and writes the activations only. On maps below the pixel rule's
// the im2col rule holds only with at least kConvPathIm2colMinPixelsPerRow output pixels per output
// channel of a group: the convolution path streams each sample's kernel and its gradient, (Cout/G) x J
// a group against the im2col matrix's J x P, so with many rows on a small map it moves more than the
// GEMM path saves. (benchmarks/ab_env.py, ODCONV_CPU_CONV_PATH=never against auto, 3-4 rounds, memory
// kept, Zen 4 EPYC, results/ab_conv_path_backward_im2col_small_maps_avx512_cpu*.json: backward 0.29-0.33
// on B8 4096->512 7x7 and 512->512 7x7 with 7x7 kernels, 0.52-0.55 with 32-64 rows on 7x7-12x12 maps,
// 0.64-0.87 on 14x14-16x16 layers of 48-1024 rows (grouped too), 0.86-0.94 with 24-32 rows on 10x10;
// kept on the convolution path: 8 rows on 16x16 (GEMM 2.52), 16 rows on 10x10 (1.06), 32 on 14x14 (1.09),
// 16 on 12x12 (0.95-0.98, the only losses, with 29-58 MB of im2col a sample).) There each thread takes a run of
// samples (backward_by_sample_convolutions, below), and a call covers as many samples as make
// kSampleConvCallMacs multiply-adds (small layers: fewer calls), one at a time when a group has fewer
// than kSampleConvMinCallChannels input channels (oneDNN's grouped convolution with 3 channels per
// group ran the stem-like layer 1.6x slower than one sample per call). The run's share of grad_W is a
// (K, N) buffer per thread beyond the first: when those would exceed a kSampleConvShareFraction-th of
// the batch's activations (x and out; deep layers: 9 MiB per thread for 256->256 3x3), or the batch is
// smaller than the thread count, the backward runs the chunks below instead. (With every share
// allowed, B16 256->256 28x28 took 0.87x the chunks' time, but its training step's peak memory rose
// from 0.93x to 1.15x the static convolution's, above the 1.1x this project holds to; bench_op.py
// --modes mem.) (2 cores, float32, ODCONV_CPU_CONV_PATH=never (GEMM path) against always, alternated
// in one process, fastest of 3 rounds, new/GEMM: B32 32->32 112x112 0.45 (the chunks 0.50), B32 64->64
// 56x56 0.66 (0.75), B16 256->256 28x28 0.83 (0.97), B64 96->96 24x24 5x5 0.79 (0.93), B128 32->32
// 48x48 0.81-0.86, B128 64->64 24x24 0.85-0.90, B64 64->64 32x32 0.89-0.97, B16 64->64 56x56 stride 2
// 0.88, B128 32->64 32x32 two groups 0.71, B64 16->16 32x32 0.71 (one sample per call 1.19-1.26), B128
// 32->64 24x24 0.89 (1.12-1.13), B32 3->32 64x64 0.62-0.71, B64 128->128 16x16 0.94-1.01, B64 64->128
// 32x32 stride 2 0.97-1.02; on smaller maps it was slower: 1.09 at 128->128 and 64->128 12x12 and
// 256->256 14x14, 1.32 at 6x6, 1.59 at 8x8; and at 1x1 on 32x32 1.47.)
// Buffers of the chunks, per chunk:
//   m     (n, G*J)         channel * spatial attention of each column
//   kern  (n*Cout, Cin/G, kh, kw) = f * m * A, the per-sample kernels (build_chunk_kernels)
//   q     (n*Cout, Cin/G, kh, kw) gradient w.r.t. kern (convolution_backward), then reduced as in
//                                 the header (reduce_chunk_gradients): grad_f, grad_m -> grad_ch /
//                                 grad_s, G -> grad_a, and into gagg (n, N) -> grad_W.
// Per thread, forward_by_sample_convolutions holds kern (c, Cout, J), m (c, G*J) and scratch (J) for
// a call of c samples; backward_by_sample_convolutions lists its own.
// ODCONV_CPU_CONV_PATH=auto (default) | always | never overrides the choice (tests use it to run
// both paths on the same layers).
constexpr int64_t kConvPathMaxMacs = 64;
constexpr int64_t kConvPathChunkBytes = 4 * 1024 * 1024;
constexpr int64_t kConvPathForwardOneChunkBytes = 8 * 1024 * 1024;  // see forward_conv_path
constexpr int64_t kConvPathIm2colBytes = 4 * 1024 * 1024;
constexpr int64_t kConvPathIm2colMinPixelsPerRow = 6;  // the backward on maps below the pixel rule: see above
constexpr int64_t kSampleConvMinIm2colBytes = 3 * 512 * 1024;
constexpr int64_t kSampleConvMinPixels = 256;
// The float32 forward of layers with few output channels (per group) whose im2col matrix reaches
// kConvPathIm2colBytes takes the convolution path on smaller maps too: the GEMM path writes
// and reads that matrix for every sample, and its products use each of its elements only Cout/G times,
// where building the sample's kernel (K * Cout * J) is cheap and oneDNN's convolution reads x itself.
// (benchmarks/ab_env.py, ODCONV_CPU_CONV_PATH=always against the GEMM path that auto took, 6 rounds,
// Zen 4 EPYC, two runs, results/ab_forward_conv_path_large_im2col_avx512_cpu.json and _b.json: forward
// 0.41-0.45 on B4 and B32 1024->16 12x12 with 7x7 kernels (29 MB of im2col a sample), 0.46 on 512->16
// 12x12 5x5, 0.55 on 1024->32 14x14 5x5 and 4096->16 7x7, 0.61 on 256->32 12x12 7x7, 0.64 on 512->64
// 14x14 5x5, 0.84-0.85 on 512->64 12x12 5x5, 2048->32 7x7 5x5 and 768->48 10x10 5x5, 0.67 with K = 1.
// Not taken: with more rows 0.74-1.00 on four layers of 96-512 rows but 1.14 on 1024->1024 14x14 and
// 1.60 on 1024->512 10x10 5x5; on 6x6 and 4x4 maps 1.33-2.70, with 64 rows. The rule against
// ODCONV_CPU_CONV_PATH=never, 8 rounds, _c.json: 0.43-0.58 on four of those layers, 0.84 and 0.94 on
// two more, 0.98-1.00 on 1024->64 6x6 and 1024->1024 14x14, which it leaves on the GEMM path.)
// Grouped layers likewise, by their rows per group (their GEMM path's tiles are whole groups):
// ODCONV_CPU_CONV_PATH=always against the GEMM path auto took, 5 rounds,
// results/ab_forward_conv_path_large_groups_avx512_cpu.json: forward 0.31 on 1024->128 with two groups
// on 14x14, 0.86 on 1024->256 with four (stride 2 from 28x28), 0.90
// on 1024->512 with eight (64 rows per group, 7.2 MB of im2col); not taken: 0.83 on 512->128 with two and
// 0.85 on 2048->256 with four onto 7x7 (3.6 MB), 0.99 on 256->64 with two (1.8 MB), and with 128 rows per
// group 0.37 on 1024->256 with two but 1.06 on 256->256 with two and 1.74 on 512->512 7x7 with two (_b.json,
// a first rule that took groups by the size of their kernel). The rule against ODCONV_CPU_CONV_PATH=never,
// 6 rounds, _c.json: 0.36-0.38 on two-group layers (1024->128 on 14x14, and from 28x28 with stride 2 and
// K = 1), 0.81 with four; 0.99-1.04 on those it leaves.
// Dense layers of 1-3 and 5-7 output channels (a head predicting RGB, a mask) stay off the convolution
// path whatever their map: oneDNN's convolution of so few channels ran several times the GEMM path's
// time (benchmarks/ab_env.py, ODCONV_CPU_CONV_PATH=never against auto, 4 rounds, Zen 4 EPYC,
// results/ab_conv_path_tiny_cout_avx512_cpu*.json: forward 0.43-0.73 and backward 0.30-0.66 on 1, 2, 3,
// 5 and 6 channels on 32x32 and 64x64 maps and 3 on 20x20 with 5x5 kernels; with 4 channels forward
// 1.55 and backward 0.84, with 8, 12 and 16 forward 1.25-2.51 and backward 1.05-3.00: those keep it).
// But not when a sample's im2col matrix is large: the GEMM path then streams it from memory for three
// multiply-adds an element (and a per-thread buffer of more than 64 MB comes from fresh pages on every
// call), where the convolution's work does not grow with it. Against ODCONV_CPU_CONV_PATH=always, 3
// rounds, B2-B8 layers of 1-6 channels on 28x28-112x112 maps with 3x3-7x7 kernels
// (results/ab_conv_path_few_rows_large_im2col_avx512_cpu*.json): forward 0.08-0.36 at 29-118 MB of
// im2col a sample, 0.56-0.68 at 13-15 MB, 1.00 at 9-12 MB and 1.5-1.7 at 5-7 MB; backward 0.13-0.31 at
// 50-118 MB, but 1.45-1.80 at 30-40 MB with 5x5 kernels (0.73 with 7x7) and 1.2-3.0 below.
constexpr int64_t kConvPathMinOddRows = 8;
constexpr int64_t kFewRowsConvPathIm2colBytesForward = 12 * 1024 * 1024;
constexpr int64_t kFewRowsConvPathIm2colBytesBackward = 48 * 1024 * 1024;
constexpr int64_t kSampleConvLargeIm2colMaxRows = 64;
constexpr int64_t kSampleConvLargeIm2colMinPixels = 49;
// On AVX-512 the backward of 16x16 maps stays on the GEMM path: ODCONV_CPU_CONV_PATH=never against
// auto, Zen 4 EPYC, 12 rounds (results/ab_conv_path_backward_16x16_avx512_cpu*.json): backward 0.78-0.80
// on B32 256->256 and 192->192 16x16, 0.93-0.94 on B64 128->128 16x16 (two runs), 1.02 on B128
// 64->64 16x16; but 1.12 on 18x18, 1.00 on 20x20, 1.08-1.12 on 24x24, 1.03 on 32x32.
constexpr int64_t kSampleConvMinPixelsBackwardAvx512 = 257;

inline int64_t sample_conv_min_pixels_backward() {
  return cpu_has_avx512() ? kSampleConvMinPixelsBackwardAvx512 : kSampleConvMinPixels;
}
constexpr int64_t kSampleConvGradBytes = 2 * 1024 * 1024;
constexpr int64_t kSampleConvCallMacs = 32 * 1000 * 1000;
constexpr int64_t kSampleConvMinCallChannels = 8;
constexpr int64_t kSampleConvMaxGroupedCall = 2;
constexpr int64_t kSampleConvShareFraction = 4;
constexpr int64_t kSampleConvMinDirectChannels = 512;  // 1x1 forward: see the header above
constexpr int64_t kSampleConvMinDirectPixels = 144;
constexpr int64_t kSampleConvMaxDirectPixels = 1024;
constexpr int64_t kNarrowGroupChannelStep = 8;      // narrow groups: see the header above
constexpr int64_t kNarrowGroupMaxRows = 32;
constexpr int64_t kNarrowGroupMinGroupsForward = 16;
constexpr int64_t kNarrowGroupMinTapsForward = 25;
constexpr int64_t kNarrowGroupMaxRowsForwardAvx2 = 24;  // without AVX-512 (oneDNN's channel block of 8)
constexpr int64_t kNarrowGroupMinPixelsForward32 = 196;  // AVX-512, groups of 25-32 rows: see the header

inline int64_t narrow_group_max_rows_forward(const Geometry& g) {
  return cpu_has_avx512() && g.out_pixels() >= kNarrowGroupMinPixelsForward32 ? kNarrowGroupMaxRows
                                                                              : kNarrowGroupMaxRowsForwardAvx2;
}
constexpr int64_t kNarrowGroupMinSampleMacs = 1000 * 1000;
constexpr int64_t kNarrowGroupMinRowsByColumns = 16;  // AVX-512: see the header above

bool depthwise_like(const Geometry& g) {
  return g.groups > 1 && g.out_per_group * g.cols_per_group() <= kConvPathMaxMacs;
}

// Grouped layers (not 1x1, not dilated) of narrow groups whose widths are multiples of
// kNarrowGroupChannelStep (ResNeXt, RegNet): see the header above.
bool narrow_groups(const Geometry& g) {
  return g.groups > 1 && !depthwise_like(g) && g.taps() > 1 && g.dil_h == 1 && g.dil_w == 1 &&
         g.in_per_group % kNarrowGroupChannelStep == 0 &&
         g.out_per_group % kNarrowGroupChannelStep == 0 && g.out_per_group <= kNarrowGroupMaxRows;
}

// Whether the float32 backward of narrow groups stays on the GEMM path, split by columns: on AVX-512,
// with at least kNarrowGroupMinRowsByColumns rows per group on maps of at most 4.5 pixels per row of
// a group (see the header above).
bool narrow_group_backward_by_columns(const Geometry& g) {
  return cpu_has_avx512() && g.out_per_group >= kNarrowGroupMinRowsByColumns &&
         2 * g.out_pixels() <= 9 * g.out_per_group && column_parts(g) > 0;
}

bool use_conv_path(const Geometry& g, at::ScalarType dtype, bool backward) {
  if (dtype != at::kFloat && dtype != at::kDouble) return false;  // the others keep their fp32 accumulation
  const std::string mode = path_override("ODCONV_CPU_CONV_PATH", {"auto", "always", "never"});
  if (mode != "auto") return mode == "always";
  if (g.groups == 1 && g.out_channels < kConvPathMinOddRows && g.out_channels % 4 != 0) {
    const int64_t large = backward ? kFewRowsConvPathIm2colBytesBackward : kFewRowsConvPathIm2colBytesForward;
    return im2col_bytes(g, c10::elementSize(dtype)) >= large;
  }
  if (depthwise_like(g)) return true;
  if (dtype == at::kFloat && narrow_groups(g)) {
    if (backward && g.stride_h == 1 && g.stride_w == 1 && !narrow_group_backward_by_columns(g)) return true;
    if (!backward && (g.groups >= kNarrowGroupMinGroupsForward || g.taps() >= kNarrowGroupMinTapsForward) &&
        g.out_per_group <= narrow_group_max_rows_forward(g) &&
        g.batch >= at::get_num_threads() &&
        g.out_channels * g.cols_per_group() * g.out_pixels() >= kNarrowGroupMinSampleMacs)
      return true;
  }
  // (A 1x1 kernel with unit stride and no padding has no im2col matrix to stream: its backward keeps the GEMM
  // path whatever the size of x. ODCONV_CPU_CONV_PATH=never against auto, 3 rounds, two runs,
  // results/ab_conv_path_backward_identity_im2col_avx512_cpu*.json: backward 0.36-0.40 on B16 1024->32 32x32
  // and B64 768->32 56x56 with 8 groups, 0.66-0.85 on grouped layers of 32-64 rows per group on 32x32 and
  // 48x48, 0.91-1.00 on dense layers of 64-512 rows, 1.00-1.10 on 768->768 56x56 with 8 groups.)
  if (backward)
    return !g.im2col_is_identity() &&
           ((im2col_bytes(g, c10::elementSize(dtype)) >= kConvPathIm2colBytes &&
             (g.out_pixels() >= sample_conv_min_pixels_backward() ||
              g.out_pixels() >= kConvPathIm2colMinPixelsPerRow * g.out_per_group)) ||
            (dtype == at::kFloat && g.out_pixels() >= sample_conv_min_pixels_backward()));
  if (dtype == at::kFloat && g.im2col_is_identity())
    return g.groups == 1 && g.in_channels >= kSampleConvMinDirectChannels &&
           g.out_pixels() >= kSampleConvMinDirectPixels && g.out_pixels() <= kSampleConvMaxDirectPixels;
  if (dtype == at::kFloat && im2col_bytes(g, sizeof(float)) >= kConvPathIm2colBytes &&
      g.out_per_group <= kSampleConvLargeIm2colMaxRows && g.out_pixels() >= kSampleConvLargeIm2colMinPixels)
    return true;
  return dtype == at::kFloat && g.out_pixels() >= kSampleConvMinPixels &&
         ((g.groups == 1 && g.in_per_group >= kSampleConvMinCallChannels) ||
          im2col_bytes(g, sizeof(float)) >= kSampleConvMinIm2colBytes);
}

// Whether the backward on the convolution path gives each thread a run of samples (rather than
// chunks of samples through multi-threaded convolutions): see above.
bool backward_by_samples(const Geometry& g, int64_t elem_size) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  if (depthwise_like(g) || g.batch < threads) return false;
  const int64_t shares = (threads - 1) * g.kernel_num * g.kernel_numel() * elem_size;
  return shares * kSampleConvShareFraction <= activation_bytes(g, elem_size);
}

// Samples per convolution call of a thread (forward_by_sample_convolutions and
// backward_by_sample_convolutions): about kSampleConvCallMacs multiply-adds, at most `most`; one
// when a group has few input channels.
int64_t samples_per_call(const Geometry& g, int64_t most) {
  if (g.in_per_group < kSampleConvMinCallChannels) return 1;
  const int64_t macs = std::max<int64_t>(1, g.out_channels * g.cols_per_group() * g.out_pixels());
  return std::clamp<int64_t>((kSampleConvCallMacs + macs - 1) / macs, 1, most);
}

// Whether one chunk holds the whole (non-empty) batch: its convolution's output and grad_x are then the op's.
inline bool single_chunk(const Geometry& g, int64_t chunk) { return g.batch > 0 && chunk >= g.batch; }

// Samples per chunk of the convolution path: kConvPathChunkBytes of activations or kernels; the
// forward takes the whole batch up to kConvPathForwardOneChunkBytes of activations (see forward_conv_path).
int64_t conv_path_chunk(const Geometry& g, const at::Tensor& x, bool forward) {
  const int64_t activations = std::max(g.in_channels * g.height * g.width, g.out_channels * g.out_pixels());
  if (forward && g.batch * activations * x.element_size() <= kConvPathForwardOneChunkBytes)
    return std::max<int64_t>(1, g.batch);
  const int64_t per_sample = std::max<int64_t>(1, std::max(g.kernel_numel(), activations) * (int64_t)x.element_size());
  return std::max<int64_t>(1, std::min(g.batch, kConvPathChunkBytes / per_sample));
}

// oneDNN sizes the work split of some primitives when it creates them (for dnnl_get_max_threads()
// threads) but, called inside a parallel region, runs only the first thread's share: the
// backward-weights convolution of a 128->128 3x3 layer on 16x16 then left part of its output
// unwritten (and a kernel that synchronises its threads waited for them forever). Workers that call
// convolutions hold this guard, under which the OpenMP thread count is one, so the primitives they
// create split the work for one thread (oneDNN keys its primitive cache by thread count). It first
// lets ATen set the thread up: a thread's first ATen call sets its OpenMP thread count to torch's,
// which would undo the guard on threads new to ATen. It restores the count on exit: a parallel_for
// of one task runs on the calling thread itself. (Without OpenMP, oneDNN is not nested: no guard.)
class OneThreadPrimitives {
 public:
#ifdef _OPENMP
  OneThreadPrimitives() {
    at::get_num_threads();  // ATen's set-up of this thread, if it has not run yet
    saved_ = omp_get_max_threads();
    omp_set_num_threads(1);
  }
  ~OneThreadPrimitives() { omp_set_num_threads(saved_); }

 private:
  int saved_ = 1;
#endif
};

// for_each_batch_range for workers that call ATen convolutions. Worker threads do not inherit the
// caller's thread-local state: without it the convolutions would dispatch through autograd again
// (recording a graph when x requires grad) and, under torch.inference_mode(), writing into the
// outputs would be refused. They hold OneThreadPrimitives as well.
template <typename F>
void for_each_batch_range_calling_convolutions(int64_t batch, const F& body) {
  const at::ThreadLocalState caller_state;
  for_each_batch_range(batch, [&](int64_t r, int64_t b_begin, int64_t b_end) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    const OneThreadPrimitives one_thread;
    body(r, b_begin, b_end);
  });
}

// Rows [r0, r1) of the n*Cout rows of the kernels Wb of the samples [b0, b0 + n), into kern (n, G, Cog,
// J) -- the layout of a convolution weight of n*G groups -- in one pass over each row of W
// (aggregate_row); m holds the samples' input scales (n, G*J).
template <typename scalar_t>
void build_kernel_rows(const scalar_t* weight, const scalar_t* f, const scalar_t* a, const scalar_t* m,
                       const Geometry& g, int64_t b0, int64_t r0, int64_t r1, scalar_t* kern) {
  const int64_t Cog = g.out_per_group, J = g.cols_per_group(), GJ = g.groups * J, K = g.kernel_num;
  const int64_t Cout = g.out_channels;
  std::vector<scalar_t> scratch(J);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i = r / Cout, o = r % Cout, b = b0 + i;
    aggregate_row_dispatch(weight + o * J, g.kernel_numel(), a + b * K, K, J, f[b * Cout + o],
                           m + i * GJ + (o / Cog) * J, scratch.data(), kern + r * J);
  }
}

// The input scales of the samples [b0, b0 + n) into m (n, G*J) (input_scale of each).
template <typename scalar_t>
void input_scales(const scalar_t* ch, const scalar_t* s, const Geometry& g, int64_t b0, int64_t n, scalar_t* m) {
  const int64_t GJ = g.groups * g.cols_per_group();
  for (int64_t i = 0; i < n; ++i) input_scale(ch + (b0 + i) * g.in_channels, s + (b0 + i) * g.taps(), g, m + i * GJ);
}

// Wb of the samples [b0, b0 + n) into kern (n, G, Cog, J) and their input scales into m (n, G*J), on
// the calling thread: the per-sample paths' workers. (Splitting their rows with a nested
// at::parallel_for gave a wrong grad_W at 3 threads, test_sample_convolutions_match_reference,
// presumably by undoing OneThreadPrimitives.)
template <typename scalar_t>
void build_sample_kernels(const scalar_t* weight, const scalar_t* ch, const scalar_t* f, const scalar_t* s,
                          const scalar_t* a, const Geometry& g, int64_t b0, int64_t n, scalar_t* kern, scalar_t* m) {
  input_scales(ch, s, g, b0, n, m);
  build_kernel_rows(weight, f, a, m, g, b0, 0, n * g.out_channels, kern);
}

// The same for a chunk, its rows split between threads. The chunks built their kernels on one
// thread through a matrix product and two elementwise products, each a pass over the kernel into a
// new tensor, and the convolution's output was then copied even when one chunk held the batch.
// (benchmarks/ab_builds.py, 5 rounds, results/ab_chunk_kernels_cpu.json: forward 0.74 on B64 128
// depthwise 16x16, 0.92-1.00 at batch 1 on 64->64 32x32, 32->32 48x48 and 64->64 24x24; against
// F.conv2d, alternated in fresh processes, the batch-1 forward of these three layers went from
// 1.22-1.33x to 1.06-1.16x.)
template <typename scalar_t>
void build_chunk_kernels(const at::Tensor& weight, const at::Tensor& ch, const at::Tensor& f, const at::Tensor& s,
                         const at::Tensor& a, const Geometry& g, int64_t b0, int64_t n, scalar_t* kern, scalar_t* m) {
  const int64_t J = g.cols_per_group();
  input_scales(ch.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), g, b0, n, m);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, J));
  at::parallel_for(0, n * g.out_channels, grain, [&](int64_t r0, int64_t r1) {
    build_kernel_rows(weight.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), m,
                      g, b0, r0, r1, kern);
  });
}

// The parameter gradients of the samples [b0, b0 + n) of a chunk from q (n, G, Cog, J), their
// gradients w.r.t. Wb: grad_f, grad_a, grad_ch and grad_s of each sample, and G into gagg (n, N),
// one pass over each sample's q (reduce_tile_gradients), the samples split between threads. m holds
// their input scales (n, G*J). This was a chain of ATen products and sums, eight passes and as
// many chunk-sized temporaries (benchmarks/ab_builds.py, 5 rounds, results/ab_chunk_reductions_cpu.json:
// backward 0.87 on B16 256->256 28x28, 0.88-0.93 at batch 1; peak memory of a training step, bench_op
// --modes mem, 47.8 -> 41.0 MiB and 2.1 -> 1.7 MiB).
template <typename scalar_t>
void reduce_chunk_gradients(const at::Tensor& q, const at::Tensor& weight, const at::Tensor& ch, const at::Tensor& f,
                            const at::Tensor& s, const at::Tensor& a, const at::Tensor& m, const Geometry& g,
                            int64_t b0, int64_t n, scalar_t* gagg, at::Tensor& grad_ch, at::Tensor& grad_f,
                            at::Tensor& grad_s, at::Tensor& grad_a) {
  static_assert(std::is_same_v<at::opmath_type<scalar_t>, scalar_t>, "float32 and float64 only");
  const int64_t J = g.cols_per_group(), GJ = g.groups * J, N = g.kernel_numel(), K = g.kernel_num;
  const Tile whole{0, g.groups, 0, g.out_per_group, 0, J};
  at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
    std::vector<scalar_t> gm(GJ), scratch(J);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = b0 + i;
      std::fill(gm.begin(), gm.end(), scalar_t(0));
      reduce_tile_gradients(whole, g, q.const_data_ptr<scalar_t>() + i * N, a.const_data_ptr<scalar_t>() + b * K,
                            weight.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>() + i * GJ,
                            f.const_data_ptr<scalar_t>() + b * g.out_channels, scratch.data(), gm.data(), gagg + i * N,
                            grad_f.data_ptr<scalar_t>() + b * g.out_channels, grad_a.data_ptr<scalar_t>() + b * K);
      reduce_scale_gradient(g, gm.data(), ch.const_data_ptr<scalar_t>() + b * g.in_channels,
                            s.const_data_ptr<scalar_t>() + b * g.taps(),
                            grad_ch.data_ptr<scalar_t>() + b * g.in_channels,
                            grad_s.data_ptr<scalar_t>() + b * g.taps());
    }
  });
}

// out[b] = conv(x[b], Wb) for every sample, each thread a run of samples, samples_per_call at a time.
template <typename scalar_t>
void forward_by_sample_convolutions(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& ch,
                                    const at::Tensor& f, const at::Tensor& s, const at::Tensor& a, const Geometry& g,
                                    at::Tensor& out) {
  static_assert(std::is_same_v<at::opmath_type<scalar_t>, scalar_t>, "float32 and float64 only");
  const int64_t Cout = g.out_channels, Cin = g.in_channels, N = g.kernel_numel(), GJ = g.groups * g.cols_per_group();
  const int64_t per_call = samples_per_call(g, g.groups == 1 ? kMaxSamplesPerThread : kSampleConvMaxGroupedCall);
  for_each_batch_range_calling_convolutions(g.batch, [&](int64_t, int64_t b_begin, int64_t b_end) {
    at::Tensor kern = at::empty({per_call * N}, x.options()), m = at::empty({per_call * GJ}, x.options());
    for (int64_t b0 = b_begin; b0 < b_end; b0 += per_call) {
      const int64_t n = std::min(per_call, b_end - b0);
      build_sample_kernels(weight.const_data_ptr<scalar_t>(), ch.const_data_ptr<scalar_t>(),
                           f.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), g,
                           b0, n, kern.data_ptr<scalar_t>(), m.data_ptr<scalar_t>());
      const at::Tensor y = at::convolution(
          x.narrow(0, b0, n).view({1, n * Cin, g.height, g.width}),
          kern.narrow(0, 0, n * N).view({n * Cout, g.in_per_group, g.kernel_h, g.kernel_w}), std::nullopt,
          {g.stride_h, g.stride_w}, {g.pad_h, g.pad_w}, {g.dil_h, g.dil_w}, false, {0, 0}, n * g.groups);
      out.narrow(0, b0, n).view({1, n * Cout, g.out_h, g.out_w}).copy_(y);
    }
  });
}

// The backward of the same layers, each thread a run of samples. Per call of c samples
// (samples_per_call): their kernels Wb are built into the thread's buffer, and
// convolution_backward (single-threaded, groups = c*G) gives their grad_x and Q, the gradient w.r.t.
// each Wb as (Cout, Cin/G, kh, kw) -- the (G, Cog, J) layout of the GEMM path's tiles -- reduced at
// once as there (reduce_tile_gradients over the whole kernel: grad_f, grad_m, grad_a, and G into the
// run's buffer). Every n samples (G of n samples within kSampleConvGradBytes), the run's share of
// grad_W gets a^T @ G, (K x n) @ (n x N); run 0's share is grad_W itself, the others' are added in
// run order at the end (deterministic for a thread count). Per thread: kern (c, N), m (c, G*J),
// gm (G*J), gbuf (n, N), scratch (J), what the convolution returns (grad_x and Q of c samples), and
// for runs after the first a (K, N) share of grad_W.
template <typename scalar_t>
void backward_by_sample_convolutions(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& ch, const at::Tensor& f, const at::Tensor& s,
                                     const at::Tensor& a, const Geometry& g, bool want_x, bool want_params,
                                     at::Tensor& grad_x, at::Tensor& grad_w, at::Tensor& grad_ch, at::Tensor& grad_f,
                                     at::Tensor& grad_s, at::Tensor& grad_a) {
  static_assert(std::is_same_v<at::opmath_type<scalar_t>, scalar_t>, "float32 and float64 only");
  const int64_t Cout = g.out_channels, Cin = g.in_channels, J = g.cols_per_group(), K = g.kernel_num;
  const int64_t N = g.kernel_numel(), GJ = g.groups * J, taps = g.taps(), B = g.batch;
  const int64_t per_product = samples_per_run(N * (int64_t)sizeof(scalar_t), kSampleConvGradBytes);
  const int64_t per_call = samples_per_call(g, per_product);
  const Tile whole{0, g.groups, 0, g.out_per_group, 0, J};
  const auto opts = x.options();
  const at::Tensor a_t = want_params ? a.t().contiguous() : at::Tensor();  // (K x B)
  std::vector<at::Tensor> shares(batch_ranges(B));                         // of grad_W, (K, N)
  const scalar_t *w_ptr = weight.const_data_ptr<scalar_t>(), *a_ptr = a.const_data_ptr<scalar_t>();
  const scalar_t *f_ptr = f.const_data_ptr<scalar_t>(), *ch_ptr = ch.const_data_ptr<scalar_t>();
  const scalar_t* s_ptr = s.const_data_ptr<scalar_t>();
  for_each_batch_range_calling_convolutions(B, [&](int64_t r, int64_t b_begin, int64_t b_end) {
    at::Tensor kern = at::empty({per_call * N}, opts), m = at::empty({per_call * GJ}, opts);
    at::Tensor scratch = at::empty({J}, opts), gm, gbuf;
    if (want_params) {
      gm = at::empty({GJ}, opts);
      gbuf = at::empty({per_product, N}, opts);
      shares[r] = r == 0 ? grad_w : at::empty({K, N}, opts);
    }
    for (int64_t b0 = b_begin; b0 < b_end; b0 += per_product) {
      const int64_t n = std::min(per_product, b_end - b0);
      for (int64_t c0 = b0; c0 < b0 + n; c0 += per_call) {
        const int64_t nc = std::min(per_call, b0 + n - c0);
        build_sample_kernels(w_ptr, ch_ptr, f_ptr, s_ptr, a_ptr, g, c0, nc, kern.data_ptr<scalar_t>(),
                             m.data_ptr<scalar_t>());
        auto [gx, q, unused] = at::convolution_backward(
            gy.narrow(0, c0, nc).view({1, nc * Cout, g.out_h, g.out_w}),
            x.narrow(0, c0, nc).view({1, nc * Cin, g.height, g.width}),
            kern.narrow(0, 0, nc * N).view({nc * Cout, g.in_per_group, g.kernel_h, g.kernel_w}), std::nullopt,
            {g.stride_h, g.stride_w}, {g.pad_h, g.pad_w}, {g.dil_h, g.dil_w}, false, {0, 0}, nc * g.groups,
            {want_x, want_params, false});
        if (want_x) grad_x.narrow(0, c0, nc).view({1, nc * Cin, g.height, g.width}).copy_(gx);
        if (!want_params) continue;
        const at::Tensor q_c = q.contiguous();
        for (int64_t i = 0; i < nc; ++i) {
          const int64_t b = c0 + i;
          scalar_t* gm_ptr = gm.data_ptr<scalar_t>();
          std::fill(gm_ptr, gm_ptr + GJ, scalar_t(0));
          reduce_tile_gradients(whole, g, q_c.const_data_ptr<scalar_t>() + i * N, a_ptr + b * K, w_ptr,
                                m.const_data_ptr<scalar_t>() + i * GJ, f_ptr + b * Cout, scratch.data_ptr<scalar_t>(),
                                gm_ptr, gbuf.data_ptr<scalar_t>() + (b - b0) * N,
                                grad_f.data_ptr<scalar_t>() + b * Cout, grad_a.data_ptr<scalar_t>() + b * K);
          reduce_scale_gradient(g, gm.const_data_ptr<scalar_t>(), ch_ptr + b * Cin, s_ptr + b * taps,
                                grad_ch.data_ptr<scalar_t>() + b * Cin, grad_s.data_ptr<scalar_t>() + b * taps);
        }
      }
      if (want_params) {
        // share (+)= a[b0:b0+n]^T @ G    (K x n) @ (n x N)
        const at::Tensor a_n = at::from_blob(const_cast<scalar_t*>(a_t.const_data_ptr<scalar_t>()) + b0, {K, n},
                                             {B, 1}, opts);
        if (b0 == b_begin)
          at::mm_out(shares[r], a_n, gbuf.narrow(0, 0, n));
        else
          shares[r].addmm_(a_n, gbuf.narrow(0, 0, n));
      }
    }
  });
  if (want_params)
    for (size_t r = 1; r < shares.size(); ++r) grad_w.add_(shares[r]);
}

at::Tensor forward_conv_path(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& ch_in,
                             const at::Tensor& f_in, const at::Tensor& s_in, const at::Tensor& a_in,
                             const Geometry& g) {
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor ch = ch_in.contiguous(), f = f_in.contiguous(), s = s_in.contiguous(), a = a_in.contiguous();
  const auto new_output = [&] {
    at::Tensor out = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, x.options());
    advise_huge_pages(out);
    return out;
  };
  if (!depthwise_like(g) && g.batch >= at::get_num_threads()) {
    at::Tensor out = new_output();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "odconv2d_cpu_sample_convolutions", [&] {
      forward_by_sample_convolutions<scalar_t>(x, weight, ch, f, s, a, g, out);
    });
    return out;
  }
  // Allocated only when there is more than one chunk: one chunk's convolution output is the op's. An
  // unused output allocated first still moved glibc's heap: freed at the end with the chunk's buffers,
  // it left enough free memory at the top for the heap to be trimmed and grown again at every call
  // (strace: two brk pairs per call; perf_shares.py: 56 % of the CPU time of a B32 512->512 7x7
  // depthwise forward in the kernel's page faults. benchmarks/ab_builds.py, 8 rounds of 5 calls,
  // results/ab_conv_path_one_chunk_avx2_cpu.json: forward 0.55 and backward 0.54 on that layer, whose
  // grad_x is now the convolution's too, 0.42 forward at B8 128->128 16x16 depthwise; 0.95-1.12 on
  // the layers of more than one chunk, whose code did not change but for the buffers below.)
  at::Tensor out;
  // The forward takes the whole batch in one chunk where its activations are at most
  // kConvPathForwardOneChunkBytes: no copy of the chunks' outputs into the op's. (A temporary switch,
  // benchmarks/ab_env.py, 30 rounds, forward: 0.75-0.78 on B32 960->960 7x7, B64 128->128 16x16 and
  // B32 256->256 14x14 depthwise, 6-8 MiB. An earlier trial of one chunk for any batch had 12.8 MB
  // still faster, 16 MB 2.7x and 32 MB 4.3x slower, presumably once the activations and oneDNN's
  // reordered copies no longer fit the 32 MB L3. The backward keeps its chunks: one chunk made it
  // 2.0x slower.)
  const int64_t chunk = conv_path_chunk(g, x, /*forward=*/true);
  if (!single_chunk(g, chunk)) out = new_output();
  // the chunks' kernels and input scales, one buffer each for all chunks
  const int64_t most = std::min(chunk, g.batch);
  const at::Tensor kern_buf = at::empty({most * g.kernel_numel()}, x.options());
  const at::Tensor m_buf = at::empty({most * g.groups * g.cols_per_group()}, x.options());
  for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
    const int64_t n = std::min(chunk, g.batch - b0);
    const at::Tensor kern = kern_buf.narrow(0, 0, n * g.kernel_numel())
                                .view({n * g.out_channels, g.in_per_group, g.kernel_h, g.kernel_w});
    const at::Tensor m = m_buf.narrow(0, 0, n * g.groups * g.cols_per_group()).view({n, g.groups * g.cols_per_group()});
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "odconv2d_cpu_chunk_kernels", [&] {
      build_chunk_kernels<scalar_t>(weight, ch, f, s, a, g, b0, n, kern.data_ptr<scalar_t>(), m.data_ptr<scalar_t>());
    });
    const at::Tensor y = at::convolution(
        x.narrow(0, b0, n).view({1, n * g.in_channels, g.height, g.width}), kern, std::nullopt,
        {g.stride_h, g.stride_w}, {g.pad_h, g.pad_w}, {g.dil_h, g.dil_w}, false, {0, 0}, n * g.groups);
    // one chunk (a single image in the GUI, depthwise layers of small maps): its convolution's output is the op's
    if (n == g.batch) return y.contiguous().view({g.batch, g.out_channels, g.out_h, g.out_w});
    out.narrow(0, b0, n).view({1, n * g.out_channels, g.out_h, g.out_w}).copy_(y);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_conv_path(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& ch_in,
    const at::Tensor& f_in, const at::Tensor& s_in, const at::Tensor& a_in, const Geometry& g, bool want_x,
    bool want_params) {
  const at::Tensor gy = grad_out_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor ch = ch_in.contiguous(), f = f_in.contiguous(), s = s_in.contiguous(), a = a_in.contiguous();
  const int64_t G = g.groups, J = g.cols_per_group(), K = g.kernel_num;
  const int64_t N = g.kernel_numel(), taps = g.taps(), Cin = g.in_channels, Cout = g.out_channels;
  const bool by_sample = backward_by_samples(g, x.element_size());
  const int64_t chunk = conv_path_chunk(g, x, /*forward=*/false);
  // One chunk's grad_x is the convolution's (below): no buffer then (see forward_conv_path).
  at::Tensor grad_x;
  if (!want_x) {
    grad_x = at::zeros_like(x);
  } else if (by_sample || !single_chunk(g, chunk)) {
    grad_x = at::empty_like(x);
    advise_huge_pages(grad_x);
  }
  // by_sample writes grad_W with its first product
  at::Tensor grad_w = at::empty({K, N}, weight.options());
  advise_huge_pages(grad_w);
  if (!(by_sample && want_params)) grad_w.zero_();
  at::Tensor grad_ch = at::zeros({g.batch, Cin}, x.options());
  at::Tensor grad_f = at::zeros({g.batch, Cout}, x.options());
  at::Tensor grad_s = at::zeros({g.batch, taps}, x.options());
  at::Tensor grad_a = at::zeros({g.batch, K}, x.options());
  if (by_sample && (want_x || want_params)) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "odconv2d_backward_cpu_sample_convolutions", [&] {
      backward_by_sample_convolutions<scalar_t>(gy, x, weight, ch, f, s, a, g, want_x, want_params, grad_x, grad_w,
                                                grad_ch, grad_f, grad_s, grad_a);
    });
    return std::make_tuple(grad_x, grad_w.view(weight.sizes()), grad_ch, grad_f,
                           grad_s.view({g.batch, g.kernel_h, g.kernel_w}), grad_a);
  }
  const int64_t most = std::min(chunk, g.batch);
  const at::Tensor kern_buf = at::empty({most * N}, x.options()), m_buf = at::empty({most * G * J}, x.options());
  for (int64_t b0 = 0; b0 < g.batch && (want_x || want_params); b0 += chunk) {
    const int64_t n = std::min(chunk, g.batch - b0);
    const at::Tensor kern = kern_buf.narrow(0, 0, n * N).view({n * Cout, g.in_per_group, g.kernel_h, g.kernel_w});
    const at::Tensor m = m_buf.narrow(0, 0, n * G * J).view({n, G * J});
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "odconv2d_backward_cpu_chunk_kernels", [&] {
      build_chunk_kernels<scalar_t>(weight, ch, f, s, a, g, b0, n, kern.data_ptr<scalar_t>(), m.data_ptr<scalar_t>());
    });
    auto [gx, q, unused] = at::convolution_backward(
        gy.narrow(0, b0, n).view({1, n * Cout, g.out_h, g.out_w}),
        x.narrow(0, b0, n).view({1, n * Cin, g.height, g.width}), kern, std::nullopt,
        {g.stride_h, g.stride_w}, {g.pad_h, g.pad_w}, {g.dil_h, g.dil_w}, false, {0, 0}, n * G,
        {want_x, want_params, false});
    if (want_x && n == g.batch)
      grad_x = gx.contiguous().view(x.sizes());
    else if (want_x)
      grad_x.narrow(0, b0, n).view({1, n * Cin, g.height, g.width}).copy_(gx);
    if (!want_params) continue;
    // per sample, one pass over Q (its gradient w.r.t. Wb) for grad_f, grad_a, grad_m and G, then
    // grad_W += a^T @ G for the chunk
    // G, the gradient w.r.t. A, in the chunk's kernels' buffer: the convolution is done with them (one
    // chunk-sized allocation less per chunk; the peak of a training step, inside the convolution, is unchanged)
    at::Tensor gagg = kern.view({n, N});
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "odconv2d_backward_cpu_chunk_reductions", [&] {
      reduce_chunk_gradients<scalar_t>(q.contiguous(), weight, ch, f, s, a, m, g, b0, n, gagg.data_ptr<scalar_t>(),
                                       grad_ch, grad_f, grad_s, grad_a);
    });
    grad_w.addmm_(a.narrow(0, b0, n).t(), gagg);
  }
  return std::make_tuple(grad_x, grad_w.view(weight.sizes()), grad_ch, grad_f,
                         grad_s.view({g.batch, g.kernel_h, g.kernel_w}), grad_a);
}

// bfloat16 and float16 take float32 kernels on float32 copies where 16-bit products are slower.
bool is_16bit(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf; }
// ---- One kernel: the batch's product (K = 1) -----------------------------------------------------
// With one kernel a sample's Wb[o, j] = a_b f_b[o] W[o, j] m_b[j] (m = channel x spatial attention of
// column j), so
//   out_b[o, p] = a_b f_b[o] sum_j W[o, j] (m_b[j] cols_b[j, p])
// with the same W for every sample: the scaled im2col matrices of n samples side by side make one
// product per group, (Cout/G x Jg) @ (Jg x n*P), as a static im2col convolution multiplies, where the
// per-sample path multiplies n products of P columns (16 on a 4x4 map) and builds each sample's Wb.
// Per thread, for a run of n samples (shared_kernel_samples):
//   cols  (G*Jg, n*P)  the samples' im2col matrices, row j scaled by m_b[j], sample i in columns [i*P, (i+1)*P)
//   tmp   (G*Jg, P)    one sample's im2col matrix
//   z     (Cout, n*P)  the product; out_b[o, :] = a_b f_b[o] z[o, i*P : (i+1)*P]
//   m     (G*Jg)       one sample's input scales
// ODCONV_CPU_SHARED_KERNEL=auto (default: K = 1, a batch of at least the thread count, maps of at most
// kSharedKernelMaxPixels pixels) | always (K = 1) | never overrides the choice.
// The per-sample path is as fast or faster from 6x6 maps up, where its products have 36+ columns and
// its folded and transposed variants apply: auto takes this one on maps of at most
// kSharedKernelMaxPixels pixels. (benchmarks/ab_env.py, ODCONV_CPU_SHARED_KERNEL=never against auto,
// Zen 4 EPYC, 8 rounds, results/ab_forward_shared_kernel_avx512_cpu.json: forward 0.61 on B64 512->512
// 2x2, 0.66 on B64 1024->256 1x1 7x7, 0.73 on B64 512->512 4x4, 0.82 on B64 256->256 3x3, 0.87 on
// 256->512 4x4, 0.91 on B32 512->512 7x7; 0.97-1.03 on 6x6, 5x5, a grouped 7x7 and stride 2 onto 7x7.
// A run before it with every K = 1 layer on this path, 5 rounds, table not kept: 1.02-1.17 on B32 256->256
// 8x8, 0.99-1.02 on 6x6, 12x12 and 14x14; blocks of 32 x 1024 were within 0.01-0.04 of 64 x 512 and
// 128 x 256 but on 8x8.)
constexpr int64_t kSharedKernelColumns = 512;                 // columns (n*P) of a run's product, at most
constexpr int64_t kSharedKernelThreadBytes = 4 * 1024 * 1024;  // a run's cols buffer, at most
constexpr int64_t kSharedKernelRows = 32;
constexpr int64_t kSharedKernelInner = 1024;
constexpr int64_t kSharedKernelMaxPixels = 49;

bool use_shared_kernel_forward(const Geometry& g, at::ScalarType dtype) {
  if (g.kernel_num != 1 || (dtype != at::kFloat && dtype != at::kDouble)) return false;
  const std::string mode = path_override("ODCONV_CPU_SHARED_KERNEL", {"auto", "always", "never"});
  if (mode != "auto") return mode == "always";
  return g.batch >= at::get_num_threads() && g.out_pixels() <= kSharedKernelMaxPixels;
}

int64_t shared_kernel_samples(const Geometry& g, int64_t elem_size) {
  const int64_t P = std::max<int64_t>(1, g.out_pixels());
  const int64_t per_sample = g.groups * g.cols_per_group() * P * elem_size;
  return std::max<int64_t>(1, std::min(kSharedKernelColumns / P, kSharedKernelThreadBytes / per_sample));
}

template <typename scalar_t>
at::Tensor forward_shared_kernel(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& ch_in,
                                 const at::Tensor& f_in, const at::Tensor& s_in, const at::Tensor& a_in,
                                 const Geometry& g) {
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor ch = ch_in.contiguous(), f = f_in.contiguous(), s = s_in.contiguous(), a = a_in.contiguous();
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, x.options());
  advise_huge_pages(out);
  if (g.batch == 0) return out;
  const int64_t P = g.out_pixels(), Cout = g.out_channels, Cog = g.out_per_group, G = g.groups;
  const int64_t Jg = g.cols_per_group(), GJ = G * Jg, x_stride = g.in_channels * g.height * g.width;
  const int64_t per_run = shared_kernel_samples(g, sizeof(scalar_t));
  const auto opts = x.options();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* w_ptr = weight.const_data_ptr<scalar_t>();
  const scalar_t *ch_ptr = ch.const_data_ptr<scalar_t>(), *f_ptr = f.const_data_ptr<scalar_t>();
  const scalar_t *s_ptr = s.const_data_ptr<scalar_t>(), *a_ptr = a.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  for_each_batch_range(g.batch, [&](int64_t, int64_t b_begin, int64_t b_end) {
    const int64_t n_most = std::min(per_run, b_end - b_begin);
    at::Tensor cols_buf = at::empty({GJ * n_most * P}, opts), tmp_buf = at::empty({GJ * P}, opts);
    at::Tensor z_buf = at::empty({Cout * n_most * P}, opts), m_buf = at::empty({GJ}, opts);
    scalar_t *cols = cols_buf.data_ptr<scalar_t>(), *tmp = tmp_buf.data_ptr<scalar_t>();
    scalar_t *z = z_buf.data_ptr<scalar_t>(), *m = m_buf.data_ptr<scalar_t>();
    for (int64_t b0 = b_begin; b0 < b_end; b0 += n_most) {
      const int64_t n = std::min(n_most, b_end - b0), N = n * P;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t b = b0 + i;
        im2col(x_ptr + b * x_stride, g, tmp);
        input_scale(ch_ptr + b * g.in_channels, s_ptr + b * g.taps(), g, m);
        for (int64_t j = 0; j < GJ; ++j) {
          const scalar_t mj = m[j];
          const scalar_t* __restrict__ src = tmp + j * P;
          scalar_t* __restrict__ dst = cols + j * N + i * P;
#pragma omp simd
          for (int64_t p = 0; p < P; ++p) dst[p] = mj * src[p];
        }
      }
      // z[group rows] = W[group rows] @ cols[group columns], (Cog x Jg) @ (Jg x n*P) per group, in blocks of
      // kSharedKernelRows rows by kSharedKernelInner columns of W that accumulate (one brgemm call over
      // all of W streamed it for every block of columns: 2.4x the per-sample path's time on 512->512 4x4)
      for (int64_t gi = 0; gi < G; ++gi)
        for (int64_t r0 = 0; r0 < Cog; r0 += kSharedKernelRows)
          for (int64_t j0 = 0; j0 < Jg; j0 += kSharedKernelInner)
            grouped_gemm<scalar_t>(1, std::min(kSharedKernelRows, Cog - r0), N, std::min(kSharedKernelInner, Jg - j0),
                                   w_ptr + (gi * Cog + r0) * Jg + j0, Jg, 0, cols + (gi * Jg + j0) * N, N, 0,
                                   z + (gi * Cog + r0) * N, N, 0, /*accumulate=*/j0 > 0, opts,
                                   /*in_column_blocks=*/true);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t b = b0 + i;
        const scalar_t ab = a_ptr[b];
        for (int64_t o = 0; o < Cout; ++o) {
          const scalar_t scale = ab * f_ptr[b * Cout + o];
          const scalar_t* __restrict__ src = z + o * N + i * P;
          scalar_t* __restrict__ dst = out_ptr + (b * Cout + o) * P;
#pragma omp simd
          for (int64_t p = 0; p < P; ++p) dst[p] = scale * src[p];
        }
      }
    }
  });
  return out;
}

at::Tensor to_float(const at::Tensor& t) { return t.to(at::kFloat); }

// ---- Kernel rows and columns that read only padding ---------------------------------------------------
// On maps smaller than the kernel's reach whole kernel rows (or columns) fall in the padding for every
// output pixel: a 3x3 kernel on a 1x1 map keeps only its centre, a dilation as large as the map (DeepLab's
// atrous pyramid at its largest rates) does the same, a 7x7 kernel on a 3x3 map keeps its middle 5x5. The
// static convolution skips such taps; the products here would multiply their zeros and build their kernel
// entries for every sample (9x the work of the 1x1 layer it is). The op on that layer is the op of the
// kernel without them: trimming t rows from both ends with padding pad - t*dil keeps every remaining tap's
// input row and the output size, and the gradients of weight and spatial_att are zero in the trimmed taps.
// Rows are trimmed in pairs (top and bottom) only while both are dead and the padding covers them, so the
// trimmed layer is an ordinary symmetric one, and only where the batch amortises the trim (dead_taps).
// ODCONV_CPU_DEAD_TAPS=auto (default) | never overrides it.
struct DeadTaps {
  int64_t rows = 0, cols = 0;  // kernel rows (columns) dropped at each end
  bool any() const { return rows > 0 || cols > 0; }
};

// Kernel positions u (rows or columns) dropped at each end along one axis.
int64_t dead_kernel_ends(int64_t in, int64_t out, int64_t kernel, int64_t stride, int64_t pad, int64_t dil) {
  const auto reads_map = [&](int64_t u) {
    for (int64_t o = 0; o < out; ++o) {
      const int64_t i = o * stride - pad + u * dil;
      if (i >= 0 && i < in) return true;
    }
    return false;
  };
  int64_t t = 0;
  while (2 * (t + 1) < kernel && (t + 1) * dil <= pad && !reads_map(t) && !reads_map(kernel - 1 - t)) ++t;
  return t;
}

// Trimming costs a pass over all of W (and, backward, one over grad_W), so it pays only where the batch
// saves more than that: per element of one kernel, each sample spends about 1 + P/K multiply-adds on it
// (building Wb from the K kernels, the product over P pixels), and the trim copies it at the cost of
// ~kDeadTapsMinSavedMacs of them. So the taps are dropped when B * (1 + P/K) * (dead fraction) reaches
// that. (benchmarks/ab_env.py --keep-freed-memory, ODCONV_CPU_DEAD_TAPS=never against always-trim, 3
// rounds, results/ab_dead_taps_small_batch_avx512_cpu.json: forward untrimmed 0.33-0.91 of the trimmed
// time at B1-B8 on 1x1-3x3 maps (scores 1.1-10.7), trimmed better at B1 on a 21x21 map with dilation 24
// (98), B16-B64 on 1x1-3x3 maps (18-71); the backward the same but for K = 8 layers, where trimming won
// at scores 2.4-10.7 (1.2-1.8x) and the rule gives that up.)
constexpr double kDeadTapsMinSavedMacs = 16;

DeadTaps dead_taps(const Geometry& g) {
  if (path_override("ODCONV_CPU_DEAD_TAPS", {"auto", "never"}) == "never") return {};
  const DeadTaps d{dead_kernel_ends(g.height, g.out_h, g.kernel_h, g.stride_h, g.pad_h, g.dil_h),
                   dead_kernel_ends(g.width, g.out_w, g.kernel_w, g.stride_w, g.pad_w, g.dil_w)};
  if (!d.any()) return d;
  const double live = double((g.kernel_h - 2 * d.rows) * (g.kernel_w - 2 * d.cols)) / double(g.taps());
  const double saved = double(g.batch) * (1.0 + double(g.out_pixels()) / double(g.kernel_num)) * (1.0 - live);
  return saved >= kDeadTapsMinSavedMacs ? d : DeadTaps{};
}

Geometry without_dead_taps(const Geometry& g, DeadTaps d) {
  Geometry live = g;
  live.kernel_h -= 2 * d.rows;
  live.kernel_w -= 2 * d.cols;
  live.pad_h -= d.rows * g.dil_h;
  live.pad_w -= d.cols * g.dil_w;
  return live;
}

// weight (K, Cout, Cin/G, kh, kw) or spatial_att (B, kh, kw) without the dead rows and columns, or (dead_to_zero)
// the gradient of that result put back in the full kernel's taps, zeros in the dead ones. A loop over the
// kernels' planes in parallel: with torch's strided copy (slice + contiguous) the trimmed forward of a 7x7
// kernel on B32 256->256 3x3 maps took 6.5 ms more than the 5x5 layer it becomes, with this loop 3 ms.
at::Tensor live_taps(const at::Tensor& t_in, DeadTaps d, bool dead_to_zero = false) {
  if (!t_in.defined()) return t_in;
  const at::Tensor t = t_in.contiguous();
  const int64_t src_h = t.size(-2), src_w = t.size(-1), planes = t.numel() / (src_h * src_w);
  const int64_t sign = dead_to_zero ? 1 : -1;
  const int64_t dst_h = src_h + sign * 2 * d.rows, dst_w = src_w + sign * 2 * d.cols;
  const int64_t full_w = std::max(src_w, dst_w), live_h = std::min(src_h, dst_h), live_w = std::min(src_w, dst_w);
  std::vector<int64_t> sizes = t.sizes().vec();
  sizes[sizes.size() - 2] = dst_h;
  sizes[sizes.size() - 1] = dst_w;
  at::Tensor out = at::empty(sizes, t.options());
  // the full grad_W of a big layer (151 MB for K = 4 1024->1024 3x3) before its first write: B16
  // 1024->1024 on 1x1 maps the backward took 0.41 of its time without (ab_env, 6 rounds; 0.61 on 512->512)
  advise_huge_pages(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "odconv_live_taps", [&] {
    const scalar_t* src = t.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, planes, 1024, [&](int64_t begin, int64_t end) {
      // one fill for the chunk's planes, and no library call per tap of a kernel's centre (a 3x3 kernel
      // on 1x1 maps): filling and copying plane by plane took 35 ms for B16 1024->1024's 4M planes
      if (dead_to_zero) std::fill_n(dst + begin * dst_h * dst_w, (end - begin) * dst_h * dst_w, scalar_t(0));
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* src_plane = src + i * src_h * src_w;
        scalar_t* dst_plane = dst + i * dst_h * dst_w;
        for (int64_t u = 0; u < live_h; ++u) {
          const int64_t full_offset = (u + d.rows) * full_w + d.cols, live_offset = u * live_w;
          const scalar_t* from = src_plane + (dead_to_zero ? live_offset : full_offset);
          scalar_t* to = dst_plane + (dead_to_zero ? full_offset : live_offset);
          if (live_w == 1)
            *to = *from;
          else
            std::copy_n(from, live_w, to);
        }
      }
    });
  });
  return out;
}

// The forward of checked inputs, by path.
// Depthwise layers (one input and one output channel per group) take depthwise_cpu.cpp's kernels (sixteen
// channels at a time over the taps inside the map), 16-bit ones on float32 copies. Against the convolution
// path they took before (benchmarks/ab_env.py, ODCONV_CPU_DEPTHWISE=never against auto, 4 rounds, memory
// kept, Zen 4 EPYC, results/ab_depthwise_direct_avx512_cpu.json, MobileNetV2's, EfficientNet's and ConvNeXt's
// depthwise layers at B32 and B1): forward 0.45-0.89 on 3x3 and 5x5 kernels from 7x7 to 112x112 maps (strided
// too), 1.07 and 1.12 with 7x7 kernels on 56x56 and 7x7 maps; backward 0.14-0.24 with 5x5 and 7x7 kernels,
// 0.43-0.90 with 3x3 on maps of up to 16x16 and stride 2 from 112x112, 1.02 and 1.18 with 3x3 on 56x56 and
// 112x112 (oneDNN's backward of per-sample kernels is slow where the kernel is large, its forward reorders
// them). ODCONV_CPU_DEPTHWISE=auto (default) | never (the convolution path, as layers with a channel
// multiplier take) overrides it (tests run both).
bool use_direct_depthwise(const Geometry& g) {
  return is_depthwise(g) && path_override("ODCONV_CPU_DEPTHWISE", {"auto", "never"}) == "auto";
}

at::Tensor forward_checked(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& channel_att,
                           const at::Tensor& filter_att, const at::Tensor& spatial_att, const at::Tensor& kernel_att,
                           const Geometry& g) {
  if (use_direct_depthwise(g)) {
    if (!is_16bit(x)) return depthwise_forward_cpu(x, weight, channel_att, filter_att, spatial_att, kernel_att, g);
    return depthwise_forward_cpu(to_float(x), to_float(weight), to_float(channel_att), to_float(filter_att),
                                 to_float(spatial_att), to_float(kernel_att), g)
        .to(x.scalar_type());
  }
  if (use_conv_path(g, x.scalar_type(), /*backward=*/false)) {
    return forward_conv_path(x, weight, channel_att, filter_att, spatial_att, kernel_att, g);
  }
  if (use_shared_kernel_forward(g, x.scalar_type())) {
    at::Tensor out;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "odconv2d_cpu_shared_kernel", [&] {
      out = forward_shared_kernel<scalar_t>(x, weight, channel_att, filter_att, spatial_att, kernel_att, g);
    });
    return out;
  }
  if (is_16bit(x) && g.out_pixels() <= kHalfForwardMaxPixelsIn16Bit) {
    // On small maps the 16-bit route (per-sample ATen matmuls) is the slower one: with 16x16 maps or
    // fewer the float32 kernels on float32 copies win (B64 512->512 4x4 bf16: 254 -> 70 ms, 256->256
    // 8x8 52 -> 20, B128 128->128 12x12 63 -> 41, B64 128->128 16x16 39 -> 33; on 32x32 and larger
    // maps 16 bit is faster, 24 against 36 ms at B64 64->64 32x32).
    return forward_kernel<float>(to_float(x), to_float(weight), to_float(channel_att), to_float(filter_att),
                                 to_float(spatial_att), to_float(kernel_att), g)
        .to(x.scalar_type());
  }
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "odconv2d_cpu", [&] {
    out = forward_kernel<scalar_t>(x, weight, channel_att, filter_att, spatial_att, kernel_att, g);
  });
  return out;
}

at::Tensor odconv2d_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& channel_att,
    const at::Tensor& filter_att, const at::Tensor& spatial_att, const at::Tensor& kernel_att,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const Geometry g = check_inputs(
      "odconv2d", x, weight, channel_att, filter_att, spatial_att, kernel_att, stride, padding,
      dilation, groups);
  TORCH_CHECK(x.device().is_cpu(), "odconv2d: the CPU kernel got x on ", x.device());
  read_masked_taps_override();
  read_ragged_tail_override();
  // the products below run on views of working buffers: keep autograd out of them
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const DeadTaps dead = dead_taps(g);
  if (dead.any()) {
    return forward_checked(x, live_taps(weight, dead), channel_att, filter_att, live_taps(spatial_att, dead),
                           kernel_att, without_dead_taps(g, dead));
  }
  return forward_checked(x, weight, channel_att, filter_att, spatial_att, kernel_att, g);
}

// The backward of checked float32 / float64 inputs.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_checked(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& channel_att,
    const at::Tensor& filter_att, const at::Tensor& spatial_att, const at::Tensor& kernel_att, const Geometry& g,
    std::array<bool, 2> output_mask) {
  if (use_direct_depthwise(g)) {
    return depthwise_backward_cpu(grad_out, x, weight, channel_att, filter_att, spatial_att, kernel_att, g,
                                  output_mask[0], output_mask[1]);
  }
  if (use_conv_path(g, x.scalar_type(), /*backward=*/true)) {
    return backward_conv_path(grad_out, x, weight, channel_att, filter_att, spatial_att, kernel_att, g,
                              output_mask[0], output_mask[1]);
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "odconv2d_backward_cpu", [&] {
    grads = backward_kernel<scalar_t>(
        grad_out, x, weight, channel_att, filter_att, spatial_att, kernel_att, g, output_mask[0],
        output_mask[1]);
  });
  return grads;
}

// The backward of checked inputs of any dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_any_dtype(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& channel_att,
    const at::Tensor& filter_att, const at::Tensor& spatial_att, const at::Tensor& kernel_att, const Geometry& g,
    std::array<bool, 2> output_mask) {
  if (!is_16bit(x)) {
    return backward_checked(grad_out, x, weight, channel_att, filter_att, spatial_att, kernel_att, g, output_mask);
  }
  // Half-precision backward runs the float32 kernels on float32 copies and rounds the gradients
  // back: faster here than the 16-bit products (1.5-1.9x on the GTSRB network's layers, batch
  // 128; the 16-bit GEMMs are per-sample ATen matmuls, float32 has brgemm), and more accurate.
  // The forward stays in 16 bit on maps larger than 16x16, where that was faster (2.3x at 48x48).
  const auto grads = backward_checked(to_float(grad_out), to_float(x), to_float(weight), to_float(channel_att),
                                      to_float(filter_att), to_float(spatial_att), to_float(kernel_att), g,
                                      output_mask);
  const auto back = [&](const at::Tensor& t) { return t.to(x.scalar_type()); };
  return std::make_tuple(back(std::get<0>(grads)), back(std::get<1>(grads)), back(std::get<2>(grads)),
                         back(std::get<3>(grads)), back(std::get<4>(grads)), back(std::get<5>(grads)));
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
  read_masked_taps_override();
  read_ragged_tail_override();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const DeadTaps dead = dead_taps(g);
  if (dead.any()) {
    auto grads = backward_any_dtype(grad_out, x, live_taps(weight, dead), channel_att, filter_att,
                                    live_taps(spatial_att, dead), kernel_att, without_dead_taps(g, dead), output_mask);
    std::get<1>(grads) = live_taps(std::get<1>(grads), dead, /*dead_to_zero=*/true);
    std::get<4>(grads) = live_taps(std::get<4>(grads), dead, /*dead_to_zero=*/true);
    return grads;
  }
  return backward_any_dtype(grad_out, x, weight, channel_att, filter_att, spatial_att, kernel_att, g, output_mask);
}

} // namespace
} // namespace odconv

TORCH_LIBRARY_IMPL(odconv, CPU, m) {
  m.impl("odconv2d", &odconv::odconv2d_cpu);
  m.impl("odconv2d_backward", &odconv::odconv2d_backward_cpu);
}
