"""GTSRB data: the official layout, class names, a track-wise validation split, preprocessing shared by
training and prediction, a decoded-once cache, and batched augmentation.

Layout (what ``torchvision.datasets.GTSRB(root, split, download=True)`` produces):

    ROOT/gtsrb/GTSRB/Training/000NN/GT-000NN.csv        (train; images TTTTT_FFFFF.ppm, T = track)
    ROOT/gtsrb/GTSRB/Final_Test/Images/*.ppm            (test)
    ROOT/gtsrb/GT-final_test.csv                        (test labels)

The CSVs are ';'-separated: Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId.

Images of one physical sign come in tracks of 30, so the validation split is drawn by track: a
track is wholly in ``train`` or wholly in ``val``, never both.
"""
import csv
import hashlib
import math
import os
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

__all__ = [
    "GTSRB_CLASSES", "Sample", "PREPROCESS_DEFAULTS", "read_split", "track_split", "preprocess_image",
    "load_image", "normalize", "load_cached", "augment_batch", "GTSRBTensors",
]

GTSRB_CLASSES = [
    "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)", "Speed limit (60km/h)",
    "Speed limit (70km/h)", "Speed limit (80km/h)", "End of speed limit (80km/h)", "Speed limit (100km/h)",
    "Speed limit (120km/h)", "No passing", "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection", "Priority road", "Yield", "Stop", "No vehicles",
    "Vehicles over 3.5 metric tons prohibited", "No entry", "General caution", "Dangerous curve to the left",
    "Dangerous curve to the right", "Double curve", "Bumpy road", "Slippery road", "Road narrows on the right",
    "Road work", "Traffic signals", "Pedestrians", "Children crossing", "Bicycles crossing",
    "Beware of ice/snow", "Wild animals crossing", "End of all speed and passing limits", "Turn right ahead",
    "Turn left ahead", "Ahead only", "Go straight or right", "Go straight or left", "Keep right", "Keep left",
    "Roundabout mandatory", "End of no passing", "End of no passing by vehicles over 3.5 metric tons",
]

# Preprocessing of every image, in training and prediction alike (saved in each checkpoint):
# resize the whole image (the sign with its ~10 % margin) to size x size, equalise the luminance
# histogram (GTSRB has many dark, low-contrast images), then normalise with mean/std.
PREPROCESS_DEFAULTS = {"size": 32, "equalize": True, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


@dataclass(frozen=True)
class Sample:
    path: str
    class_id: int
    track: str  # "class/track" for the training split, "" where tracks are unknown (test)


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter=";"))
    if rows and ("Filename" not in rows[0] or "ClassId" not in rows[0]):
        raise ValueError(f"{path}: expected GTSRB annotation columns Filename;...;ClassId, got {list(rows[0])}")
    return rows


def read_split(root, split="train"):
    """The samples of the official ``train`` (all of it) or ``test`` split under ``root``."""
    base = os.path.join(root, "gtsrb")
    if split == "train":
        folder = os.path.join(base, "GTSRB", "Training")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"GTSRB training split not found: {folder} (extract the data there or pass --download)")
        samples = []
        for class_dir in sorted(os.listdir(folder)):
            class_path = os.path.join(folder, class_dir)
            csv_path = os.path.join(class_path, f"GT-{class_dir}.csv")
            if not os.path.isfile(csv_path):
                continue
            for row in _read_csv(csv_path):
                track = row["Filename"].split("_")[0]
                samples.append(Sample(os.path.join(class_path, row["Filename"]), int(row["ClassId"]),
                                      f"{class_dir}/{track}"))
        if not samples:
            raise FileNotFoundError(f"no GT-*.csv annotations under {folder}")
        return samples
    if split == "test":
        images = os.path.join(base, "GTSRB", "Final_Test", "Images")
        for csv_path in (os.path.join(base, "GT-final_test.csv"), os.path.join(images, "GT-final_test.csv")):
            if os.path.isfile(csv_path):
                return [Sample(os.path.join(images, r["Filename"]), int(r["ClassId"]), "") for r in _read_csv(csv_path)]
        raise FileNotFoundError(f"GTSRB test labels not found: {os.path.join(base, 'GT-final_test.csv')}")
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def track_split(samples, val_fraction=0.1, seed=0):
    """Splits training samples into (train, val) by track, per class, deterministically.

    Each class gives round(val_fraction * its tracks) tracks (at least one if it has two or more) to
    validation, drawn with ``seed``; every image of a track goes to the same side.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    tracks_by_class = {}
    for s in samples:
        if not s.track:
            raise ValueError(f"{s.path}: a track-wise split needs track ids (training split only)")
        tracks_by_class.setdefault(s.class_id, set()).add(s.track)
    rng = random.Random(seed)
    val_tracks = set()
    for class_id in sorted(tracks_by_class):
        tracks = sorted(tracks_by_class[class_id])
        n_val = round(val_fraction * len(tracks))
        if val_fraction > 0 and len(tracks) >= 2:
            n_val = max(1, n_val)
        n_val = min(n_val, len(tracks) - 1)
        val_tracks.update(rng.sample(tracks, n_val))
    train = [s for s in samples if s.track not in val_tracks]
    val = [s for s in samples if s.track in val_tracks]
    return train, val


def load_image(source):
    """An RGB PIL image from a path, bytes-like file object or PIL image, with a clear error.

    Raises ValueError for files that are not images, are corrupt, or have modes we cannot read
    faithfully (e.g. 16-bit), and for absurdly large images.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            image = Image.open(source)
            image.load()
        except Image.DecompressionBombError as error:
            raise ValueError(f"image is too large to decode safely: {error}") from error
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"not a readable image ({type(error).__name__}: {error})") from error
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        raise ValueError(f"unsupported image mode {image.mode!r} (16/32-bit); convert it to 8-bit RGB first")
    if image.mode in ("P", "PA", "LA", "RGBA", "L", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            background = Image.new("RGB", image.size, (255, 255, 255))
            rgba = image.convert("RGBA")
            background.paste(rgba, mask=rgba.getchannel("A"))
            image = background
        else:
            image = image.convert("RGB")
    if image.mode != "RGB":
        raise ValueError(f"unsupported image mode {image.mode!r}")
    if min(image.size) < 1:
        raise ValueError(f"empty image of size {image.size}")
    return image


def preprocess_image(image, config=PREPROCESS_DEFAULTS):
    """An RGB PIL image -> uint8 tensor (3, size, size): resize, then equalise the luminance."""
    size = int(config["size"])
    image = image.convert("RGB").resize((size, size), Image.BILINEAR)
    if config.get("equalize", False):
        y, cb, cr = image.convert("YCbCr").split()
        image = Image.merge("YCbCr", (ImageOps.equalize(y), cb, cr)).convert("RGB")
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1).contiguous()


