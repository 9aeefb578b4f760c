"""LoRA adapters on a causal LM: attach a fresh one, save, load and remove one.

An adapter lives on disk as a peft folder (``adapter_config.json`` + safetensors weights),
written atomically. Under DeepSpeed ZeRO-3 (`starlora.zero3`) its weights are gathered from
every process before one of them writes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from starlora import zero3
from starlora.errors import ConfigError
from starlora.io import atomic_folder

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: LoRA targets per architecture: all attention and MLP projections, as in the STAR paper
#: (a list: module names; a string: a regex over full module names, as peft takes it).
#: Mixtral's experts are fused 3-D weights in transformers 5, which module LoRA cannot reach:
#: its attention is adapted, and the run says what is left (`unadapted`).
LORA_TARGETS: dict[str, list[str] | str] = {
    **{arch: _LLAMA_LIKE
       for arch in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    # Gemma 3 4B-27B (image and text): the language model's projections, not the vision tower
    "gemma3": r".*language_model.*\.(" + "|".join(_LLAMA_LIKE) + ")",
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


def lora_targets(model: Any) -> list[str] | str:
    """Module names LoRA attaches to for this architecture (``all-linear`` if unknown)."""
    return LORA_TARGETS.get(getattr(model.config, "model_type", ""), "all-linear")


def unadapted(model: Any, target_modules: list[str] | str | None = None) -> list[str]:
    """Names of the weights in `model`'s text decoder (``get_decoder()``: not a vision tower,
    not the LM head) that LoRA on `target_modules` (None: the architecture's, `lora_targets`)
    leaves without an adapter: linear layers no target names (matched as peft matches), and
    fused weights of 3 or more dimensions (mixture-of-experts experts), which module LoRA
    cannot reach. [] when every projection of the decoder is adapted."""
    import re

    import torch

    targets = target_modules or lora_targets(model)
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):  # a model of its own: nothing to say
        return []
    prefix = next((n for n, m in model.named_modules() if m is decoder), None)
    if decoder is None or prefix is None:  # no decoder inside the model to look at
        return []
    prefix = prefix + "." if prefix else ""

    def adapted(name: str) -> bool:
        if targets == "all-linear":
            return True
        if isinstance(targets, str):
            return re.fullmatch(targets, prefix + name) is not None
        return any(name == t or name.endswith("." + t) for t in targets)

    linear = [n for n, m in decoder.named_modules() if (
        isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and not adapted(n)]
    fused = [n for n, p in decoder.named_parameters() if p.dim() >= 3]
    return [prefix + n for n in linear + fused]


def lora_note(model: Any, config: Any) -> str | None:
    """What a run says when LoRA on ``config.lora.target_modules`` leaves weights of `model`'s
    decoder without an adapter (`unadapted`), or None."""
    left = unadapted(model, config.lora.target_modules)
    if not left:
        return None
    return (f"LoRA leaves {len(left)} weights of the decoder without an adapter (e.g. "
            f"{', '.join(left[:2])}; fused mixture-of-experts weights cannot take one); "
            "lora.target_modules names the modules to adapt")


def attach_lora(
    model: Any,
    *,
    r: int = 64,
    alpha: float = 16,
    dropout: float = 0.1,
    target_modules: list[str] | str | None = None,
    init: str = "gaussian",
    adapter_name: str = "default",
) -> Any:
    """Wrap `model` in a peft model with a fresh LoRA adapter.

    `init="gaussian"` draws A from a Gaussian and sets B to zero, as the STAR paper describes;
    ``"default"`` is peft's Kaiming-uniform A. Dropout applies to the input of A.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules or lora_targets(model),
        init_lora_weights=True if init == "default" else init,
        task_type="CAUSAL_LM",
        fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2",
    )
    return get_peft_model(model, config, adapter_name=adapter_name)


def save_adapter(peft_model: Any, directory: str | Path, *, write: bool = True) -> None:
    """Save the adapter as peft safetensors (``adapter_model.safetensors`` + config) to
    `directory`, atomically (`starlora.io.atomic_folder`), if `write`. Under DeepSpeed ZeRO-3
    every process must call it (the adapter's weights are gathered from all of them first),
    and one of them writes."""
    params = [p for name, p in peft_model.named_parameters() if "lora_" in name]
    with zero3.gathered(params):
        if write:
            with atomic_folder(directory) as tmp:
                peft_model.save_pretrained(tmp, safe_serialization=True)
                _sort_target_modules(Path(tmp) / "adapter_config.json")


def _sort_target_modules(config: Path) -> None:
    """peft writes an adapter's ``target_modules`` from a set, in an order that follows the
    process's string hashes: sorted, the same adapter saves the same bytes in every run."""
    data = json.loads(config.read_text())
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_adapter(model: Any, directory: str | Path) -> Any:
    """``PeftModel.from_pretrained(model, directory)`` in eval mode (adapter frozen)."""
    from peft import PeftModel

    check_adapter_dir(directory)
    return PeftModel.from_pretrained(model, str(directory)).eval()


def remove_adapter(peft_model: Any) -> Any:
    """Strip the adapter without merging it and give back the plain base model (eval mode),
    whose weights are unchanged, so the next round can attach a fresh adapter to it."""
    return peft_model.unload().eval()


def is_saved_adapter(directory: str | Path) -> bool:
    """Whether `directory` holds an adapter saved by `save_adapter` (peft's layout)."""
    return (Path(directory) / "adapter_config.json").is_file()


def check_adapter_dir(directory: str | Path) -> None:
    if not is_saved_adapter(directory):
        raise ConfigError(f"adapter {directory}: not a saved adapter (no adapter_config.json)")
