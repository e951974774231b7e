"""gui.py with pytest-qt, offscreen: predictions shown, bad files and checkpoints reported in the
window, folders predicted in batches off the GUI thread, drag and drop, and ``--screenshot``."""
import os
import subprocess
import sys
import threading

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

pytest.importorskip("PyQt5")
pytest.importorskip("pytestqt")

from PyQt5.QtCore import QMimeData, QPoint, Qt, QUrl  # noqa: E402
from PyQt5.QtGui import QDragEnterEvent, QDropEvent  # noqa: E402

from gtsrb_fixtures import make_bad_files, make_checkpoint, make_sign, write_signs  # noqa: E402
from odconv.predict import Predictor  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import gui  # noqa: E402

WAIT_MS = 30000


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gui")
    stop = str(root / "stop.png")
    make_sign("stop", size=72).save(stop)
    return {
        "checkpoint": make_checkpoint(root / "model.pt"),
        "other_checkpoint": make_checkpoint(root / "other.pt", seed=1),
        "stop": stop,
        "bad": make_bad_files(root / "bad"),
        "root": root,
    }


@pytest.fixture(scope="module")
def predictor(files):
    return Predictor(files["checkpoint"])


@pytest.fixture
def window(qtbot, files):
    w = gui.MainWindow(files["checkpoint"], batch_size=8)
    qtbot.addWidget(w)
    w.show()
    yield w
    w.close()


def shown_class(window):
    return window.prediction_panel.class_name_label.text()


def test_loading_an_image_shows_its_prediction(window, predictor, files):
    assert window.message_label.kind == "info" and "Model loaded" in window.message_label.text()
    window.open_paths([files["stop"]])
    expected = predictor.predict([files["stop"]])[0]
    assert shown_class(window) == expected["class_name"]
    assert f"class {expected['class_id']}" in window.prediction_panel.detail_label.text()
    bars = window.prediction_panel.bars
    assert bars.bars[0].format() == f"{expected['confidence']:.1%}"
    assert [bar.value() for bar in bars.bars] == sorted((bar.value() for bar in bars.bars), reverse=True)
    assert window.image_view.has_image() and window.explanation_view.has_image()
    assert window.current_heatmap.shape == (predictor.input_size,) * 2 and window.current_heatmap.std() > 0.01
    assert window.message_label.kind == "info" and expected["class_name"] in window.message_label.text()
    # status: model file, backend, inference time
    assert window.model_label.text() == "Model: model.pt"
    assert predictor.backend in window.backend_label.text() and "cpu" in window.backend_label.text()
    assert window.timing_label.text().startswith("Inference: ") and "ms" in window.timing_label.text()


def test_corrupt_file_shows_an_error_and_a_good_image_still_works(window, files, predictor):
    window.open_paths([files["bad"]["corrupt"]])
    assert window.message_label.kind == "error"
    assert "corrupt.png" in window.message_label.text() and "not a readable image" in window.message_label.text()
    assert shown_class(window) == "—" and not window.image_view.has_image()
    window.open_paths([files["stop"]])
    assert window.message_label.kind == "info"
    assert shown_class(window) == predictor.predict([files["stop"]])[0]["class_name"]
    assert window.image_view.has_image()


@pytest.mark.parametrize("kind, words", [("sixteen_bit", "16"), ("text", "not a readable image"),
                                         ("huge", "too large")])
def test_unreadable_files_are_reported_in_the_window(window, files, kind, words):
    window.open_paths([files["bad"][kind]])
    assert window.message_label.kind == "error" and words in window.message_label.text()
    assert shown_class(window) == "—"


def test_cmyk_jpeg_is_predicted(window, files, predictor):
    window.open_paths([files["bad"]["cmyk"]])
    assert window.message_label.kind == "info"
    assert shown_class(window) == predictor.predict([files["bad"]["cmyk"]])[0]["class_name"]


