"""A/B timing of two builds of the odconv extension: which is faster, op by op, on a noisy machine.

On a shared virtual machine one run of a benchmark can be 20-30 % off the next, which hides the
effect of a kernel change. This script alternates the two builds, each in a fresh process, ROUNDS
times per shape, and keeps each build's fastest median: what is left is the difference between the
builds, not the machine's mood at one moment. It times the compiled ops directly (forward, and the
backward op with both gradient groups), on the extension each folder holds.

    git worktree add /tmp/before HEAD~1 && (cd /tmp/before && ODCONV_NO_CUDA=1 python setup.py build_ext --inplace)
    python benchmarks/ab_builds.py /tmp/before .                   # the default suite
    python benchmarks/ab_builds.py /tmp/before . --shapes "128,64,64,24,3,4,1,1;layer4" --rounds 3

A folder is a checkout whose odconv/ holds a built extension. Shapes use bench_op's syntax.
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import parse_shapes  # noqa: E402

SHAPES = "default"
ROUNDS = 2        # alternations of the two builds per shape
REPEATS = 7       # timed calls per process (after one warm-up); their median is one measurement

WORKER = r"""
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch, odconv
from common import LayerShape, make_inputs
assert odconv.backend_info()["cpu"]["backend"] == "extension", odconv.backend_info()["cpu"]
shape = LayerShape(**json.loads(sys.argv[2]))
x, w, ch, f, s, a = [t.float().detach() for t in make_inputs(shape)]
(stride, padding, dilation, groups) = shape.conv_args()
args = (list(stride), list(padding), list(dilation), groups)
gy = torch.randn_like(torch.ops.odconv.odconv2d(x, w, ch, f, s, a, *args))
ops = {"fwd": lambda: torch.ops.odconv.odconv2d(x, w, ch, f, s, a, *args),
       "bwd": lambda: torch.ops.odconv.odconv2d_backward(gy, x, w, ch, f, s, a, *args, [True, True])}
result = {}
for name, op in ops.items():
    op()
    times = []
    for _ in range(int(sys.argv[3])):
        start = time.perf_counter()
        op()
        times.append(time.perf_counter() - start)
    result[name] = 1e3 * statistics.median(times)
print(json.dumps(result))
"""


def measure(folder, shape, repeats):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", WORKER, os.path.abspath(folder), json.dumps(dataclasses.asdict(shape)),
                           str(repeats)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{folder}: {shape.name} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", help="folder with the first build (A)")
    p.add_argument("after", help="folder with the second build (B)")
    p.add_argument("--shapes", default=SHAPES)
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    rows = []
    print("| shape | A fwd ms | B fwd ms | B/A fwd | A bwd ms | B bwd ms | B/A bwd |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for shape in parse_shapes(args.shapes):
        best = {"before": {}, "after": {}}
        for _ in range(args.rounds):
            for side in ("before", "after"):
                for op, ms in measure(getattr(args, side), shape, args.repeats).items():
                    best[side][op] = min(best[side].get(op, float("inf")), ms)
        a, b = best["before"], best["after"]
        print(f"| {shape.name} | {a['fwd']:.1f} | {b['fwd']:.1f} | {b['fwd'] / a['fwd']:.2f} "
              f"| {a['bwd']:.1f} | {b['bwd']:.1f} | {b['bwd'] / a['bwd']:.2f} |", flush=True)
        rows.append({"shape": shape.as_dict(), "name": shape.name, "before_ms": a, "after_ms": b})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"before": os.path.abspath(args.before), "after": os.path.abspath(args.after),
                       "rounds": args.rounds, "repeats": args.repeats, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
