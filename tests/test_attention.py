"""`attention_kernels`: on CUDA, SDPA may not use cuDNN attention; on CPU nothing changes. And
generation, training and scoring all run their attention inside it."""

from __future__ import annotations

import contextlib

import pytest
import torch

from starlora import answer_loss, generation, training
from starlora.attention import attention_kernels
from starlora.config import LoraConfig, TrainingConfig
from starlora.models import load_model
from starlora.scoring import engine
from starlora.tasks import get_task

FLAGS = {
    "cudnn": torch.backends.cuda.cudnn_sdp_enabled,
    "flash": torch.backends.cuda.flash_sdp_enabled,
    "efficient": torch.backends.cuda.mem_efficient_sdp_enabled,
    "math": torch.backends.cuda.math_sdp_enabled,
}


def flags() -> dict[str, bool]:
    return {name: read() for name, read in FLAGS.items()}


def test_cuda_leaves_out_cudnn_attention_and_restores_the_flags() -> None:
    before = flags()
    assert before["cudnn"], "torch's default: cuDNN attention allowed"
    with attention_kernels("cuda"):
        assert flags() == {"cudnn": False, "flash": True, "efficient": True, "math": True}
    assert flags() == before
    with pytest.raises(RuntimeError), attention_kernels(torch.device("cuda", 0)):
        assert not flags()["cudnn"]
        raise RuntimeError("an error inside")
    assert flags() == before  # restored on the way out of an error too


def test_cpu_changes_nothing(monkeypatch) -> None:
    """On the CPU the context touches no SDPA setting at all (whatever they are: here not
    torch's defaults), inside or after it, even when the block raises, and an attention
    computed inside it is bit-identical to one computed outside."""
    torch.backends.cuda.enable_flash_sdp(False)  # a non-default state that must survive
    try:
        before = flags()
        assert before["flash"] is False
        calls = []
        for name in ("enable_cudnn_sdp", "enable_flash_sdp", "enable_mem_efficient_sdp",
                     "enable_math_sdp"):
            monkeypatch.setattr(torch.backends.cuda, name,
                                lambda on, name=name: calls.append((name, on)))
        q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
        outside = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        for device in ("cpu", torch.device("cpu"), "meta"):
            with attention_kernels(device):
                assert flags() == before
                inside = torch.nn.functional.scaled_dot_product_attention(q, k, v,
                                                                          is_causal=True)
            assert flags() == before
        assert torch.equal(inside, outside)
        with pytest.raises(RuntimeError), attention_kernels("cpu"):
            raise RuntimeError("an error inside")
        assert flags() == before and calls == []
    finally:
        monkeypatch.undo()
        torch.backends.cuda.enable_flash_sdp(True)
    assert flags()["flash"]


def test_generation_training_and_scoring_attend_inside_it(monkeypatch) -> None:
    """Each call site's device is the CPU here, so the real context would change nothing: stand
    in the CUDA one, and record whether cuDNN attention was allowed at every SDPA call."""
    seen: list[bool] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    def as_if_cuda(device) -> contextlib.AbstractContextManager:
        assert torch.device(device).type == "cpu"  # each passes the model's device
        return attention_kernels("cuda")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    for module in (generation, training, engine, answer_loss):  # answer_loss: the loss check
        monkeypatch.setattr(module, "attention_kernels", as_if_cuda)
    loaded = load_model("tiny-llama", device="cpu", dtype="float32", seed=0)
    task = get_task("arith")
    examples = task.generate("train", 4, 0)
    counts = []
    prompts = [task.prompt_ids(loaded.tokenizer, ex) for ex in examples]
    generation.generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=3,
                        progress=False)
    counts.append(len(seen))
    result = training.train_adapter(loaded.model, loaded.tokenizer, task, examples,
                                    TrainingConfig(epochs=1, batch_size=2), LoraConfig(r=4),
                                    seed=0, progress=False)
    counts.append(len(seen))
    engine.score_examples(result.model, loaded.tokenizer, task, examples, mc_passes=2,
                          progress=False)
    counts.append(len(seen))
    assert 0 < counts[0] < counts[1] < counts[2], counts  # every phase reached SDPA
    # and never with cuDNN attention allowed
    assert not any(seen), (counts, [i for i, s in enumerate(seen) if s])
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored afterwards
