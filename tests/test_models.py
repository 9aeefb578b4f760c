from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

from starlora.adapters import attach_lora, lora_targets
from starlora.errors import ModelNotFoundError
from starlora.models import (
    load_model,
    model_fingerprint,
    pick_dtype,
    resolve_model,
)


def test_smollm2_loads_offline_with_low_loss(smol) -> None:
    assert smol.model.config.model_type == "llama"
    assert sum(p.numel() for p in smol.model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    text = "The capital of France is Paris. It is a beautiful city with many museums."
    ids = smol.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        loss = smol.model(**ids, labels=ids["input_ids"]).loss.item()
    assert math.isfinite(loss) and loss < 6.0
    # the fingerprint is the packaged GGUF's sha256, hashed once per process
    assert smol.fingerprint.startswith("gguf:") and len(smol.fingerprint) == 5 + 64
    assert model_fingerprint("smollm2-135m-instruct") == smol.fingerprint


def test_unknown_model_names_all_three_tries(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(str(tmp_path / "missing"))
    message = str(err.value)
    assert "not a built-in" in message and "not an existing folder" in message
    assert "Hugging Face Hub" in message


def test_lora_targets_all_projections(tiny) -> None:
    peft_model = attach_lora(tiny.model, r=4, alpha=8, dropout=0.1)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    expected = lora_targets(tiny.model)
    assert wrapped == set(expected)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # B starts at zero, so the adapted model equals the base model
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    torch.testing.assert_close(adapted, base)


def test_cpu_defaults_to_float32() -> None:
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bf16") == torch.bfloat16


def test_tune_cpu_allocator_is_accepted_by_glibc() -> None:
    import platform
    import sys

    from starlora.models import tune_cpu_allocator

    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    # mallopt refuses values out of range (an mmap threshold over 32 MiB, say) with 0
    assert tune_cpu_allocator() is on_glibc


def test_fingerprints_follow_the_weights(tmp_path, monkeypatch) -> None:
    """Tiny models: name, config, seed and the torch and transformers versions. Folders: their
    weight files' names, sizes and mtimes, so retraining in place changes it. A folder without
    weights has none ("")."""
    a = load_model("tiny-llama", device="cpu", dtype="float32", seed=0)
    assert a.fingerprint.startswith("tiny:")
    assert load_model("tiny-llama", device="cpu", seed=0).fingerprint == a.fingerprint
    assert load_model("tiny-llama", device="cpu", seed=1).fingerprint != a.fingerprint
    assert load_model("tiny-qwen2", device="cpu", seed=0).fingerprint != a.fingerprint
    with pytest.raises(ValueError, match="config"):
        model_fingerprint("tiny-llama")
    # the init is torch's and transformers', so another version may draw other weights
    for library in ("torch", "transformers"):
        with monkeypatch.context() as patch:
            # by name: loading a model can put a new transformers module object in sys.modules
            module = importlib.import_module(library)
            patch.setattr(module, "__version__", module.__version__ + "+other")
            assert model_fingerprint("tiny-llama", config=a.model.config) != a.fingerprint
    assert model_fingerprint("tiny-llama", config=a.model.config) == a.fingerprint

    folder = tmp_path / "model"
    a.model.save_pretrained(folder)
    a.tokenizer.save_pretrained(folder)
    first = load_model(str(folder), device="cpu", dtype="float32")
    assert first.fingerprint.startswith("files:")
    assert model_fingerprint(str(folder)) == first.fingerprint
    weights = folder / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # rewritten in place
    assert model_fingerprint(str(folder)) != first.fingerprint
    (folder / "extra.bin").write_bytes(b"x")
    assert model_fingerprint(str(folder)) not in (first.fingerprint, "")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    assert model_fingerprint(str(bare)) == ""


REVISIONS = """
import os, sys, torch
from pathlib import Path
from starlora.errors import ConfigError, ModelNotFoundError
from starlora.models import load_model

hub = Path(os.environ["HF_HUB_CACHE"]) / "models--org--tiny"  # the Hub cache's own layout
for sha, seed in (("a" * 40, 0), ("b" * 40, 1)):
    tiny = load_model("tiny-llama", device="cpu", dtype="float32", seed=seed)
    tiny.model.save_pretrained(hub / "snapshots" / sha)
    tiny.tokenizer.save_pretrained(hub / "snapshots" / sha)
(hub / "refs").mkdir()
(hub / "refs" / "main").write_text("a" * 40)
first = lambda m: next(m.model.parameters())
main, pinned, named = (load_model("org/tiny", device="cpu", revision=r)
                       for r in (None, "b" * 40, "main"))
assert torch.equal(first(main), first(named)) and not torch.equal(first(main), first(pinned))
assert main.fingerprint != pinned.fingerprint
for name, revision, error in (("org/tiny", "c" * 40, ModelNotFoundError),
                              ("tiny-llama", "v1", ConfigError)):
    try:
        load_model(name, device="cpu", revision=revision)
    except error as e:
        print(e)
"""


def test_a_hub_model_loads_at_the_revision_asked_for(tmp_path) -> None:
    """`model.revision` pins a Hub id's weights: in a Hub cache holding two commits of one
    repository (offline), None and "main" load the branch's commit, a commit hash its own;
    a hash not there is not found, and a revision of a built-in model is refused."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", REVISIONS], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"),
                               "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-2:] == [  # (after any library notice)
        "model 'org/tiny': not a built-in (smollm2-135m-instruct, gemma3-270m, tiny-llama, "
        "tiny-qwen2, tiny-gpt2), not an existing folder, and not reachable on the Hugging Face "
        f"Hub at revision {'c' * 40!r} (LocalEntryNotFoundError)",
        "model.revision: 'v1' applies to a Hugging Face Hub id; 'tiny-llama' is a built-in "
        "model or a local folder"]


def test_lora_reaches_every_projection_of_phi3_and_names_what_mixtral_keeps() -> None:
    """Phi-3's projections are fused (qkv_proj, gate_up_proj): the llama names it was given
    adapted 4 of its 8 linear layers without a word. Mixtral's experts are 3-D weights that
    module LoRA cannot reach: the run now names them (`unadapted`, `lora_note`)."""
    import re

    from starlora.adapters import LORA_TARGETS, lora_note, unadapted
    from starlora.config import ExperimentConfig
    from starlora.models import tiny_model

    tiny = load_model("tiny-llama", device="cpu", dtype="float32", seed=0)
    assert unadapted(tiny.model) == [] and lora_note(tiny.model, ExperimentConfig()) is None
    phi3 = tiny_model("tiny-llama", tiny.tokenizer, model_type="phi3", num_key_value_heads=4)
    linear = {n for n, m in phi3.get_decoder().named_modules() if isinstance(m, torch.nn.Linear)}
    assert unadapted(phi3) == []
    wrapped = {n.split("model.", 2)[-1] for n, m in attach_lora(phi3, r=4).named_modules()
               if hasattr(m, "lora_A") and n}
    assert {n.removeprefix("model.") for n in wrapped} >= linear and len(linear) == 8
    mixtral = tiny_model("tiny-llama", tiny.tokenizer, model_type="mixtral",
                         num_local_experts=2, num_experts_per_tok=1)
    assert unadapted(mixtral) == [f"model.layers.{i}.mlp.experts.{w}"
                                  for i in (0, 1) for w in ("gate_up_proj", "down_proj")]
    note = lora_note(mixtral, ExperimentConfig())
    assert note.startswith("LoRA leaves 4 weights of the decoder without an adapter")
    assert unadapted(tiny.model, ["q_proj"])[:2] == ["model.layers.0.self_attn.k_proj",
                                                     "model.layers.0.self_attn.v_proj"]
    # Gemma 3 4B-27B: the language model's projections, not the vision tower's
    gemma3 = LORA_TARGETS["gemma3"]
    assert re.fullmatch(gemma3, "model.language_model.layers.3.mlp.down_proj")
    assert not re.fullmatch(gemma3, "model.vision_tower.encoder.layers.0.self_attn.q_proj")
