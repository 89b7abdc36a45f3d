"""The model a user walks away with: ONNX and PyTorch files plus the model.json that explains them.

    meta = export_model(model, class_names, checkpoint_meta["preprocessing"], "studies/demo/model",
                        meta={"study": "demo", "trial": 12, "holdout": {"accuracy": 0.91}})
    check_export("studies/demo/model", holdout_images)  # ONNX Runtime vs PyTorch, same inputs

The folder (file names are defined here and nowhere else):

    model.onnx   ONNX opset 18: input "image" (N, 3, S, S) float32, already normalised;
                 output "logits" (N, num_classes); N is free
    model.pt2    a torch.export program, loadable with torch alone:
                 torch.export.load("model.pt2").module()(image) -> logits
    model.json   format version, class names in output order, preprocessing (size, resize mode,
                 mean/std), tensor names and shapes, the files, and the caller's meta

Both model files come from one torch.export trace, so they hold the same graph. Writing and
running ONNX needs the ``export`` extra (pip install -e ".[export]"); nothing else in the package
imports onnx, so studies run without it.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from .config import RESIZE_MODES
from .model import TransferNet

log = logging.getLogger(__name__)

#: Bump when a field of model.json changes meaning; readers refuse newer versions.
EXPORT_FORMAT = 1
FORMAT_NAME = "transferstudy-model"
META_FILE = "model.json"
ONNX_FILE = "model.onnx"
TORCH_FILE = "model.pt2"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
#: ONNX operator set. 18 is the lowest that torch's (torch.export-based) exporter writes
#: natively: asking for 17 triggers a version conversion that fails on ResNet-50. ONNX Runtime
#: runs opset 18 from version 1.14 (2023).
ONNX_OPSET = 18
#: Where a model file can run: "onnx" (ONNX Runtime), "torch" (model.pt2) or "auto" (ONNX
#: Runtime when installed, else PyTorch).
RUNTIMES = ("auto", "onnx", "torch")
INSTALL_HINT = 'pip install -e ".[export]"'


class ExportUnavailableError(ImportError):
    """An optional ONNX package is missing; the message says how to install it."""


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ExportUnavailableError(
            f"{module} is not installed; ONNX export and inference need it: {INSTALL_HINT}"
        ) from exc


def export_model(
    model: TransferNet, class_names: list[str], preprocessing: dict, out_dir: str | Path, meta: dict | None = None
) -> dict:
    """Write ``model.onnx``, ``model.pt2`` and ``model.json`` into ``out_dir``.

    The caller's model is left as it was (device, train/eval mode); a CPU copy is exported in
    eval mode.

    Args:
        class_names: one per output, in output order.
        preprocessing: ``image_size`` (px), ``resize_mode`` and ``mean``/``std`` (3 floats each),
            as in a checkpoint's metadata.
        meta: whatever describes where the model comes from (study name, trial number, holdout
            metrics...); stored under ``meta``; must be JSON-serialisable (numpy values are fine).

    Returns:
        The content of model.json (as read back: plain JSON values).

    Raises:
        ExportUnavailableError: onnx or onnxscript is not installed.
        ValueError: class names or preprocessing do not fit the model.
        TypeError: ``meta`` holds something JSON cannot store.
    """
    for module in ("onnx", "onnxscript"):  # before the slow trace, not after it
        _require(module)
    pre = _checked_preprocessing(preprocessing)
    if len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {model.num_classes} outputs")
    # model.json is written last (a folder that has it is complete), but a meta that JSON cannot store fails now
    text = json.dumps(_model_json(model, class_names, pre, meta), indent=2, default=_plain) + "\n"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = copy.deepcopy(model).cpu().eval()
    example = torch.zeros(2, 3, pre["image_size"], pre["image_size"])
    with torch.no_grad():  # frozen stages switch autograd off inside forward; outside too, no switch is traced
        program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    aside = Path(tempfile.mkdtemp(prefix=".export-", dir=out))  # written aside, then renamed in: never half a file
    try:
        torch.export.save(program, aside / TORCH_FILE)
        onnx_program = torch.onnx.export(
            program,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=ONNX_OPSET,
            dynamo=True,
            dynamic_shapes=({0: "batch"},),
            verbose=False,
        )
        onnx_program.save(aside / ONNX_FILE, external_data=False)  # one file: ResNet-50 is far below 2 GB
        (aside / META_FILE).write_text(text)
        (out / META_FILE).unlink(missing_ok=True)  # an older model.json must not vouch for the new files
        for name in (TORCH_FILE, ONNX_FILE, META_FILE):  # model.json last: a folder that has it is complete
            (aside / name).replace(out / name)
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    log.info("exported %d-class model to %s (%s, %s, %s)", len(class_names), out, ONNX_FILE, TORCH_FILE, META_FILE)
    return json.loads(text)


def _checked_preprocessing(preprocessing: dict) -> dict:
    missing = {"image_size", "resize_mode", "mean", "std"} - set(preprocessing)
    if missing:
        raise ValueError(f"preprocessing lacks {sorted(missing)}")
    if preprocessing["resize_mode"] not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {preprocessing['resize_mode']!r}")
    pre = {
        "image_size": int(preprocessing["image_size"]),
        "resize_mode": preprocessing["resize_mode"],
        "mean": [float(v) for v in preprocessing["mean"]],
        "std": [float(v) for v in preprocessing["std"]],
    }
    if len(pre["mean"]) != 3 or len(pre["std"]) != 3:
        raise ValueError("mean and std need one value per RGB channel")
    return pre


def _model_json(model: TransferNet, class_names: list[str], pre: dict, meta: dict | None) -> dict:
    size = pre["image_size"]
    return {
        "format": FORMAT_NAME,
        "format_version": EXPORT_FORMAT,
        "arch": "resnet50",
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "unfreeze_depth": model.unfreeze_depth,
        "preprocessing": {
            **pre,
            "steps": [
                "decode, apply EXIF orientation, convert to 8-bit RGB",
                f"resize to {size}x{size}: "
                + (
                    "bicubic, shorter side to size, then centre crop"
                    if pre["resize_mode"] == "center_crop"
                    else "bicubic, both sides to size (aspect ratio not kept)"
                ),
                "scale to [0, 1], subtract mean and divide by std per channel, lay out as (3, H, W)",
            ],
        },
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32", "layout": "NCHW, RGB"},
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", len(class_names)],
            "dtype": "float32",
            "meaning": "unnormalised class scores: softmax gives probabilities, index i is class_names[i]",
        },
        "files": {"onnx": ONNX_FILE, "torch": TORCH_FILE},
        "onnx_opset": ONNX_OPSET,
        "versions": {name: _version(name) for name in ("torch", "onnx", "onnxscript")},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "meta": dict(meta or {}),
    }


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def _plain(value):
    """JSON for numpy/torch values and paths that callers put into ``meta``."""
    if isinstance(value, (np.generic, np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} in meta is not JSON-serialisable")


def read_model_json(folder: str | Path) -> dict:
    """model.json of an exported model folder, checked for format and version."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {META_FILE} in {folder}: not an exported model folder")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read ({type(exc).__name__}: {exc}); export the model again") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a transferstudy model description")
    if doc.get("format_version", 0) > EXPORT_FORMAT:
        raise ValueError(
            f"{path} has format version {doc['format_version']}; this transferstudy reads up to {EXPORT_FORMAT}"
        )
    return doc


