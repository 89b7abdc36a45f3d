"""model.py: unfreeze depth, frozen batch norm, parameter groups, weights, checkpoints."""

from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, resnet50

from transferstudy.model import (
    MAX_DEPTH,
    TransferNet,
    WeightsUnavailableError,
    build_model,
    load_checkpoint,
    save_checkpoint,
    trainable_parameter_names,
)

#: Torchvision module names that must be trainable at each unfreeze depth (README, "Design decisions" 1).
TRAINABLE_AT_DEPTH = {
    0: set(),
    1: {"layer4"},
    2: {"layer3", "layer4"},
    3: {"layer2", "layer3", "layer4"},
    4: {"layer1", "layer2", "layer3", "layer4"},
    5: {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"},
}
#: Stage index of each torchvision top-level module inside ``TransferNet.stages``.
STAGE_OF = {"conv1": 0, "bn1": 0, "layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4}


@functools.cache
def _backbone_prototype() -> nn.Module:
    torch.manual_seed(0)
    return resnet50(weights=None)


def _net(depth: int, num_classes: int = 3) -> tuple[TransferNet, nn.Module]:
    """A fresh TransferNet and the torchvision backbone it was built from (copying beats re-initialising)."""
    backbone = copy.deepcopy(_backbone_prototype())
    return TransferNet(backbone, num_classes, depth), backbone


# --------------------------------------------------------------------------- unfreeze depth


@pytest.mark.parametrize("depth", range(MAX_DEPTH + 1))
def test_requires_grad_matches_the_documented_stages(depth):
    model, backbone = _net(depth)
    assert model.stages[0][0] is backbone.conv1 and model.stages[0][1] is backbone.bn1
    for i, name in enumerate(("layer1", "layer2", "layer3", "layer4"), start=1):
        assert model.stages[i] is getattr(backbone, name)
    for name, p in backbone.named_parameters():
        top = name.split(".")[0]
        if top == "fc":
            continue  # replaced by the new head
        assert p.requires_grad == (top in TRAINABLE_AT_DEPTH[depth]), name
    assert all(p.requires_grad for p in model.head.parameters())
    expected = sum(p.numel() for n, p in backbone.named_parameters() if n.split(".")[0] in TRAINABLE_AT_DEPTH[depth])
    expected += model.head.weight.numel() + model.head.bias.numel()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    names = trainable_parameter_names(model)
    assert {"head.weight", "head.bias"} <= names
    assert all(n.startswith("head.") or int(n.split(".")[1]) >= MAX_DEPTH - depth for n in names)


@pytest.mark.parametrize("depth", range(MAX_DEPTH + 1))
def test_frozen_stages_stay_in_eval_mode(depth):
    model, _ = _net(depth)
    for _ in range(2):  # also after an eval()/train() round trip
        model.eval()
        assert not any(m.training for m in model.modules())
        model.train()
        for i, stage in enumerate(model.stages):
            trainable = i >= MAX_DEPTH - depth
            assert all(m.training == trainable for m in stage.modules()), (depth, i)
        assert model.head.training


def _bn_state(stage: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{n}.{b}": getattr(m, b).clone()
        for n, m in stage.named_modules()
        if isinstance(m, nn.BatchNorm2d)
        for b in ("running_mean", "running_var", "num_batches_tracked")
    }


@pytest.mark.parametrize("depth", range(MAX_DEPTH + 1))
def test_training_step_only_touches_trainable_stages(depth):
    model, _ = _net(depth)
    model.train()
    optimizer = torch.optim.AdamW(model.param_groups(lr=1e-2, weight_decay=0.1, backbone_lr_mult=0.5), lr=1e-2)
    bn_before = [_bn_state(s) for s in model.stages]
    params_before = [[p.detach().clone() for p in s.parameters()] for s in model.stages]
    head_before = model.head.weight.detach().clone()

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0])
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    assert not torch.equal(model.head.weight, head_before)
    for i, stage in enumerate(model.stages):
        after = _bn_state(stage)
        params = list(stage.parameters())
        if i < MAX_DEPTH - depth:  # frozen
            for key, value in after.items():
                assert torch.equal(value, bn_before[i][key]), f"stage {i} {key} changed while frozen"
            assert all(torch.equal(p, q) for p, q in zip(params, params_before[i]))
            assert all(p.grad is None for p in params)
        else:
            for key, value in after.items():
                if key.endswith("num_batches_tracked"):
                    assert value.item() == bn_before[i][key].item() + 1, key
                else:
                    assert not torch.equal(value, bn_before[i][key]), f"stage {i} {key} did not update"
            assert any(not torch.equal(p, q) for p, q in zip(params, params_before[i]))


