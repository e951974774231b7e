"""A lower bound for odconv2d built on library GEMMs: the time of its per-sample products alone.

ODConv gives every sample its own kernel, so its convolution is, per sample and group, the product
of that sample's (Cout/G x J) kernel with its (J x P) im2col matrix (J = Cin/G*k*k, P = Ho*Wo), where
a static convolution multiplies one kernel by the whole batch at once. When P is small these
per-sample products are thin (16 columns at 4x4). This script times exactly those products and
nothing else -- no aggregation, no im2col, no attention -- on one thread, one product per sample,
the kernel shared by all samples so it is served from cache as in the extension, in whichever
orientation is faster, through two primitives: torch.bmm over the groups of one sample (MKL here),
and oneDNN's brgemm micro-kernel one call per group, as the extension's float32 kernels call it
(at::native::cpublas::brgemm, compiled here with torch.utils.cpp_extension.load_inline on first use,
cached afterwards; left out where torch lacks it or no compiler is found). It compares them with
F.conv2d of the same layer, also on one thread:

  forward   out_b   = Wb @ cols_b          (Cout/G x J) @ (J x P)
  backward  gcols_b = Wb^T @ gy_b          (J x Cout/G) @ (Cout/G x P)    (the gradient of x)
            Q_b     = gy_b @ cols_b^T      (Cout/G x P) @ (P x J)         (the gradient of Wb)

  bound = time of the faster primitive's products / (static time * floor),   floor = 1 + K/(Ho*Wo)

An implementation that runs these products through these library GEMMs costs at least `bound` in the
units of bench_op's target (extension / (static * floor) <= 1.15 forward, <= 1.2 forward+backward):
where the bound is above the target, the target is out of reach that way on this machine. It is not
a bound for a hand-written micro-kernel that fuses the aggregation into the product, and a bound
below the target proves nothing either way: the aggregation and the other per-sample passes come on
top.

The same for the extension's other way, its convolution path (the float32 forward and backward of
dense layers on maps of 256+ pixels: one call of the convolution primitive per sample and thread):
`conv` times F.conv2d on one sample at a time, and aten's convolution_backward (grad_x and the
kernel's gradient) likewise, the kernel built once and shared, so before any of ODConv's own work,
against the same batched convolution:

  conv bound = time of the B one-sample convolutions / (static time * floor)

The process makes glibc keep freed memory first (odconv.keep_freed_memory(), as train.py and bench_op.py
do), so the static convolution is not timed taking its large buffers as fresh pages on every call
(--release-memory: glibc's default, as the runs before 2026-12-07 14:10 UTC).

Examples
  python benchmarks/bench_gemm_bound.py                                  # default and extra suites
  python benchmarks/bench_gemm_bound.py --shapes "64,512,512,4,3,4,1,1"
  python benchmarks/bench_gemm_bound.py --primitives bmm                 # without the compiled brgemm
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark

sys.path.append(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # odconv, if not installed
from common import machine_info, parse_shapes  # noqa: E402

import odconv  # noqa: E402

SHAPES = "default,extra"
MIN_RUN_TIME = 0.3
ROUNDS = 3
PRIMITIVES = "bmm,brgemm"
CACHE_BLOCK_ELEMS = 64 * 1024   # floats of a block of the shared operand (256 KB: a quarter of this L2)
CACHE_BLOCK_INNER = 1024        # of the inner dimension, at most
TARGETS = {"fwd": 1.15, "fwdbwd": 1.2}
# the variants per_sample_products times for each product, in its order (the JSON's variants_s)
VARIANTS = {
    "bmm": {"fwd": ["Wb @ cols", "cols^T @ Wb^T"], "gx": ["Wb^T @ gy", "gy^T @ Wb"], "q": ["gy @ cols^T", "cols @ gy^T"]},
    "brgemm": {"fwd": ["Wb @ cols", "Wb @ cols, blocked", "cols^T @ Wb^T", "cols^T @ Wb^T, blocked"],
               "gx": ["Wb^T @ gy", "Wb^T @ gy, blocked", "gy^T @ Wb", "gy^T @ Wb, blocked"],
               "q": ["gy @ cols^T", "gy @ cols^T, blocked", "cols @ gy^T", "cols @ gy^T, blocked"]},
}

BRGEMM_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

bool brgemm_available() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  return true;
#else
  return false;
#endif
}

// C[g] = A[g] @ B[g] for every sample and group through brgemm calls, as the extension makes them.
// A and B are (G, rows, cols), shared by the samples, or (batch, G, rows, cols); C is (G, M, N),
// rewritten by every sample (only the products' time matters here). The product is cut into blocks
// of mb x nb outputs and kb of the inner dimension (the later kb blocks accumulate), and every block
// is done for all samples before the next: a block of a shared operand stays in cache meanwhile,
// as a tile of the kernels does in the extension.
void brgemm_products(const at::Tensor& A, const at::Tensor& B, at::Tensor& C, int64_t batch, int64_t mb,
                     int64_t nb, int64_t kb) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  const int64_t G = C.size(0), M = C.size(1), N = C.size(2), K = A.size(-1);
  const float* a = A.const_data_ptr<float>();
  const float* b = B.const_data_ptr<float>();
  float* c = C.data_ptr<float>();
  const int64_t a_sample = A.dim() == 4 ? G * M * K : 0, b_sample = B.dim() == 4 ? G * K * N : 0;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t m0 = 0; m0 < M; m0 += mb)
      for (int64_t n0 = 0; n0 < N; n0 += nb)
        for (int64_t k0 = 0; k0 < K; k0 += kb)
          for (int64_t s = 0; s < batch; ++s)
            at::native::cpublas::brgemm(std::min(mb, M - m0), std::min(nb, N - n0), std::min(kb, K - k0), K, N, N,
                                        k0 > 0, a + s * a_sample + g * M * K + m0 * K + k0,
                                        b + s * b_sample + g * K * N + k0 * N + n0, c + g * M * N + m0 * N + n0,
                                        false);
  at::native::cpublas::brgemm_release(false);
#endif
}
"""


