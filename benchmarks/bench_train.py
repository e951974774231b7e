"""Images per second of one full training step (forward, loss, backward, SGD update) of the GTSRB
network, with the odconv extension and with the pure-PyTorch reference (the official
formulation), plus the static twin (nn.Conv2d) for scale; each network also under bfloat16 autocast
(`train.py --amp bf16`), to show whether mixed precision pays on this machine.

    python benchmarks/bench_train.py                       # batch 128, 48x48 images (train.py's), CPU
    python benchmarks/bench_train.py --quick               # CI smoke run
    python benchmarks/bench_train.py --device cuda --batch-size 256

Each configuration runs in a fresh process (the backend is chosen when odconv is imported, by
ODCONV_BACKEND), ROUNDS times, the configurations alternating; a configuration's result is its
fastest round (its median step in that round). On a shared machine one process can run 30 % slower
than the next for reasons of its own; alternating and keeping the best round compares the
configurations, not the machine's moments. Prints a markdown table and writes JSON (default
benchmarks/results/bench_train_<device>.json).

Like train.py, each worker first calls odconv.keep_freed_memory() (glibc keeps freed memory for the
next step instead of unmapping it; see odconv/allocator.py); --release-memory leaves glibc's default,
under which every step takes its large tensors as fresh pages.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

try:
    import resource  # Unix
except ImportError:
    resource = None

BATCH_SIZE = 128
IMAGE_SIZE = 48
STEPS = 12
WARMUP = 3
ROUNDS = 3
# (network, odconv backend, autocast): the reference's autocast run is left out (it is the slow baseline)
CONFIGS = [("odconv", "extension", "none"), ("odconv", "reference", "none"), ("static", "extension", "none"),
           ("odconv", "extension", "bf16"), ("static", "extension", "bf16")]


def worker(args):
    os.environ["ODCONV_BACKEND"] = args.backend
    # odconv from this checkout when it is not installed (built in place, as benchmarks/gpu_check.sh does)
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch

    import odconv
    from odconv.models import build_model

    # as train.py: freed memory stays in the process for the next step (odconv.allocator)
    kept = False if args.release_memory else odconv.keep_freed_memory()
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model({"conv": args.conv}).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    criterion = odconv.AdaptiveLoss(class_counts=[100 + 10 * c for c in range(43)]).to(device)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 43, (args.batch_size,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        # as train.py: the forward and the loss under autocast, the backward outside it
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    # the process's peak resident set (Linux and BSD report KiB, macOS bytes): what keeping freed memory costs
    peak_rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)
                if resource is not None else None)
    print(json.dumps({"conv": args.conv, "backend": odconv.backend_info()[device.type]["backend"], "amp": args.amp,
                      "keep_freed_memory": kept, "peak_rss_mib": peak_rss,
                      "step_ms": 1e3 * median, "images_per_s": args.batch_size / median,
                      "step_ms_all": [1e3 * t for t in times]}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--warmup", type=int, default=WARMUP)
    p.add_argument("--rounds", type=int, default=None,
                   help=f"alternations of the configurations, the best kept (default {ROUNDS}; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="batch 16, 2 steps, 1 round: a smoke run")
    p.add_argument("--release-memory", action="store_true",
                   help="glibc's default: freed memory goes back to the system (train.py keeps it, as without this)")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--conv", default="odconv", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="extension", help=argparse.SUPPRESS)
    p.add_argument("--amp", default="none", choices=["none", "bf16"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.batch_size, args.steps, args.warmup = 16, 2, 1
    args.rounds = max(1, args.rounds if args.rounds is not None else (1 if args.quick else ROUNDS))
    if args.worker:
        return worker(args)

    rounds = [[] for _ in CONFIGS]  # per configuration, one worker result per round
    for _ in range(args.rounds):
        for i, (conv, backend, amp) in enumerate(CONFIGS):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--conv", conv, "--backend", backend,
                   "--amp", amp, "--device", args.device, "--batch-size", str(args.batch_size),
                   "--image-size", str(args.image_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            if args.release_memory:
                cmd.append("--release-memory")
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{conv}/{backend}/autocast {amp} failed:\n{out.stderr[-2000:]}")
            rounds[i].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = []
    for per_round in rounds:
        best = dict(min(per_round, key=lambda r: r["step_ms"]))
        best["round_step_ms"] = [r["step_ms"] for r in per_round]
        results.append(best)

    by = {(r["conv"], r["backend"], r["amp"]): r for r in results}
    ext, ref = by.get(("odconv", "extension", "none")), by.get(("odconv", "reference", "none"))
    print(f"GTSRB network training step, batch {args.batch_size}, {args.image_size}x{args.image_size}, {args.device}, "
          f"fastest of {args.rounds} rounds")
    print("| network | odconv backend | autocast | step (ms) | images/s | peak RSS (MiB) |")
    print("|---|---|---|---:|---:|---:|")
    for r in results:
        backend = r["backend"] if r["conv"] == "odconv" else "-"
        rss = "-" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"
        print(f"| {r['conv']} | {backend} | {r['amp']} | {r['step_ms']:.1f} | {r['images_per_s']:.0f} | {rss} |")
    speedup = None
    if ext and ref and ext["backend"] == "extension":
        speedup = ext["images_per_s"] / ref["images_per_s"]
        print(f"\nextension / reference: {speedup:.2f}x images/s")
    bf16_speedup = {}
    for conv in ("odconv", "static"):
        fp32, bf16 = by.get((conv, "extension", "none")), by.get((conv, "extension", "bf16"))
        if fp32 and bf16:
            bf16_speedup[conv] = bf16["images_per_s"] / fp32["images_per_s"]
            print(f"{conv}: bf16 autocast / float32: {bf16_speedup[conv]:.2f}x images/s")

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import machine_info
    report = {"machine": machine_info(args.device), "device": args.device,
              "batch_size": args.batch_size, "image_size": args.image_size, "steps": args.steps,
              "rounds": args.rounds,
              "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]), "results": results,
              "extension_over_reference": speedup, "bf16_autocast_over_float32": bf16_speedup}
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"bench_train_{args.device}{'_quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
