#!/usr/bin/env python3
"""Desktop GUI of the GTSRB ODConv traffic-sign classifier (PyQt5).

    python gui.py [--checkpoint PATH] [--device cpu|cuda] [IMAGE_OR_FOLDER ...] [--screenshot OUT.png]

Open an image, a folder, or drop files and folders onto the window: the image is shown with the
predicted sign, the top-5 classes with confidence bars, and a Grad-CAM heat-map of where the network
looked. Folders are predicted in batches on a worker thread, with a progress bar. ``--screenshot``
renders the window once the arguments are loaded (and folder predictions are done) and exits.

This file is UI only: every model and image operation goes through ``odconv.predict`` and the
package's public API; Qt never enters the ``odconv`` package.
"""
import argparse
import os
import sys
import threading
import time
from contextlib import contextmanager

from PyQt5.QtCore import QObject, QSize, Qt, QThread, QTimer, pyqtSignal, pyqtSlot
from PyQt5.QtGui import QColor, QIcon, QImage, QKeySequence, QPalette, QPixmap
from PyQt5.QtWidgets import (
    QAction, QApplication, QFileDialog, QFrame, QGridLayout, QGroupBox, QHBoxLayout, QLabel, QListWidget,
    QListWidgetItem, QMainWindow, QProgressBar, QSizePolicy, QSlider, QSplitter, QStackedWidget, QStyle, QToolButton,
    QVBoxLayout, QWidget,
)

from odconv.checkpoint import CheckpointError
from odconv.predict import (
    DEFAULT_CHECKPOINT, IMAGE_EXTENSIONS, Predictor, PredictorError, expand_sources, overlay_heatmap,
)

APP_NAME = "ODConv Traffic-Sign Classifier"
TOPK = 5
DISPLAY_SIZE = 480          # longest side of the rendered explanation overlay, in pixels
THUMBNAIL_SIZE = 48


def pil_to_qimage(image):
    """An RGB PIL image -> a QImage that owns its pixels (safe to build off the GUI thread)."""
    image = image.convert("RGB")
    data = image.tobytes()
    return QImage(data, image.width, image.height, 3 * image.width, QImage.Format_RGB888).copy()


def display_size(width, height, longest=DISPLAY_SIZE):
    scale = longest / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


@contextmanager
def busy_cursor():
    QApplication.setOverrideCursor(Qt.WaitCursor)
    try:
        yield
    finally:
        QApplication.restoreOverrideCursor()


# ---------------------------------------------------------------------------------------------
# Worker: predicts a list of image files in batches, off the GUI thread
# ---------------------------------------------------------------------------------------------
class FolderPredictionWorker(QObject):
    """Reads, thumbnails and predicts ``paths`` ``batch_size`` at a time on its own QThread.

    Emits ``results_ready(job_id, [(result, thumbnail QImage or None), ...])`` per batch,
    ``progress(job_id, done, total)``, and ``finished(job_id, cancelled, inference_ms)`` once.
    ``cancel()`` may be called from any thread; the worker stops after the current batch.
    """

    results_ready = pyqtSignal(int, object)
    progress = pyqtSignal(int, int, int)
    finished = pyqtSignal(int, bool, float)

    def __init__(self, job_id, predictor, paths, batch_size=32, topk=TOPK):
        super().__init__()
        self.job_id = job_id
        self.predictor = predictor
        self.paths = list(paths)
        self.batch_size = max(1, int(batch_size))
        self.topk = topk
        self._cancel = threading.Event()
        self._home_thread = QThread.currentThread()

    def cancel(self):
        self._cancel.set()

    @pyqtSlot()
    def run(self):
        total, inference_ms, start = len(self.paths), 0.0, 0
        try:
            for start in range(0, total, self.batch_size):
                if self._cancel.is_set():
                    break
                entries, batch_ms = self._predict_batch(self.paths[start:start + self.batch_size])
                inference_ms += batch_ms
                self.results_ready.emit(self.job_id, entries)
                self.progress.emit(self.job_id, min(start + self.batch_size, total), total)
        except Exception as error:  # never let a worker die silently: report it as results
            failed = [({"path": p, "error": f"prediction failed: {type(error).__name__}: {error}"}, None)
                      for p in self.paths[start:]]
            self.results_ready.emit(self.job_id, failed)
        finally:
            self.moveToThread(self._home_thread)  # so the GUI thread can delete us after the thread ends
            self.finished.emit(self.job_id, self._cancel.is_set(), inference_ms)

    def _predict_batch(self, paths):
        """[(result, thumbnail)] for ``paths`` and the time the network took, in ms."""
        images, entries = [], []
        for path in paths:
            try:
                image = Predictor.read_image(path)
            except ValueError as error:
                entries.append(({"path": path, "error": str(error)}, None))
                continue
            thumbnail = image.copy()
            thumbnail.thumbnail((THUMBNAIL_SIZE * 2, THUMBNAIL_SIZE * 2))
            entries.append((None, pil_to_qimage(thumbnail)))
            images.append((len(entries) - 1, path, image))
        predictions, elapsed_ms = [], 0.0
        if images:
            predictions = self.predictor.predict([image for _, _, image in images], topk=self.topk,
                                                 batch_size=len(images))
            elapsed_ms = self.predictor.last_inference_ms or 0.0  # this thread's call: forward time
        for (index, path, _), result in zip(images, predictions):
            entries[index] = ({**result, "path": path}, entries[index][1])
        return entries, elapsed_ms