def test_changing_depth_on_a_training_model():
    model, _ = _net(0)
    model.train()
    model.set_unfreeze_depth(5)
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    model.set_unfreeze_depth(2)
    assert not model.stages[2].training and model.stages[3].training
    assert not any(p.requires_grad for p in model.stages[2].parameters())
    assert model.num_frozen == 3


@pytest.mark.parametrize("depth", [-1, 6])
def test_depth_out_of_range(depth):
    with pytest.raises(ValueError, match="unfreeze_depth"):
        _net(depth)


def test_forward_shape():
    model, _ = _net(2, num_classes=7)
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)


# --------------------------------------------------------------------------- parameter groups


@pytest.mark.parametrize("depth", [0, 2, 5])
def test_param_groups(depth):
    model, _ = _net(depth)
    groups = model.param_groups(lr=0.01, weight_decay=0.05, backbone_lr_mult=0.1)
    by_name = {g["name"]: g for g in groups}
    expected_names = {"head", "head_no_decay"} | ({"backbone", "backbone_no_decay"} if depth else set())
    assert set(by_name) == expected_names and len(groups) == len(by_name)
    assert by_name["head"]["lr"] == by_name["head_no_decay"]["lr"] == 0.01
    if depth:
        assert by_name["backbone"]["lr"] == pytest.approx(0.001)
        assert by_name["backbone_no_decay"]["lr"] == pytest.approx(0.001)
    for g in groups:
        for p in g["params"]:
            if p.ndim <= 1:
                assert g["weight_decay"] == 0.0, g["name"]
            else:
                assert g["weight_decay"] == 0.05, g["name"]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))  # no parameter twice
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}
    head_ids = {id(p) for p in model.head.parameters()}
    assert {id(p) for n in ("head", "head_no_decay") for p in by_name[n]["params"]} == head_ids


# --------------------------------------------------------------------------- weights


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No cached torchvision weights, and every HTTP(S) connection refused at once."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)


def test_imagenet_offline_is_a_clear_error(offline):
    with pytest.raises(WeightsUnavailableError) as info:
        build_model(3, weights="imagenet", progress=False)
    message = str(info.value)
    assert '"none"' in message
    assert "path" in message and "state_dict" in message


def test_auto_offline_falls_back_to_random_init(offline, caplog):
    with caplog.at_level(logging.WARNING, logger="transferstudy.model"):
        model, loaded = build_model(3, weights="auto", unfreeze_depth=1, progress=False)
    assert loaded.requested == "auto" and loaded.used == "none"
    assert not loaded.pretrained
    assert loaded.warning and "NOT pretrained" in loaded.warning
    assert any("NOT pretrained" in r.getMessage() for r in caplog.records)
    assert model.unfreeze_depth == 1 and model.head.out_features == 3


def test_none_weights():
    _, loaded = build_model(3, weights="none")
    assert loaded.used == "none" and loaded.warning is None and not loaded.pretrained


def test_random_init_drawn_again_from_the_same_state_is_torchvisions_and_moves_the_rng_alike(monkeypatch):
    """A random backbone is remembered by the RNG state and dtype it came from: drawn again, it
    holds torchvision's values and leaves the RNG where torchvision's own draw leaves it."""
    from transferstudy import model as model_mod

    monkeypatch.setattr(model_mod, "_LAST_RANDOM", {})
    torch.manual_seed(7)
    reference = [v for k, v in resnet50(weights=None).state_dict().items() if not k.startswith("fc.")]
    built, next_draws = [], []
    for _ in range(2):  # a new draw, then the remembered one
        torch.manual_seed(7)
        model, _ = build_model(4, weights="none")
        state = model.state_dict()
        backbone = [v for k, v in state.items() if not k.startswith("head.")]
        assert len(backbone) == len(reference) and all(map(torch.equal, backbone, reference))
        built.append(state)
        next_draws.append(torch.rand(3))
    assert all(torch.equal(built[0][k], built[1][k]) for k in built[0])  # the head, drawn after it, too
    assert torch.equal(*next_draws)  # and whatever the RNG gives next
    torch.manual_seed(7)
    torch.set_default_dtype(torch.float64)
    try:
        model, _ = build_model(4, weights="none")  # same RNG state, another dtype: another draw
    finally:
        torch.set_default_dtype(torch.float32)
    assert model.stages[0][0].weight.dtype == torch.float64  # not the float32 draw remembered above


