"""export.py: ONNX + PyTorch files with model.json, and the two runtimes agreeing on them."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_class_folders
from helpers import built_once, shared_root

from transferstudy import export
from transferstudy.images import IMAGENET_MEAN, IMAGENET_STD, decode_image
from transferstudy.model import (
    TransferNet,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from transferstudy.predict import expand

EXPORT_CLASSES = ["red", "green", "blue"]
SIZE = 16
META = {"study": "tiny", "trial": 7, "holdout": {"accuracy": np.float64(0.5), "n": np.int64(6)}}


@dataclass
class Exported:
    """One small model, saved both as a study checkpoint and as an exported folder."""

    model: TransferNet
    checkpoint: Path
    folder: Path
    doc: dict  # what export_model returned
    was_training: bool  # the model's mode after export (it was put in train mode before)


_EXPORTED: dict[str, Exported] = {}


def export_once(tmp_path_factory) -> Exported:
    """The export takes ~30 s on a CPU (torch.export + ONNX translation of ResNet-50): one test
    process of the session exports, and test_export.py and test_predict.py use that folder
    whichever process runs them."""
    if "tiny" not in _EXPORTED:
        root = shared_root(tmp_path_factory, "exported")
        with built_once(root) as done:
            if not done:
                _export(root)
        model, _ = load_checkpoint(root / "best.pt")  # the exported weights, exactly
        was_training = json.loads((root / "mode.json").read_text())["was_training"]
        doc = export.read_model_json(root / "model")
        _EXPORTED["tiny"] = Exported(model, root / "best.pt", root / "model", doc, was_training)
    return _EXPORTED["tiny"]


def _export(root: Path) -> None:
    torch.manual_seed(0)
    model, _ = build_model(len(EXPORT_CLASSES), weights="none", unfreeze_depth=1)
    with torch.no_grad():  # spread the head so the class order is clear
        model.head.weight.mul_(20.0)
    checkpoint = save_checkpoint(root / "best.pt", model, EXPORT_CLASSES, image_size=SIZE, resize_mode="center_crop")
    _, meta = load_checkpoint(checkpoint)
    doc = export.export_model(model.train(), EXPORT_CLASSES, meta["preprocessing"], root / "model", META)
    assert doc == export.read_model_json(root / "model")  # what export_model returns is model.json
    (root / "mode.json").write_text(json.dumps({"was_training": model.training}))


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> Exported:
    return export_once(tmp_path_factory)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> np.ndarray:
    """24 decoded ``(SIZE, SIZE, 3)`` uint8 images of the conftest kind."""
    root = write_class_folders(
        tmp_path_factory.mktemp("images"), num_classes=3, per_class=8, test_per_class=None, size=20
    )
    return np.stack([decode_image(f, SIZE) for f in expand([root])])


def test_folder_holds_three_files_and_described_model(exported):
    assert sorted(p.name for p in exported.folder.iterdir()) == ["model.json", "model.onnx", "model.pt2"]
    doc = json.loads((exported.folder / "model.json").read_text())
    assert doc == exported.doc
    assert doc["format"] == "transferstudy-model" and doc["format_version"] == export.EXPORT_FORMAT
    assert doc["class_names"] == EXPORT_CLASSES and doc["num_classes"] == 3
    pre = doc["preprocessing"]
    assert (pre["image_size"], pre["resize_mode"]) == (SIZE, "center_crop")
    assert pre["mean"] == list(IMAGENET_MEAN) and pre["std"] == list(IMAGENET_STD)
    assert doc["input"] == {
        "name": "image",
        "shape": ["batch", 3, SIZE, SIZE],
        "dtype": "float32",
        "layout": "NCHW, RGB",
    }
    assert doc["output"]["name"] == "logits" and doc["output"]["shape"] == ["batch", 3]
    assert doc["files"] == {"onnx": "model.onnx", "torch": "model.pt2"}
    assert doc["onnx_opset"] == export.ONNX_OPSET and doc["versions"]["torch"] == torch.__version__
    assert doc["meta"] == {"study": "tiny", "trial": 7, "holdout": {"accuracy": 0.5, "n": 6}}
    assert exported.was_training, "export must leave the caller's model in the mode it had"


def test_onnx_and_pytorch_agree_on_decoded_or_normalised_images(exported, images):
    check = export.check_export(exported.folder, images, batch_size=10)
    assert check["images"] == len(images) == 24
    assert check["top1_agreement"] >= 0.99
    assert 0 <= check["max_abs_logit_diff"] < 1e-3
    assert check["versions"]["onnxruntime"]
    x = export.to_input(torch.from_numpy(images), exported.doc["preprocessing"])
    assert export.check_export(exported.folder, x.numpy(), batch_size=10) == check
    with pytest.raises(ValueError, match="at least one image"):
        export.check_export(exported.folder, images[:0])


def test_model_files_compute_the_network_for_any_batch_size(exported, images):
    x = export.to_input(torch.from_numpy(images), exported.doc["preprocessing"])
    with torch.no_grad():
        expected = exported.model(x)
        for runtime in ("onnx", "torch"):
            model, _ = export.load_exported(exported.folder, runtime)
            for batch in (x[:1], x[:5]):
                torch.testing.assert_close(model(batch), expected[: len(batch)], atol=1e-3, rtol=1e-4)


def test_a_program_read_again_gives_modules_with_weights_of_their_own(exported, tmp_path, monkeypatch):
    """The last model.pt2 read is remembered by the file's identity: a second load does not read
    it again, a rewritten file is read anew, and no two modules share weights."""
    first, _ = export.load_exported(exported.folder, "torch")
    program = export._load_program(exported.folder / "model.pt2")  # remembered: not read again
    reads = []
    monkeypatch.setattr(torch.export, "load", lambda path: reads.append(path) or program)
    second, _ = export.load_exported(exported.folder, "torch")
    assert reads == []
    with torch.no_grad():
        next(second.parameters()).zero_()
    assert next(first.parameters()).abs().sum() > 0  # weights of its own
    copy = tmp_path / "model"
    copy.mkdir()
    for name in ("model.json", "model.pt2"):
        (copy / name).write_bytes((exported.folder / name).read_bytes())
    export.load_exported(copy, "torch")
    export.load_exported(copy, "torch")
    os.utime(copy / "model.pt2", ns=(1, 1))  # the file changed
    export.load_exported(copy, "torch")
    assert reads == [copy / "model.pt2", copy / "model.pt2"]


def test_onnx_graph_names_and_dynamic_batch(exported):
    import onnx

    graph = onnx.load(str(exported.folder / "model.onnx")).graph
    (image,), (logits,) = graph.input, graph.output
    assert image.name == "image" and logits.name == "logits"
    assert [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim] == ["batch", 3, SIZE, SIZE]
    assert [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim] == ["batch", 3]


def test_auto_runtime_falls_back_to_pytorch_without_onnxruntime(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails, find_spec says absent
    model, _ = export.load_exported(exported.folder)
    assert isinstance(model, torch.nn.Module)
    with pytest.raises(export.ExportUnavailableError, match=r'pip install -e "\.\[export\]"'):
        export.load_exported(exported.folder, "onnx")


@pytest.mark.parametrize("missing", ["onnx", "onnxscript"])
def test_export_without_onnx_packages_names_the_extra(missing, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, missing, None)
    model, _ = build_model(2, weights="none")
    pre = {"image_size": SIZE, "resize_mode": "center_crop", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    with pytest.raises(
        export.ExportUnavailableError, match=rf'{missing} is not installed.*pip install -e "\.\[export\]"'
    ):
        export.export_model(model, ["a", "b"], pre, tmp_path / "model", {})
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    "names, change, message",
    [
        (["a"], {}, "1 class names for a model with 2 outputs"),
        (["a", "b"], {"resize_mode": "squash"}, "resize_mode must be one of"),
        (["a", "b"], {"std": (1.0, 1.0)}, "one value per RGB channel"),
        (["a", "b"], {"image_size": None}, "lacks"),
    ],
)
def test_export_rejects_what_does_not_fit(names, change, message, tmp_path):
    model, _ = build_model(2, weights="none")
    pre = {"image_size": SIZE, "resize_mode": "center_crop", "mean": IMAGENET_MEAN, "std": IMAGENET_STD, **change}
    pre = {k: v for k, v in pre.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        export.export_model(model, names, pre, tmp_path / "model", {})


def test_unknown_or_newer_model_folder_is_refused(tmp_path, exported):
    with pytest.raises(FileNotFoundError, match="not an exported model folder"):
        export.read_model_json(tmp_path)
    doc = json.loads((exported.folder / "model.json").read_text())
    for change, message in (
        ({"format": "other"}, "not a transferstudy model"),
        ({"format_version": 99}, "format version 99"),
    ):
        (tmp_path / "model.json").write_text(json.dumps({**doc, **change}))
        with pytest.raises(ValueError, match=message):
            export.read_model_json(tmp_path)


def test_meta_that_json_cannot_store_is_refused_before_writing(tmp_path):
    model, _ = build_model(2, weights="none")
    pre = {"image_size": SIZE, "resize_mode": "center_crop", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    with pytest.raises(TypeError, match="object in meta is not JSON-serialisable"):
        export.export_model(model, ["a", "b"], pre, tmp_path / "model", {"when": object()})
    assert not (tmp_path / "model").exists()
