"""Benchmark of the odconv2d op: our extension against the reference, the compiled reference and a static conv.

For each layer shape it
  1. validates, in float64 on a batch of 2 of that layer, every backend it will time: output and the six
     gradients against the reference (the reference itself against a per-sample definition; the static conv
     as the same layer: the reference with K = 1 and unit attentions). With --dtype other than float64 the
     eager backends are also checked in that dtype against float64. A mismatch stops the run (exit 1);
  2. times forward under torch.no_grad() ("fwd") and forward + backward of all six inputs ("fwdbwd"), with
     torch.utils.benchmark's blocked_autorange after a warm-up, in --rounds rounds interleaved across
     backends (a burst of load from elsewhere then hits all of them), merged: median over all blocks; the
     process first makes glibc keep freed memory (odconv.keep_freed_memory(), as train.py does), so that no
     backend's time includes taking its large buffers as fresh pages on every call (--release-memory: not);
  3. measures the peak memory of one training step, forward + backward ("mem").
and prints markdown tables, then writes everything (machine, command line, per-shape results) to JSON.

Backends
  extension           torch.ops.odconv.odconv2d, our kernels (skipped, with the reason, if not built for the device)
  reference           odconv.reference.odconv2d_reference, the official formulation (all B kernels, groups=B*G)
  compiled_reference  torch.compile(odconv2d_reference, dynamic=False) (--no-compile to skip)
  static              F.conv2d with one (Cout, Cin/G, k, k) weight: what a plain conv layer of this shape costs

Figures of merit, per shape and mode
  floor  = 1 + K/(Ho*Wo): the least odconv can cost relative to the static conv (per sample it also
           aggregates the kernel from K candidates, K*Cout*J multiply-adds against Cout*J*Ho*Wo for the conv)
  target = extension / (static * floor): our goal is <= 1.15 for fwd and <= 1.2 for fwdbwd

Peak memory of a training step, minus what was allocated before it (inputs, the output gradient); the
gradients the step returns are part of it
  cuda  torch.cuda.max_memory_allocated() over the step, after a warm-up step and reset_peak_memory_stats().
  cpu   no allocator statistic sees everything (oneDNN, MKL and the extension's own buffers bypass the
        profiler's view), so the peak resident set size is measured, in a fresh subprocess per shape that
        takes the backends one after another: for each, it allocates the inputs, runs two warm-up steps (lazy
        initialisation, compilation), frees them, and reports the peak RSS during one more step (Linux VmHWM,
        reset through /proc/self/clear_refs) minus the RSS just before it. The subprocess has glibc mmap every
        block of 64 KiB or more (and so unmap it when freed) and calls malloc_trim() before each measured step,
        so its RSS is live memory and what one backend freed cannot hide part of the next one's peak.
        Resolution: pages; steps of a few KiB are noise.

On CUDA, TF32 is switched off (cuDNN and cuBLAS): every backend computes in true float32, as the validation
requires. Timings on a shared or busy machine are noisy (the load average is recorded in the JSON).

Examples
  python benchmarks/bench_op.py --quick --device cpu            # smoke run, < 1 minute on 2 cores
  python benchmarks/bench_op.py --device cuda                   # default suite, float32
  python benchmarks/bench_op.py --device cuda --shapes default,layer4,extra --dtype bfloat16
  python benchmarks/bench_op.py --device cpu --shapes "32,256,256,8,3,4,1,1" --modes fwd,fwdbwd --no-compile
  python benchmarks/bench_op.py --device cpu --shapes "layer4;64,96,96,24,5,4,1,1" --json /tmp/bench.json
"""
import argparse
import dataclasses
import gc
import json
import os
import shlex
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # odconv, if not installed
import odconv  # noqa: E402  (loads the extension, which registers torch.ops.odconv)
from odconv.reference import odconv2d_reference  # noqa: E402

from common import (NAMES, MALLOC_ENV, SUITES, LayerShape, machine_info, make_inputs, odconv2d_per_sample,  # noqa: E402
                    parse_shapes, peak_rss, relative_errors, release_free_heap, reset_peak_rss)

