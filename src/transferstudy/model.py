"""ResNet-50 for transfer: weights, a new head, unfreeze depth, frozen batch norm, param groups.

Unfreeze depth ``k`` (README, "Design decisions" 1) counts trainable backbone stages from the top:

    k = 0  new head only (frozen feature extractor)
    k = 1  + layer4
    k = 2  + layer3
    k = 3  + layer2
    k = 4  + layer1
    k = 5  everything, including the stem (conv1 + bn1)

Frozen stages keep their batch-norm statistics: they stay in eval mode even while the model
trains, and run without autograd (no activations are kept for them).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .resnet import ResNet50

log = logging.getLogger(__name__)

STAGE_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4")
MAX_DEPTH = len(STAGE_NAMES)
FEATURE_DIM = 2048


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be obtained; the message names the alternatives."""


@dataclass(frozen=True)
class LoadedWeights:
    """Which weights the backbone actually holds (``requested`` may have been ``auto``)."""

    requested: str
    used: str  # "imagenet", "none" or the local path
    warning: str | None = None

    @property
    def pretrained(self) -> bool:
        return self.used != "none"


class TransferNet(nn.Module):
    """ResNet-50 as five stages plus a new linear head, with an unfreeze depth.

    Attributes:
        stages: stem, layer1..layer4, bottom to top.
        head: the new ``2048 -> num_classes`` classifier (always trainable).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, unfreeze_depth: int = 0):
        super().__init__()
        stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool)
        self.stages = nn.ModuleList([stem, backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(FEATURE_DIM, num_classes)
        self.num_classes = num_classes
        self.unfreeze_depth = 0
        self.set_unfreeze_depth(unfreeze_depth)

    @property
    def num_frozen(self) -> int:
        """How many bottom stages are frozen (``5 - unfreeze_depth``)."""
        return MAX_DEPTH - self.unfreeze_depth

    def set_unfreeze_depth(self, k: int) -> None:
        if not 0 <= k <= MAX_DEPTH:
            raise ValueError(f"unfreeze_depth must be in 0..{MAX_DEPTH}, got {k}")
        self.unfreeze_depth = k
        for i, stage in enumerate(self.stages):
            stage.requires_grad_(i >= self.num_frozen)
        self.head.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> TransferNet:
        super().train(mode)
        for stage in self.stages[: self.num_frozen]:
            stage.eval()  # frozen stages keep their batch-norm running statistics
        return self

    def frozen_features(self, x: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Output of the frozen stages: a fixed function of the input (no autograd).

        At depth 0 the whole backbone is frozen and the pooled 2048-d vector is returned.
        ``depth`` asks for the stages frozen at another unfreeze depth (default: this model's);
        it changes nothing about the model.
        """
        depth = self.unfreeze_depth if depth is None else depth
        with torch.no_grad():
            for stage in self.stages[: MAX_DEPTH - depth]:
                x = stage(x)
            if depth == 0:
                x = torch.flatten(self.pool(x), 1)
        return x

    def trainable_forward(self, h: torch.Tensor) -> torch.Tensor:
        """From frozen-stage output (``frozen_features``) to logits."""
        for stage in self.stages[self.num_frozen :]:
            h = stage(h)
        if self.unfreeze_depth > 0:
            h = torch.flatten(self.pool(h), 1)
        return self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trainable_forward(self.frozen_features(x))

    def param_groups(self, lr: float, weight_decay: float, backbone_lr_mult: float) -> list[dict]:
        """Optimiser groups: head at ``lr``, trainable backbone at ``lr * backbone_lr_mult``.

        Biases and batch-norm parameters get no weight decay (decaying them only hurts).
        """
        groups = []
        backbone = [p for s in self.stages[self.num_frozen :] for p in s.parameters()]
        for params, group_lr, name in (
            (list(self.head.parameters()), lr, "head"),
            (backbone, lr * backbone_lr_mult, "backbone"),
        ):
            decay = [p for p in params if p.ndim > 1]
            no_decay = [p for p in params if p.ndim <= 1]
            if decay:
                groups.append({"params": decay, "lr": group_lr, "weight_decay": weight_decay, "name": name})
            if no_decay:
                groups.append({"params": no_decay, "lr": group_lr, "weight_decay": 0.0, "name": f"{name}_no_decay"})
        return groups