# ---------------------------------------------------------------------------------------------
# Small widgets
# ---------------------------------------------------------------------------------------------
class ImageView(QLabel):
    """Shows one image scaled to fit (aspect kept), or a placeholder text."""

    def __init__(self, placeholder, parent=None):
        super().__init__(parent)
        self._pixmap = None
        self._placeholder = placeholder
        self.setAlignment(Qt.AlignCenter)
        self.setMinimumSize(220, 220)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)
        self.setObjectName("imageView")
        self.setWordWrap(True)
        self.clear_image()

    def set_image(self, qimage):
        self._pixmap = QPixmap.fromImage(qimage)
        self._rescale()

    def clear_image(self, placeholder=None):
        self._pixmap = None
        self.setPixmap(QPixmap())
        self.setText(placeholder or self._placeholder)

    def has_image(self):
        return self._pixmap is not None

    def resizeEvent(self, event):
        super().resizeEvent(event)
        self._rescale()

    def _rescale(self):
        if self._pixmap is None:
            return
        size = self.contentsRect().size() - QSize(8, 8)
        self.setPixmap(self._pixmap.scaled(size, Qt.KeepAspectRatio, Qt.SmoothTransformation))


class ConfidenceBars(QWidget):
    """The top-k classes: rank, name and a confidence bar each."""

    def __init__(self, rows=TOPK, parent=None):
        super().__init__(parent)
        layout = QGridLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setHorizontalSpacing(10)
        layout.setVerticalSpacing(6)
        layout.setColumnStretch(2, 1)
        self.name_labels, self.bars, self.rank_labels = [], [], []
        for row in range(rows):
            rank = QLabel(f"{row + 1}.")
            rank.setObjectName("rankLabel")
            name = QLabel("")
            name.setMinimumWidth(300)
            bar = QProgressBar()
            bar.setRange(0, 1000)
            bar.setTextVisible(True)
            bar.setFixedHeight(18)
            bar.setObjectName("topBar" if row == 0 else "otherBar")
            layout.addWidget(rank, row, 0)
            layout.addWidget(name, row, 1)
            layout.addWidget(bar, row, 2)
            self.rank_labels.append(rank)
            self.name_labels.append(name)
            self.bars.append(bar)
        self.clear()

    def set_ranking(self, ranking):
        for row, (name, bar) in enumerate(zip(self.name_labels, self.bars)):
            if row < len(ranking):
                entry = ranking[row]
                name.setText(f"{entry['class_name']}  <span style='color:#8a8f98'>#{entry['class_id']}</span>")
                name.setToolTip(entry["class_name"])
                bar.setValue(round(entry["confidence"] * 1000))
                bar.setFormat(f"{entry['confidence']:.1%}")
                bar.setVisible(True)
            else:
                name.setText("")
                bar.setVisible(False)

    def clear(self):
        for name, bar in zip(self.name_labels, self.bars):
            name.setText("—")
            bar.setValue(0)
            bar.setFormat("")


