"""Screens random layer shapes for ones where the CPU extension is far above its floor.

The speed targets are to hold "on other reasonable shapes" too, and the suites cannot list them all.
This script draws --count layers (seeded, so a run can be repeated) from a space of plausible ones --
batch 1-128, 3-2048 channels, square maps of 2-56 pixels, 1x1 to 7x7 kernels, stride 1 or 2, up to 32
groups, K = 1-8, and with --dilations a dilation from that list (default 1, which draws none, so a seed
gives the layers it gave before the option) -- keeps those whose static convolution makes --min-macs to --max-macs multiply-adds,
and times, in one process, the extension's forward (the odconv2d op) and backward (odconv2d_backward,
both gradient groups) against the static convolution's (F.conv2d and aten's convolution_backward of one
of the K kernels): the median of --calls calls each, alternated, after a warm-up. It prints each layer's
forward and forward + backward time over static x floor (floor = 1 + K/(Ho*Wo), as in bench_op.py) and
marks those above --flag.

A screen, not a benchmark of record: single medians on a shared machine move by 10-30 %, so a marked
layer is a candidate to measure with benchmarks/ab_env.py (its path overrides) or bench_op.py. Such a
sweep found the tiles that layers with K < 4 took (3x slower than K = 4's on 512-channel layers) and
the GEMM path of layers with few output channels and large im2col matrices (HISTORY.md, History).

Examples
  python benchmarks/sweep_shapes.py                          # 40 layers, seed 0
  python benchmarks/sweep_shapes.py --count 100 --seed 3 --flag 1.6 --json /tmp/sweep.json
  python benchmarks/sweep_shapes.py --seed 2 --dilations 1,1,2,4,12   # atrous layers too
"""
import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.append(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # odconv, if not installed
import odconv  # noqa: E402  (loads the extension, which registers torch.ops.odconv)
from common import LayerShape, layer_calls, machine_info  # noqa: E402

COUNT = 40
SEED = 0
CALLS = 5               # timed calls per op and layer, alternated between the extension and static
FLAG = 1.8              # mark layers above this many times static x floor (fwd or fwd+bwd)
MIN_MACS = 20_000_000   # multiply-adds of the static forward: below, call overheads dominate
MAX_MACS = 4_000_000_000

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
CHANNELS = (3, 16, 32, 48, 64, 96, 128, 160, 256, 384, 512, 768, 1024, 2048)
SIZES = (2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 48, 56)
KERNELS = (1, 3, 3, 3, 5, 7)
GROUPS = (1, 1, 1, 1, 2, 4, 8, 32)
KERNEL_NUMS = (1, 2, 4, 4, 4, 8)


def draw(rng, min_macs, max_macs, dilations=(1,)):
    """A random LayerShape whose static forward makes [min_macs, max_macs] multiply-adds."""
    while True:
        groups = rng.choice(GROUPS)
        cin, cout = rng.choice(CHANNELS), rng.choice(CHANNELS)
        if groups > 1:  # channels a multiple of the groups
            cin, cout = groups * max(1, cin // groups), groups * max(1, cout // groups)
        shape = LayerShape(rng.choice(BATCHES), cin, cout, rng.choice(SIZES), rng.choice(KERNELS),
                           rng.choice(KERNEL_NUMS), rng.choice((1, 1, 1, 2)), groups,
                           dilation=rng.choice(dilations) if len(dilations) > 1 else dilations[0])
        if shape.out_size < 1:
            continue
        macs = shape.batch * cout * (cin // groups) * shape.kernel ** 2 * shape.out_size ** 2
        if min_macs <= macs <= max_macs:
            return shape


def time_layer(shape, calls):
    """Median ms of each of layer_calls' four ops, calls alternated between them after one warm-up call."""
    ops = layer_calls(shape)
    names = ("fwd", "bwd", "static_fwd", "static_bwd")
    for name in names:
        ops[name]()
    times = {name: [] for name in names}
    for _ in range(calls):
        for name in names:
            start = time.perf_counter()
            ops[name]()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=COUNT, help="layers to time")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--calls", type=int, default=CALLS, help="timed calls per op and layer")
    p.add_argument("--flag", type=float, default=FLAG, help="mark layers above this ratio to static x floor")
    p.add_argument("--min-macs", type=float, default=MIN_MACS)
    p.add_argument("--max-macs", type=float, default=MAX_MACS)
    p.add_argument("--dilations", default="1",
                   help="comma-separated dilations to draw from, repeats weighting them (default 1: none drawn)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.count < 1 or args.calls < 1:
        p.error("--count and --calls must be at least 1")
    if not 0 < args.min_macs <= args.max_macs:
        p.error("need 0 < --min-macs <= --max-macs")
    try:
        dilations = tuple(int(d) for d in args.dilations.split(","))
    except ValueError:
        dilations = ()
    if not dilations or min(dilations) < 1:
        p.error(f"--dilations must be a comma-separated list of integers >= 1, got {args.dilations!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = odconv.backend_info()["cpu"]
    if info["backend"] != "extension":
        sys.exit(f"sweep_shapes.py times the compiled CPU extension, which is not in use: {info}")
    odconv.keep_freed_memory()  # as train.py and bench_op.py: no backend pays for fresh pages on every call

    rng = random.Random(args.seed)
    print("| layer | floor | static fwd ms | fwd / floor | static fwd+bwd ms | fwd+bwd / floor |")
    print("|---|---:|---:|---:|---:|---:|")
    results = []
    for _ in range(args.count):
        shape = draw(rng, args.min_macs, args.max_macs, dilations)
        ms = time_layer(shape, args.calls)
        fwd = ms["fwd"] / ms["static_fwd"] / shape.floor
        fwdbwd = (ms["fwd"] + ms["bwd"]) / (ms["static_fwd"] + ms["static_bwd"]) / shape.floor
        marked = max(fwd, fwdbwd) > args.flag
        print(f"| {shape.name} | {shape.floor:.3f} | {ms['static_fwd']:.2f} | {fwd:.2f} | "
              f"{ms['static_fwd'] + ms['static_bwd']:.2f} | {fwdbwd:.2f}{' **above --flag**' if marked else ''} |",
              flush=True)
        results.append({"shape": shape.as_dict(), "name": shape.name, "median_ms": ms, "fwd_over_floor": fwd,
                        "fwdbwd_over_floor": fwdbwd, "flagged": marked})
    flagged = [r["name"] for r in results if r["flagged"]]
    print(f"\n{len(flagged)} of {len(results)} layers above {args.flag} x static x floor" +
          (": " + "; ".join(flagged) if flagged else ""))
    if args.json:
        report = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "machine": machine_info("cpu"),
                  "threads": torch.get_num_threads(), "args": vars(args), "results": results}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return results


if __name__ == "__main__":
    main()
