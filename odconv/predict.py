"""Prediction with a trained GTSRB checkpoint: a reusable ``Predictor``, Grad-CAM explanations, and a CLI.

    from odconv.predict import Predictor
    predictor = Predictor()                       # checkpoints/gtsrb_odconv.pt, CPU
    predictor.predict(["stop.png", "yield.jpg"])  # [{"path", "class_id", "class_name", "confidence", "topk"}, ...]
    predictor.explain("stop.png")                 # (S, S) float32 heat-map in [0, 1] (Grad-CAM)

Command line (exit 0 when at least one image was predicted, 1 when none was, 2 when the checkpoint
or the device cannot be used):

    python -m odconv.predict IMG_OR_FOLDER... [--checkpoint PATH] [--topk 5] [--json]
                             [--device cpu|cuda] [--batch-size 64] [--recursive]

A source that cannot be read (corrupt, not an image, 16-bit, too large, missing) gives
``{"path", "error"}`` in place of a prediction; the other sources are still predicted. This module
has no GUI dependency; ``gui.py`` at the repository root is built on it.
"""
import argparse
import json
import os
import sys
import threading
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from .data import load_image, normalize, preprocess_image
from .modules import ODConv2d
from .ops import backend_info

__all__ = [
    "DEFAULT_CHECKPOINT", "IMAGE_EXTENSIONS", "Predictor", "PredictorError", "expand_sources",
    "heatmap_to_rgb", "overlay_heatmap", "main",
]

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The trained model: <repo>/checkpoints/gtsrb_odconv.pt, or $ODCONV_CHECKPOINT when set.
DEFAULT_CHECKPOINT = os.environ.get("ODCONV_CHECKPOINT") or os.path.join(_REPO_ROOT, "checkpoints", "gtsrb_odconv.pt")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class PredictorError(RuntimeError):
    """The predictor cannot run as asked (e.g. CUDA requested where there is none)."""