class OnnxModel:
    """An ONNX Runtime session that takes and returns torch tensors, like the network it came from."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu"):
        ort = _require("onnxruntime")
        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), providers=providers)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        image = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: image})[0])


def load_exported(
    folder: str | Path, runtime: str = "auto", device: torch.device | str = "cpu"
) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict]:
    """An exported model folder -> (callable from normalised images to logits, model.json).

    Args:
        runtime: one of ``RUNTIMES``; ``auto`` uses ONNX Runtime when it is installed.

    Raises:
        ExportUnavailableError: ``runtime="onnx"`` without onnxruntime installed.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    doc = read_model_json(folder)
    if runtime == "auto":
        runtime = "onnx" if importlib.util.find_spec("onnxruntime") else "torch"
    if runtime == "onnx":
        return OnnxModel(Path(folder) / doc["files"]["onnx"], device), doc
    module = copy.deepcopy(_load_program(Path(folder) / doc["files"]["torch"]).module())  # weights of its own
    return module.to(device), doc


#: The last ``model.pt2`` read, by the file's identity (``_load_program``).
_LAST_PROGRAM: dict[tuple, torch.export.ExportedProgram] = {}


def _load_program(path: Path) -> torch.export.ExportedProgram:
    """``torch.export.load``, remembered for the last file read: reading a ResNet-50 program
    takes seconds, and the refit's check and a prediction may read the same file again. The
    file's device, inode, size and modification time are the key, so a file rewritten or
    replaced since is read anew. Modules made from one program share its weights: callers copy."""
    st = path.stat()
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _LAST_PROGRAM:
        program = torch.export.load(path)
        _LAST_PROGRAM.clear()
        _LAST_PROGRAM[key] = program
    return _LAST_PROGRAM[key]


def to_input(batch_u8: torch.Tensor, preprocessing: dict) -> torch.Tensor:
    """Decoded ``(B, S, S, 3)`` uint8 images -> the ``(B, 3, S, S)`` float32 input of the model files."""
    x = batch_u8.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(preprocessing["mean"], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing["std"], device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def check_export(out_dir: str | Path, images: np.ndarray | torch.Tensor, batch_size: int = 64) -> dict:
    """Run ONNX Runtime and the PyTorch file on the same images and compare their logits.

    Args:
        images: model input ``(N, 3, S, S)`` float32, already normalised, or decoded images
            ``(N, S, S, 3)`` uint8, which are normalised with model.json's mean/std.

    Returns:
        ``images`` (N), ``top1_agreement`` (share of images with the same top class, 0..1) and
        ``max_abs_logit_diff``, plus the runtime versions.
    """
    x_all = torch.as_tensor(images)
    if len(x_all) == 0:
        raise ValueError("check_export needs at least one image")
    onnx_model, doc = load_exported(out_dir, "onnx")
    torch_model, _ = load_exported(out_dir, "torch")
    same, worst = 0, 0.0
    for start in range(0, len(x_all), batch_size):
        x = x_all[start : start + batch_size]
        x = to_input(x, doc["preprocessing"]) if x.dtype == torch.uint8 else x.float()
        a, b = onnx_model(x), torch_model(x)
        same += int((a.argmax(1) == b.argmax(1)).sum())
        worst = max(worst, float((a - b).abs().max()))
    return {
        "images": len(x_all),
        "top1_agreement": same / len(x_all),
        "max_abs_logit_diff": worst,
        "versions": {"onnxruntime": _version("onnxruntime"), "torch": torch.__version__},
    }
