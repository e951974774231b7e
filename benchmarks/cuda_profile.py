"""Where the GPU time of one odconv2d forward + backward goes, kernel by kernel (torch.profiler).

For each layer shape and backend (extension, reference, static), runs WARMUP steps, then profiles
STEPS forward + backward steps and prints the CUDA kernels sorted by their total time per step, with
the step's wall time. It tells which part of the extension's step to work on (the per-sample kernel
builds, im2col/col2im, the batched GEMMs, the attention-gradient reductions) and what cuDNN runs for
the same layer.

    python benchmarks/cuda_profile.py                                  # three default shapes, float32
    python benchmarks/cuda_profile.py --shapes "layer4" --dtype bfloat16
    python benchmarks/cuda_profile.py --shapes "64,64,64,32,3,4,1,1" --backends extension --json /tmp/p.json

TF32 is off (as in bench_op.py), so float32 means float32 everywhere.
"""
import argparse
import collections
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # odconv, if not installed
import odconv  # noqa: E402
from odconv.reference import odconv2d_reference  # noqa: E402

from common import make_inputs, parse_shapes  # noqa: E402

DEFAULT_SHAPES = "64,64,64,32,3,4,1,1;64,128,128,16,3,4,1,1;256,512,512,7,3,4,1,1"
BACKENDS = ("extension", "reference", "static")
WARMUP = 3
STEPS = 5
TOP = 12
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_step(backend, shape, dtype):
    """A closure running one forward + backward of the layer with this backend."""
    x, weight, *attentions = [t.requires_grad_() for t in make_inputs(shape, dtype, "cuda")]
    stride, padding, dilation, groups = shape.conv_args()
    if backend == "static":
        static_weight = weight[0].detach().clone().requires_grad_()
        leaves = [x, static_weight]
        forward = lambda: F.conv2d(x, static_weight, None, stride, padding, dilation, groups)  # noqa: E731
    else:
        fn = torch.ops.odconv.odconv2d if backend == "extension" else odconv2d_reference
        args = ([list(stride), list(padding), list(dilation), groups] if backend == "extension"
                else [stride, padding, dilation, groups])
        leaves = [x, weight, *attentions]
        forward = lambda: fn(x, weight, *attentions, *args)  # noqa: E731
    grad_out = torch.randn_like(forward().detach())

    def step():
        torch.autograd.grad(forward(), leaves, grad_out)

    return step


def kernel_table(prof, steps):
    """[(kernel name, ms per step, calls per step)] of the CUDA kernels, largest first."""
    totals = collections.defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals[event.name]
            entry[0] += event.device_time / 1e3
            entry[1] += 1
    rows = [(name, ms / steps, calls / steps) for name, (ms, calls) in totals.items()]
    return sorted(rows, key=lambda row: -row[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="suite names or B,Cin,Cout,H,k,K,stride,groups; ';'")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--top", type=int, default=TOP, help="kernels listed per backend")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("cuda_profile.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtype = DTYPES[args.dtype]
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype,
              "backend_info": odconv.backend_info()["cuda"], "shapes": []}
    for shape in parse_shapes(args.shapes):
        entry = {"shape": shape.as_dict(), "name": shape.name, "backends": {}}
        print(f"\n## {shape.name} ({args.dtype}, forward + backward)")
        for backend in args.backends.split(","):
            step = make_step(backend, shape, dtype)
            for _ in range(WARMUP):
                step()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - start) / args.steps * 1e3
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    step()
                torch.cuda.synchronize()
            rows = kernel_table(prof, args.steps)
            gpu_ms = sum(row[1] for row in rows)
            print(f"\n{backend}: {wall_ms:.3f} ms per step (wall), {gpu_ms:.3f} ms in kernels")
            for name, ms, calls in rows[:args.top]:
                print(f"  {ms:9.3f} ms {calls:6.1f}x  {name[:110]}")
            entry["backends"][backend] = {"wall_ms": wall_ms, "kernel_ms": gpu_ms,
                                          "kernels": [{"name": n, "ms": ms, "calls": c} for n, ms, c in rows]}
            del step
            torch.cuda.empty_cache()
        report["shapes"].append(entry)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
