"""train.py end to end on tiny generated GTSRB-format data: checkpoints, resume, kill, split, DDP."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from odconv.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from odconv.data import GTSRB_CLASSES, Sample, normalize, preprocess_image, load_image, read_split, track_split
from tiny_gtsrb import make_tiny_gtsrb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_NET = ["--widths", "8", "16", "--blocks", "1", "1", "--stem-width", "8", "--kernel-num", "2",
            "--batch-size", "8", "--no-progress", "--threads", "1"]


def run_train(*args, timeout=300, launcher=None):
    cmd = (launcher or [sys.executable]) + [os.path.join(REPO, "train.py"), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_gtsrb(str(tmp_path_factory.mktemp("gtsrb")))


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    stdout = run_train("--data", tiny_data, "--out", out, "--epochs", "1", *TINY_NET)
    return out, stdout


def test_one_epoch_end_to_end(trained, tiny_data):
    out, stdout = trained
    for name in ("best.pt", "last.pt", "metrics.csv", "curves.png", "confusion_matrix.png", "per_class.csv"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert "best validation accuracy" in stdout
    checkpoint = load_checkpoint(os.path.join(out, "best.pt"))  # weights_only=True inside
    assert checkpoint["epoch"] == 1 and checkpoint["class_names"] == GTSRB_CLASSES
    assert checkpoint["preprocess"]["size"] == 48 and "optimizer" in checkpoint
    # one epoch with the temperature annealed over a tenth of the run: back at 1 when saved
    assert checkpoint["temperature"] == 1.0
    temps = {v.item() for k, v in checkpoint["state_dict"].items() if k.endswith("attention.temperature")}
    assert temps == {1.0}
    model = model_from_checkpoint(checkpoint)
    image = preprocess_image(load_image(read_split(tiny_data, "train")[0].path), checkpoint["preprocess"])
    with torch.no_grad():
        probabilities = model(normalize(image[None], checkpoint["preprocess"])).softmax(1)
    assert probabilities.shape == (1, 43) and torch.isfinite(probabilities).all()


def test_export_drops_training_state(trained, tmp_path):
    out, _ = trained
    target = str(tmp_path / "shipped.pt")
    run_train("--export", os.path.join(out, "best.pt"), target)
    shipped = load_checkpoint(target)
    assert not {"optimizer", "train_state_dict", "rng"} & set(shipped)
    assert os.path.getsize(target) < os.path.getsize(os.path.join(out, "best.pt"))
    full = load_checkpoint(os.path.join(out, "best.pt"))
    for key, value in full["state_dict"].items():
        assert torch.equal(shipped["state_dict"][key], value)
    model_from_checkpoint(shipped)


def test_evaluate_prints_json_last(trained, tiny_data):
    out, _ = trained
    for split, expected_n in (("val", None), ("test", 12), ("train", None)):
        stdout = run_train("--evaluate", os.path.join(out, "best.pt"), "--data", tiny_data, "--split", split,
                           "--no-progress")
        result = json.loads(stdout.strip().splitlines()[-1])
        assert result["split"] == split and 0.0 <= result["accuracy"] <= 1.0
        if expected_n:
            assert result["n"] == expected_n


def test_resume_continues_from_saved_epoch(trained, tiny_data, tmp_path):
    out, _ = trained
    resumed = str(tmp_path / "resumed")
    import shutil
    shutil.copytree(out, resumed)
    checkpoint = load_checkpoint(os.path.join(resumed, "last.pt"))
    checkpoint["args"]["out"] = resumed
    from odconv.checkpoint import save_checkpoint
    save_checkpoint(checkpoint, os.path.join(resumed, "last.pt"))
    stdout = run_train("--resume", os.path.join(resumed, "last.pt"), "--epochs", "2", "--no-progress")
    assert "resumed from" in stdout and "at epoch 1" in stdout
    assert "epoch 2:" in stdout and "epoch 1:" not in stdout.split("resumed from")[1]
    last = load_checkpoint(os.path.join(resumed, "last.pt"))
    assert last["epoch"] == 2 and [h["epoch"] for h in last["history"]] == [1, 2]


def test_sigkill_mid_epoch_leaves_last_checkpoint_loadable(tiny_data, tmp_path):
    out = str(tmp_path / "killed")
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--data", tiny_data, "--out", out, "--epochs", "200",
           *TINY_NET]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        epochs_seen = 0
        deadline = time.time() + 240
        while epochs_seen < 2 and time.time() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            epochs_seen += line.startswith("epoch ")
        assert epochs_seen >= 2, "training did not get through two epochs"
        time.sleep(0.05)  # now inside epoch 3 (or saving it): kill without warning
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    checkpoint = load_checkpoint(os.path.join(out, "last.pt"))
    assert checkpoint["epoch"] >= 2
    model_from_checkpoint(checkpoint)


def test_track_split_never_shares_a_track(tiny_data):
    samples = read_split(tiny_data, "train")
    train, val = track_split(samples, val_fraction=0.34, seed=3)
    assert len(train) + len(val) == len(samples) and val
    assert not {s.track for s in train} & {s.track for s in val}
    # deterministic, and every class keeps training tracks
    assert track_split(samples, 0.34, 3) == (train, val)
    assert {s.class_id for s in train} == {s.class_id for s in samples}
    many = [Sample(f"{c}/{t}_{f}", c, f"{c:05d}/{t:05d}") for c in range(5) for t in range(20) for f in range(30)]
    tr, va = track_split(many, 0.1, 0)
    assert not {s.track for s in tr} & {s.track for s in va}
    assert all(sum(1 for s in va if s.class_id == c) == 60 for c in range(5))  # 2 of 20 tracks x 30 frames


def test_bad_checkpoints_give_clear_errors(tmp_path, trained):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(os.urandom(1000))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(str(corrupt))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not an odconv GTSRB checkpoint"):
        load_checkpoint(str(foreign))
    checkpoint = load_checkpoint(os.path.join(trained[0], "best.pt"))
    checkpoint["model"] = {**checkpoint["model"], "widths": [8, 32]}
    with pytest.raises(CheckpointError, match="do not match its architecture"):
        model_from_checkpoint(checkpoint)
    result = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--evaluate", str(corrupt)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 0 and "error:" in result.stderr and "Traceback" not in result.stderr


def test_distributed_two_processes(tiny_data, tmp_path):
    out = str(tmp_path / "ddp")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533"]
    stdout = run_train("--data", tiny_data, "--out", out, "--epochs", "1", *TINY_NET, launcher=launcher, timeout=400)
    assert stdout.count("epoch 1:") == 1  # only rank 0 prints
    assert "2 process(es)" in stdout
    checkpoint = load_checkpoint(os.path.join(out, "best.pt"))
    model_from_checkpoint(checkpoint)


def test_network_attention_starts_neutral():
    """GTSRBNet zeroes the attention heads: every sample starts from the mean kernel (see models.py)."""
    from odconv.models import build_model
    torch.manual_seed(0)
    model = build_model({"widths": [8, 16], "blocks": [1, 1], "stem_width": 8}).train()
    layer = model.stages[0][0][0]
    channel, filt, spatial, kernel = layer.attention(torch.randn(4, 8, 16, 16))
    for t in (channel, filt, spatial):
        assert torch.all(t == 0.5)
    assert torch.all(kernel == 0.25)
    assert layer.weight.std() > 0 and layer.attention.fc.weight.std() > 0  # the rest is initialised
    official = build_model({"widths": [8, 16], "blocks": [1, 1], "stem_width": 8, "attention_init": "official"})
    assert official.stages[0][0][0].attention.kernel_fc.weight.std() > 0
    with pytest.raises(ValueError, match="attention_init"):
        build_model({"attention_init": "ones"})


def test_count_macs_counts_what_the_forward_runs():
    # static twin, 8x8 input: the stem runs as one 7x7 convolution (3 -> 4 channels, merged kernel),
    # then one 3x3 convolution 4 -> 8 on 8x8, then the 8 -> 43 linear layer
    from odconv.models import build_model, count_macs
    model = build_model({"widths": [8], "blocks": [1], "stem_width": 4, "conv": "static"})
    assert count_macs(model, 8) == 8 * 8 * 4 * (3 * 7 * 7) + 8 * 8 * 8 * (4 * 3 * 3) + 8 * 43


def test_bf16_warning_only_where_the_cpu_lacks_bfloat16_arithmetic(monkeypatch):
    sys.path.insert(0, REPO)
    import train
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert "--amp none" in train.bf16_emulation_warning("bf16", cpu)
    assert train.bf16_emulation_warning("none", cpu) is None
    assert train.bf16_emulation_warning("bf16", torch.device("cuda")) is None
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert train.bf16_emulation_warning("bf16", cpu) is None


def test_missing_data_ends_with_the_reason_not_a_traceback(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--data", str(tmp_path / "nowhere"), "--out", str(out),
           *TINY_NET]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode != 0
    assert "error: GTSRB training split not found" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()  # nothing created for a run that never started