def test_folder_is_predicted_in_batches_off_the_gui_thread(window, qtbot, tmp_path, predictor):
    paths = write_signs(tmp_path / "folder", 21)
    calls = []
    original_predict = window.predictor.predict

    def recording_predict(sources, *args, **kwargs):
        calls.append((threading.current_thread() is threading.main_thread(), len(sources)))
        return original_predict(sources, *args, **kwargs)

    window.predictor.predict = recording_predict
    window.open_paths([str(tmp_path / "folder")])
    assert window.is_busy() and window.progress_bar.isVisible()
    qtbot.waitUntil(lambda: not window.is_busy(), timeout=WAIT_MS)
    assert not window.progress_bar.isVisible()
    results = window.results_list.results()
    assert [r["path"] for r in results] == paths
    expected = predictor.predict(paths)
    assert [r["class_name"] for r in results] == [r["class_name"] for r in expected]
    # batched (8 per call), and never on the GUI thread
    assert [n for _, n in calls] == [8, 8, 5] and not any(on_main for on_main, _ in calls)
    assert window.progress_bar.value() == 21
    assert "Predicted 21 of 21" in window.message_label.text()
    # the first image is shown; selecting another shows its stored prediction
    assert window.current_path == paths[0]
    window.results_list.setCurrentRow(5)
    assert window.current_path == paths[5] and shown_class(window) == results[5]["class_name"]


def test_folder_with_bad_files_marks_them_and_keeps_the_rest(window, qtbot, tmp_path, files):
    folder = tmp_path / "mixed"
    good = write_signs(folder, 4)
    for key in ("corrupt", "sixteen_bit", "huge", "cmyk"):
        with open(files["bad"][key], "rb") as src, open(folder / os.path.basename(files["bad"][key]), "wb") as dst:
            dst.write(src.read())
    window.open_paths([str(folder)])
    qtbot.waitUntil(lambda: not window.is_busy(), timeout=WAIT_MS)
    results = {os.path.basename(r["path"]): r for r in window.results_list.results()}
    assert len(results) == 8
    assert all("error" in results[name] for name in ("corrupt.png", "sixteen_bit.png", "huge.png"))
    assert all("class_name" in results[os.path.basename(p)] for p in good + [files["bad"]["cmyk"]])
    assert window.message_label.kind == "error" and "3 could not be read" in window.message_label.text()
    row = [os.path.basename(r["path"]) for r in window.results_list.results()].index("corrupt.png")
    window.results_list.setCurrentRow(row)
    assert window.message_label.kind == "error" and "corrupt.png" in window.message_label.text()


def test_a_new_folder_replaces_a_running_one(window, qtbot, tmp_path):
    write_signs(tmp_path / "first", 40)
    second = write_signs(tmp_path / "second", 3)
    window.open_paths([str(tmp_path / "first")])
    window.open_paths([str(tmp_path / "second")])
    qtbot.waitUntil(lambda: not window.is_busy() and not window._jobs, timeout=WAIT_MS)
    assert [r["path"] for r in window.results_list.results()] == second


def test_missing_checkpoint_shows_an_error_and_a_model_can_be_opened_later(qtbot, files, tmp_path, predictor):
    w = gui.MainWindow(str(tmp_path / "missing.pt"))
    qtbot.addWidget(w)
    w.show()
    assert w.predictor is None and w.message_label.kind == "error"
    assert "checkpoint not found" in w.message_label.text() and "Open model" in w.message_label.text()
    assert w.model_label.text() == "Model: none loaded"
    w.open_paths([files["stop"]])  # the image is shown, with the reason it is not classified
    assert w.image_view.has_image() and shown_class(w) == "—"
    assert w.message_label.kind == "error" and "no model is loaded" in w.message_label.text()
    assert w.load_model(files["checkpoint"])  # what "Open model..." calls: the open image is predicted
    assert shown_class(w) == predictor.predict([files["stop"]])[0]["class_name"]
    assert w.model_label.text() == "Model: model.pt"
    w.close()