def load_brgemm():
    """The compiled brgemm_products, or None (with the reason printed) where it cannot be had."""
    try:
        from torch.utils.cpp_extension import load_inline
        module = load_inline("odconv_bench_brgemm", cpp_sources=BRGEMM_SOURCE,
                             functions=["brgemm_available", "brgemm_products"], extra_cflags=["-O2"])
    except Exception as e:  # no compiler, no headers: the bmm column still stands
        print(f"brgemm left out: could not compile the timing helper ({type(e).__name__}: {e})", file=sys.stderr)
        return None
    if not module.brgemm_available():
        print("brgemm left out: this torch has no float32 cpublas::brgemm", file=sys.stderr)
        return None
    return module.brgemm_products


def timed(fn, min_run_time):
    """The fastest block's time per call. Load from elsewhere on a shared machine only adds time, so the
    minimum is the fair figure for a bound on both sides of the ratio."""
    fn()
    return min(benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).times)


def cache_blocks(M, N, K, a_shared, b_shared, elems=CACHE_BLOCK_ELEMS):
    """(mb, nb, kb) for brgemm_products: the block of the shared operand (the kernel) within `elems`
    floats; where neither is shared (Q = gy @ cols^T), the block of the output."""
    up16 = lambda v, cap: max(1, min(cap, v if v < 16 else v // 16 * 16))  # noqa: E731
    kb = min(K, CACHE_BLOCK_INNER)
    if a_shared:
        return up16(elems // kb, M), N, kb
    if b_shared:
        return M, up16(elems // kb, N), kb
    mb = up16(64, M)
    return mb, up16(elems // mb, N), K


def per_sample_products(shape, primitive, brgemm_products=None):
    """{"fwd": [fn, ...], "gx": [...], "q": [...]}: each fn runs one product per sample and group, in one
    orientation, through torch.bmm ("bmm") or brgemm_products ("brgemm")."""
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

    if primitive == "brgemm":
        def products(a, b, out_shape):
            # each orientation whole, and cut into blocks that keep its shared operand in cache
            o = out[out_shape]
            M, N, K = o.shape[1], o.shape[2], a.shape[-1]
            return [lambda: brgemm_products(a, b, o, shape.batch, M, N, K),
                    lambda: brgemm_products(a, b, o, shape.batch, *cache_blocks(M, N, K, a.dim() == 3, b.dim() == 3))]
        return {
            "fwd": products(w, cols, (cog, P)) + products(cols_t, w_t, (P, cog)),
            "gx": products(w_t, gy, (J, P)) + products(gy_t, w, (P, J)),
            "q": products(gy, cols_t, (cog, J)) + products(cols, gy_t, (J, cog)),
        }
    return {
        "fwd": [loop(lambda b, o: torch.bmm(w, cols[b], out=o), (cog, P)),
                loop(lambda b, o: torch.bmm(cols_t[b], w_t, out=o), (P, cog))],
        "gx": [loop(lambda b, o: torch.bmm(w_t, gy[b], out=o), (J, P)),
               loop(lambda b, o: torch.bmm(gy_t[b], w, out=o), (P, J))],
        "q": [loop(lambda b, o: torch.bmm(gy[b], cols_t[b], out=o), (cog, J)),
              loop(lambda b, o: torch.bmm(cols[b], gy_t[b], out=o), (J, cog))],
    }


def static_layer(shape):
    """x, the static layer's kernel w and a gradient gy of its output (seeded), and its conv_args()."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape.batch, shape.in_channels, shape.size, shape.size, generator=gen)
    w = torch.randn(shape.out_channels, shape.in_channels // shape.groups, shape.kernel, shape.kernel, generator=gen)
    gy = torch.randn(shape.batch, shape.out_channels, shape.out_size, shape.out_size, generator=gen)
    return x, w, gy, shape.conv_args()


def sample_convolutions(shape):
    """{"fwd": fn, "bwd": fn}: the layer's convolution (forward; backward with grad_x and the kernel's
    gradient) called on one sample at a time, the kernel shared, as the extension's convolution path
    calls it on a sample's own kernel."""
    x, w, gy, (stride, padding, dilation, groups) = static_layer(shape)

    def fwd():
        for b in range(shape.batch):
            F.conv2d(x[b:b + 1], w, None, stride, padding, dilation, groups)

    def bwd():
        for b in range(shape.batch):
            torch.ops.aten.convolution_backward(gy[b:b + 1], x[b:b + 1], w, None, list(stride), list(padding),
                                                list(dilation), False, [0, 0], groups, [True, True, False])
    return {"fwd": fwd, "bwd": bwd}


def static_times(shape, min_run_time):
    x, w, gy, (stride, padding, dilation, groups) = static_layer(shape)
    conv = lambda xx, ww: F.conv2d(xx, ww, None, stride, padding, dilation, groups)  # noqa: E731
    with torch.no_grad():
        fwd = timed(lambda: conv(x, w), min_run_time)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

    def step():
        torch.autograd.grad(conv(xg, wg), (xg, wg), gy)
    return fwd, timed(step, min_run_time)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=SHAPES, help="suites and/or 'B,Cin,Cout,H,k,K,stride,groups' (as bench_op)")
    p.add_argument("--primitives", default=PRIMITIVES, help="comma-separated, of bmm and brgemm")
    p.add_argument("--min-run-time", type=float, default=MIN_RUN_TIME)
    p.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved rounds; the fastest is kept")
    p.add_argument("--release-memory", action="store_true",
                   help="glibc's default: freed memory goes back to the system, and the static convolution's large "
                        "buffers come back as fresh pages on every call; by default it is kept, as train.py does")
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args(argv)
    if not args.release_memory:
        odconv.keep_freed_memory()
    primitives = [name for name in args.primitives.split(",") if name]
    unknown = sorted(set(primitives) - {"bmm", "brgemm"})
    if unknown or not primitives:
        p.error(f"--primitives: unknown {unknown} (expected bmm and/or brgemm)")
    brgemm_products = load_brgemm() if "brgemm" in primitives else None
    if "brgemm" in primitives and brgemm_products is None:
        primitives.remove("brgemm")
        if not primitives:
            sys.exit("no primitive left to time")
    torch.set_num_threads(1)
    rows = []
    columns = " | ".join(f"{name} fwd ms" for name in primitives)
    bwd_columns = " | ".join(f"{name} fwd+bwd ms" for name in primitives)
    print(f"| shape | static fwd ms | {columns} | fwd bound | conv fwd ms | conv fwd bound "
          f"| static fwd+bwd ms | {bwd_columns} | fwd+bwd bound | conv fwd+bwd ms | conv fwd+bwd bound |")
    print("|---|" + "---|" * (8 + 2 * len(primitives)))
    for shape in parse_shapes(args.shapes):
        products = {name: per_sample_products(shape, name, brgemm_products) for name in primitives}
        # per primitive and product, each variant's fastest time (VARIANTS names them) and the fastest
        variants = {name: {product: [float("inf")] * len(fns) for product, fns in by_product.items()}
                    for name, by_product in products.items()}
        convolutions = sample_convolutions(shape)
        conv = {step: float("inf") for step in convolutions}
        static_fwd, static_fwdbwd = float("inf"), float("inf")
        for _ in range(args.rounds):  # interleaved, so a burst of load elsewhere hits both sides
            for name, by_product in products.items():
                for product, fns in by_product.items():
                    variants[name][product] = [min(t, timed(fn, args.min_run_time))
                                               for t, fn in zip(variants[name][product], fns)]
            conv = {step: min(t, timed(convolutions[step], args.min_run_time)) for step, t in conv.items()}
            fwd, fwdbwd = static_times(shape, args.min_run_time)
            static_fwd, static_fwdbwd = min(static_fwd, fwd), min(static_fwdbwd, fwdbwd)
        best = {name: {product: min(times) for product, times in by_product.items()}
                for name, by_product in variants.items()}
        # per primitive, and the faster primitive for each product
        gemm_fwd = {name: best[name]["fwd"] for name in primitives}
        gemm_fwdbwd = {name: sum(best[name].values()) for name in primitives}
        fastest = {product: min(best[name][product] for name in primitives) for product in ("fwd", "gx", "q")}
        row = {"shape": shape.as_dict(), "name": shape.name, "static_fwd_s": static_fwd,
               "static_fwdbwd_s": static_fwdbwd, "gemm_s": best, "variants_s": variants, "fastest_gemm_s": fastest,
               "bound_fwd": fastest["fwd"] / (static_fwd * shape.floor),
               "bound_fwdbwd": sum(fastest.values()) / (static_fwdbwd * shape.floor),
               "sample_conv_s": conv, "bound_conv_fwd": conv["fwd"] / (static_fwd * shape.floor),
               "bound_conv_fwdbwd": (conv["fwd"] + conv["bwd"]) / (static_fwdbwd * shape.floor)}
        rows.append(row)
        flag = lambda mode: " (above target)" if row[f"bound_{mode}"] > TARGETS[mode.split("_")[-1]] else ""  # noqa: E731
        fwd_ms = " | ".join(f"{gemm_fwd[name] * 1e3:.2f}" for name in primitives)
        fwdbwd_ms = " | ".join(f"{gemm_fwdbwd[name] * 1e3:.2f}" for name in primitives)
        print(f"| {shape.name} | {static_fwd * 1e3:.2f} | {fwd_ms} | {row['bound_fwd']:.2f}{flag('fwd')} "
              f"| {conv['fwd'] * 1e3:.2f} | {row['bound_conv_fwd']:.2f}{flag('conv_fwd')} "
              f"| {static_fwdbwd * 1e3:.2f} | {fwdbwd_ms} | {row['bound_fwdbwd']:.2f}{flag('fwdbwd')} "
              f"| {(conv['fwd'] + conv['bwd']) * 1e3:.2f} | {row['bound_conv_fwdbwd']:.2f}{flag('conv_fwdbwd')} |",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_info("cpu"), "argv": sys.argv, "threads": 1, "timing": "fastest block",
                       "primitives": primitives, "variants": VARIANTS, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
