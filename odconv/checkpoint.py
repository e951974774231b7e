"""Checkpoints of the GTSRB network: plain data (no pickled code), written atomically.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(..., weights_only=True)``:

    format        "odconv-gtsrb/1"
    model         the model config (odconv.models.build_model rebuilds the network from it)
    state_dict    the network's weights (temperature buffers included)
    class_names   list of the class names, index = class id
    preprocess    the preprocessing config (odconv.data.PREPROCESS_DEFAULTS)
    temperature   the ODConv temperature the weights were saved at
    epoch, best_val_accuracy, metrics, args      training bookkeeping
    optimizer, scheduler, scaler (optional)      for --resume

``save_checkpoint`` writes to a temporary file in the same folder, flushes it to disk and renames
it over the target, so a run killed at any moment leaves the previous checkpoint intact.
"""
import os
import tempfile

import torch

from .models import build_model

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "save_checkpoint", "load_checkpoint", "model_from_checkpoint"]

CHECKPOINT_FORMAT = "odconv-gtsrb/1"
_REQUIRED = ("format", "model", "state_dict", "class_names", "preprocess")


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, corrupt, or not one of ours."""


def save_checkpoint(checkpoint, path):
    """Writes ``checkpoint`` to ``path`` atomically (temporary file + fsync + rename)."""
    checkpoint = {"format": CHECKPOINT_FORMAT, **checkpoint}
    missing = [k for k in _REQUIRED if k not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint lacks {missing}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def load_checkpoint(path, map_location="cpu"):
    """Loads and validates a checkpoint with ``weights_only=True``; raises CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path}: not a valid torch checkpoint or corrupt "
                              f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path} is not an odconv GTSRB checkpoint (format {found!r}, expected "
                              f"{CHECKPOINT_FORMAT!r})")
    missing = [k for k in _REQUIRED if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}")
    return checkpoint


def model_from_checkpoint(checkpoint, device="cpu"):
    """Rebuilds the network of a loaded checkpoint, with its weights, in eval mode.

    Raises CheckpointError when the weights do not fit the architecture the config describes.
    """
    try:
        model = build_model(checkpoint["model"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint describes an unknown architecture: {error}") from error
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()
        raise CheckpointError("checkpoint weights do not match its architecture: "
                              + " ".join(line.strip() for line in first[:3])) from error
    if len(checkpoint["class_names"]) != model.config["num_classes"]:
        raise CheckpointError(f"checkpoint has {len(checkpoint['class_names'])} class names for a "
                              f"{model.config['num_classes']}-class model")
    return model.to(device).eval()
