"""How fast oneDNN's brgemm runs one product whole, and cut into blocks of columns.

The extension's float32 kernels multiply through at::native::cpublas::brgemm, one call per product
(csrc/cpu/odconv_cpu.cpp, grouped_gemm). This script times such products on one thread, as the
forward makes them: C_s = A @ B_s for a run of samples s, A (M x K) shared (a tile of the kernel),
B_s (K x N) and C_s (M x N) one per sample, cycling over a few buffers. Each product is either one
call (whole) or one call per block of `--blocks` columns (the last block ragged), sample by sample.
The variants are interleaved, round after round, so that a shared machine's drift hits all of them;
it prints the median and the best GFLOP/s of each over the rounds. Compiles its helper with
torch.utils.cpp_extension.load_inline on first use (cached afterwards).

Examples
  python benchmarks/bench_brgemm_blocks.py                                   # the default products
  python benchmarks/bench_brgemm_blocks.py --products "32,144,576;8,144,576" --blocks 32,48,64
  python benchmarks/bench_brgemm_blocks.py --json benchmarks/results/bench_brgemm_blocks_cpu.json
"""
import argparse
import json
import os
import statistics
import sys

import torch

sys.path.append(os.path.dirname(os.path.abspath(__file__)))
from common import machine_info  # noqa: E402

# M,N,K: rows (a tile's output channels), columns (a map's pixels), inner dimension (a tile's columns)
PRODUCTS = "32,64,576;32,80,576;32,96,576;32,100,576;32,128,576;32,144,576;32,196,576;32,256,576;32,576,576;8,144,576"
BLOCKS = "48"          # column blocks to try besides the whole product
SAMPLES = 4            # distinct B and C buffers the calls cycle over
ROUNDS = 8
FLOP_PER_ROUND = 1.5e9  # calls per variant and round: about this many floating-point operations

SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>
#include <chrono>
#include <vector>

bool brgemm_available() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  return true;
#else
  return false;
#endif
}

// GFLOP/s of `calls` products C_s (+)= A @ B_s, s cycling over `samples` buffers, each product in
// calls of `block` columns (block >= N: one call).
double products_gflops(int64_t M, int64_t N, int64_t K, int64_t block, int64_t samples, int64_t calls) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  std::vector<float> A(M * K, 0.5f), B(samples * K * N, 0.25f), C(samples * M * N, 0.f);
  const auto product = [&](int64_t s) {
    for (int64_t n0 = 0; n0 < N; n0 += block)
      at::native::cpublas::brgemm(M, std::min(block, N - n0), K, K, N, N, /*add_C=*/true, A.data(),
                                  B.data() + s * K * N + n0, C.data() + s * M * N + n0, false);
  };
  for (int64_t s = 0; s < samples; ++s) product(s);  // creates the kernels, touches the buffers
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < calls; ++i) product(i % samples);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  at::native::cpublas::brgemm_release(false);
  return 2.0 * M * N * K * calls / seconds / 1e9;
#else
  return 0.0;
#endif
}
"""


def load_products():
    from torch.utils.cpp_extension import load_inline
    module = load_inline("odconv_bench_brgemm_blocks", cpp_sources=SOURCE,
                         functions=["brgemm_available", "products_gflops"], extra_cflags=["-O2"])
    if not module.brgemm_available():
        sys.exit("this torch has no float32 cpublas::brgemm")
    return module.products_gflops


def parse_products(text):
    products = []
    for item in filter(None, (p.strip() for p in text.split(";"))):
        values = [int(v) for v in item.split(",")]
        if len(values) != 3 or min(values) < 1:
            raise argparse.ArgumentTypeError(f"a product is M,N,K with positive sizes, got '{item}'")
        products.append(tuple(values))
    return products


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--products", type=parse_products, default=parse_products(PRODUCTS), help="M,N,K;M,N,K;...")
    p.add_argument("--blocks", default=BLOCKS, help="column blocks to try, comma-separated")
    p.add_argument("--samples", type=int, default=SAMPLES)
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--flop-per-round", type=float, default=FLOP_PER_ROUND)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    blocks = [int(b) for b in args.blocks.split(",") if b]
    torch.set_num_threads(1)
    gflops_of = load_products()

    rows = []
    print("| M x K @ K x N | " + " | ".join(["whole"] + [f"blocks of {b}" for b in blocks]) + " |  (GFLOP/s, median / best)")
    print("|---|" + "---:|" * (1 + len(blocks)))
    for M, N, K in args.products:
        variants = {"whole": N, **{f"blocks of {b}": b for b in blocks}}
        calls = max(10, int(args.flop_per_round / (2 * M * N * K)))
        rates = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, block in variants.items():
                rates[name].append(gflops_of(M, N, K, block, args.samples, calls))
        summary = {name: {"median": statistics.median(r), "best": max(r), "rounds": r} for name, r in rates.items()}
        rows.append({"M": M, "N": N, "K": K, "gflops": summary})
        cells = " | ".join(f"{s['median']:.0f} / {s['best']:.0f}" for s in summary.values())
        print(f"| {M} x {K} @ {K} x {N} | {cells} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
                       "machine": machine_info("cpu"), "samples": args.samples, "rounds": args.rounds, "results": rows},
                      fh, indent=1)
        print(f"\nwrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