# ---------------------------------------------------------------------------------------------- defaults
DEFAULT_SHAPES = "default"
QUICK_SHAPES = "quick"
DEFAULT_MIN_RUN_TIME = 0.5     # seconds per blocked_autorange measurement...
DEFAULT_ROUNDS = 3             # ...taken this many times, interleaved across backends and modes
QUICK_MIN_RUN_TIME = 0.05
QUICK_ROUNDS = 1
VALIDATION_BATCH = 2
BACKENDS = ("extension", "reference", "compiled_reference", "static")
MODES = ("fwd", "fwdbwd", "mem")
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Largest max|got - want| / max|want| accepted against float64 results computed from the same inputs.
RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
TARGETS = {"fwd": 1.15, "fwdbwd": 1.2}   # extension / (static * floor)
MEMORY_CHILD_TIMEOUT_S = 1800
MEMORY_TAG = "ODCONV_MEMORY_RESULT "
# -------------------------------------------------------------------------------------------------------


class ValidationError(Exception):
    pass


def log(*args, **kwargs):
    print(*args, **kwargs, flush=True)  # progress of long runs shows up at once, also through a pipe


def extension_unavailable_reason(device):
    """None if the extension has a kernel for this device type, else why not."""
    try:
        if torch._C._dispatch_has_kernel_for_dispatch_key("odconv::odconv2d", device.upper()):
            return None
    except RuntimeError:  # the op was never registered: the extension did not load
        pass
    return odconv.backend_info()[device]["reason"]


def make_forward(backend, shape):
    """A function of the backend's input tensors (the six odconv2d tensors; x and weight for static)."""
    stride, padding, dilation, groups = shape.conv_args()
    if backend == "extension":
        op = torch.ops.odconv.odconv2d
        return lambda *t: op(*t, list(stride), list(padding), list(dilation), groups)
    if backend == "reference":
        return lambda *t: odconv2d_reference(*t, stride, padding, dilation, groups)
    if backend == "compiled_reference":
        compiled = torch.compile(odconv2d_reference, dynamic=False)
        return lambda *t: compiled(*t, stride, padding, dilation, groups)
    if backend == "static":
        return lambda x, weight: F.conv2d(x, weight, None, stride, padding, dilation, groups)
    raise ValueError(backend)


def backend_inputs(backend, odconv_inputs, requires_grad):
    """Fresh leaves over the same storage; static takes x and one (Cout, Cin/G, k, k) kernel."""
    tensors = odconv_inputs[:1] + [odconv_inputs[1][0]] if backend == "static" else odconv_inputs
    return [t.detach().requires_grad_(requires_grad) for t in tensors]


def output_gradient(shape, dtype, device):
    size = (shape.batch, shape.out_channels, shape.out_size, shape.out_size)
    return torch.randn(size, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device, dtype)


def make_step(forward, tensors, grad_out, train):
    """One inference forward (no_grad) or one training step: forward, then the gradients of all inputs."""
    if not train:
        def step():
            with torch.no_grad():
                return forward(*tensors)
        return step

    def step():
        return torch.autograd.grad(forward(*tensors), tensors, grad_out)
    return step


def error_text(error):
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


# --------------------------------------------------------------------------------------------- validation

def output_and_grads(what, forward, tensors, grad_out):
    tensors = [t.detach().requires_grad_() for t in tensors]
    out = forward(*tensors)
    if out.shape != grad_out.shape:
        raise ValidationError(f"{what}: output shape {tuple(out.shape)}, expected {tuple(grad_out.shape)}")
    return [out.detach(), *torch.autograd.grad(out, tensors, grad_out.to(out.dtype))]


def compare(what, got, want, rtol, names):
    errors = dict(zip(names, relative_errors(got, want)))
    bad = [f"{name} {err:.3g}" for name, err in errors.items() if not err <= rtol]
    if bad:
        raise ValidationError(f"{what}: max |got - want| / max |want| exceeds rtol {rtol:g} for " + ", ".join(bad))
    return errors


