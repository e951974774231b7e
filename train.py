"""Train (or evaluate) the ODConv traffic-sign classifier on GTSRB.

    python train.py --data data                                  # the full run, defaults below
    python train.py --data data --conv static --out runs/static  # ablation: the same net with nn.Conv2d
    python train.py --data data --epochs 1 --limit 3000          # a quick smoke run
    python train.py --resume runs/gtsrb_odconv/last.pt           # continue a killed run
    python train.py --evaluate checkpoints/gtsrb_odconv.pt --data data --split val
    python train.py --export runs/gtsrb_odconv/best.pt checkpoints/gtsrb_odconv.pt   # for shipping
    torchrun --nproc_per_node=2 train.py --data data             # DistributedDataParallel

Data: the official GTSRB layout under --data (see odconv/data.py); --download fetches it with
torchvision where a network exists. Validation is a track-wise split of the training split.
Outputs in --out: last.pt (every epoch, for --resume), best.pt (best validation accuracy),
metrics.csv, curves.png, confusion_matrix.png, per_class.csv. Checkpoints are written atomically.
--export writes a checkpoint without the training state (optimizer, raw weights, RNG), for shipping.
"""
import argparse
import csv
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import odconv
from odconv.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from odconv.data import (GTSRB_CLASSES, PREPROCESS_DEFAULTS, augment_batch, load_cached, normalize, read_split,
                         track_split)
from odconv.models import MODEL_DEFAULTS, build_model, count_macs, count_parameters

# ---- defaults -----------------------------------------------------------------------------------
DATA = "data"
OUT = "runs/gtsrb_odconv"
CONV = "odconv"              # "odconv" or "static" (the ablation twin)
IMAGE_SIZE = 48              # speed-limit digits need the pixels: 98.92 % at 32, see README
EPOCHS = 15
BATCH_SIZE = 128
LR = 0.1                     # peak learning rate (SGD, Nesterov momentum), per 128 images, for a
WEIGHT_DECAY = 5e-4          # loss of cross-entropy scale; AdaptiveLoss's alpha scales its gradients,
                             # so with it the optimiser runs at lr/alpha and weight_decay*alpha: the
                             # same steps as an alpha = 1 loss at LR and WEIGHT_DECAY
EMA = 0.999                  # decay per step of the weight average that is evaluated and saved (0: off)
WARMUP_EPOCHS = 1
LOSS = "adaptive"            # "adaptive" (class-balanced focal) or "ce"
TEMP_INIT = 30.0             # ODConv temperature: 30 -> 1 linearly over the first TEMP_EPOCHS
TEMP_EPOCHS = None           # default: a tenth of the run (the official 10 of 100 epochs)
VAL_FRACTION = 0.1
SPLIT_SEED = 0
SEED = 0
AMP = "none"                 # "bf16": bfloat16 autocast (CPU and CUDA)
# --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA, help="GTSRB root (holds gtsrb/GTSRB/...)")
    p.add_argument("--download", action="store_true", help="download GTSRB with torchvision first")
    p.add_argument("--out", default=OUT, help="output folder")
    p.add_argument("--conv", default=CONV, choices=["odconv", "static"])
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    p.add_argument("--widths", type=int, nargs="+", default=MODEL_DEFAULTS["widths"])
    p.add_argument("--blocks", type=int, nargs="+", default=MODEL_DEFAULTS["blocks"])
    p.add_argument("--stem-width", type=int, default=MODEL_DEFAULTS["stem_width"])
    p.add_argument("--kernel-num", type=int, default=MODEL_DEFAULTS["kernel_num"])
    p.add_argument("--dropout", type=float, default=MODEL_DEFAULTS["dropout"])
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="per process")
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY)
    p.add_argument("--ema", type=float, default=EMA, help="decay of the weight average per step (0: off)")
    p.add_argument("--warmup-epochs", type=float, default=WARMUP_EPOCHS)
    p.add_argument("--loss", default=LOSS, choices=["adaptive", "ce"])
    p.add_argument("--temp-init", type=float, default=TEMP_INIT)
    p.add_argument("--temp-epochs", type=float, default=TEMP_EPOCHS)
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION)
    p.add_argument("--split-seed", type=int, default=SPLIT_SEED)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--amp", default=AMP, choices=["none", "bf16"])
    p.add_argument("--limit", type=int, default=0, help="use about N training images, every k-th (smoke runs)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--release-memory", action="store_true",
                   help="leave glibc's default of returning freed memory to the system; by default it is kept "
                        "for the next step (odconv.keep_freed_memory; benchmarks/bench_train.py: CPU steps 1.2-1.35x as fast, "
                        "8 %% more peak memory)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resume", default="", help="continue from this last.pt")
    p.add_argument("--evaluate", default="", metavar="CKPT", help="only evaluate this checkpoint on --split")
    p.add_argument("--split", default="val", choices=["train", "val", "test"], help="split for --evaluate")
    p.add_argument("--export", nargs=2, metavar=("CKPT", "OUT"), help="copy CKPT without its training state to OUT")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