class PredictionPanel(QGroupBox):
    """The predicted sign (name, id, confidence) and the top-k confidence bars."""

    def __init__(self, parent=None):
        super().__init__("Prediction", parent)
        layout = QVBoxLayout(self)
        self.class_name_label = QLabel()
        self.class_name_label.setObjectName("predictedClassLabel")
        self.class_name_label.setWordWrap(True)
        self.detail_label = QLabel()
        self.detail_label.setObjectName("predictionDetailLabel")
        self.bars = ConfidenceBars()
        layout.addWidget(self.class_name_label)
        layout.addWidget(self.detail_label)
        layout.addSpacing(6)
        layout.addWidget(self.bars)
        self.show_nothing("Open an image to classify it")

    def show_result(self, result):
        self.class_name_label.setText(result["class_name"])
        self.detail_label.setText(f"class {result['class_id']} · {result['confidence']:.1%} confidence")
        self.bars.set_ranking(result["topk"])

    def show_nothing(self, text):
        self.class_name_label.setText("—")
        self.detail_label.setText(text)
        self.bars.clear()


class MessageBanner(QLabel):
    """A one-line message above the image: information, or an error (never a dialog)."""

    STYLES = {
        "info": "background:#eef3fa; color:#1d3557; border:1px solid #c9d6ea;",
        "error": "background:#fdecea; color:#8b1a1a; border:1px solid #f2b8b5;",
    }

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("messageLabel")
        self.setWordWrap(True)
        self.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.kind = "info"
        self.show_info("Open an image or a folder (File menu), or drop files onto this window.")

    def show_info(self, text):
        self._show("info", text)

    def show_error(self, text):
        self._show("error", text)

    def _show(self, kind, text):
        self.kind = kind
        self.setText(text)
        self.setToolTip(text)
        self.setStyleSheet(f"QLabel#messageLabel {{{self.STYLES[kind]} border-radius:4px; padding:6px 10px;}}")