def validate(shape, backends, forwards, device, dtype):
    """Checks every backend to be timed on a batch of VALIDATION_BATCH of this layer. Returns, per backend,
    {"validated": True, "checks": {check: {tensor: relative error}}} or, for a compiled reference that
    fails to compile, {"validated": False, "skipped": error}. Raises ValidationError on a mismatch."""
    small = shape.with_batch(VALIDATION_BATCH)
    inputs = make_inputs(small, torch.float64, device)
    grad_out = output_gradient(small, torch.float64, device)
    names = ("out",) + NAMES
    results = {}
    truth = {}  # float64 output and gradients each backend must reproduce in the timing dtype

    rtol = RTOL[torch.float64]
    want = output_and_grads("reference", forwards["reference"], inputs, grad_out)

    def float64_check(backend):
        """(name of the check, its relative errors, what the backend must reproduce in the timing dtype)."""
        if backend == "reference":
            stride, padding, dilation, groups = small.conv_args()
            definition = output_and_grads("per-sample definition",
                                          lambda *t: odconv2d_per_sample(*t, stride, padding, dilation, groups),
                                          inputs, grad_out)
            return ("float64 vs per-sample definition",
                    compare("reference vs per-sample definition (float64)", want, definition, rtol, names),
                    (inputs, want, names))
        if backend == "static":
            # The reference with one candidate kernel and unit attentions is a plain conv: this checks that
            # static is the same layer (stride, padding, groups) as the odconv backends.
            x, weight, *attentions = make_inputs(dataclasses.replace(small, kernel_num=1), torch.float64, device)
            unit_attentions = [torch.ones_like(a) for a in attentions]
            ref = output_and_grads("reference", forwards["reference"], [x, weight, *unit_attentions], grad_out)
            got = output_and_grads("static", forwards["static"], [x, weight[0]], grad_out)
            return ("float64 same layer as reference",
                    compare("static vs reference with K=1 and unit attentions (float64)", got,
                            [ref[0], ref[1], ref[2][0]], rtol, ("out", "x", "weight")),
                    ([x, weight[0]], got, ("out", "x", "weight")))
        got = output_and_grads(backend, forwards[backend], inputs, grad_out)
        return ("float64 vs reference", compare(f"{backend} vs reference (float64)", got, want, rtol, names),
                (inputs, want, names))

    for backend in backends:
        try:
            check, errors, truth[backend] = float64_check(backend)
        except ValidationError:
            raise
        except Exception as error:  # noqa: BLE001
            if backend == "compiled_reference":  # a compiler failure is reported, not fatal
                results[backend] = {"validated": False, "skipped": f"compile failed: {error_text(error)}"}
                continue
            raise ValidationError(f"{backend} raised on a valid float64 input: {error_text(error)}") from error
        results[backend] = {"checks": {check: errors}}

    if dtype != torch.float64:
        # Also check the code path that is timed, against float64. The compiled reference is checked in
        # float64 only: one more compilation per shape is not worth it for generated code.
        for backend, (inputs64, want64, tensor_names) in truth.items():
            if backend == "compiled_reference":
                continue
            try:
                got = output_and_grads(f"{backend} in {dtype}", forwards[backend],
                                       [t.to(dtype) for t in inputs64], grad_out.to(dtype))
            except Exception as error:  # noqa: BLE001
                raise ValidationError(f"{backend} raised in {dtype}: {error_text(error)} "
                                      f"(is {dtype} supported on {device}?)") from error
            errors = compare(f"{backend} in {dtype} vs float64", got, want64, RTOL[dtype], tensor_names)
            results[backend]["checks"][f"{str(dtype).replace('torch.', '')} vs float64"] = errors

    for entry in results.values():
        entry.setdefault("validated", True)
    return results


# ----------------------------------------------------------------------------------------- timing, memory

def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def warm_up(step, device):
    """Runs the first two calls (compilation, oneDNN/cuDNN algorithm choice, allocator growth); returns
    the seconds the first one took."""
    start = time.perf_counter()
    step()
    synchronize(device)
    first_call_s = time.perf_counter() - start
    step()
    return first_call_s