def test_incompatible_checkpoint_keeps_the_loaded_model(window, files, tmp_path, predictor):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint" * 64)
    window.open_paths([files["stop"]])
    assert not window.load_model(str(garbage))
    assert window.message_label.kind == "error" and "garbage.pt" in window.message_label.text()
    assert "Still using model.pt" in window.message_label.text()
    assert window.predictor is not None and window.model_label.text() == "Model: model.pt"
    window.open_paths([files["stop"]])
    assert shown_class(window) == predictor.predict([files["stop"]])[0]["class_name"]
    assert window.load_model(files["other_checkpoint"])
    assert window.model_label.text() == "Model: other.pt"
    assert shown_class(window) == Predictor(files["other_checkpoint"]).predict([files["stop"]])[0]["class_name"]


def test_open_model_menu_action_exists(window):
    texts = [a.text() for menu in window.menuBar().actions() for a in menu.menu().actions()]
    assert "Open &model…" in texts and "Open &image…" in texts and "Open &folder…" in texts


def test_explanation_can_be_hidden_and_shown(window, files):
    window.show_explanation_action.setChecked(False)
    window.open_paths([files["stop"]])
    assert not window.explanation_box.isVisible() and window.current_heatmap is None
    window.show_explanation_action.setChecked(True)
    assert window.explanation_box.isVisible() and window.current_heatmap is not None
    window.opacity_slider.setValue(10)
    assert window.explanation_view.has_image()


def test_dropping_files_and_folders(window, qtbot, tmp_path, files, predictor):
    def drop(paths):
        mime = QMimeData()
        mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
        enter = QDragEnterEvent(QPoint(50, 50), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
        window.dragEnterEvent(enter)
        assert enter.isAccepted()
        window.dropEvent(QDropEvent(QPoint(50, 50), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier))

    drop([files["stop"]])
    assert shown_class(window) == predictor.predict([files["stop"]])[0]["class_name"]
    paths = write_signs(tmp_path / "dropped", 3)
    drop([tmp_path / "dropped", files["stop"]])
    qtbot.waitUntil(lambda: not window.is_busy(), timeout=WAIT_MS)
    assert [r["path"] for r in window.results_list.results()] == paths + [files["stop"]]


def test_screenshot_writes_a_non_blank_png(files, tmp_path):
    folder = tmp_path / "shots"
    write_signs(folder, 5)
    out = tmp_path / "shot.png"
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    done = subprocess.run([sys.executable, os.path.join(REPO, "gui.py"), "--checkpoint", files["checkpoint"],
                           str(folder), "--screenshot", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pixels = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32)
    assert pixels.shape[0] >= 600 and pixels.shape[1] >= 900
    assert pixels.var() > 100  # not blank
    assert len(np.unique(pixels.reshape(-1, 3)[::37], axis=0)) > 50  # images, text and bars were drawn


def test_closing_while_a_folder_is_predicted_stops_the_worker(qtbot, files, tmp_path):
    write_signs(tmp_path / "many", 64)
    w = gui.MainWindow(files["checkpoint"], batch_size=4)
    qtbot.addWidget(w)
    w.show()
    w.open_paths([str(tmp_path / "many")])
    threads = [thread for thread, _ in w._jobs.values()]
    assert w.is_busy() and threads
    w.close()
    assert all(thread.isFinished() for thread in threads)
    assert not w.is_busy()


def test_opening_another_model_predicts_the_open_folder_again(window, qtbot, tmp_path, files):
    paths = write_signs(tmp_path / "again", 5)
    window.open_paths([str(tmp_path / "again")])
    qtbot.waitUntil(lambda: not window.is_busy(), timeout=WAIT_MS)
    assert window.load_model(files["other_checkpoint"])
    qtbot.waitUntil(lambda: not window.is_busy(), timeout=WAIT_MS)
    expected = Predictor(files["other_checkpoint"]).predict(paths)
    results = window.results_list.results()
    assert [(r["path"], r["class_id"]) for r in results] == [(r["path"], r["class_id"]) for r in expected]
    assert [r["confidence"] for r in results] == pytest.approx([r["confidence"] for r in expected], rel=1e-4)