class ResultsList(QListWidget):
    """Images of a folder (or a drop of several files) with their predictions."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("resultsList")
        self.setIconSize(QSize(THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        self.setUniformItemSizes(True)
        self.setSpacing(2)
        self.setAlternatingRowColors(True)
        self.setSelectionMode(QListWidget.SingleSelection)
        self.setTextElideMode(Qt.ElideRight)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)

    def add_results(self, entries):
        for result, thumbnail in entries:
            name = os.path.basename(result["path"] or "") or "<image>"
            item = QListWidgetItem()
            if "error" in result:
                item.setText(f"{name}\n⚠ {result['error']}")
                item.setForeground(QColor("#a32020"))
                item.setIcon(self.style().standardIcon(QStyle.SP_MessageBoxWarning))
                item.setToolTip(f"{result['path']}\n{result['error']}")
            else:
                item.setText(f"{name}\n{result['class_name']} · {result['confidence']:.1%}")
                item.setToolTip(f"{result['path']}\n{result['class_name']} (class {result['class_id']}), "
                                f"{result['confidence']:.1%}")
                if thumbnail is not None:
                    item.setIcon(QIcon(QPixmap.fromImage(thumbnail)))
            item.setData(Qt.UserRole, result)
            self.addItem(item)

    def results(self):
        return [self.item(row).data(Qt.UserRole) for row in range(self.count())]


# ---------------------------------------------------------------------------------------------
# Main window
# ---------------------------------------------------------------------------------------------
class MainWindow(QMainWindow):
    """Image / folder viewer with predictions, explanations and a model status line."""

    def __init__(self, checkpoint_path=None, device="cpu", batch_size=32):
        super().__init__()
        self.device = device
        self.batch_size = batch_size
        self.predictor = None
        self.model_error = None        # why the last model could not be loaded
        self.current_image = None      # PIL image shown
        self.current_path = None
        self.current_heatmap = None
        self.current_result = None
        self._jobs = {}                # job id -> (QThread, worker), until the thread ends
        self._active_job = None
        self._next_job = 0
        self._batch_sources = []       # what the results list was opened from, to redo on a new model
        self._batch_stats = None
        self._show_first_result = False

        self.setWindowTitle(APP_NAME)
        self.setAcceptDrops(True)
        self.resize(1240, 800)
        self._build_actions()
        self._build_ui()
        self.load_model(checkpoint_path or DEFAULT_CHECKPOINT)

    # -- construction ---------------------------------------------------------------------------
    def _build_actions(self):
        style = self.style()
        self.open_image_action = QAction(style.standardIcon(QStyle.SP_FileIcon), "Open &image…", self)
        self.open_image_action.setShortcut(QKeySequence.Open)
        self.open_image_action.triggered.connect(self.open_image_dialog)
        self.open_folder_action = QAction(style.standardIcon(QStyle.SP_DirOpenIcon), "Open &folder…", self)
        self.open_folder_action.setShortcut("Ctrl+Shift+O")
        self.open_folder_action.triggered.connect(self.open_folder_dialog)
        self.open_model_action = QAction(style.standardIcon(QStyle.SP_DriveHDIcon), "Open &model…", self)
        self.open_model_action.setShortcut("Ctrl+M")
        self.open_model_action.triggered.connect(self.open_model_dialog)
        self.quit_action = QAction("&Quit", self)
        self.quit_action.setShortcut(QKeySequence.Quit)
        self.quit_action.triggered.connect(self.close)
        self.show_explanation_action = QAction("Show &explanation", self, checkable=True, checked=True)
        self.show_explanation_action.setShortcut("Ctrl+E")
        self.show_explanation_action.toggled.connect(self._on_explanation_toggled)

        file_menu = self.menuBar().addMenu("&File")
        for action in (self.open_image_action, self.open_folder_action, self.open_model_action):
            file_menu.addAction(action)
        file_menu.addSeparator()
        file_menu.addAction(self.quit_action)
        view_menu = self.menuBar().addMenu("&View")
        view_menu.addAction(self.show_explanation_action)

        toolbar = self.addToolBar("Main")
        toolbar.setObjectName("mainToolBar")
        toolbar.setMovable(False)
        toolbar.setToolButtonStyle(Qt.ToolButtonTextBesideIcon)
        for action in (self.open_image_action, self.open_folder_action, self.open_model_action):
            toolbar.addAction(action)
        toolbar.addSeparator()
        toolbar.addAction(self.show_explanation_action)

    def _build_ui(self):
        # left: the results of a folder
        self.results_title = QLabel("Folder")
        self.results_title.setObjectName("panelTitle")
        self.results_hint = QLabel("No folder open.\n\nUse File ▸ Open folder… or drop a folder or several "
                                   "images onto the window to predict them all.")
        self.results_hint.setObjectName("captionLabel")
        self.results_hint.setWordWrap(True)
        self.results_hint.setAlignment(Qt.AlignTop | Qt.AlignLeft)
        self.results_list = ResultsList()
        self.results_list.currentItemChanged.connect(self._on_result_selected)
        self.results_stack = QStackedWidget()
        self.results_stack.addWidget(self.results_hint)
        self.results_stack.addWidget(self.results_list)
        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(8, 8, 4, 8)
        left_layout.addWidget(self.results_title)
        left_layout.addWidget(self.results_stack, 1)

        # right: message, image and explanation side by side, prediction
        self.message_label = MessageBanner()
        self.image_view = ImageView("No image\n\nOpen an image or a folder, or drop files here")
        self.explanation_view = ImageView("The heat-map of where the network looked appears here")
        self.opacity_slider = QSlider(Qt.Horizontal)
        self.opacity_slider.setRange(0, 100)
        self.opacity_slider.setValue(55)
        self.opacity_slider.setToolTip("Heat-map opacity")
        self.opacity_slider.valueChanged.connect(self._render_explanation)
        self.explanation_caption = QLabel("")
        self.explanation_caption.setObjectName("captionLabel")
        self.explanation_caption.setWordWrap(True)

        image_box = QGroupBox("Image")
        image_layout = QVBoxLayout(image_box)
        image_layout.addWidget(self.image_view)
        self.image_caption = QLabel("")
        self.image_caption.setObjectName("captionLabel")
        image_layout.addWidget(self.image_caption)

        self.explanation_box = QGroupBox("Where the network looked (Grad-CAM)")
        explanation_layout = QVBoxLayout(self.explanation_box)
        explanation_layout.addWidget(self.explanation_view)
        opacity_row = QHBoxLayout()
        opacity_row.addWidget(QLabel("Opacity"))
        opacity_row.addWidget(self.opacity_slider)
        explanation_layout.addLayout(opacity_row)
        explanation_layout.addWidget(self.explanation_caption)

        views = QHBoxLayout()
        views.setSpacing(10)
        views.addWidget(image_box, 1)
        views.addWidget(self.explanation_box, 1)

        self.prediction_panel = PredictionPanel()
        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.setContentsMargins(4, 8, 8, 8)
        right_layout.setSpacing(8)
        right_layout.addWidget(self.message_label)
        right_layout.addLayout(views, 1)
        right_layout.addWidget(self.prediction_panel)

        splitter = QSplitter(Qt.Horizontal)
        splitter.addWidget(left)
        splitter.addWidget(right)
        splitter.setStretchFactor(0, 0)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([340, 900])
        splitter.setChildrenCollapsible(False)
        self.setCentralWidget(splitter)

        # status bar: model, backend, inference time, folder progress
        status = self.statusBar()
        self.model_label = QLabel()
        self.backend_label = QLabel()
        self.timing_label = QLabel("Inference: —")
        for label in (self.model_label, self.backend_label, self.timing_label):
            label.setObjectName("statusField")
        self.progress_bar = QProgressBar()
        self.progress_bar.setFixedWidth(220)
        self.progress_bar.setFormat("%v / %m images")
        self.progress_bar.setVisible(False)
        self.cancel_button = QToolButton()
        self.cancel_button.setIcon(self.style().standardIcon(QStyle.SP_DialogCancelButton))
        self.cancel_button.setToolTip("Stop predicting the folder")
        self.cancel_button.clicked.connect(self.cancel_batch)
        self.cancel_button.setVisible(False)
        status.addWidget(self.model_label)
        status.addWidget(self._separator())
        status.addWidget(self.backend_label)
        status.addWidget(self._separator())
        status.addWidget(self.timing_label, 1)
        status.addPermanentWidget(self.progress_bar)
        status.addPermanentWidget(self.cancel_button)

    @staticmethod
    def _separator():
        line = QFrame()
        line.setFrameShape(QFrame.VLine)
        line.setFrameShadow(QFrame.Sunken)
        return line

    # -- model ----------------------------------------------------------------------------------
    def load_model(self, path):
        """Loads a checkpoint; on failure keeps the previous model (if any) and says why."""
        try:
            with busy_cursor():
                predictor = Predictor(path, device=self.device)
        except (CheckpointError, PredictorError) as error:
            kept = f" Still using {os.path.basename(self.predictor.model_file)}." if self.predictor else \
                " Choose a model with File ▸ Open model… (Ctrl+M)."
            self.model_error = str(error)
            self.message_label.show_error(f"Could not load the model: {error}.{kept}")
            self._update_model_status()
            return False
        except Exception as error:  # e.g. out of memory: report, keep running
            self.model_error = f"{type(error).__name__}: {error}"
            self.message_label.show_error(f"Could not load the model {path}: {self.model_error}")
            self._update_model_status()
            return False
        try:  # so the first timing shown is not the one-off warm-up
            predictor.warm_up()
        except Exception:
            pass
        self.predictor = predictor
        self.model_error = None
        self._update_model_status()
        self.message_label.show_info(f"Model loaded: {predictor.model_file}")
        # Predict again what is open, with the new model.
        if self.current_path is not None:
            self.show_image(self.current_path)
        if self._batch_sources:
            self.start_batch(self._batch_sources, show_first=self.current_path is None)
        return True

    def _update_model_status(self):
        predictor = self.predictor
        if predictor is None:
            self.model_label.setText("Model: none loaded")
            self.model_label.setToolTip("")
            self.backend_label.setText("ODConv backend: —")
            self.setWindowTitle(APP_NAME)
            return
        epoch = predictor.metadata.get("epoch")
        accuracy = predictor.metadata.get("best_val_accuracy")
        details = f"{predictor.model_file}\n{predictor.num_classes} classes, input {predictor.input_size}×{predictor.input_size}"
        if epoch is not None:
            details += f", epoch {epoch}"
        if isinstance(accuracy, (int, float)) and accuracy:
            details += f", best val. accuracy {accuracy:.2%}"
        self.model_label.setText(f"Model: {os.path.basename(predictor.model_file)}")
        self.model_label.setToolTip(details)
        self.backend_label.setText(f"ODConv backend: {predictor.backend} ({predictor.device.type})")
        self.backend_label.setToolTip(predictor.backend_reason)
        self.setWindowTitle(f"{APP_NAME} — {os.path.basename(predictor.model_file)}")

    def _no_model_reason(self):
        why = f" ({self.model_error})" if self.model_error else ""
        return f"no model is loaded{why}. Choose one with File ▸ Open model… (Ctrl+M)."

    # -- opening things -------------------------------------------------------------------------
    def open_image_dialog(self):
        patterns = " ".join(f"*{ext}" for ext in IMAGE_EXTENSIONS)
        path, _ = QFileDialog.getOpenFileName(self, "Open image", self._dialog_folder(),
                                              f"Images ({patterns});;All files (*)")
        if path:
            self.open_paths([path])

    def open_folder_dialog(self):
        path = QFileDialog.getExistingDirectory(self, "Open folder of images", self._dialog_folder())
        if path:
            self.open_paths([path])

    def open_model_dialog(self):
        start = os.path.dirname(self.predictor.model_file) if self.predictor else os.path.dirname(DEFAULT_CHECKPOINT)
        path, _ = QFileDialog.getOpenFileName(self, "Open model checkpoint", start,
                                              "PyTorch checkpoints (*.pt *.pth);;All files (*)")
        if path:
            self.load_model(path)

    def _dialog_folder(self):
        return os.path.dirname(self.current_path) if self.current_path else os.getcwd()

    def open_paths(self, paths):
        """One file: show it. Folders or several files: predict them all into the results list."""
        paths = [os.fspath(p) for p in paths]
        if not paths:
            return
        if len(paths) == 1 and not os.path.isdir(paths[0]):
            self._show_first_result = False  # a running folder must not replace this image
            self.results_list.setCurrentRow(-1)
            self.show_image(paths[0])
        else:
            self.start_batch(paths)

    # -- one image ------------------------------------------------------------------------------
    def show_image(self, path, result=None):
        """Shows ``path`` with its prediction (``result`` if already known) and explanation."""
        name = os.path.basename(path)
        self.current_path = path
        self.current_heatmap = None
        self.current_result = None
        try:
            image = Predictor.read_image(path)
        except ValueError as error:
            self.current_image = None
            self.image_view.clear_image(f"Cannot display\n{name}")
            self.image_caption.setText("")
            self.explanation_view.clear_image("No explanation")
            self.explanation_caption.setText("")
            self.prediction_panel.show_nothing("No prediction: the file could not be read")
            self.message_label.show_error(f"Cannot open {name}: {error}")
            return False
        self.current_image = image
        self.image_view.set_image(pil_to_qimage(image))
        self.image_caption.setText(f"{name} · {image.width}×{image.height}")
        if self.predictor is None:
            self.prediction_panel.show_nothing("No model loaded")
            self.explanation_view.clear_image("Load a model to see where it looks")
            self.explanation_caption.setText("")
            self.message_label.show_error(f"{name} is shown but not classified: {self._no_model_reason()}")
            return False
        try:
            with busy_cursor():
                if result is None or "error" in result:
                    result = {**self.predictor.predict([image], topk=TOPK)[0], "path": path}
                    self.timing_label.setText(f"Inference: {self.predictor.last_inference_ms:.1f} ms (1 image)")
                self.current_result = result
                self.prediction_panel.show_result(result)
                self._explain(image, result)
        except Exception as error:  # a model failure must not take the window down
            self.prediction_panel.show_nothing("Prediction failed")
            self.message_label.show_error(f"Prediction failed for {name}: {type(error).__name__}: {error}")
            return False
        self.message_label.show_info(f"{name}: {result['class_name']} ({result['confidence']:.1%})")
        return True

    def _explain(self, image, result):
        if not self.show_explanation_action.isChecked():
            return
        details = self.predictor.explain_details(image, class_id=result["class_id"])
        self.current_heatmap = details["heatmap"]
        method = {"grad-cam": "Grad-CAM", "gradient x activation": "Gradient × activation"}.get(
            details["method"], details["method"])
        caption = f"{method} for “{details['class_name']}” on layer {details['layer']}"
        if details["odconv"]:
            kernel = details["odconv"][-1]["kernel"]
            caption += " · ODConv kernel attention " + " ".join(f"{k:.2f}" for k in kernel)
        self.explanation_caption.setText(caption)
        self._render_explanation()

    def _render_explanation(self):
        if self.current_image is None or self.current_heatmap is None:
            return
        size = display_size(*self.current_image.size)
        overlay = overlay_heatmap(self.current_image, self.current_heatmap,
                                  alpha=self.opacity_slider.value() / 100.0, size=size)
        self.explanation_view.set_image(pil_to_qimage(overlay))

    def _on_explanation_toggled(self, visible):
        self.explanation_box.setVisible(visible)
        if visible and self.current_image is not None and self.predictor is not None and self.current_heatmap is None:
            result = self.current_result
            if result and "error" not in result:
                try:
                    self._explain(self.current_image, result)
                except Exception as error:
                    self.message_label.show_error(f"Explanation failed: {type(error).__name__}: {error}")

    # -- many images ----------------------------------------------------------------------------
    def start_batch(self, paths, show_first=True):
        """Predicts the images of ``paths`` (folders expand to their images) on a worker thread.

        With ``show_first`` the first result is selected (and shown) as soon as it arrives.
        """
        self.cancel_batch()
        self._show_first_result = show_first
        self._batch_sources = list(paths)
        self.results_list.clear()
        self.results_stack.setCurrentWidget(self.results_list)
        entries = expand_sources(paths)
        files = [e for e in entries if isinstance(e, str)]
        problems = [(e, None) for e in entries if not isinstance(e, str)]
        title = os.path.basename(os.path.normpath(paths[0])) if len(paths) == 1 else f"{len(paths)} items"
        self.results_title.setText(f"Folder: {title}")
        self.results_list.add_results(problems)
        if self.predictor is None:
            self.results_list.add_results([({"path": f, "error": "no model loaded"}, None) for f in files])
            self.message_label.show_error(f"The images are not predicted: {self._no_model_reason()} "
                                          "They will be once a model is loaded.")
            return
        if not files:
            self.message_label.show_error(f"No images found in {', '.join(paths)}.")
            return
        job_id = self._next_job
        self._next_job += 1
        worker = FolderPredictionWorker(job_id, self.predictor, files, self.batch_size)
        thread = QThread(self)
        worker.moveToThread(thread)
        thread.started.connect(worker.run)
        worker.results_ready.connect(self._on_batch_results)
        worker.progress.connect(self._on_batch_progress)
        worker.finished.connect(self._on_batch_finished)
        thread.finished.connect(lambda job_id=job_id: self._forget_job(job_id))
        self._jobs[job_id] = (thread, worker)
        self._active_job = job_id
        self._batch_stats = {"started": time.perf_counter(), "inference_ms": 0.0, "total": len(files),
                             "problems": len(problems)}
        self.progress_bar.setRange(0, len(files))
        self.progress_bar.setValue(0)
        self.progress_bar.setVisible(True)
        self.cancel_button.setVisible(True)
        self.message_label.show_info(f"Predicting {len(files)} images from {title}…")
        thread.start()

    def cancel_batch(self):
        if self._active_job is not None:
            thread, worker = self._jobs[self._active_job]
            worker.cancel()
            self._active_job = None
            self.progress_bar.setVisible(False)
            self.cancel_button.setVisible(False)
            self.message_label.show_info("Stopped predicting the folder.")

    def is_busy(self):
        """True while a folder is being predicted."""
        return self._active_job is not None

    def _on_batch_results(self, job_id, entries):
        if job_id != self._active_job:
            return
        self.results_list.add_results(entries)
        if self._show_first_result:
            results = self.results_list.results()
            first_good = next((row for row, r in enumerate(results) if "error" not in r), None)
            if first_good is not None:
                self._show_first_result = False
                self.results_list.setCurrentRow(first_good)

    def _on_batch_progress(self, job_id, done, total):
        if job_id == self._active_job:
            self.progress_bar.setValue(done)

    def _on_batch_finished(self, job_id, cancelled, inference_ms):
        thread, _ = self._jobs.get(job_id, (None, None))
        if thread is not None:
            thread.quit()
        if job_id != self._active_job:
            return
        self._active_job = None
        self.progress_bar.setVisible(False)
        self.cancel_button.setVisible(False)
        results = self.results_list.results()
        good = sum("error" not in r for r in results)
        stats = self._batch_stats
        per_image = inference_ms / good if good else 0.0
        self.timing_label.setText(f"Inference: {inference_ms:.0f} ms for {good} images "
                                  f"({per_image:.2f} ms/image, batches of {self.batch_size})")
        bad = len(results) - good
        summary = f"Predicted {good} of {len(results)} images in {time.perf_counter() - stats['started']:.1f} s"
        if bad:
            self.message_label.show_error(f"{summary}; {bad} could not be read (marked ⚠ in the list).")
        else:
            self.message_label.show_info(summary + ".")

    def _forget_job(self, job_id):
        thread, worker = self._jobs.pop(job_id, (None, None))
        if thread is not None:
            thread.deleteLater()
        if worker is not None:
            worker.deleteLater()

    def _on_result_selected(self, item, _previous=None):
        if item is None:
            return
        result = item.data(Qt.UserRole)
        if result.get("path") and os.path.isfile(result["path"]):
            self.show_image(result["path"], result)
        else:
            self.message_label.show_error(f"{result.get('path')}: {result.get('error', 'not a file')}")

    # -- drag and drop --------------------------------------------------------------------------
    @staticmethod
    def _local_paths(mime):
        return [url.toLocalFile() for url in mime.urls() if url.isLocalFile()] if mime.hasUrls() else []

    def dragEnterEvent(self, event):
        if self._local_paths(event.mimeData()):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dragMoveEvent(self, event):
        self.dragEnterEvent(event)

    def dropEvent(self, event):
        paths = self._local_paths(event.mimeData())
        if paths:
            event.acceptProposedAction()
            self.open_paths(paths)

    # -- shutdown -------------------------------------------------------------------------------
    def closeEvent(self, event):
        for thread, worker in list(self._jobs.values()):
            worker.cancel()
        for thread, _ in list(self._jobs.values()):
            thread.quit()
            thread.wait(10000)
        self._active_job = None
        super().closeEvent(event)


STYLE_SHEET = """
QLabel#predictedClassLabel { font-size: 20pt; font-weight: 600; color: #1b2a41; }
QLabel#predictionDetailLabel { color: #4a5568; font-size: 10.5pt; }
QLabel#panelTitle { font-weight: 600; font-size: 11pt; color: #1b2a41; }
QLabel#captionLabel { color: #5f6b7a; }
QLabel#imageView { background: #f4f6f9; border: 1px solid #d8dee6; border-radius: 4px; color: #7b8794; }
QGroupBox { font-weight: 600; border: 1px solid #d8dee6; border-radius: 6px; margin-top: 10px; padding-top: 8px; }
QGroupBox::title { subcontrol-origin: margin; left: 10px; padding: 0 4px; color: #33415c; }
QProgressBar { border: 1px solid #c8d0da; border-radius: 3px; background: #f1f3f6; text-align: center; }
QProgressBar#topBar::chunk { background: #2e9d5b; border-radius: 2px; }
QProgressBar#otherBar::chunk { background: #6b8fc7; border-radius: 2px; }
QStatusBar QLabel { padding: 0 6px; }
"""


def parse_args(argv):
    parser = argparse.ArgumentParser(description=f"{APP_NAME}: classify traffic-sign images and show why.")
    parser.add_argument("paths", nargs="*", metavar="IMAGE_OR_FOLDER", help="images or folders to open at start")
    parser.add_argument("--checkpoint", default=None, help=f"model checkpoint (default: {DEFAULT_CHECKPOINT})")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch when predicting folders")
    parser.add_argument("--screenshot", metavar="OUT.png", default=None,
                        help="render the window to OUT.png after loading the arguments, then exit")
    parser.add_argument("--screenshot-timeout", type=float, default=120.0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    app = QApplication.instance() or QApplication([sys.argv[0]])
    app.setApplicationName(APP_NAME)
    app.setStyle("Fusion")
    palette = app.palette()
    palette.setColor(QPalette.Window, QColor("#ffffff"))
    palette.setColor(QPalette.AlternateBase, QColor("#f6f8fb"))
    app.setPalette(palette)
    app.setStyleSheet(STYLE_SHEET)
    font = app.font()
    if font.pointSizeF() < 10:
        font.setPointSizeF(10)
        app.setFont(font)

    window = MainWindow(args.checkpoint, device=args.device, batch_size=max(1, args.batch_size))

    def report_unexpected(kind, value, traceback):  # show, log, keep running (PyQt would abort)
        sys.__excepthook__(kind, value, traceback)
        window.message_label.show_error(f"Unexpected error: {kind.__name__}: {value}")
    sys.excepthook = report_unexpected

    window.show()
    if args.paths:
        window.open_paths(args.paths)

    if args.screenshot:
        deadline = time.monotonic() + args.screenshot_timeout

        def capture():
            if window.is_busy() and time.monotonic() < deadline:
                QTimer.singleShot(50, capture)
                return
            app.processEvents()
            saved = window.grab().save(args.screenshot, "PNG")
            if not saved:
                print(f"error: could not write the screenshot {args.screenshot}", file=sys.stderr)
            window.close()
            app.exit(0 if saved else 1)

        QTimer.singleShot(100, capture)
    return app.exec_()


if __name__ == "__main__":
    sys.exit(main())
