"""A lower bound for odconv2d built on library GEMMs: the time of its per-sample products alone.

ODConv gives every sample its own kernel, so its convolution is, per sample and group, the product
of that sample's (Cout/G x J) kernel with its (J x P) im2col matrix (J = Cin/G*k*k, P = Ho*Wo), where
a static convolution multiplies one kernel by the whole batch at once. When P is small these
per-sample products are thin (16 columns at 4x4) and library GEMMs run them far below the speed the
static convolution reaches. This script times exactly those products and nothing else -- no
aggregation, no im2col, no attention -- with torch.bmm over the groups of one sample (MKL here; oneDNN's brgemm, which the extension
also uses, is not reachable from Python and was slower on thin products when tried in the extension),
on one thread, one product per sample, the kernel shared by all samples so it is served from cache
as in the extension, and in whichever orientation is faster. It compares them with F.conv2d of the
same layer, also on one thread:

  forward   out_b   = Wb @ cols_b          (Cout/G x J) @ (J x P)
  backward  gcols_b = Wb^T @ gy_b          (J x Cout/G) @ (Cout/G x P)    (the gradient of x)
            Q_b     = gy_b @ cols_b^T      (Cout/G x P) @ (P x J)         (the gradient of Wb)

  bound = GEMM time / (static time * floor),   floor = 1 + K/(Ho*Wo)

An implementation that runs these products through library GEMMs costs at least `bound` in the
units of bench_op's target (extension / (static * floor) <= 1.15 forward, <= 1.2 forward+backward):
where the bound is above the target, the target is out of reach that way on this machine. It is not
a bound for a hand-written micro-kernel that fuses the aggregation into the product.

Examples
  python benchmarks/bench_gemm_bound.py                                  # default and extra suites
  python benchmarks/bench_gemm_bound.py --shapes "64,512,512,4,3,4,1,1"
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark

sys.path.append(os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, parse_shapes  # noqa: E402

SHAPES = "default,extra"
MIN_RUN_TIME = 0.3
ROUNDS = 3
TARGETS = {"fwd": 1.15, "fwdbwd": 1.2}


def timed(fn, min_run_time):
    """The fastest block's time per call. Load from elsewhere on a shared machine only adds time, so the
    minimum is the fair figure for a bound on both sides of the ratio."""
    fn()
    return min(benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).times)


def per_sample_products(shape):
    """{"fwd": fn, "gx": fn, "q": [fn, ...]}: each fn runs one product per sample and group, in one orientation."""
    g, cog, J, P = shape.groups, shape.out_channels // shape.groups, shape.in_channels // shape.groups * shape.kernel ** 2, shape.out_size ** 2
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(g, cog, J, generator=gen)               # one kernel per group, shared by the samples
    w_t = w.transpose(1, 2).contiguous()
    cols = torch.randn(shape.batch, g, J, P, generator=gen)
    cols_t = cols.transpose(2, 3).contiguous()
    gy = torch.randn(shape.batch, g, cog, P, generator=gen)
    gy_t = gy.transpose(2, 3).contiguous()
    out = {shape_: torch.empty(g, *shape_) for shape_ in [(cog, P), (P, cog), (J, P), (P, J), (cog, J), (J, cog)]}

    def loop(product, out_shape):
        # one product per sample (all its groups in one batched call: a call per group of a depthwise
        # layer would time the Python loop, not the GEMM)
        o = out[out_shape]

        def run():
            for b in range(shape.batch):
                product(b, o)
        return run

    return {
        "fwd": [loop(lambda b, o: torch.bmm(w, cols[b], out=o), (cog, P)),
                loop(lambda b, o: torch.bmm(cols_t[b], w_t, out=o), (P, cog))],
        "gx": [loop(lambda b, o: torch.bmm(w_t, gy[b], out=o), (J, P)),
               loop(lambda b, o: torch.bmm(gy_t[b], w, out=o), (P, J))],
        "q": [loop(lambda b, o: torch.bmm(gy[b], cols_t[b], out=o), (cog, J)),
              loop(lambda b, o: torch.bmm(cols[b], gy_t[b], out=o), (J, cog))],
    }


def static_times(shape, min_run_time):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape.batch, shape.in_channels, shape.size, shape.size, generator=gen)
    w = torch.randn(shape.out_channels, shape.in_channels // shape.groups, shape.kernel, shape.kernel, generator=gen)
    stride, padding, dilation, groups = shape.conv_args()
    conv = lambda xx, ww: F.conv2d(xx, ww, None, stride, padding, dilation, groups)  # noqa: E731
    with torch.no_grad():
        fwd = timed(lambda: conv(x, w), min_run_time)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    gy = torch.randn(conv(x, w).shape, generator=gen)

    def step():
        torch.autograd.grad(conv(xg, wg), (xg, wg), gy)
    return fwd, timed(step, min_run_time)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=SHAPES, help="suites and/or 'B,Cin,Cout,H,k,K,stride,groups' (as bench_op)")
    p.add_argument("--min-run-time", type=float, default=MIN_RUN_TIME)
    p.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved rounds; the fastest is kept")
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    print("| shape | static fwd ms | GEMMs fwd ms | fwd bound | static fwd+bwd ms | GEMMs fwd+bwd ms | fwd+bwd bound |")
    print("|---|---|---|---|---|---|---|")
    for shape in parse_shapes(args.shapes):
        products = per_sample_products(shape)
        best, static_fwd, static_fwdbwd = {}, float("inf"), float("inf")
        for _ in range(args.rounds):  # interleaved, so a burst of load elsewhere hits both sides
            for name, fns in products.items():
                best[name] = min([best.get(name, float("inf"))] + [timed(fn, args.min_run_time) for fn in fns])
            fwd, fwdbwd = static_times(shape, args.min_run_time)
            static_fwd, static_fwdbwd = min(static_fwd, fwd), min(static_fwdbwd, fwdbwd)
        gemm_fwd, gemm_fwdbwd = best["fwd"], best["fwd"] + best["gx"] + best["q"]
        row = {"shape": shape.as_dict(), "name": shape.name, "static_fwd_s": static_fwd,
               "static_fwdbwd_s": static_fwdbwd, "gemm_s": best,
               "bound_fwd": gemm_fwd / (static_fwd * shape.floor),
               "bound_fwdbwd": gemm_fwdbwd / (static_fwdbwd * shape.floor)}
        rows.append(row)
        flag = lambda mode: " (above target)" if row[f"bound_{mode}"] > TARGETS[mode] else ""  # noqa: E731
        print(f"| {shape.name} | {static_fwd * 1e3:.2f} | {gemm_fwd * 1e3:.2f} | {row['bound_fwd']:.2f}{flag('fwd')} "
              f"| {static_fwdbwd * 1e3:.2f} | {gemm_fwdbwd * 1e3:.2f} | {row['bound_fwdbwd']:.2f}{flag('fwdbwd')} |",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_info("cpu"), "argv": sys.argv, "threads": 1, "timing": "fastest block",
                       "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