def _resolve_device(device):
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PredictorError("device 'cuda' requested but CUDA is not available (torch "
                             f"{torch.__version__}, cuda build: {torch.version.cuda or 'no'}); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise PredictorError(f"unsupported device {str(device)!r}: use 'cpu' or 'cuda'")
    return device


def _source_name(source):
    """What a result's "path" says about its source: the path, or None for in-memory images."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return getattr(source, "name", None) if not isinstance(source, Image.Image) else None


class Predictor:
    """A GTSRB checkpoint loaded once, for batched prediction and Grad-CAM explanations.

    ``checkpoint_path`` defaults to ``DEFAULT_CHECKPOINT``; ``device`` is "cpu" or "cuda". Raises
    ``CheckpointError`` for a missing, corrupt or incompatible checkpoint and ``PredictorError``
    for an unavailable device.

    The network is only read, never modified (no hooks are installed), so ``predict`` and
    ``explain`` may run concurrently from several threads.
    """

    def __init__(self, checkpoint_path=None, device="cpu"):
        self.checkpoint_path = os.path.abspath(os.fspath(checkpoint_path or DEFAULT_CHECKPOINT))
        self.device = _resolve_device(device)
        checkpoint = load_checkpoint(self.checkpoint_path, map_location="cpu")
        preprocess = checkpoint["preprocess"]
        if not isinstance(preprocess, dict) or any(k not in preprocess for k in ("size", "mean", "std")):
            raise CheckpointError(f"{self.checkpoint_path}: preprocessing config lacks size/mean/std: {preprocess!r}")
        self.model = model_from_checkpoint(checkpoint, self.device)
        self.class_names = [str(name) for name in checkpoint["class_names"]]
        self.preprocess = dict(preprocess)
        self.input_size = int(preprocess["size"])
        self.metadata = {k: checkpoint.get(k) for k in ("epoch", "best_val_accuracy", "temperature", "model")}
        self._last_call = threading.local()  # timing of each thread's last predict() call

    # -- what is loaded -------------------------------------------------------------------------
    @property
    def model_file(self):
        return self.checkpoint_path

    @property
    def last_inference_ms(self):
        """Forward time (ms, all batches) of the calling thread's last ``predict()``; None before."""
        return getattr(self._last_call, "inference_ms", None)

    @property
    def last_image_count(self):
        """Images the calling thread's last ``predict()`` ran through the network."""
        return getattr(self._last_call, "image_count", 0)

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def backend(self):
        """"extension" or "reference": the odconv2d implementation serving this device."""
        return backend_info()[self.device.type]["backend"]

    @property
    def backend_reason(self):
        return backend_info()[self.device.type]["reason"]

    def describe(self):
        """One line: model file, backend and device."""
        return f"{os.path.basename(self.model_file)} · odconv {self.backend} ({self.device.type})"

    # -- images ---------------------------------------------------------------------------------
    @staticmethod
    def read_image(source):
        """An RGB PIL image from a path, file object or PIL image; ValueError with a clear reason."""
        name = _source_name(source)
        if name is not None and isinstance(source, (str, os.PathLike)):
            if not os.path.exists(name):
                raise ValueError("file not found")
            if os.path.isdir(name):
                raise ValueError("is a folder, not an image file")
        try:
            return load_image(source)
        except ValueError as error:
            if isinstance(error.__cause__, UnidentifiedImageError):  # PIL's message repeats the path
                raise ValueError("not a readable image (format not recognised: corrupt, or not an image file)") from error
            raise
        except MemoryError as error:
            raise ValueError("image is too large to decode in memory") from error
        except Exception as error:  # PIL raises a zoo of exceptions for malformed files
            raise ValueError(f"not a readable image ({type(error).__name__}: {error})") from error

    def _tensor(self, image):
        return preprocess_image(image, self.preprocess)

    def _input(self, uint8_batch):
        return normalize(uint8_batch.to(self.device), self.preprocess)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def warm_up(self):
        """One forward pass of a blank image, so later timings exclude one-off initialisation."""
        x = self._input(torch.zeros(1, 3, self.input_size, self.input_size, dtype=torch.uint8))
        with torch.inference_mode():
            self.model(x)
        self._sync()

    # -- prediction -----------------------------------------------------------------------------
    def predict(self, sources, topk=5, batch_size=64):
        """One result dict per source (a path, file object or PIL image), in order.

        ``{"path", "class_id", "class_name", "confidence", "topk": [{"class_id", "class_name",
        "confidence"}, ...]}``, or ``{"path", "error"}`` for a source that cannot be read. Images
        are decoded and run through the network ``batch_size`` at a time.
        """
        if isinstance(sources, (str, os.PathLike, Image.Image)):
            sources = [sources]
        sources = list(sources)
        topk = max(1, min(int(topk), self.num_classes))
        batch_size = max(1, int(batch_size))
        results = [None] * len(sources)
        forward_seconds, count = 0.0, 0
        for start in range(0, len(sources), batch_size):
            indices, tensors = [], []
            for i in range(start, min(start + batch_size, len(sources))):
                try:
                    tensors.append(self._tensor(self.read_image(sources[i])))
                    indices.append(i)
                except ValueError as error:
                    results[i] = {"path": _source_name(sources[i]), "error": str(error)}
            if not tensors:
                continue
            x = self._input(torch.stack(tensors))
            t0 = time.perf_counter()
            with torch.inference_mode():
                probabilities = torch.softmax(self.model(x).float(), dim=1)
                confidences, class_ids = probabilities.topk(topk, dim=1)
            self._sync()
            forward_seconds += time.perf_counter() - t0
            count += len(tensors)
            confidences, class_ids = confidences.cpu().tolist(), class_ids.cpu().tolist()
            for row, i in enumerate(indices):
                ranked = [{"class_id": int(c), "class_name": self.class_names[c], "confidence": float(p)}
                          for c, p in zip(class_ids[row], confidences[row])]
                results[i] = {"path": _source_name(sources[i]), **ranked[0], "topk": ranked}
        self._last_call.inference_ms = forward_seconds * 1000.0 if count else None
        self._last_call.image_count = count
        return results

    # -- explanation ----------------------------------------------------------------------------
    def explain(self, source, class_id=None, output_size=None):
        """Grad-CAM heat-map (float32 in [0, 1]) of where the network looked for ``class_id``.

        ``class_id`` defaults to the predicted class. The map is (S, S) at the preprocessed input
        size by default; ``output_size="original"`` gives the source image's (H, W), a pair (H, W)
        any size. Raises ValueError for an unreadable source.
        """
        return self.explain_details(source, class_id, output_size)["heatmap"]

    def explain_details(self, source, class_id=None, output_size=None):
        """Grad-CAM plus what the ODConv layers of the last stage attended to.

        Returns ``{"heatmap", "class_id", "class_name", "confidence", "layer", "method",
        "odconv": [{"layer", "spatial" (kh, kw), "kernel" (K,)}]}``. Grad-CAM weighs the feature
        maps of the last stage's last convolution block (before its pooling) by the spatial mean of
        the class score's gradient and keeps the positive part; where no position has positive
        evidence (possible for an untrained net) it falls back to |gradient x activation|, and
        ``method`` says which was used.
        """
        image = self.read_image(source)
        x = self._input(self._tensor(image)[None]).requires_grad_(True)
        model = self.model
        last_stage = model.stages[-1]
        with torch.enable_grad():
            # The forward pass of GTSRBNet (head(stages(stem(x)))), unrolled over the last stage so
            # its last convolution block's output is at hand; no module is modified.
            features = model.stem(x)
            for stage in model.stages[:-1]:
                features = stage(features)
            target, target_name, attentions = None, None, []
            for name, block in last_stage.named_children():
                odconv = block[0] if isinstance(block, nn.Sequential) and len(block) and isinstance(block[0], ODConv2d) else None
                if odconv is not None:
                    with torch.no_grad():
                        _, _, spatial, kernel = odconv.attention(features)
                    attentions.append({"layer": f"stages.{len(model.stages) - 1}.{name}",
                                       "spatial": spatial[0].float().cpu().numpy(),
                                       "kernel": kernel[0].float().cpu().numpy()})
                features = block(features)
                if not isinstance(block, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
                    target, target_name = features, f"stages.{len(model.stages) - 1}.{name}"
            if target is None:
                raise RuntimeError("the network's last stage has no convolution block to explain")
            logits = model.head(features)
            probabilities = torch.softmax(logits.detach().float(), dim=1)[0]
            if class_id is None:
                class_id = int(probabilities.argmax())
            if not 0 <= int(class_id) < self.num_classes:
                raise ValueError(f"class_id must be in [0, {self.num_classes}), got {class_id}")
            class_id = int(class_id)
            gradient, = torch.autograd.grad(logits[0, class_id], target)
        activation, gradient = target.detach()[0].float(), gradient[0].float()
        cam = torch.relu((gradient.mean(dim=(1, 2))[:, None, None] * activation).sum(0))
        method = "grad-cam"
        if float(cam.max()) <= 1e-12:
            cam, method = (gradient * activation).abs().sum(0), "gradient x activation"
        if output_size is None:
            size = (self.input_size, self.input_size)
        elif output_size == "original":
            size = (image.height, image.width)
        else:
            size = (int(output_size[0]), int(output_size[1]))
        cam = F.interpolate(cam[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        low, high = float(cam.min()), float(cam.max())
        cam = (cam - low) / (high - low) if high - low > 1e-12 else torch.zeros_like(cam)
        return {"heatmap": cam.clamp_(0.0, 1.0).cpu().numpy().astype(np.float32), "class_id": class_id,
                "class_name": self.class_names[class_id], "confidence": float(probabilities[class_id]),
                "layer": target_name, "method": method, "odconv": attentions}


# -- heat-map rendering --------------------------------------------------------------------------
# A perceptually ordered blue -> cyan -> green -> yellow -> red ramp ("jet"-like, less garish).
_RAMP_POSITIONS = [0.0, 0.25, 0.5, 0.75, 1.0]
_RAMP_COLOURS = np.array([[48, 18, 130], [30, 140, 230], [60, 200, 120], [250, 210, 40], [220, 30, 30]], dtype=np.float32)


def heatmap_to_rgb(heatmap):
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours of the ramp."""
    h = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0)
    rgb = np.stack([np.interp(h, _RAMP_POSITIONS, _RAMP_COLOURS[:, c]) for c in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


def overlay_heatmap(image, heatmap, alpha=0.5, size=None):
    """``image`` (PIL) with ``heatmap`` (any resolution, [0, 1]) blended over it, as an RGB PIL image.

    ``size`` (width, height) resizes the image first (e.g. to the display size). Hot regions are
    covered up to ``alpha``, cold ones a quarter of that, so the sign stays visible.
    """
    image = image.convert("RGB")
    if size is not None and tuple(size) != image.size:
        image = image.resize((max(1, int(size[0])), max(1, int(size[1]))), Image.BICUBIC)
    heat = Image.fromarray(np.asarray(heatmap, dtype=np.float32), mode="F").resize(image.size, Image.BILINEAR)
    heat = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)
    weight = (float(alpha) * (0.25 + 0.75 * heat))[..., None]
    blended = (1.0 - weight) * np.asarray(image, dtype=np.float32) + weight * heatmap_to_rgb(heat).astype(np.float32)
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8), mode="RGB")


# -- sources -------------------------------------------------------------------------------------
def _is_image_name(name):
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def expand_sources(paths, recursive=False):
    """Paths -> an ordered list of image paths and ``{"path", "error"}`` entries.

    A folder expands to its image files (by extension, sorted; with ``recursive`` its sub-folders'
    too); a file is kept whatever its name (a bad one fails when it is read); a missing path or a
    folder without images gives an error entry.
    """
    entries = []
    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            found = []
            if recursive:
                for root, dirs, files in os.walk(path):
                    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                    found.extend(os.path.join(root, f) for f in sorted(files) if _is_image_name(f))
            else:
                found = [os.path.join(path, f) for f in sorted(os.listdir(path))
                         if _is_image_name(f) and os.path.isfile(os.path.join(path, f))]
            entries.extend(found or [{"path": path, "error": "no image files in this folder"}])
        elif os.path.exists(path):
            entries.append(path)
        else:
            entries.append({"path": path, "error": "file not found"})
    return entries


# -- command line --------------------------------------------------------------------------------
def _format_table(results, topk):
    rows = [(r["path"] or "<image>") for r in results]
    width = min(max([len(p) for p in rows] + [4]), 60)

    def clip(text):
        return text if len(text) <= width else "..." + text[-(width - 3):]

    lines = [f"{'FILE':<{width}}  {'CLASS':>5}  {'CONF':>6}  NAME"]
    for name, r in zip(rows, results):
        if "error" in r:
            lines.append(f"{clip(name):<{width}}  {'-':>5}  {'-':>6}  error: {r['error']}")
            continue
        lines.append(f"{clip(name):<{width}}  {r['class_id']:>5}  {r['confidence']:>6.1%}  {r['class_name']}")
        if topk > 1:
            for alt in r["topk"][1:]:
                lines.append(f"{'':<{width}}  {alt['class_id']:>5}  {alt['confidence']:>6.1%}  {alt['class_name']}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m odconv.predict",
        description="Classify traffic-sign images with a trained GTSRB ODConv checkpoint.")
    parser.add_argument("sources", nargs="+", metavar="IMG_OR_FOLDER", help="image files and/or folders of images")
    parser.add_argument("--checkpoint", default=None, help=f"model checkpoint (default: {DEFAULT_CHECKPOINT})")
    parser.add_argument("--topk", type=int, default=5, help="classes listed per image (default: 5)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of results instead of a table")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--recursive", "-r", action="store_true", help="also search sub-folders for images")
    args = parser.parse_args(argv)
    if args.topk < 1:
        parser.error("--topk must be at least 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")

    try:
        predictor = Predictor(args.checkpoint, device=args.device)
    except (CheckpointError, PredictorError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2

    entries = expand_sources(args.sources, recursive=args.recursive)
    files = [e for e in entries if isinstance(e, str)]
    started = time.perf_counter()
    predicted = iter(predictor.predict(files, topk=args.topk, batch_size=args.batch_size))
    results = [next(predicted) if isinstance(e, str) else e for e in entries]
    elapsed = time.perf_counter() - started
    good = sum("error" not in r for r in results)

    try:
        if args.json:
            json.dump(results, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print(_format_table(results, args.topk))
            print(f"\n{good} of {len(results)} predicted · {predictor.describe()} · "
                  f"{elapsed * 1000:.0f} ms total")
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into head
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
