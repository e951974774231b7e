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

When the machine's mood changes over minutes (one build's fastest median 25 % off the other's with
identical code), --paired runs both builds at the same time instead, each process on its own CPU
(the rounds swap the CPUs), so both see the same neighbours; it reports the median of the rounds'
B/A ratios and their range. --threads sets each process's threads (default 1; 2 on one CPU gives
the backward by columns the parts it has on two cores, time-sliced):

    python benchmarks/ab_builds.py /tmp/before . --paired --threads 2 --rounds 4 --repeats 5

--env-a / --env-b VAR=VALUE set environment variables for one side's processes: one build against
itself with a path override (ODCONV_CPU_TRANSPOSED_FORWARD, ODCONV_CPU_BACKWARD_SPLIT, ...) on one side:

    python benchmarks/ab_builds.py . . --env-b ODCONV_CPU_TRANSPOSED_FORWARD=always --paired --shapes "..."
"""
import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import env_settings, parse_shapes  # noqa: E402

SHAPES = "default"
ROUNDS = 2        # alternations of the two builds per shape
REPEATS = 7       # timed calls per process (after one warm-up); their median is one measurement

WORKER = r"""
import json, os, statistics, sys, time
if int(sys.argv[4]) >= 0:
    os.sched_setaffinity(0, {int(sys.argv[4])})  # before OpenMP starts
sys.path.insert(0, sys.argv[1])
import torch, odconv
if int(sys.argv[5]) > 0:
    torch.set_num_threads(int(sys.argv[5]))
from common import LayerShape, layer_calls
assert odconv.backend_info()["cpu"]["backend"] == "extension", odconv.backend_info()["cpu"]
calls = layer_calls(LayerShape(**json.loads(sys.argv[2])))
ops = {name: calls[name] for name in ("fwd", "bwd")}
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


def start(folder, shape, repeats, cpu=-1, threads=0, extra_env=None):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(__file__)), **(extra_env or {}))
    if threads > 0:
        # more threads than CPUs: waiting threads must sleep, not spin on the CPU the others need
        env.update(OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="passive")
    return subprocess.Popen([sys.executable, "-c", WORKER, os.path.abspath(folder), json.dumps(dataclasses.asdict(shape)),
                             str(repeats), str(cpu), str(threads)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def finish(proc, folder, shape):
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"{folder}: {shape.name} failed:\n{err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def measure(folder, shape, repeats, extra_env=None):
    return finish(start(folder, shape, repeats, extra_env=extra_env), folder, shape)


def measure_paired(before, after, shape, repeats, rounds, threads, envs=(None, None)):
    """Both builds at once, each on its own CPU, the CPUs swapped every round: per op, the fastest
    time of each and the rounds' B/A ratios."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        sys.exit("--paired needs two CPUs")
    times = {"before": [], "after": []}
    for r in range(rounds):
        pins = (cpus[0], cpus[1]) if r % 2 == 0 else (cpus[1], cpus[0])
        procs = [start(folder, shape, repeats, cpu, threads, env)
                 for folder, cpu, env in zip((before, after), pins, envs)]
        for side, folder, proc in zip(("before", "after"), (before, after), procs):
            times[side].append(finish(proc, folder, shape))
    ops = times["before"][0].keys()
    ratios = {op: [b[op] / a[op] for a, b in zip(times["before"], times["after"])] for op in ops}
    best = {side: {op: min(t[op] for t in times[side]) for op in ops} for side in times}
    return best, ratios


def parse_env(items, parser):
    """{"VAR": "VALUE"} from --env-a/--env-b's VAR=VALUE items."""
    try:
        return env_settings(items)
    except ValueError as error:
        parser.error(f"an environment setting is VAR=VALUE, got '{error}'")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", help="folder with the first build (A)")
    p.add_argument("after", help="folder with the second build (B)")
    p.add_argument("--shapes", default=SHAPES)
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--paired", action="store_true", help="both builds at once, each on its own CPU")
    p.add_argument("--threads", type=int, default=None, help="threads per process (default: torch's; 1 paired)")
    p.add_argument("--env-a", action="append", default=[], metavar="VAR=VALUE",
                   help="environment variable for A's processes (repeatable)")
    p.add_argument("--env-b", action="append", default=[], metavar="VAR=VALUE",
                   help="environment variable for B's processes (repeatable)")
    args = p.parse_args(argv)
    threads = args.threads if args.threads is not None else (1 if args.paired else 0)
    env_of = {"before": parse_env(args.env_a, p), "after": parse_env(args.env_b, p)}
    rows = []
    if args.paired:
        print("| shape | A fwd ms | B fwd ms | B/A fwd, median [range] | A bwd ms | B bwd ms | B/A bwd, median [range] |")
    else:
        print("| shape | A fwd ms | B fwd ms | B/A fwd | A bwd ms | B bwd ms | B/A bwd |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for shape in parse_shapes(args.shapes):
        row = {"shape": shape.as_dict(), "name": shape.name}
        if args.paired:
            best, ratios = measure_paired(args.before, args.after, shape, args.repeats, args.rounds, threads,
                                          (env_of["before"], env_of["after"]))
            a, b = best["before"], best["after"]
            cells = [f"{statistics.median(ratios[op]):.2f} [{min(ratios[op]):.2f}-{max(ratios[op]):.2f}]"
                     for op in ("fwd", "bwd")]
            row["ratios"] = ratios
        else:
            best = {"before": {}, "after": {}}
            for _ in range(args.rounds):
                for side in ("before", "after"):
                    for op, ms in measure(getattr(args, side), shape, args.repeats, env_of[side]).items():
                        best[side][op] = min(best[side].get(op, float("inf")), ms)
            a, b = best["before"], best["after"]
            cells = [f"{b[op] / a[op]:.2f}" for op in ("fwd", "bwd")]
        print(f"| {shape.name} | {a['fwd']:.1f} | {b['fwd']:.1f} | {cells[0]} "
              f"| {a['bwd']:.1f} | {b['bwd']:.1f} | {cells[1]} |", flush=True)
        row.update(before_ms=a, after_ms=b)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"before": os.path.abspath(args.before), "after": os.path.abspath(args.after),
                       "env_a": env_of["before"], "env_b": env_of["after"],
                       "rounds": args.rounds, "repeats": args.repeats, "paired": args.paired, "threads": threads,
                       "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