def normalize(images_uint8_or_float, config=PREPROCESS_DEFAULTS):
    """(B, 3, S, S) uint8 or [0, 1] float -> normalised float32 network input."""
    x = images_uint8_or_float
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    mean = torch.tensor(config["mean"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(config["std"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class GTSRBTensors(torch.utils.data.Dataset):
    """Decoded, preprocessed images held in memory as uint8 (N, 3, S, S) with labels."""

    def __init__(self, images, labels, paths=None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.paths = images, labels, paths

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def class_counts(self, num_classes):
        return torch.bincount(self.labels, minlength=num_classes).tolist()


def _decode_all(samples, config, progress=True):
    images = torch.empty(len(samples), 3, config["size"], config["size"], dtype=torch.uint8)
    iterator = samples
    if progress:
        from tqdm import tqdm
        iterator = tqdm(samples, desc="decoding images", unit="img", mininterval=2.0)
    for i, s in enumerate(iterator):
        try:
            images[i] = preprocess_image(load_image(s.path), config)
        except ValueError as error:
            raise ValueError(f"{s.path}: {error}") from error
    return images


def load_cached(root, samples, config=PREPROCESS_DEFAULTS, cache_dir=None, progress=True):
    """Decodes and preprocesses ``samples`` once, caching the uint8 tensors under ``cache_dir``.

    The cache file's name is a hash of the file list and the preprocessing, so a change in either
    decodes again. Returns a GTSRBTensors.
    """
    cache_dir = cache_dir or os.path.join(root, "cache")
    key = hashlib.sha1(repr(([(s.path, s.class_id) for s in samples],
                             {k: config[k] for k in ("size", "equalize")})).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"gtsrb_{config['size']}_{key}.pt")
    labels = torch.tensor([s.class_id for s in samples], dtype=torch.int64)
    paths = [s.path for s in samples]
    if os.path.isfile(path):
        try:
            images = torch.load(path, weights_only=True)
            if images.shape[0] == len(samples):
                return GTSRBTensors(images, labels, paths)
        except Exception:  # a truncated cache is rebuilt
            pass
    images = _decode_all(samples, config, progress)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(images, tmp)
    os.replace(tmp, path)
    return GTSRBTensors(images, labels, paths)


def augment_batch(images, generator=None, max_rotation=12.0, max_scale=0.12, max_translate=0.08, max_shear=6.0,
                  brightness=0.25, contrast=0.25):
    """Random per-sample affine warp and brightness/contrast jitter of a uint8 batch (B, 3, S, S).

    No flips: mirrored signs change meaning (keep left/right, turn left/right, curves). Returns
    float in [0, 1].
    """
    x = images.float().div_(255.0)
    batch = x.shape[0]
    if batch == 0:
        return x

    def uniform(low, high):
        return torch.rand(batch, generator=generator) * (high - low) + low

    angle = uniform(-max_rotation, max_rotation) * math.pi / 180
    shear = uniform(-max_shear, max_shear) * math.pi / 180
    scale = uniform(1 - max_scale, 1 + max_scale)
    tx, ty = uniform(-max_translate, max_translate) * 2, uniform(-max_translate, max_translate) * 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    # output -> input sampling grid: rotation and shear, divided by the zoom, then a shift
    theta = torch.stack([
        torch.stack([cos / scale, (-sin + torch.tan(shear) * cos) / scale, tx], dim=1),
        torch.stack([sin / scale, (cos + torch.tan(shear) * sin) / scale, ty], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    b = uniform(1 - brightness, 1 + brightness).view(batch, 1, 1, 1)
    c = uniform(1 - contrast, 1 + contrast).view(batch, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * c + mean * b).clamp_(0.0, 1.0)
