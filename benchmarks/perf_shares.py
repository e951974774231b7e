"""Where a CPU op's time goes: Linux perf's shares of its CPU time, by library, beside its wall time.

For each layer and mode this starts a worker process that builds the layer's inputs and warms the op
up, then records it with `perf record -p` while it makes `--calls` timed calls (so the interpreter's
start and the warm-up are not in the profile), and reads `perf report --sort dso`. The libraries it
names: oneDNN's generated code ("[JIT]": the brgemm micro-kernels of the extension's products, or the
convolution kernels of the static layer and of the extension's convolution path), the extension's own
code (_C: building kernels, im2col, reductions, transposes), libc (memset, memcpy, malloc), the kernel
(page faults), OpenMP (libgomp: threads waiting at barriers), libtorch (dispatch), the rest. Shares
are of the CPU time of all threads. The static convolution of the same layer is timed alongside
(`static ms`: F.conv2d forward, or aten's convolution_backward for the backward), and `jit ms` = the
JIT share of the op's time per call: the time the products took when the threads were busy
throughout, to compare with the static layer's.

The workers make glibc keep freed memory (odconv.keep_freed_memory(), as train.py and bench_op.py do);
with --release-memory, glibc's default, the page faults of large buffers taken afresh on every call show
as the kernel's share.

Needs `perf` and permission to record a process you own (kernel.perf_event_paranoid <= 2).

Examples
  python benchmarks/perf_shares.py --shapes "128,128,256,6,3,4,1,1;128,128,128,12,3,4,1,1"
  python benchmarks/perf_shares.py --shapes "64,512,512,4,3,4,1,1" --modes bwd --calls 10
  python benchmarks/perf_shares.py --shapes gtsrb --json benchmarks/results/perf_shares_cpu.json
"""
import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.append(os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, parse_shapes  # noqa: E402

SHAPES = "128,128,256,6,3,4,1,1;128,128,128,12,3,4,1,1;64,512,512,4,3,4,1,1"
MODES = "fwd,bwd"
CALLS = 20
PERF_START_S = 1.0  # seconds given to perf record to attach
GROUPS = ("jit", "extension", "libc", "kernel", "openmp", "torch", "python", "other")

WORKER = r"""
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch, odconv
from common import LayerShape, layer_calls
mode, calls = sys.argv[3], int(sys.argv[4])
if sys.argv[5] == "keep":
    odconv.keep_freed_memory()  # as train.py and bench_op.py
if not mode.startswith("static"):
    assert odconv.backend_info()["cpu"]["backend"] == "extension", odconv.backend_info()["cpu"]
op = layer_calls(LayerShape(**json.loads(sys.argv[2])))[mode]
with torch.no_grad():
    for _ in range(2):
        op()
    print("ready", flush=True)
    sys.stdin.readline()  # the profiler is attached
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        op()
        times.append(time.perf_counter() - start)
print(json.dumps({"ms": 1e3 * statistics.median(times), "threads": torch.get_num_threads()}), flush=True)
sys.stdin.readline()  # the profiler has stopped: the interpreter's exit is not in the profile
"""


def group_of(dso):
    """The library group of a `perf report --sort dso` entry."""
    if dso.startswith("[JIT]"):
        return "jit"
    if dso.startswith("_C.") or dso.startswith("_C-"):
        return "extension"
    if dso.startswith("libc.so") or dso.startswith("libc-") or dso.startswith("libm.so"):
        return "libc"
    if dso.startswith("[kernel"):
        return "kernel"
    if dso.startswith("libgomp") or dso.startswith("libiomp"):
        return "openmp"
    if dso.startswith("libtorch") or dso.startswith("libc10"):
        return "torch"
    if dso.startswith("libpython") or dso.startswith("python"):
        return "python"
    return "other"


def parse_report(text):
    """Shares in percent per library group from the text of `perf report --sort dso --stdio`."""
    shares = dict.fromkeys(GROUPS, 0.0)
    for line in text.splitlines():
        m = re.match(r"\s*([0-9.]+)%\s+(\S.*?)\s*$", line)
        if m and not line.lstrip().startswith("#"):
            shares[group_of(m.group(2))] += float(m.group(1))
    return shares


def profile(shape, mode, calls, folder, keep_freed_memory=True):
    """(median ms per call, threads, shares by group) of `calls` calls of the op, recorded by perf."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([folder, os.path.dirname(os.path.abspath(__file__))]))
    worker = subprocess.Popen([sys.executable, "-c", WORKER, os.path.dirname(os.path.abspath(__file__)),
                               json.dumps(dataclasses.asdict(shape)), mode, str(calls),
                               "keep" if keep_freed_memory else "release"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if worker.stdout.readline().strip() != "ready":
        worker.kill()
        sys.exit(f"{shape.name} {mode}: the worker failed:\n{worker.stderr.read()[-2000:]}")
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        perf = None
        if not mode.startswith("static"):
            perf = subprocess.Popen(["perf", "record", "-q", "-o", data, "-p", str(worker.pid)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(PERF_START_S)  # perf attaches to the worker's threads before the timed calls
        worker.stdin.write("go\n")
        worker.stdin.flush()
        line = worker.stdout.readline()
        shares = None
        if perf is not None:
            perf.send_signal(signal.SIGINT)
            perf_err = perf.communicate()[1]
        worker.stdin.write("exit\n")
        worker.stdin.flush()
        err = worker.communicate()[1]
        if worker.returncode != 0 or not line.strip():
            sys.exit(f"{shape.name} {mode}: the worker failed:\n{err[-2000:]}")
        result = json.loads(line)
        if perf is not None:
            report = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso", "--stdio"],
                                    capture_output=True, text=True)
            if report.returncode != 0 or "%" not in report.stdout:
                sys.exit(f"perf recorded nothing usable:\n{perf_err[-1000:]}\n{report.stderr[-1000:]}")
            shares = parse_report(report.stdout)
    return result["ms"], result["threads"], shares


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=SHAPES, help="bench_op's shape syntax or suite names")
    p.add_argument("--modes", default=MODES, help="fwd and/or bwd (the backward op, both gradient groups)")
    p.add_argument("--calls", type=int, default=CALLS)
    p.add_argument("--folder", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   help="checkout whose built extension to profile (default: this one)")
    p.add_argument("--release-memory", action="store_true",
                   help="glibc's default: freed memory goes back to the system (page faults show as kernel %%); "
                        "by default the workers keep it, as train.py does")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= {"fwd", "bwd"}:
        p.error(f"--modes takes fwd and bwd, got {args.modes}")
    if shutil.which("perf") is None:
        sys.exit("perf is not installed (linux-tools / linux-perf)")

    rows = []
    print("| shape | mode | ms | static ms | " + " | ".join(f"{g} %" for g in GROUPS) + " | jit ms |")
    print("|---|---|---:|---:|" + "---:|" * (len(GROUPS) + 1))
    for shape in parse_shapes(args.shapes):
        for mode in modes:
            keep = not args.release_memory
            static_ms = profile(shape, "static_" + mode, args.calls, args.folder, keep)[0]
            ms, threads, shares = profile(shape, mode, args.calls, args.folder, keep)
            jit_ms = ms * shares["jit"] / 100
            rows.append({"name": shape.name, "mode": mode, "ms": ms, "static_ms": static_ms, "threads": threads,
                         "shares_percent": shares, "jit_ms": jit_ms})
            cells = " | ".join(f"{shares[g]:.1f}" for g in GROUPS)
            print(f"| {shape.name} | {mode} | {ms:.1f} | {static_ms:.1f} | {cells} | {jit_ms:.1f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
                       "machine": machine_info("cpu"), "calls": args.calls,
                       "keep_freed_memory": not args.release_memory, "results": rows}, fh, indent=1)
        print(f"\nwrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