def time_steps(steps, device, threads, min_run_time, rounds, sub_label):
    """Times every step with blocked_autorange, in `rounds` interleaved rounds so that a burst of load from
    elsewhere is shared by all backends rather than falling on one; the blocks of all rounds are merged.

    steps: {(backend, mode): step}. Returns {(backend, mode): result dict}, with {"skipped": error} for a
    step that raised."""
    results = {}
    for key, step in steps.items():
        try:
            results[key] = {"first_call_s": warm_up(step, device)}
        except Exception as error:  # noqa: BLE001  (out of memory, compile failure, ...: keep going)
            results[key] = {"skipped": error_text(error)}
    measurements = {key: [] for key in steps if "skipped" not in results[key]}
    for _ in range(rounds):
        for key, runs in measurements.items():
            if "skipped" in results[key]:
                continue
            timer = benchmark.Timer(stmt="step()", globals={"step": steps[key]}, num_threads=threads,
                                    label="odconv2d", sub_label=sub_label, description=" ".join(key))
            try:
                runs.append(timer.blocked_autorange(min_run_time=min_run_time))  # synchronizes CUDA itself
            except Exception as error:  # noqa: BLE001
                results[key] = {"skipped": error_text(error)}
    for key, runs in measurements.items():
        if "skipped" in results[key]:
            continue
        merged, = benchmark.Measurement.merge(runs)
        results[key].update(
            median_ms=merged.median * 1e3, mean_ms=merged.mean * 1e3, iqr_ms=merged.iqr * 1e3,
            round_medians_ms=[run.median * 1e3 for run in runs],
            # > 1.1 or so: the machine was not quiet, or the step is not stable; the median is suspect
            round_spread=max(run.median for run in runs) / min(run.median for run in runs),
            blocks=len(merged.times),
            calls_per_block=[run.number_per_run for run in runs])
    return results


def cuda_step_peak(step):
    step()  # warm-up: cuDNN algorithm search and compilation are not the step's memory
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - baseline
    del result
    return peak


def cpu_step_peak(step):
    for _ in range(2):  # warm-up: lazy initialisation (thread pools, oneDNN primitives, compilation)
        step()
    gc.collect()
    release_free_heap()
    baseline = reset_peak_rss()
    result = step()
    peak = peak_rss() - baseline
    del result
    return peak


def build_step(shape, backend, dtype, device, train):
    forward = make_forward(backend, shape)
    tensors = backend_inputs(backend, make_inputs(shape, dtype, device), requires_grad=train)
    return make_step(forward, tensors, output_gradient(shape, dtype, device), train)


def memory_child(spec):
    """Entry point of the CPU memory subprocess (--memory-child): prints the peak of one training step of
    each backend, measured one after the other, each after its own warm-up."""
    torch.set_num_threads(spec["threads"])
    shape = LayerShape(**spec["shape"])
    peaks = {}
    for backend in spec["backends"]:
        try:
            step = build_step(shape, backend, DTYPES[spec["dtype"]], "cpu", train=True)
            peaks[backend] = cpu_step_peak(step)
        except Exception as error:  # noqa: BLE001  (reported by the parent as this backend's failure)
            peaks[backend] = error_text(error)
        step = None
        gc.collect()
    log(MEMORY_TAG + json.dumps(peaks))


def measure_cpu_memory(shape, backends, dtype_name, threads):
    """{backend: peak bytes, or an error message}, from a fresh subprocess (see the module docstring)."""
    spec = {"shape": dataclasses.asdict(shape), "backends": backends, "dtype": dtype_name, "threads": threads}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", json.dumps(spec)],
                          capture_output=True, text=True, env={**os.environ, **MALLOC_ENV},
                          timeout=MEMORY_CHILD_TIMEOUT_S)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MEMORY_TAG):
            return json.loads(line[len(MEMORY_TAG):])
    stderr = proc.stderr.strip().splitlines()
    error = f"memory subprocess exited {proc.returncode}: {stderr[-1] if stderr else 'no output'}"
    return {backend: error for backend in backends}


# ---------------------------------------------------------------------------------------------- metrics

def ratio(a, b):
    return a / b if a is not None and b else None


def shape_metrics(shape, backends):
    def ms(backend, mode):
        return backends.get(backend, {}).get(mode, {}).get("median_ms")

    metrics = {"floor": shape.floor}
    for mode in ("fwd", "fwdbwd"):
        static = ms("static", mode)
        extension = ms("extension", mode)
        metrics[mode] = {
            "ratio_to_static": {b: ratio(ms(b, mode), static) for b in backends if b != "static"},
            "target": ratio(extension, static * shape.floor if static else None),
            "speedup_vs_reference": ratio(ms("reference", mode), extension),
            "speedup_vs_compiled_reference": ratio(ms("compiled_reference", mode), extension),
        }
    peak = {b: backends[b].get("mem", {}).get("peak_bytes") for b in backends}
    metrics["mem"] = {"ratio_to_static": {b: ratio(p, peak.get("static")) for b, p in peak.items() if b != "static"}}
    return metrics


