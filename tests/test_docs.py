"""The documentation site: its configuration reference is generated from the pydantic models
(docs/hooks/config_reference.py), so these tests check the generator, that every field has a
note, and that the site's navigation and pages agree. `mkdocs build --strict` runs in CI."""

from __future__ import annotations

from pathlib import Path

import yaml
from scripts import load_script

from starlora.config import ExperimentConfig

ROOT = Path(__file__).resolve().parents[1]


def _hook():
    return load_script("docs/hooks/config_reference.py")


def _keys() -> list[str]:
    keys = []
    for name, field in ExperimentConfig.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and hasattr(section, "model_fields"):
            keys += [f"{name}.{k}" for k in section.model_fields]
        else:
            keys.append(name)
    return keys


def test_field_comments_take_the_lines_above_and_the_line_itself():
    source = (
        "class A:\n"
        "    x: int = 1  # beside x\n"
        "\n"
        "    # above y, first line\n"
        "    # above y, second line\n"
        "    y: str = 'a'  # beside y\n"
        "    z: int = 3\n"
        "    # not about z: a blank line\n"
        "\n"
        "    w: int = 4\n"
    )
    comments = _hook().field_comments(source)
    assert comments[("A", "x")] == "beside x"
    assert comments[("A", "y")] == "above y, first line above y, second line beside y"
    assert ("A", "z") not in comments and ("A", "w") not in comments


def test_the_reference_has_a_row_with_a_note_for_every_config_field():
    """A new field without a comment in config.py fails here: write one beside it."""
    hook = _hook()
    reference = hook.reference()
    rows = {line.split("|")[1].strip().strip("`"): line for line in reference.splitlines()
            if line.startswith("| `")}
    assert sorted(rows) == sorted(_keys())
    undocumented = [key for key, line in rows.items() if line.rstrip().endswith("|  |")]
    assert not undocumented, f"config fields without a comment in config.py: {undocumented}"
    assert "| `training.lr` | float | `0.00015` | > 0 |" in reference
    assert "`generated` \\| `gold`" in rows["scoring.answers"]


def test_a_page_marker_is_replaced_by_its_section():
    filled = _hook().fill("before\n<!-- config-reference: task -->\nafter")
    assert filled.startswith("before\n| key |") and filled.endswith("\nafter")
    assert "`task.question_field`" in filled and "`training.lr`" not in filled


def test_every_page_is_in_the_navigation_and_every_link_target_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = [next(iter(item.values())) for item in config["nav"]]
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert sorted(nav) == pages


def test_the_readme_demo_paragraph_is_rendered_from_the_committed_demo_record() -> None:
    """The demo's time and curve in the README come from docs/demo.json (written by
    `make demo UPDATE_README=1` from a demo's own demo.json), never typed by hand."""
    import json

    demo_figures = load_script("docs/hooks/demo_figures.py")
    record = json.loads((ROOT / "docs" / "demo.json").read_text())
    readme = (ROOT / "README.md").read_text()
    assert demo_figures.block(readme) == demo_figures.render(record)
    assert f"**{record['minutes']:.1f} minutes**" in readme and record["commit"] in readme


def test_the_readme_own_data_block_makes_valid_files_and_commands(tmp_path: Path,
                                                                  monkeypatch) -> None:
    """README's "Your own data" block, which it says runs as it is: its files are written by
    bash, and `own_data_example_holds` them. (Running it takes a minute of SmolLM2: the
    human-oracle flow itself is tested on tiny models, tests/test_run_labels.py.)"""
    import re
    import subprocess

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Your own data"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    subprocess.run(["bash", "-c", block[:block.index("starlora ")]], cwd=tmp_path, check=True)
    own_data_example_holds(block, tmp_path, monkeypatch)


def test_the_data_pages_ten_lines_make_valid_files_and_commands(tmp_path: Path,
                                                                monkeypatch) -> None:
    """docs/your-data.md's "Ten lines": its two JSON blocks are the pool and the test file,
    its YAML block the config, and `own_data_example_holds` them (its sizes once asked for
    more prompts than its pool holds, which the run refuses before any work)."""
    import re

    page = (ROOT / "docs" / "your-data.md").read_text()
    section = page[page.index("## Ten lines"):page.index("## Sources")]
    pool, test = re.findall(r"```json\n(.*?)```", section, re.S)
    (tmp_path / "pool.jsonl").write_text(pool)
    (tmp_path / "test.jsonl").write_text(test)
    (tmp_path / "my.yaml").write_text(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    own_data_example_holds(re.search(r"```bash\n(.*?)```", section, re.S).group(1), tmp_path,
                           monkeypatch)


def own_data_example_holds(commands_block: str, folder: Path, monkeypatch) -> None:
    """The own-data example in `folder` (pool.jsonl, test.jsonl, my.yaml): its config loads,
    its data reads (2 pool prompts without answers, 1 test item), the pool serves its plan
    (`check_plan`, which a run calls before any work), and every `starlora` line of
    `commands_block` parses as a command: run, annotate, run."""
    import shlex

    from starlora.cli import build_parser
    from starlora.config import load_config
    from starlora.run.data import check_plan, load_data, make_task

    commands = [line.split("#")[0].strip() for line in commands_block.splitlines()
                if line.startswith("starlora ")]
    assert [c.split()[1] for c in commands] == ["run", "annotate", "run"]
    monkeypatch.chdir(folder)
    cfg = load_config(folder / "my.yaml")
    assert cfg.active_learning.oracle == "human" and cfg.task.prompt_style == "chat"
    data = load_data(cfg.task, make_task(cfg.task))
    assert len(data.pool) == 2 and len(data.test) == 1
    assert all(ex.answer is None for ex in data.pool) and data.test[0].answer
    check_plan(cfg, data.pool, data.labelled)
    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[1:])
        assert callable(args.func)


def test_the_api_pages_strategy_snippet_runs_as_it_says() -> None:
    """docs/api.md's strategy of your own: the block runs, registers its name, and selects
    what its comment says."""
    import contextlib
    import io
    import re

    from starlora.acquisition.registry import _FACTORIES

    page = (ROOT / "docs" / "api.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", page, re.S)
                 if "register_strategy" in b)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(block, "docs/api.md", "exec"), {"__name__": "api_snippet"})
    finally:
        _FACTORIES.pop("short-first", None)
    assert out.getvalue() == "['b', 'c']\n"
