"""odconv.predict: the Predictor (batched prediction, bad files, Grad-CAM), its helpers and its CLI.

Everything runs on a small randomly initialised checkpoint written to a tmp dir: no GTSRB data,
no GPU.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import odconv
from gtsrb_fixtures import make_bad_files, make_checkpoint, make_sign, write_signs
from odconv.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from odconv.data import GTSRB_CLASSES, PREPROCESS_DEFAULTS, normalize, preprocess_image
from odconv.predict import (
    DEFAULT_CHECKPOINT, Predictor, PredictorError, expand_sources, heatmap_to_rgb, overlay_heatmap,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    return {
        "checkpoint": make_checkpoint(root / "model.pt"),
        "good": write_signs(root / "good", 6),
        "bad": make_bad_files(root / "bad"),
        "root": root,
    }


@pytest.fixture(scope="module")
def predictor(files):
    return Predictor(files["checkpoint"])


def test_default_checkpoint_is_in_the_repository():
    assert os.path.abspath(DEFAULT_CHECKPOINT) == os.path.join(REPO, "checkpoints", "gtsrb_odconv.pt") \
        or os.environ.get("ODCONV_CHECKPOINT")


SHIPPED = os.path.join(REPO, "checkpoints", "gtsrb_odconv.pt")
EXAMPLES = {"stop.png": 14, "speed_limit_30.png": 1, "road_work.png": 25, "turn_right_ahead.png": 33,
            "keep_right.png": 38}  # docs/examples: validation-track images the shipped model never trained on


def test_shipped_model_recognises_the_example_signs():
    assert os.path.getsize(SHIPPED) <= 20 * 2 ** 20
    checkpoint = load_checkpoint(SHIPPED)  # weights_only=True
    assert checkpoint["model"]["conv"] == "odconv" and checkpoint["class_names"] == GTSRB_CLASSES
    assert not {"optimizer", "train_state_dict", "rng"} & set(checkpoint)  # exported for shipping
    paths = [os.path.join(REPO, "docs", "examples", name) for name in EXAMPLES]
    results = Predictor(SHIPPED).predict(paths)
    assert [r["class_id"] for r in results] == list(EXAMPLES.values()), [r.get("class_name") for r in results]


def test_predictor_describes_what_it_loaded(predictor, files):
    assert predictor.model_file == os.path.abspath(files["checkpoint"])
    assert predictor.backend == odconv.backend_info()["cpu"]["backend"]
    assert predictor.backend in ("extension", "reference")
    assert predictor.class_names == GTSRB_CLASSES and predictor.input_size == PREPROCESS_DEFAULTS["size"]
    assert predictor.last_inference_ms is None
    assert "model.pt" in predictor.describe()


def test_predict_matches_the_network_and_has_sorted_topk(predictor, files):
    results = predictor.predict(files["good"], topk=5)
    assert [r["path"] for r in results] == files["good"]
    checkpoint = load_checkpoint(files["checkpoint"])
    model = model_from_checkpoint(checkpoint)
    images = torch.stack([preprocess_image(Image.open(p).convert("RGB"), checkpoint["preprocess"]) for p in files["good"]])
    with torch.no_grad():
        expected = torch.softmax(model(normalize(images, checkpoint["preprocess"])), dim=1)
    for row, result in enumerate(results):
        assert set(result) == {"path", "class_id", "class_name", "confidence", "topk"}
        assert result["class_id"] == int(expected[row].argmax())
        assert result["class_name"] == GTSRB_CLASSES[result["class_id"]]
        assert result["confidence"] == pytest.approx(float(expected[row].max()), rel=1e-4)
        confidences = [t["confidence"] for t in result["topk"]]
        assert len(result["topk"]) == 5 and confidences == sorted(confidences, reverse=True)
        assert result["topk"][0] == {k: result[k] for k in ("class_id", "class_name", "confidence")}
        assert all(GTSRB_CLASSES[t["class_id"]] == t["class_name"] for t in result["topk"])
    assert predictor.last_inference_ms > 0 and predictor.last_image_count == len(files["good"])


def test_batching_does_not_change_results(predictor, files):
    one_by_one = predictor.predict(files["good"], topk=3, batch_size=1)
    batched = predictor.predict(files["good"], topk=3, batch_size=4)
    for a, b in zip(one_by_one, batched):
        assert a["class_id"] == b["class_id"]
        assert a["confidence"] == pytest.approx(b["confidence"], rel=1e-4, abs=1e-6)


def test_pil_images_and_single_sources(predictor, files):
    image = make_sign("triangle", size=40)
    result, = predictor.predict([image], topk=1)
    assert result["path"] is None and len(result["topk"]) == 1
    single = predictor.predict(files["good"][0])
    assert len(single) == 1 and single[0]["path"] == files["good"][0]
    assert len(predictor.predict([], topk=5)) == 0


def test_bad_sources_give_errors_and_the_others_are_still_predicted(predictor, files):
    bad = files["bad"]
    sources = [files["good"][0], bad["corrupt"], bad["sixteen_bit"], bad["text"], bad["huge"], bad["cmyk"],
               str(files["root"] / "missing.png"), files["good"][1]]
    results = predictor.predict(sources, batch_size=3)
    by_path = {r["path"]: r for r in results}
    assert [r["path"] for r in results] == sources
    for key in ("corrupt", "sixteen_bit", "text", "huge"):
        assert set(by_path[bad[key]]) == {"path", "error"} and by_path[bad[key]]["error"]
    assert "16" in by_path[bad["sixteen_bit"]]["error"]
    assert "too large" in by_path[bad["huge"]]["error"]
    assert by_path[str(files["root"] / "missing.png")]["error"] == "file not found"
    for path in (files["good"][0], files["good"][1], bad["cmyk"]):  # CMYK is converted, not rejected
        assert "error" not in by_path[path] and by_path[path]["class_name"] in GTSRB_CLASSES


def test_explain_gives_a_normalised_non_constant_heatmap(predictor, files):
    heatmap = predictor.explain(files["good"][0])
    size = predictor.input_size
    assert heatmap.shape == (size, size) and heatmap.dtype == np.float32
    assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0 and heatmap.max() == pytest.approx(1.0)
    assert heatmap.std() > 0.01
    big = make_sign("red_circle", size=90).resize((90, 70))
    assert predictor.explain(big, output_size="original").shape == (70, 90)
    assert predictor.explain(big, output_size=(20, 30)).shape == (20, 30)
    details = predictor.explain_details(files["good"][1], class_id=14)
    assert details["class_id"] == 14 and details["class_name"] == "Stop"
    assert details["layer"].startswith("stages.") and details["method"] in ("grad-cam", "gradient x activation")
    assert details["odconv"] and details["odconv"][-1]["spatial"].shape == (3, 3)
    assert details["odconv"][-1]["kernel"].sum() == pytest.approx(1.0, abs=1e-5)


def test_explain_errors(predictor, files):
    with pytest.raises(ValueError, match="class_id"):
        predictor.explain(files["good"][0], class_id=43)
    with pytest.raises(ValueError):
        predictor.explain(files["bad"]["corrupt"])


def test_explain_leaves_the_model_untouched(predictor, files):
    before = predictor.predict(files["good"][:2])
    predictor.explain(files["good"][0])
    assert not predictor.model.training
    assert all(not m._forward_hooks and not m._backward_hooks for m in predictor.model.modules())
    assert all(p.grad is None for p in predictor.model.parameters())
    assert predictor.predict(files["good"][:2]) == before


def test_overlay_and_colour_ramp():
    image = make_sign("blue_disc", size=30)
    heat = np.linspace(0, 1, 48 * 48, dtype=np.float32).reshape(48, 48)
    overlay = overlay_heatmap(image, heat, alpha=0.5, size=(120, 120))
    assert overlay.mode == "RGB" and overlay.size == (120, 120)
    assert overlay_heatmap(image, heat).size == (30, 30)
    rgb = heatmap_to_rgb(heat)
    assert rgb.shape == (48, 48, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 2] > rgb[0, 0, 0] and rgb[-1, -1, 0] > rgb[-1, -1, 2]  # cold is blue, hot is red


def test_load_errors(files, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Predictor(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(1000))
    with pytest.raises(CheckpointError):
        Predictor(garbage)
    mismatched = make_checkpoint(tmp_path / "wide.pt", model_config={"stem_width": 8, "widths": [8, 32], "blocks": [1, 1]})
    checkpoint = load_checkpoint(mismatched)
    checkpoint["model"]["widths"] = [8, 16]
    torch.save(checkpoint, tmp_path / "mismatched.pt")
    with pytest.raises(CheckpointError, match="do not match"):
        Predictor(tmp_path / "mismatched.pt")
    if not torch.cuda.is_available():
        with pytest.raises(PredictorError, match="CUDA is not available"):
            Predictor(files["checkpoint"], device="cuda")


def test_expand_sources(files, tmp_path):
    folder = os.path.dirname(files["good"][0])
    (tmp_path / "empty").mkdir()
    (tmp_path / "nested" / "deeper").mkdir(parents=True)
    make_sign().save(tmp_path / "nested" / "deeper" / "a.png")
    entries = expand_sources([folder, files["bad"]["text"], tmp_path / "missing.png", tmp_path / "empty"])
    assert entries[:6] == files["good"]
    assert entries[6] == files["bad"]["text"]  # an explicit file is kept whatever its extension
    assert entries[7] == {"path": str(tmp_path / "missing.png"), "error": "file not found"}
    assert entries[8]["error"].startswith("no image files")
    assert expand_sources([files["bad"]["text"]]) == [files["bad"]["text"]]
    assert expand_sources([os.path.dirname(files["bad"]["text"])]).count(files["bad"]["text"]) == 0
    assert expand_sources([tmp_path / "nested"], recursive=True) == [str(tmp_path / "nested" / "deeper" / "a.png")]


# -- command line ----------------------------------------------------------------------------------
def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "odconv.predict", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_json_on_good_and_bad_files(files):
    bad = files["bad"]
    folder = os.path.dirname(files["good"][0])
    done = run_cli(folder, bad["corrupt"], bad["text"], bad["sixteen_bit"], "--json", "--topk", "3",
                   "--checkpoint", files["checkpoint"], "--batch-size", "4")
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert len(results) == len(files["good"]) + 3
    for result in results[:len(files["good"])]:
        assert isinstance(result["class_id"], int) and result["class_name"] == GTSRB_CLASSES[result["class_id"]]
        assert 0.0 <= result["confidence"] <= 1.0 and len(result["topk"]) == 3
    for result, path in zip(results[len(files["good"]):], (bad["corrupt"], bad["text"], bad["sixteen_bit"])):
        assert result["path"] == path and "error" in result and "class_id" not in result


def test_cli_fails_when_nothing_is_predicted(files):
    bad = files["bad"]
    done = run_cli(bad["corrupt"], bad["text"], "--json", "--checkpoint", files["checkpoint"])
    assert done.returncode == 1
    assert all("error" in r for r in json.loads(done.stdout))


def test_cli_missing_or_foreign_checkpoint_is_a_one_line_error(files, tmp_path, capsys):
    from odconv.predict import main
    assert main([files["good"][0], "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("error: checkpoint not found")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    assert main([files["good"][0], "--checkpoint", str(foreign), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "not an odconv GTSRB checkpoint" in captured.err


def test_cli_table(files, capsys):
    from odconv.predict import main
    assert main([files["good"][0], files["bad"]["corrupt"], "--checkpoint", files["checkpoint"], "--topk", "2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["FILE", "CLASS", "CONF"]
    assert any(name in lines[1] for name in GTSRB_CLASSES) and "%" in lines[1]
    assert any("error:" in line and "corrupt.png" in line for line in lines)
    assert "1 of 2 predicted" in out
