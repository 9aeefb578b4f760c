from __future__ import annotations

from pathlib import Path

import pytest

from starlora.config import dump_config, load_config
from starlora.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_paper_s() -> None:
    cfg = load_config()
    assert (cfg.training.lr, cfg.training.epochs, cfg.training.batch_size) == (1.5e-4, 3, 8)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (64, 16, 0.1)
    assert (cfg.active_learning.initial_size, cfg.active_learning.query_size) == (500, 500)
    assert cfg.active_learning.rounds == 10


def test_unknown_key_names_file_line_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "seed: 1\ntraining:\n  lr: 0.001\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:4: training\.epoch: unknown key"):
        load_config(path)


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "lora:\n  r: sixty\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:2: lora\.r: .*integer"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"c\.yaml:1: lora\.dropout: .*less than 1"):
        load_config(write(tmp_path, "lora: {dropout: 1.5}\n"))


def test_overrides_apply_and_are_validated(tmp_path: Path) -> None:
    path = write(tmp_path, "training:\n  lr: 0.001\n")
    cfg = load_config(path, ["training.lr=2e-4", "active_learning.strategy=random", "task.name=gsm8k"])
    assert cfg.training.lr == 2e-4 and cfg.active_learning.strategy == "random"
    with pytest.raises(ConfigError, match=r"--set training\.lr=fast: training\.lr: .*number"):
        load_config(path, ["training.lr=fast"])
    with pytest.raises(ConfigError, match=r"--set training\.nope=1: training\.nope: unknown key"):
        load_config(path, ["training.nope=1"])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(path, ["training.lr"])


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"c\.yaml:2: not valid YAML"):
        load_config(write(tmp_path, "seed: 1\ntraining: lr: 3\n"))


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["seed=5", "output.report_to=tensorboard"])
    assert cfg.output.report_to == ["tensorboard"]
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    load_config(path)