# (name, how to read it from a shape's metrics, worst is max or min, target)
WORST = [
    ("fwd extension/(static*floor)", lambda m: m["fwd"]["target"], max, TARGETS["fwd"]),
    ("fwdbwd extension/(static*floor)", lambda m: m["fwdbwd"]["target"], max, TARGETS["fwdbwd"]),
    ("fwd speedup over reference", lambda m: m["fwd"]["speedup_vs_reference"], min, None),
    ("fwdbwd speedup over reference", lambda m: m["fwdbwd"]["speedup_vs_reference"], min, None),
    ("fwd speedup over compiled reference", lambda m: m["fwd"]["speedup_vs_compiled_reference"], min, None),
    ("fwdbwd speedup over compiled reference", lambda m: m["fwdbwd"]["speedup_vs_compiled_reference"], min, None),
    ("peak memory extension/static", lambda m: m["mem"]["ratio_to_static"].get("extension"), max, None),
]


def worst_shapes(results):
    worst = {}
    for name, read, pick, target in WORST:
        values = [(read(r["metrics"]), r["name"]) for r in results]
        values = [(v, n) for v, n in values if v is not None]
        if values:
            value, shape_name = pick(values)
            worst[name] = {"value": value, "shape": shape_name, "target": target}
    return worst


# ---------------------------------------------------------------------------------------------- report

def fmt(value, spec=".3f", suffix=""):
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def markdown_tables(results, backends):
    def value(result, backend, mode, key):
        return result["backends"].get(backend, {}).get(mode, {}).get(key)

    odconv_backends = [b for b in backends if b != "static"]
    time_rows = []
    for r in results:
        for mode, label in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
            if not any(mode in r["backends"].get(b, {}) for b in backends):
                continue  # mode not run
            m = r["metrics"][mode]
            cells = [fmt(value(r, "static", mode, "median_ms"))]
            for b in odconv_backends:
                ms = value(r, b, mode, "median_ms")
                cells.append("n/a" if ms is None else f"{ms:.3f} ({fmt(m['ratio_to_static'].get(b), '.2f')})")
            cells += [f"{r['metrics']['floor']:.3f}", fmt(m["target"], ".2f"),
                      fmt(m["speedup_vs_reference"], ".2f", "x"), fmt(m["speedup_vs_compiled_reference"], ".2f", "x")]
            time_rows.append(f"| {r['name']} | {label} | " + " | ".join(cells) + " |")
    tables = []
    if time_rows:
        header = (["shape", "mode", "static ms"] + [f"{b} ms (x static)" for b in odconv_backends]
                  + ["floor", "ext/(static*floor)", "ext speedup vs ref", "vs compiled"])
        tables += ["### Time (median ms; ratio to static)", "", "| " + " | ".join(header) + " |",
                   "|---" * len(header) + "|", *time_rows, ""]

    if any("mem" in e for r in results for e in r["backends"].values()):
        header = ["shape"] + [f"{b} MiB" for b in backends] + ["ext/static", "ref/static"]
        tables += ["### Peak memory of one training step (beyond inputs)", "", "| " + " | ".join(header) + " |",
                   "|---" * len(header) + "|"]
        for r in results:
            peaks = [value(r, b, "mem", "peak_bytes") for b in backends]
            ratios = r["metrics"]["mem"]["ratio_to_static"]
            cells = [fmt(None if p is None else p / 2 ** 20, ".1f") for p in peaks]
            cells += [fmt(ratios.get("extension"), ".2f"), fmt(ratios.get("reference"), ".2f")]
            tables.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(tables)