def test_resnet50_is_torchvisions_module_for_module_draw_for_draw_and_output_for_output():
    """The engine's own ResNet-50 (it does not import torchvision) has torchvision's parameter
    and buffer names and shapes, draws the same values from the same RNG state and leaves the RNG
    where torchvision leaves it, and computes the same outputs (float64, train and eval mode)."""
    from transferstudy.resnet import ResNet50

    draws = []
    for make in (ResNet50, lambda: resnet50(weights=None)):
        torch.manual_seed(11)
        net = make().double()
        draws.append((net, net.state_dict(), torch.rand(4)))
    (ours, ours_state, ours_next), (theirs, theirs_state, theirs_next) = draws
    assert [(k, v.shape) for k, v in ours_state.items()] == [(k, v.shape) for k, v in theirs_state.items()]
    assert all(torch.equal(ours_state[k], theirs_state[k]) for k in theirs_state)
    assert torch.equal(ours_next, theirs_next)
    x = torch.randn(3, 3, 40, 40, dtype=torch.float64)
    for mode in (True, False):  # batch statistics, then running ones
        with torch.no_grad():
            assert torch.equal(ours.train(mode)(x), theirs.train(mode)(x))
    assert torch.equal(ours.layer3[0].bn2.running_mean, theirs.layer3[0].bn2.running_mean)  # updated alike


def test_the_engine_imports_torchvision_only_to_fetch_imagenet_weights():
    """torchvision imports torch._dynamo (seconds of every worker's start-up): no module of the
    engine or the flows imports it at module level."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = []
    for path in sorted([*(root / "src").rglob("*.py"), *(root / "flows").rglob("*.py")]):
        tree = ast.parse(path.read_text(), str(path))
        top = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        local = {
            id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)
        }
        for node in top:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if id(node) not in local and any(n.split(".")[0] == "torchvision" for n in names):
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert found == []


def test_imagenet_weights_come_through_torchvisions_cache(tmp_path, monkeypatch):
    """``imagenet`` loads torchvision's IMAGENET1K_V2 file from torchvision's cache (here a
    stand-in with known values, under the file name torchvision downloads it to)."""
    from torchvision.models import ResNet50_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(5)
    reference = resnet50(weights=None).state_dict()
    cached = tmp_path / "hub" / "checkpoints" / ResNet50_Weights.IMAGENET1K_V2.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.save(reference, cached)
    model, loaded = build_model(3, weights="imagenet", unfreeze_depth=2, progress=False)
    assert loaded.used == "imagenet" and loaded.pretrained and loaded.warning is None
    assert torch.equal(model.stages[0][0].weight, reference["conv1.weight"])
    assert torch.equal(model.stages[4][2].bn3.running_var, reference["layer4.2.bn3.running_var"])
    assert model.head.out_features == 3 and model.unfreeze_depth == 2


@pytest.mark.parametrize("wrapped", [False, True])
def test_local_state_dict_loads(tmp_path, wrapped):
    torch.manual_seed(123)
    reference = resnet50(weights=None)
    state = reference.state_dict()
    if wrapped:  # a training checkpoint of a DataParallel model
        state = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    torch.manual_seed(0)  # a different random init, so equality means the file was loaded
    model, loaded = build_model(5, weights=str(path))
    assert loaded.used == str(path) and loaded.pretrained and loaded.warning is None
    assert torch.equal(model.stages[0][0].weight, reference.conv1.weight)
    assert torch.equal(model.stages[4][2].conv3.weight, reference.layer4[2].conv3.weight)
    assert torch.equal(model.stages[3][0].bn1.running_var, reference.layer3[0].bn1.running_var)
    assert model.head.out_features == 5


def test_local_path_errors(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="not found"):
        build_model(3, weights=str(tmp_path / "missing.pth"))
    torch.save(resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(WeightsUnavailableError, match="not a ResNet-50"):
        build_model(3, weights=str(tmp_path / "resnet18.pth"))
    state = resnet50(weights=None).state_dict()
    del state["layer2.0.conv1.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(WeightsUnavailableError, match="layer2.0.conv1.weight"):
        build_model(3, weights=str(tmp_path / "partial.pth"))
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="notes.pth"):
        build_model(3, weights=str(tmp_path / "notes.pth"))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(WeightsUnavailableError, match="list"):
        build_model(3, weights=str(tmp_path / "list.pth"))


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_gives_identical_predictions(tmp_path):
    model, _ = build_model(4, weights="none", unfreeze_depth=3)
    with torch.no_grad():  # non-default batch-norm statistics, so they must travel too
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    path = save_checkpoint(tmp_path / "sub" / "best.pt", model, ["a", "b", "c", "d"], 32, "stretch", extra={"trial": 7})
    assert path.is_file() and not path.with_suffix(".pt.tmp").exists()

    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    assert loaded.unfreeze_depth == 3
    assert meta["class_names"] == ["a", "b", "c", "d"]
    assert meta["preprocessing"]["image_size"] == 32 and meta["preprocessing"]["resize_mode"] == "stretch"
    assert meta["extra"] == {"trial": 7}
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a transferstudy checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