# ---- distributed ----------------------------------------------------------------------------------

def setup_distributed(device):
    """torchrun sets RANK/WORLD_SIZE: then one process per rank (gloo on CPU, nccl on CUDA)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return rank, world, torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return rank, world, torch.device("cpu")


def all_reduce_sum(values, device, world):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


# ---- data ---------------------------------------------------------------------------------------

def load_splits(args, preprocess, splits, progress):
    """{split: GTSRBTensors} for the requested splits; train/val come from the track-wise split. Missing
    or unreadable data ends the run with the reason, not a traceback."""
    try:
        return read_splits(args, preprocess, splits, progress)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}")


def read_splits(args, preprocess, splits, progress):
    result = {}
    if {"train", "val"} & set(splits):
        samples = read_split(args.data, "train")
        train, val = track_split(samples, args.val_fraction, args.split_seed)
        if args.limit:  # every k-th image: all classes stay represented
            train = train[:: max(1, len(train) // args.limit)]
        if "train" in splits:
            result["train"] = load_cached(args.data, train, preprocess, progress=progress)
        if "val" in splits:
            result["val"] = load_cached(args.data, val, preprocess, progress=progress)
    if "test" in splits:
        result["test"] = load_cached(args.data, read_split(args.data, "test"), preprocess, progress=progress)
    return result


# ---- one epoch ------------------------------------------------------------------------------------

def ema_update(decay):
    """Exponential moving average for torch.optim.swa_utils.AveragedModel, with a warm-up: after n
    updates the decay is min(decay, (1 + n) / (10 + n)), so the average follows the early, fast-moving
    weights instead of holding on to the random initial ones. Integer buffers take the current value."""

    def update(averaged, current, num_averaged):
        if not averaged[0].is_floating_point():
            torch._foreach_copy_(averaged, current)
            return
        n = float(num_averaged)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))

    return update


def bf16_emulation_warning(amp, device):
    """The warning for bfloat16 autocast on a CPU that has no bfloat16 arithmetic, or None.

    Without AVX512-BF16 or AMX, oneDNN converts to and from float32 around every product: on an AMD
    EPYC with AVX2 only, a training step of the GTSRB network ran 6x (ODConv) and 10x (static twin)
    slower under autocast than in float32 (benchmarks/results/bench_train_cpu_9f7389a_avx2.json)."""
    if amp != "bf16" or device.type != "cpu":
        return None
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if any(getattr(torch.cpu, name, lambda: False)() for name in checks):
        return None
    return ("warning: --amp bf16 on a CPU without bfloat16 arithmetic (AVX512-BF16 or AMX): autocast "
            "emulates it and trains several times slower than float32 here (6-10x on an AVX2 CPU, "
            "benchmarks/RESULTS.md); --amp none is the faster choice")


def autocast(args, device):
    if args.amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def train_one_epoch(model, loader, criterion, optimizer, lr_at, temperature_at, epoch, args, device, rank, world,
                    generator, ema=None):
    model.train()
    steps = len(loader)
    totals = [0.0, 0.0, 0.0]  # loss sum, correct, seen
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=rank != 0 or args.no_progress,
               unit="batch", dynamic_ncols=True)
    for step, (images, labels) in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch, step, steps)
        temperature = temperature_at(epoch, step)
        odconv.set_temperature(model, temperature)
        x = normalize(augment_batch(images, generator), args.preprocess).to(device, non_blocking=True)
        y = labels.to(device, non_blocking=True)
        with autocast(args, device):
            logits = model(x)
        loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model.module if hasattr(model, "module") else model)
        totals[0] += loss.item() * len(y)
        totals[1] += (logits.argmax(1) == y).sum().item()
        totals[2] += len(y)
        if rank == 0 and not args.no_progress:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{totals[0] / totals[2]:.4f}", acc=f"{totals[1] / totals[2]:.4f}",
                            img_s=f"{totals[2] * world / elapsed:.0f}", T=f"{temperature:.2f}")
    elapsed = time.perf_counter() - start
    loss_sum, correct, seen = all_reduce_sum(totals, device, world)
    return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
            "images_per_s": seen / elapsed, "epoch_time_s": elapsed}


@torch.no_grad()
def predict_all(model, dataset, args, device, batch_size=512):
    """(logits, labels) for the whole dataset, on this process."""
    model.eval()
    outputs = []
    for i in range(0, len(dataset), batch_size):
        x = normalize(dataset.images[i:i + batch_size], args.preprocess).to(device)
        with autocast(args, device):
            outputs.append(model(x).float().cpu())
    logits = torch.cat(outputs) if outputs else torch.zeros(0, len(GTSRB_CLASSES))
    return logits, dataset.labels


def evaluate(model, dataset, criterion, args, device):
    logits, labels = predict_all(model, dataset, args, device)
    loss = criterion(logits, labels).item() if len(labels) else float("nan")
    accuracy = (logits.argmax(1) == labels).float().mean().item() if len(labels) else float("nan")
    return {"loss": loss, "accuracy": accuracy, "n": len(labels)}, logits


# ---- reports ----------------------------------------------------------------------------------------

def write_reports(out, history, logits, labels, class_names):
    """curves.png, confusion_matrix.png and per_class.csv (precision/recall/F1 per class)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss", yscale="log")
    ax_acc.plot(epochs, [100 * h["train_accuracy"] for h in history], label="train")
    ax_acc.plot(epochs, [100 * h["val_accuracy"] for h in history], label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy", ylim=(90, 100.2))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=120)
    plt.close(fig)

    n = len(class_names)
    predicted = logits.argmax(1)
    confusion = torch.zeros(n, n, dtype=torch.int64)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    fig, ax = plt.subplots(figsize=(13, 11))
    sns.heatmap(confusion.numpy(), ax=ax, cmap="Blues", norm=matplotlib.colors.LogNorm(vmin=1),
                cbar_kws={"label": "images (log scale)"}, square=True)
    ax.set(xlabel="predicted class", ylabel="true class",
           title=f"confusion matrix (validation, {len(labels)} images, "
                 f"accuracy {100 * (predicted == labels).float().mean():.2f} %)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "confusion_matrix.png"), dpi=110)
    plt.close(fig)

    rows = []
    for c in range(n):
        tp = confusion[c, c].item()
        support, predicted_c = confusion[c].sum().item(), confusion[:, c].sum().item()
        precision = tp / predicted_c if predicted_c else float("nan")
        recall = tp / support if support else float("nan")
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else float("nan")
        rows.append({"class_id": c, "class_name": class_names[c], "precision": precision, "recall": recall,
                     "f1": f1, "support": support})
    with open(os.path.join(out, "per_class.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def print_per_class(rows):
    print(f"{'class':>5}  {'precision':>9}  {'recall':>7}  {'support':>7}  name")
    for r in rows:
        print(f"{r['class_id']:>5}  {r['precision']:>9.4f}  {r['recall']:>7.4f}  {r['support']:>7}  {r['class_name']}")


# ---- main -------------------------------------------------------------------------------------------

def run_evaluation(args):
    try:
        checkpoint = load_checkpoint(args.evaluate)
        model = model_from_checkpoint(checkpoint, args.device)
    except CheckpointError as error:
        raise SystemExit(f"error: {error}")
    saved = checkpoint.get("args", {})
    for key in ("val_fraction", "split_seed"):  # the split the model was trained with
        if key in saved:
            setattr(args, key, saved[key])
    args.limit = 0
    args.preprocess = checkpoint["preprocess"]
    args.amp = "none"
    dataset = load_splits(args, args.preprocess, [args.split], progress=not args.no_progress)[args.split]
    metrics, logits = evaluate(model, dataset, torch.nn.CrossEntropyLoss(), args, torch.device(args.device))
    predicted = logits.argmax(1)
    n_classes = len(checkpoint["class_names"])
    print(f"checkpoint {args.evaluate} (epoch {checkpoint.get('epoch')}, temperature {checkpoint.get('temperature')})")
    print(f"{args.split}: {metrics['n']} images, accuracy {100 * metrics['accuracy']:.3f} %, "
          f"cross-entropy {metrics['loss']:.4f}, errors {(predicted != dataset.labels).sum().item()}")
    per_class_recall = torch.bincount(dataset.labels[predicted == dataset.labels], minlength=n_classes).float() / \
        torch.bincount(dataset.labels, minlength=n_classes).clamp(min=1).float()
    worst = per_class_recall.argsort()[:3].tolist()
    print("lowest recall: " + ", ".join(f"{checkpoint['class_names'][c]} {100 * per_class_recall[c]:.1f} %" for c in worst))
    print(json.dumps({"split": args.split, "accuracy": metrics["accuracy"], "n": metrics["n"],
                      "loss": metrics["loss"], "checkpoint": args.evaluate}))


TRAINING_STATE = ("optimizer", "train_state_dict", "ema_updates", "rng")


def export_checkpoint(source, target):
    """The deployed model of a training checkpoint, without what only --resume needs."""
    try:
        checkpoint = load_checkpoint(source)
        model_from_checkpoint(checkpoint)  # refuse to ship something that does not load
    except CheckpointError as error:
        raise SystemExit(f"error: {error}")
    slim = {k: v for k, v in checkpoint.items() if k not in TRAINING_STATE and k != "format"}
    save_checkpoint(slim, target)
    print(f"exported {source} (epoch {slim.get('epoch')}, best validation accuracy "
          f"{slim.get('best_val_accuracy')}) to {target}: {os.path.getsize(target) / 2 ** 20:.1f} MiB")


def main(argv=None):
    args = parse_args(argv)
    if args.export:
        return export_checkpoint(*args.export)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.release_memory:
        odconv.keep_freed_memory()  # each step reuses the last one's freed memory: no fresh pages to fault in
    if args.download:  # the split this run reads; torchvision skips what is already there
        import torchvision
        torchvision.datasets.GTSRB(args.data, split="test" if args.evaluate and args.split == "test" else "train",
                                   download=True)
    if args.evaluate:
        return run_evaluation(args)

    rank, world, device = setup_distributed(args.device)
    resume = None
    if args.resume:
        try:
            resume = load_checkpoint(args.resume)
        except CheckpointError as error:
            raise SystemExit(f"error: {error}")
        saved = resume["args"]
        # a resumed run continues with the settings it was started with (except where to stop)
        keep = {k: getattr(args, k) for k in ("resume", "epochs", "no_progress", "threads", "device", "release_memory")}
        for key, value in saved.items():
            setattr(args, key, value)
        for key, value in keep.items():
            setattr(args, key, value)
    warning = bf16_emulation_warning(args.amp, device)
    if warning and rank == 0:
        print(warning, file=sys.stderr)
    torch.manual_seed(args.seed + rank)
    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)
    args.preprocess = {**PREPROCESS_DEFAULTS, "size": args.image_size}
    progress = rank == 0 and not args.no_progress
    data = load_splits(args, args.preprocess, ["train", "val"], progress)
    os.makedirs(args.out, exist_ok=True)
    train_set, val_set = data["train"], data["val"]
    model_config = {"conv": args.conv, "widths": list(args.widths), "blocks": list(args.blocks),
                    "stem_width": args.stem_width, "kernel_num": args.kernel_num, "dropout": args.dropout,
                    "num_classes": len(GTSRB_CLASSES)}
    model = build_model(model_config).to(device)
    if rank == 0:
        print(f"model: {args.conv}, {count_parameters(model) / 1e6:.2f} M parameters, "
              f"{count_macs(model, args.image_size) / 1e6:.1f} M multiply-adds per {args.image_size}x{args.image_size} image")
        print(f"data: {len(train_set)} training and {len(val_set)} validation images (track-wise split), "
              f"{world} process(es); backend {odconv.backend_info()[device.type]}")

    class_counts = train_set.class_counts(len(GTSRB_CLASSES))
    criterion = odconv.AdaptiveLoss(class_counts=class_counts) if args.loss == "adaptive" else torch.nn.CrossEntropyLoss()
    criterion = criterion.to(device)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    loss_scale = criterion.alpha if args.loss == "adaptive" else 1.0
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay * loss_scale},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, momentum=0.9, nesterov=True)
    peak_lr = args.lr / loss_scale * args.batch_size * world / 128
    ema = None
    if args.ema > 0:
        from torch.optim.swa_utils import AveragedModel
        ema = AveragedModel(model, multi_avg_fn=ema_update(args.ema), use_buffers=True)

    def lr_at(epoch, step, steps):
        t = epoch + step / steps
        if t < args.warmup_epochs:
            return peak_lr * t / args.warmup_epochs
        progress_frac = (t - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-9)
        return peak_lr * 0.5 * (1 + math.cos(math.pi * min(progress_frac, 1.0)))

    sampler = torch.utils.data.distributed.DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed,
                                                              drop_last=True) if world > 1 else None
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                                         shuffle=sampler is None, drop_last=len(train_set) >= args.batch_size,
                                         generator=torch.Generator().manual_seed(args.seed))
    temp_epochs = args.temp_epochs if args.temp_epochs is not None else max(args.epochs / 10, 0)
    schedule = odconv.TemperatureSchedule(max(len(loader), 1), temp_epochs, args.temp_init) if args.conv == "odconv" else None

    def temperature_at(epoch, step):
        return schedule(epoch, step) if schedule else 1.0

    history, best_accuracy, start_epoch = [], 0.0, 0
    if resume is not None:
        model.load_state_dict(resume["train_state_dict"] if ema is not None else resume["state_dict"])
        if ema is not None:
            ema.module.load_state_dict(resume["state_dict"])
            ema.n_averaged.copy_(resume["ema_updates"])
        optimizer.load_state_dict(resume["optimizer"])
        history, best_accuracy, start_epoch = resume["history"], resume["best_val_accuracy"], resume["epoch"]
        torch.set_rng_state(resume["rng"]["torch"])
        generator.set_state(resume["rng"]["augment"])
        if rank == 0:
            print(f"resumed from {args.resume} at epoch {start_epoch}, best validation accuracy {best_accuracy:.4f}")
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    eval_criterion = torch.nn.CrossEntropyLoss()
    for epoch in range(start_epoch, args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        metrics = train_one_epoch(train_model, loader, criterion, optimizer, lr_at, temperature_at, epoch, args, device,
                                  rank, world, generator, ema)
        temperature = temperature_at(epoch + 1, 0)
        odconv.set_temperature(model, temperature)
        # the deployed network: the weight average (its temperature is the current one, not an average)
        deployed = ema.module if ema is not None else model
        odconv.set_temperature(deployed, temperature)
        val_metrics, _ = evaluate(deployed, val_set, eval_criterion, args, device) if rank == 0 else ({}, None)
        if rank != 0:
            continue
        record = {"epoch": epoch + 1, "lr": lr_at(epoch + 1, 0, 1), "temperature": temperature, **metrics,
                  "val_loss": val_metrics["loss"], "val_accuracy": val_metrics["accuracy"]}
        history.append(record)
        improved = record["val_accuracy"] > best_accuracy
        best_accuracy = max(best_accuracy, record["val_accuracy"])
        checkpoint = {
            "model": model.config, "state_dict": deployed.state_dict(), "class_names": GTSRB_CLASSES,
            "preprocess": args.preprocess, "temperature": temperature, "epoch": epoch + 1,
            "best_val_accuracy": best_accuracy, "metrics": record, "history": history,
            "args": {k: v for k, v in vars(args).items() if k != "preprocess"},
            "optimizer": optimizer.state_dict(),
            "train_state_dict": model.state_dict() if ema is not None else None,
            "ema_updates": ema.n_averaged if ema is not None else None,
            "rng": {"torch": torch.get_rng_state(), "augment": generator.get_state()},
        }
        if improved:
            save_checkpoint(checkpoint, os.path.join(args.out, "best.pt"))
        save_checkpoint(checkpoint, os.path.join(args.out, "last.pt"))
        with open(os.path.join(args.out, "metrics.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
        print(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f} | "
              f"val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f} (best {best_accuracy:.4f}) | "
              f"T {temperature:.2f} | {record['images_per_s']:.0f} img/s, {record['epoch_time_s']:.0f} s"
              + (" | saved best.pt" if improved else ""), flush=True)

    if rank == 0 and history:
        best = load_checkpoint(os.path.join(args.out, "best.pt"))
        best_model = model_from_checkpoint(best, device)
        metrics, logits = evaluate(best_model, val_set, eval_criterion, args, device)
        rows = write_reports(args.out, history, logits, val_set.labels, GTSRB_CLASSES)
        print_per_class(rows)
        print(f"best validation accuracy {100 * metrics['accuracy']:.3f} % at epoch {best['epoch']} "
              f"({metrics['n']} images); outputs in {args.out}")
    if world > 1:
        # rank 0 ends alone (final evaluation, reports): the others wait for it, so that no rank tears its gloo
        # connections down under a peer still using the group (a CI run saw rank 1 abort there)
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