#: The last randomly initialised backbone, by the RNG state and dtype it was drawn from (``_random_backbone``).
_LAST_RANDOM: dict[tuple, tuple[dict[str, torch.Tensor], torch.Tensor]] = {}


def _random_backbone() -> nn.Module:
    """A randomly initialised ResNet-50 (torchvision's initialisation), drawn from torch's global RNG.

    The draw is a function of the RNG state and the default dtype. A process that draws it again
    from the same state (the search, confirmation and refit runners of one study all seed it with
    ``train_seed``) gets the remembered values and leaves the RNG where a new draw would have
    left it, instead of spending about 0.4 s on an initialisation whose result is known.
    """
    key = (torch.get_default_dtype(), torch.random.get_rng_state().numpy().tobytes())
    if key in _LAST_RANDOM:
        state, rng_after = _LAST_RANDOM[key]
        net = copy.deepcopy(_backbone_skeleton(key[0])).to_empty(device="cpu")
        net.load_state_dict(state)
        torch.random.set_rng_state(rng_after)
        return net
    net = ResNet50()
    _LAST_RANDOM.clear()  # one draw kept: ResNet-50 is about 100 MB
    _LAST_RANDOM[key] = ({k: v.clone() for k, v in net.state_dict().items()}, torch.random.get_rng_state())
    return net


