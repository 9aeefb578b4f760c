from __future__ import annotations

from pathlib import Path

import pytest

from starlora.acquisition import STRATEGIES
from starlora.config import dump_config, load_config
from starlora.demo import DEMO_CONFIG
from starlora.errors import ConfigError
from starlora.run.data import check_plan, load_data, make_task
from starlora.tasks import TASKS

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


SHIPPED = [*sorted(CONFIGS.glob("*.yaml")), DEMO_CONFIG]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_validate_and_can_start(path: Path, data_dir: Path) -> None:
    """Each shipped config loads with its strategy and task names checked, and its pool can
    serve its protocol (read from ../shared/data as the configs say)."""
    config = load_config(path)
    assert config.active_learning.strategy in STRATEGIES and config.task.name in TASKS
    for split in ("train", "test"):
        value = getattr(config.task, split)
        if value is not None:  # paths are relative to the repository root
            setattr(config.task, split, str(data_dir / Path(value).relative_to("../shared/data")))
    task = make_task(config.task)
    check_plan(config, load_data(config.task, task).pool)


@pytest.mark.parametrize("key,value,names", [
    ("active_learning.strategy", "pe-dynamc", STRATEGIES),
    ("task.name", "gsm8", TASKS),
])
def test_strategy_and_task_names_are_checked_when_the_config_loads(
    tmp_path: Path, key: str, value: str, names
) -> None:
    section, field = key.split(".")
    path = write(tmp_path, f"seed: 0\n{section}:\n  {field}: {value}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert f"c.yaml:3: {key}: unknown" in str(e.value) and repr(value) in str(e.value)
    assert all(name in str(e.value) for name in names)  # the valid names are listed
