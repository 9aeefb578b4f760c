"""Shared fixtures: real tiny models of three architectures and the real SmolLM2-135M.

Everything runs offline (HF_HUB_OFFLINE=1) on the CPU. Two tiers: ``pytest -m "not slow"``
(every module, tiny models) and the full suite (``make test``), which adds whole runs and the
real SmolLM2; tests that use the `smol` fixture are marked slow automatically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from launching import ONE, OWN_BASE, TINY, TWO, made_once, run  # noqa: E402

from starlora.models import Loaded, load_model  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_ARCHS = ["tiny-llama", "tiny-qwen2", "tiny-gpt2"]


#: modules whose tests launch 2-process runs and share the `tiny_runs` session fixture: one
#: xdist group (`make test` runs 2 workers with ``--dist loadgroup``), so one worker makes the
#: fixture and no two launches share the cores (or accelerate's default port) at once. (That
#: worker may still tear fixtures down between the chunks it is sent: `tiny_runs` and
#: test_zero3's `zero3_run` were each set up twice in a measured run, so they make their
#: runs through `launching.made_once`, which keeps them for the session.)
MULTIPROCESS = {"test_distributed.py", "test_zero3.py", "test_training.py"}


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n 2``) each worker computes on one thread: two workers on 2
    cores, instead of two 2-thread processes contending for them. The processes a test starts
    (a run killed and resumed in the test's own process, torchrun's workers) inherit the one
    thread: bf16 on a CPU rounds differently with another thread count, so a run started on two
    threads and resumed on one would not end byte for byte as a run on one."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that loads the real SmolLM2 (the `smol` fixture) belongs to the slow tier. Each
    module is one xdist group (its tests run on one worker), the multi-process modules one
    group together (`MULTIPROCESS`)."""
    for item in items:
        if "smol" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
        module = item.path.name
        item.add_marker(pytest.mark.xdist_group("multiprocess" if module in MULTIPROCESS
                                                else module))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The benchmark data beside the repository; tests that need it skip without it."""
    if not DATA.is_dir():
        pytest.skip(f"benchmark data not found at {DATA} (expected ../shared/data)")
    return DATA


@pytest.fixture(scope="session")
def smol() -> Loaded:
    """The real SmolLM2-135M-Instruct, loaded once per session (fp32, CPU, eval mode)."""
    return load_model("smollm2-135m-instruct", device="cpu", dtype="float32")


@pytest.fixture(params=TINY_ARCHS)
def tiny(request: pytest.FixtureRequest) -> Loaded:
    """A fresh tiny random model of each architecture (function-scoped: tests may mutate it)."""
    return load_model(request.param, device="cpu", dtype="float32", seed=0)


# -- for the multi-process tests (test_distributed.py, test_zero3.py; see launching.py) --
@pytest.fixture(scope="session")
def scoring_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """11 arith problems (an odd count: one process gets a padding item) and a LoRA adapter
    of tiny-llama with non-zero B, so that MC dropout changes the scores."""
    import torch

    from starlora.adapters import attach_lora
    from starlora.tasks import get_task

    folder = tmp_path_factory.mktemp("scoring")
    data = folder / "data.jsonl"
    examples = get_task("arith").generate("train", 11, 0)
    data.write_text("".join(json.dumps({"id": ex.id, "question": ex.question,
                                        "answer": ex.answer}) + "\n" for ex in examples))
    model = attach_lora(load_model("tiny-llama", device="cpu", dtype="float32", seed=0).model,
                        r=4, dropout=0.1)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    model.save_pretrained(folder / "adapter")
    return data, folder / "adapter"


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """configs/tiny.yaml run by one process and by two (once per session: `made_once`)."""
    def make(folder: Path) -> None:
        run([*ONE, "run", str(TINY), "--run-dir", str(folder / "one"), *OWN_BASE])
        proc = run([*TWO, "run", str(TINY), "--run-dir", str(folder / "two"), *OWN_BASE])
        assert proc.stdout.count("run finished") == 1  # the main process reports, alone

    folder = made_once(tmp_path_factory, "tiny_runs", make)
    return folder / "one", folder / "two"