def write_json(path, report):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__[__doc__.index("Examples"):])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda if available")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: the '{QUICK_SHAPES}' suite (unless --shapes), {QUICK_MIN_RUN_TIME}s timings")
    parser.add_argument("--shapes", default=None,
                        help=f"suites ({', '.join(SUITES)}) and/or 'B,Cin,Cout,H,k,K,stride,groups[,padding[,dilation]]' "
                             f"shapes, separated by ';' (suites also by ','); default: {DEFAULT_SHAPES}")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of the timed runs")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated subset of " + ",".join(BACKENDS))
    parser.add_argument("--no-compile", action="store_true", help="skip compiled_reference")
    parser.add_argument("--release-memory", action="store_true",
                        help="time under glibc's default, which returns freed memory to the system (large buffers "
                             "then come back as fresh pages on every call); by default it is kept, as train.py does")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help=f"seconds per blocked_autorange measurement "
                             f"(default {DEFAULT_MIN_RUN_TIME}, quick {QUICK_MIN_RUN_TIME})")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"interleaved timing rounds, merged (default {DEFAULT_ROUNDS}, quick {QUICK_ROUNDS})")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (default: torch's)")
    parser.add_argument("--json", default=None,
                        help="output path (default benchmarks/results/bench_op_<device>[_<suites>][_<dtype>].json, "
                             "see default_json_path)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # internal: CPU memory subprocess
    args = parser.parse_args(argv)

    args.shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    try:
        parse_shapes(args.shapes)
    except ValueError as error:
        parser.error(str(error))
    if args.min_run_time is None:
        args.min_run_time = QUICK_MIN_RUN_TIME if args.quick else DEFAULT_MIN_RUN_TIME
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for value, known, what in ((args.modes, MODES, "mode"), (args.backends, BACKENDS, "backend")):
        unknown = set(value) - set(known)
        if unknown:
            parser.error(f"unknown {what}(s) {sorted(unknown)}; choose from {','.join(known)}")
    if args.json is None:
        args.json = default_json_path(args.device, args.shapes, args.dtype)
    return args


def default_json_path(device, shapes, dtype):
    """benchmarks/results/bench_op_<device>.json for runs of the issue's suite ('default' among the
    suites), bench_op_<device>_<suites>.json for other suites (gtsrb, layer4_other, ...) and
    bench_op_<device>_custom.json for explicit shapes, with _<dtype> unless float32: a run of one
    suite does not overwrite another's results."""
    items = [item.strip() for part in shapes.split(";") for item in part.split(",") if item.strip()]
    if not all(item in SUITES for item in items):
        name = "_custom"
    elif "default" in items:
        name = ""
    else:
        name = "_" + "_".join(items)
    suffix = "" if dtype == "float32" else f"_{dtype}"
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"bench_op_{device}{name}{suffix}.json")


def benchmark_shape(entry, shape, backends, unavailable, args):
    """Fills entry["backends"] and entry["metrics"] for one shape: validation first (raises ValidationError on
    a mismatch), then timings and memory of every backend that passed."""
    device, dtype = args.device, DTYPES[args.dtype]
    runnable = [b for b in backends if b not in unavailable]
    if "compiled_reference" in runnable:
        torch._dynamo.reset()  # code compiled for earlier shapes would count towards the recompile limit
    forwards = {b: make_forward(b, shape) for b in set(runnable) | {"reference"}}
    results = entry["backends"]
    for backend in backends:
        results[backend] = {"validated": False, "skipped": unavailable[backend]} if backend in unavailable else {}

    for backend, result in validate(shape, runnable, forwards, device, dtype).items():
        results[backend].update(result)
        if result["validated"]:
            log(f"  validated {backend}: " + ", ".join(f"{check} {max(errors.values()):.1e}"
                                                       for check, errors in result["checks"].items()))
        else:
            log(f"  skipping {backend}: {result['skipped']}")
    validated = [b for b in backends if results[b].get("validated")]

    odconv_inputs = make_inputs(shape, dtype, device)
    grad_out = output_gradient(shape, dtype, device)

    def step(backend, train):
        return make_step(forwards[backend], backend_inputs(backend, odconv_inputs, train), grad_out, train)

    steps = {(backend, mode): step(backend, train=mode == "fwdbwd")
             for backend in validated for mode in args.modes if mode != "mem"}
    timings = time_steps(steps, device, args.threads, args.min_run_time, args.rounds, shape.name)
    for (backend, mode), timing in timings.items():
        results[backend][mode] = timing
        if "median_ms" in timing:
            spread = f" (slowest/fastest round {timing['round_spread']:.2f})" if args.rounds > 1 else ""
            log(f"  {backend:<18} {mode:<6} {timing['median_ms']:.3f} ms{spread}")
        else:
            log(f"  {backend:<18} {mode:<6} failed: {timing['skipped']}")
    del steps
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

    if "mem" in args.modes and validated:
        if device == "cpu":
            peaks = measure_cpu_memory(shape, validated, args.dtype, args.threads)
        else:
            peaks = {}
            for backend in validated:
                try:
                    peaks[backend] = cuda_step_peak(step(backend, train=True))
                except Exception as error:  # noqa: BLE001
                    peaks[backend] = error_text(error)
                torch.cuda.empty_cache()
        for backend, peak in peaks.items():
            if isinstance(peak, int):
                results[backend]["mem"] = {"peak_bytes": peak, "peak_mib": peak / 2 ** 20}
                log(f"  {backend:<18} mem    {peak / 2 ** 20:.1f} MiB")
            else:
                results[backend]["mem"] = {"skipped": peak}
                log(f"  {backend:<18} mem    failed: {peak}")
    entry["metrics"] = shape_metrics(shape, results)


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child:
        memory_child(json.loads(args.memory_child))
        return 0

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    torch.set_num_threads(args.threads)
    # as train.py: glibc keeps freed memory for the next call, so no backend's time includes taking its large
    # buffers as fresh pages again on every call (the static convolution's were up to half of its time)
    kept_freed_memory = False if args.release_memory else odconv.keep_freed_memory()
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # the best cuDNN algorithm for every conv, static and reference
        # cuDNN convs default to TF32 (10-bit mantissa): the reference and the static conv would then be timed
        # at lower precision than our float32 kernels, and fail the float32 validation (errors ~5e-4).
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    shapes = parse_shapes(args.shapes)

    # Backends that will not run at all, and why.
    backends = [b for b in BACKENDS if b in args.backends]
    unavailable = {}
    reason = extension_unavailable_reason(device)
    if reason:
        unavailable["extension"] = f"not built for {device}: {reason}"
    if args.no_compile:
        unavailable["compiled_reference"] = "--no-compile"
    for backend, why in unavailable.items():
        if backend in backends:
            log(f"note: skipping {backend}: {why}")

    report = {
        "command": shlex.join([sys.executable] + (sys.argv if argv is None else [sys.argv[0], *argv])),
        "args": {k: v for k, v in vars(args).items() if k != "memory_child"},
        "machine": machine_info(device),
        "backend_info": odconv.backend_info(),
        "config": {"validation_batch": VALIDATION_BATCH, "rtol": {str(k): v for k, v in RTOL.items()},
                   "targets": TARGETS, "keep_freed_memory": kept_freed_memory,
                   "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
                   if device == "cuda" else None,
                   "memory_method": "torch.cuda.max_memory_allocated() over one step, minus allocated before"
                   if device == "cuda" else "peak RSS (VmHWM) over one step minus RSS before, in a fresh subprocess "
                   "per shape, glibc mmap threshold 64 KiB, after warm-up and malloc_trim"},
        "shapes": [],
    }
    log(f"odconv2d benchmark: {device} ({report['machine']['device_name']}), {args.dtype}, "
          f"{args.threads} threads, torch {torch.__version__}, {len(shapes)} shapes")

    for index, shape in enumerate(shapes, 1):
        log(f"[{index}/{len(shapes)}] {shape.name} (floor {shape.floor:.3f})")
        entry = {"name": shape.name, "shape": shape.as_dict(), "backends": {}}
        report["shapes"].append(entry)
        try:
            benchmark_shape(entry, shape, backends, unavailable, args)
        except ValidationError as error:
            report["error"] = f"validation failed on {shape.name}: {error}"
            write_json(args.json, report)
            log(f"VALIDATION FAILED on {shape.name}: {error}\n(results so far in {args.json})", file=sys.stderr)
            return 1
        write_json(args.json, report)  # after every shape, so an interrupted run keeps what it measured

    report["worst"] = worst_shapes(report["shapes"])
    report["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    write_json(args.json, report)

    log()
    log(markdown_tables(report["shapes"], backends))
    log()
    for name, worst in report["worst"].items():
        target = f" (target <= {worst['target']})" if worst["target"] else ""
        log(f"worst {name}: {worst['value']:.3f} at {worst['shape']}{target}")
    log(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