def _load_backbone(weights: str, progress: bool = True) -> tuple[nn.Module, LoadedWeights]:
    if weights == "none":
        return _random_backbone(), LoadedWeights("none", "none")
    if weights in ("imagenet", "auto"):
        try:
            return _imagenet_backbone(progress), LoadedWeights(weights, "imagenet")
        except (urllib.error.URLError, OSError, RuntimeError) as exc:
            message = (
                f"ImageNet weights for ResNet-50 could not be downloaded ({type(exc).__name__}: {exc}). "
                'Use weights = "none" for a randomly initialised backbone, or weights = "/path/to/resnet50.pth" '
                "for a local torchvision ResNet-50 state_dict (for example one copied into $TORCH_HOME/hub/checkpoints)."
            )
            if weights == "imagenet":
                raise WeightsUnavailableError(message) from exc
            warning = "backbone NOT pretrained: ImageNet weights were unavailable, so it was randomly initialised."
            log.warning("%s (%s)", warning, exc)
            return _random_backbone(), LoadedWeights("auto", "none", warning)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(
            f'weights file not found: {path}. weights must be "imagenet", "auto", "none" or a path to a '
            "torchvision ResNet-50 state_dict"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or one that needs unsafe unpickling
        raise WeightsUnavailableError(f"{path} could not be read as a state_dict ({type(exc).__name__})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{path} holds a {type(state).__name__}, not a ResNet-50 state_dict")
    net = ResNet50()
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # strict=False still refuses tensors of the wrong shape
        raise WeightsUnavailableError(
            f"{path} is not a ResNet-50 state_dict: {str(exc).strip().splitlines()[-1].strip()}"
        ) from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise WeightsUnavailableError(
            f"{path} is not a ResNet-50 state_dict: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return net, LoadedWeights(weights, str(path))


def _imagenet_backbone(progress: bool) -> nn.Module:
    """torchvision's IMAGENET1K_V2 weights, through torchvision's download and cache (the only
    use of torchvision in the engine: see resnet.py), in a network initialised as torchvision's
    ``resnet50(weights=...)`` initialises it before loading them."""
    from torchvision.models import ResNet50_Weights

    net = ResNet50()
    net.load_state_dict(ResNet50_Weights.IMAGENET1K_V2.get_state_dict(progress=progress, check_hash=True))
    return net


def build_model(
    num_classes: int, weights: str = "none", unfreeze_depth: int = 0, progress: bool = True
) -> tuple[TransferNet, LoadedWeights]:
    """ResNet-50 with the requested weights, a fresh ``num_classes`` head and unfreeze depth.

    Args:
        weights: ``imagenet`` (torchvision IMAGENET1K_V2 through torchvision's cache), ``none``
            (random init), ``auto`` (ImageNet if obtainable, else random init with a warning),
            or a path to a local ResNet-50 state_dict.

    Raises:
        WeightsUnavailableError: ``imagenet`` could not be downloaded, or the path is unusable.
    """
    backbone, loaded = _load_backbone(weights, progress)
    model = TransferNet(backbone, num_classes, unfreeze_depth)
    _init_head(model)
    return model, loaded


def build_on_backbone(num_classes: int, backbone_state: dict[str, torch.Tensor], unfreeze_depth: int) -> TransferNet:
    """A network with these backbone weights (a ``TransferNet`` state_dict less ``head.*``) and
    a fresh head, drawn from torch's RNG as ``build_model`` draws it. It is a copy of a
    skeleton (``empty_network``)."""
    model = empty_network(num_classes, unfreeze_depth)
    missing, unexpected = model.load_state_dict(backbone_state, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise ValueError(f"not a backbone state: missing {missing[:5]}, unexpected {unexpected[:5]}")
    _init_head(model)
    return model


def empty_network(num_classes: int, unfreeze_depth: int) -> TransferNet:
    """A network with storage but no values yet (torch's default dtype, on the CPU), for weights
    that are loaded next: its backbone is a copy of a meta-device skeleton, so no random
    initialisation is computed only to be overwritten."""
    backbone = copy.deepcopy(_backbone_skeleton(torch.get_default_dtype()))
    with torch.device("meta"):
        model = TransferNet(backbone, num_classes, unfreeze_depth)  # the head: one small init on meta
    return model.to_empty(device="cpu")


@functools.cache
def _backbone_skeleton(dtype: torch.dtype) -> nn.Module:
    """ResNet-50 on the meta device (no storage, no values), made once per dtype; shared, so
    only ever copied."""
    with torch.device("meta"):
        return ResNet50(init=False).to(dtype)


def _init_head(model: TransferNet) -> None:
    bound = 1.0 / math.sqrt(FEATURE_DIM)
    nn.init.uniform_(model.head.weight, -bound, bound)
    nn.init.zeros_(model.head.bias)


def trainable_parameter_names(model: TransferNet) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- checkpoints

CHECKPOINT_FORMAT = 1


def save_checkpoint(
    path: str | Path,
    model: TransferNet,
    class_names: list[str],
    image_size: int,
    resize_mode: str,
    extra: dict | None = None,
) -> Path:
    """Write the trained network with everything needed to use it: classes and preprocessing."""
    from .images.batches import IMAGENET_MEAN, IMAGENET_STD

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "arch": "resnet50",
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "class_names": list(class_names),
        "unfreeze_depth": model.unfreeze_depth,
        "preprocessing": {
            "image_size": image_size,
            "resize_mode": resize_mode,
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
        },
        "extra": extra or {},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[TransferNet, dict]:
    """Load a checkpoint written by ``save_checkpoint``; returns (model in eval mode, metadata).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is truncated, corrupt or not a checkpoint (one line naming it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn zip or a foreign pickle: torch.load raises many kinds
        why = " ".join(str(exc).split())
        raise ValueError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {why})") from None
    if not isinstance(payload, dict) or payload.get("arch") != "resnet50" or "state_dict" not in payload:
        raise ValueError(f"{path} is not a transferstudy checkpoint")
    try:
        model = empty_network(len(payload["class_names"]), payload["unfreeze_depth"])
        model.load_state_dict(payload["state_dict"])  # strict: every value comes from the file
    except (KeyError, TypeError, RuntimeError) as exc:  # RuntimeError: tensors of the wrong shape
        why = " ".join(str(exc).split())[:300]
        raise ValueError(f"checkpoint {path} is damaged ({type(exc).__name__}: {why})") from None
    model.to(device).eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, meta
