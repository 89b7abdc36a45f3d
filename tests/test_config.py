"""Study files: committed ones are valid; bad ones fail with one line naming the file and key."""

from pathlib import Path

import pytest
from helpers import run_cli

from transferstudy.config import ConfigError, from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo.toml", "stanford_cars.toml"])
def test_committed_study_files_are_valid(name):
    cfg = load_config(ROOT / "studies" / name)
    assert cfg.study.name == Path(name).stem
    assert {"unfreeze_depth", "lr", "epochs", "train_ratio"} <= set(cfg.search.space)


def test_stanford_study_is_the_real_gpu_study():
    cfg = load_config(ROOT / "studies" / "stanford_cars.toml")
    assert (cfg.data.image_size, cfg.train.weights) == (224, "imagenet")


def _write(tmp_path, text):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, key",
    [
        ("[study]\nn_trails = 3\n", "[study] n_trails"),
        ("[data]\nimage_size = 8\n", "[data] image_size"),
        ("[train]\nweights = 3\n", "[train] weights"),
        ("[search]\nlr = [0.1, 0.001]\n", "[search] lr"),
        ("[search]\nlr = [0.0, 0.1]\n", "[search] lr"),
        ("[search]\nunfreeze_depth = [0, 7]\n", "[search] unfreeze_depth"),
        ("[search]\nmomentum = [0.8, 0.9]\n", "[search] momentum"),
        ("[train]\nlr = 0.1\n[search]\nlr = [0.01, 0.1]\n", "[train] lr"),
        ('[study]\npruner = "asha"\n', "[study] pruner"),
        ('[sudy]\nname = "x"\n', "[sudy]"),
        ('[study]\ndevice = "gpu"\n', "[study] device"),
        ('[train]\nweights = "imagnet"\n', "[train] weights"),
    ],
)
def test_bad_key_is_named(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and key in message and "\n" not in message


def test_not_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[study\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_train_fixes_a_default_search_dimension():
    cfg = from_dict({"train": {"epochs": 3}}, source="x.toml")
    assert set(cfg.search.space) == {"unfreeze_depth", "lr", "train_ratio"} and cfg.train.epochs == 3


def test_defaults_and_overrides_are_validated():
    cfg = from_dict({"search": {"lr": [1e-4, 1e-2]}}, source="x.toml")
    assert cfg.search.space == {"lr": [1e-4, 1e-2]}  # only what is listed is searched
    assert cfg.with_overrides(study={"n_trials": 7}).study.n_trials == 7
    with pytest.raises(ConfigError, match=r"\[study\] n_trials"):
        cfg.with_overrides(study={"n_trials": 0})


def test_resolved_config_round_trips():
    cfg = load_config(ROOT / "studies" / "demo.toml")
    assert from_dict(cfg.to_dict(), source=cfg.source) == cfg


def test_cli_broken_study_file_is_one_line(tmp_path):
    from flows.study import main

    path = _write(tmp_path, "[train]\nbatch_size = 1\n")
    code, _, err = run_cli(main, ["--config", str(path)])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(path) in lines[0] and "[train] batch_size" in lines[0]


def test_cli_set_overrides_any_key_and_refuses_unknown_ones(tmp_path):
    from flows.study import main, resolve_config

    cfg = resolve_config(ROOT / "studies" / "demo.toml", ["train.batch_size=16", "search.epochs=[1, 2]"], n_trials=3)
    assert (cfg.train.batch_size, cfg.search.space["epochs"], cfg.study.n_trials) == (16, [1, 2], 3)
    fixed = resolve_config(ROOT / "studies" / "demo.toml", ["train.lr=0.01"])
    assert fixed.train.lr == 0.01 and "lr" not in fixed.search.space  # fixing a searched key stops searching it
    code, _, err = run_cli(main, ["--config", str(ROOT / "studies" / "demo.toml"), "--set", "train.batch_sise=16"])
    assert code == 2 and err.count("\n") == 1 and "[train] batch_sise: unknown key" in err


def test_cli_missing_dataset_is_one_line_before_prefect_starts(tmp_path):
    from flows.study import main

    path = _write(
        tmp_path, f'[data]\npath = "{tmp_path / "nowhere"}"\n[study]\nstorage = "sqlite:///{tmp_path}/o.db"\n'
    )
    code, _, err = run_cli(main, ["--config", str(path)])
    assert code == 2
    assert err.strip().splitlines() == [f"error: dataset not found: {tmp_path / 'nowhere'}"]
