from __future__ import annotations

from pathlib import Path

import pytest

from starlora.acquisition import STRATEGIES
from starlora.config import dump_config, load_config
from starlora.demo import DEMO_CONFIG
from starlora.errors import ConfigError
from starlora.run.data import check_plan, load_data, make_task
from starlora.run.protocol import planned_rounds
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
    with pytest.raises(ConfigError, match=r"c\.yaml:4: training\.epoch: unknown key \(did you "
                                          r"mean training\.epochs\?\)"):
        load_config(path)


def test_every_problem_of_a_config_is_listed_in_file_order(tmp_path: Path) -> None:
    """Three problems, three lines in the order of the file, then the overrides' (one was
    shown, the last of them, with "(and 2 more)"); an unknown section set by --set names
    the --set (it was named as the file) and the section it may mean."""
    path = write(tmp_path, "training:\n  epoch: 3\n  lr: x\nlora:\n  r: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["traning.lr=3"])
    lines = str(e.value).splitlines()
    assert lines[2].startswith(f"{path}:3: training.lr: Input should be a valid number")
    assert lines[:2] + lines[3:] == [
        f"{path}: 4 problems:",
        f"{path}:2: training.epoch: unknown key (did you mean training.epochs?)",
        f"{path}:5: lora.r: Input should be greater than 0",
        "--set traning.lr=3: traning: unknown key (did you mean training?)"]


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


def test_yes_and_no_are_words_and_booleans_still_read_them(tmp_path: Path) -> None:
    """A yes/no task's choices, in a file or with the docs' --set, stay words (YAML 1.1 made
    them booleans, which a list of strings refused); a boolean setting still takes them."""
    path = write(tmp_path, "task:\n  choices: [yes, no]\nscoring:\n  per_token: yes\n")
    cfg = load_config(path)
    assert cfg.task.choices == ["yes", "no"] and cfg.scoring.per_token is True
    cfg = load_config(None, ["task.choices=[yes, no]", "scoring.per_token=off"])
    assert cfg.task.choices == ["yes", "no"] and cfg.scoring.per_token is False
    assert load_config(write(tmp_path, dump_config(cfg))) == cfg
    assert load_config(None, ["scoring.per_token=True"]).scoring.per_token is True


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


def test_a_budget_spent_by_the_labelled_file_is_refused_before_any_work(tmp_path: Path) -> None:
    """Issue 36, bug 2: with 6 labels in task.labelled and a budget of 4, a query of
    ``budget - labelled`` = -2 examples took almost the whole pool; check_plan refuses it (and
    `starlora run` exits 2 before it creates the run directory or loads a model)."""
    from starlora.cli import main
    from starlora.io import write_jsonl
    from starlora.tasks import get_task

    mine = get_task("arith").generate("train", 6, 99)
    write_jsonl(tmp_path / "mine.jsonl", [{"id": f"m{i}", "question": ex.question,
                                           "answer": ex.answer} for i, ex in enumerate(mine)])
    overrides = ["task.name=arith", "task.pool_size=40", "task.test_size=8",
                 f"task.labelled={tmp_path / 'mine.jsonl'}", "active_learning.initial_size=2",
                 "active_learning.query_size=4", "active_learning.rounds=3",
                 "active_learning.budget=4", "model.name=tiny-llama"]
    config = load_config(None, overrides)
    task = make_task(config.task)
    data = load_data(config.task, task)
    with pytest.raises(ConfigError, match="budget: 4 labels, but task.labelled holds 6 labels"):
        check_plan(config, data.pool, data.labelled)
    args = ["run", str(write(tmp_path, "seed: 0\n")), "--run-dir", str(tmp_path / "run")]
    assert main(args + [a for o in overrides for a in ("--set", o)]) == 2
    assert not (tmp_path / "run").exists()
    # a budget of 8: the 6 labels, then one query of 2 (not a second query of 0)
    config = load_config(None, [*overrides[:-1], "active_learning.budget=8"])
    check_plan(config, data.pool, data.labelled)
    assert planned_rounds(config, len(data.labelled)) == 2 and planned_rounds(config) == 3
