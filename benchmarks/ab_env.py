"""A/B of the CPU kernels' path overrides within one process, call by call: which variant is faster.

The extension reads its ODCONV_CPU_* overrides (ODCONV_CPU_BACKWARD_SPLIT, ODCONV_CPU_BACKWARD_TRANSPOSED_GX,
ODCONV_CPU_CONV_PATH, ODCONV_CPU_DEAD_TAPS, ODCONV_CPU_DEPTHWISE, ODCONV_CPU_FOLDED_GRAD_W, ODCONV_CPU_FORWARD_SPLIT, ODCONV_CPU_MASKED_TAPS,
ODCONV_CPU_RAGGED_TAIL, ODCONV_CPU_SHARED_KERNEL, ODCONV_CPU_SKIP_PADDED_ROWS, ODCONV_CPU_TAP_MAJOR,
ODCONV_CPU_TRANSPOSED_FORWARD) at every call, so one process can alternate them.
This script times the compiled ops (forward, and the backward op with both gradient groups) of each
layer with every variant in turn, call after call, the order reversed every other round, and reports per variant the median time and the median over rounds
of its time / the first variant's time in the same round. A shared machine's drift over minutes hits the paired
calls alike: on the 2-vCPU EPYC of 2026-12-06 such ratios held to 2-3 % over 30 rounds where
benchmarks/ab_builds.py's fastest medians of fresh processes (the way to compare two builds) moved
by 10-20 %.

--fresh-inputs gives every round new input tensors (the same values in new memory; the old ones stay
allocated, so the memory really is new): on the Zen 4 EPYC of 2026-12-08 the folded backward's time on
small maps depended on where its buffers and the inputs lay -- 38-41 ms against 54-60 ms for the same call
on the GTSRB 6x6 layer, the static backward unchanged (HISTORY.md) -- and a process, or a run of calls,
could stay in one such state; with fresh inputs each variant meets many of them, and the ratios
compare the variants rather than one placement.

By default the process keeps glibc's defaults, under which buffers of 32 MiB and more come as fresh pages on
every call; --keep-freed-memory makes glibc keep freed memory first (odconv.keep_freed_memory(), as train.py,
bench_op.py and sweep_shapes.py run), which A/B runs of allocation-heavy paths should use to read as training.
A variant is a comma-separated list of VAR=VALUE settings ("" or "-" for none: the defaults); a
setting with an empty value unsets the variable.

Examples
  python benchmarks/ab_env.py --variants "-" "ODCONV_CPU_TRANSPOSED_FORWARD=always" --shapes "32,256,256,14,3,4,1,1"
  python benchmarks/ab_env.py --variants "ODCONV_CPU_BACKWARD_SPLIT=samples" "ODCONV_CPU_BACKWARD_SPLIT=columns" \\
      --shapes "64,128,128,12,3,4,1,1;128,128,256,6,3,4,1,1" --modes bwd --rounds 30 --json ab_env.json
  python benchmarks/ab_env.py --variants "-" "ODCONV_CPU_FOLDED_GRAD_W=products" --shapes "128,128,256,6,3,4,1,1" \
      --modes bwd --rounds 10 --fresh-inputs --keep-freed-memory
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.append(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # odconv, if not installed
import odconv  # noqa: E402  (loads the extension, which registers torch.ops.odconv)
from common import env_settings, layer_calls, machine_info, parse_shapes  # noqa: E402

SHAPES = "64,512,512,4,3,4,1,1"
MODES = "fwd,bwd"
ROUNDS = 20       # calls per variant, op and shape, interleaved
WARMUP = 2        # untimed calls per variant before the rounds


def parse_variant(text):
    """{"VAR": "VALUE"} of a variant "VAR=VALUE,VAR2=VALUE2" ("" or "-": no settings)."""
    if text in ("", "-"):
        return {}
    try:
        return env_settings(filter(None, text.split(",")))
    except ValueError as error:
        raise ValueError(f"a variant is VAR=VALUE[,VAR=VALUE...], got '{error}' in '{text}'") from None


def apply(settings, defaults):
    """Puts the process environment in a variant's state: its settings over the starting values."""
    for name in set(defaults) | set(settings):
        value = settings.get(name, defaults.get(name))
        if value is None or value == "":
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def interleave(make_op, variants, rounds, warmup, fresh_inputs=False):
    """Per variant, its times (s) over `rounds` alternations of the variants. make_op() gives the op to time
    (on its own inputs); with fresh_inputs every round after the first calls it again, keeping the earlier
    ops (and their inputs) alive, and runs the new op once per variant untimed first."""
    names = list(variants)
    defaults = {name: os.environ.get(name) for settings in variants.values() for name in settings}
    times = {name: [] for name in names}
    ops = [make_op()]
    try:
        for name in names:
            apply(variants[name], defaults)
            for _ in range(warmup):
                ops[-1]()
        for r in range(rounds):
            if fresh_inputs and r > 0:
                ops.append(make_op())
                for name in names:
                    apply(variants[name], defaults)
                    ops[-1]()
            op = ops[-1]
            for name in (names if r % 2 == 0 else names[::-1]):
                apply(variants[name], defaults)
                start = time.perf_counter()
                op()
                times[name].append(time.perf_counter() - start)
    finally:
        apply({}, defaults)
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", required=True, help="two or more; the first is the reference")
    p.add_argument("--shapes", default=SHAPES, help="bench_op's syntax")
    p.add_argument("--modes", default=MODES, help="fwd, bwd or both")
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--warmup", type=int, default=WARMUP)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="make glibc keep freed memory, as train.py does (process-wide; default: glibc's defaults)")
    p.add_argument("--fresh-inputs", action="store_true",
                   help="new input tensors every round, the old ones kept (see above)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if len(args.variants) < 2:
        p.error("give at least two variants")
    try:
        variants = {text: parse_variant(text) for text in args.variants}
    except ValueError as error:
        p.error(str(error))
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in ("fwd", "bwd") for m in modes):
        p.error(f"--modes takes fwd and/or bwd, got '{args.modes}'")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = odconv.backend_info()["cpu"]
    if info["backend"] != "extension":
        sys.exit(f"ab_env.py times the compiled CPU extension, which is not in use: {info}")
    kept = bool(odconv.keep_freed_memory()) if args.keep_freed_memory else False

    reference = args.variants[0]
    print("| shape | op | variant | median ms | / first, median of rounds [range] |")
    print("|---|---|---|---:|---:|")
    results = []
    for shape in parse_shapes(args.shapes):
        calls = layer_calls(shape)
        for mode in modes:
            make_op = (lambda m=mode: layer_calls(shape)[m]) if args.fresh_inputs else (lambda m=mode: calls[m])
            times = interleave(make_op, variants, args.rounds, args.warmup, args.fresh_inputs)
            row = {"name": shape.name, "op": mode, "variants": {}}
            for text in args.variants:
                ratios = [t / t0 for t, t0 in zip(times[text], times[reference])]
                row["variants"][text] = {"median_ms": 1e3 * statistics.median(times[text]),
                                         "times_ms": [1e3 * t for t in times[text]], "ratios": ratios}
                print(f"| {shape.name} | {mode} | {text or '-'} | {1e3 * statistics.median(times[text]):.2f} | "
                      f"{statistics.median(ratios):.3f} [{min(ratios):.2f}-{max(ratios):.2f}] |")
            results.append(row)
    if args.json:
        report = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "machine": machine_info("cpu"),
                  "threads": torch.get_num_threads(), "rounds": args.rounds, "reference": reference,
                  "fresh_inputs": args.fresh_inputs,
                  "keep_freed_memory": kept, "results": results}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return results


if __name__ == "__main__":
    main()
