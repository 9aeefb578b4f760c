"""Constraint-LoRA training on real tiny models (CPU, a handful of examples, few steps)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from starlora.config import LoraConfig, TrainingConfig
from starlora.datafiles import load_examples
from starlora.errors import ConfigError, StarloraError
from starlora.models import attach_lora, load_model
from starlora.tasks import get_task
from starlora.training import (
    IGNORE,
    build_optimizer,
    collate,
    encode_example,
    load_adapter,
    remove_adapter,
    save_adapter,
    train_adapter,
)

LORA = LoraConfig(r=8, alpha=16, dropout=0.1)


@pytest.fixture(scope="module")
def obqa(data_dir):
    task = get_task("obqa")
    return task, load_examples(data_dir / "obqa" / "train.jsonl", task, limit=6)


def lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def b_norm(model) -> float:
    return sum(v.pow(2).sum() for k, v in lora_state(model).items() if "lora_B" in k).sqrt().item()


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_collate_pads_right_and_labels_answers_only():
    batch = collate([([5, 6, 7], [8, 9]), ([1], [2])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE] * 3 + [8, 9], [IGNORE, 2] + [IGNORE] * 3]


def test_long_prompts_are_cut_from_the_left(obqa):
    task, examples = obqa
    tok = load_model("tiny-llama", device="cpu").tokenizer
    prompt, answer = task.encode(tok, examples[0])
    cut_prompt, cut_answer = encode_example(task, tok, examples[0], max_length=10)
    assert cut_answer == answer and len(cut_prompt) + len(cut_answer) == 10
    assert cut_prompt == prompt[-len(cut_prompt) :]


def test_loss_is_answer_token_cross_entropy(tiny, obqa):
    """The first step's loss (B = 0, so the model is still the base model) equals the mean
    cross-entropy over answer tokens, computed by hand one unpadded example at a time."""
    task, examples = obqa
    pairs = [task.encode(tiny.tokenizer, ex) for ex in examples]
    answer_nll, all_nll, n_answer, n_all = 0.0, 0.0, 0, 0
    for prompt, answer in pairs:
        ids = prompt + answer
        logp = torch.log_softmax(logits(tiny.model, ids)[:-1], -1)
        nll = -logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        answer_nll += nll[len(prompt) - 1 :].sum().item()
        n_answer += len(answer)
        all_nll += nll.sum().item()
        n_all += len(ids) - 1
    training = TrainingConfig(epochs=1, batch_size=len(examples), lr=1e-4)
    result = train_adapter(tiny.model, tiny.tokenizer, task, examples, training, LORA, seed=0,
                           progress=False)
    assert result.steps == 1
    assert result.losses[0] == pytest.approx(answer_nll / n_answer, rel=1e-5)
    assert abs(answer_nll / n_answer - all_nll / n_all) > 0.01  # the check can tell them apart
    assert result.train_tokens == sum(len(p) + len(a) for p, a in pairs)


def test_only_lora_b_decays():
    """With zero gradients, an AdamW step changes parameters by decay alone: B shrinks by
    lr * b_decay, A (and anything else trainable) stays put."""
    loaded = load_model("tiny-llama", device="cpu")
    peft = attach_lora(loaded.model, r=4)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.ones_(p)
    training = TrainingConfig(lr=0.1, b_decay=0.5, b_decay_mode="decoupled")
    opt = build_optimizer(peft, training)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert decayed and all("lora_B" in n for n, p in peft.named_parameters() if id(p) in decayed)
    before = lora_state(peft)
    for p in peft.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    for name, value in lora_state(peft).items():
        expected = before[name] * (1 - 0.1 * 0.5) if "lora_B" in name else before[name]
        torch.testing.assert_close(value, expected)
    for mode in ("l2", "none"):
        opt = build_optimizer(peft, training.model_copy(update={"b_decay_mode": mode}))
        assert {g["weight_decay"] for g in opt.param_groups} == {0.0}


def test_b_decay_shrinks_b(obqa):
    """Same seed and data: decoupled decay and the L2 penalty on B both end with a smaller
    ||B|| than no constraint."""
    task, examples = obqa
    norms = {}
    for mode in ("none", "decoupled", "l2"):
        loaded = load_model("tiny-llama", device="cpu")
        training = TrainingConfig(lr=1e-2, epochs=2, batch_size=2, b_decay=10.0, b_decay_mode=mode)
        result = train_adapter(loaded.model, loaded.tokenizer, task, examples, training, LORA,
                               seed=0, progress=False)
        norms[mode] = b_norm(result.model)
    assert 0 < norms["decoupled"] < 0.9 * norms["none"]
    assert 0 < norms["l2"] < 0.9 * norms["none"]


def test_same_seed_same_adapter_and_base_unchanged(obqa):
    """Same seed and data give the same adapter, also on a base model that already carried
    (and gave back) an adapter; another seed gives another adapter."""
    task, examples = obqa
    training = TrainingConfig(lr=1e-3, epochs=2, batch_size=4)
    loaded = load_model("tiny-qwen2", device="cpu")
    probe = task.encode(loaded.tokenizer, examples[0])[0]
    base_logits = logits(loaded.model, probe)
    first = train_adapter(loaded.model, loaded.tokenizer, task, examples, training, LORA, seed=1,
                          progress=False)
    state = lora_state(first.model)
    assert not torch.equal(logits(first.model, probe), base_logits)
    base = remove_adapter(first.model)
    assert not isinstance(base, PeftModel) and not any("lora" in n for n, _ in base.named_modules())
    assert torch.equal(logits(base, probe), base_logits)
    again = train_adapter(base, loaded.tokenizer, task, examples, training, LORA, seed=1,
                          progress=False)
    assert again.losses == first.losses
    assert all(torch.equal(v, state[k]) for k, v in lora_state(again.model).items())
    other = train_adapter(remove_adapter(again.model), loaded.tokenizer, task, examples, training,
                          LORA, seed=2, progress=False)
    assert not all(torch.equal(v, state[k]) for k, v in lora_state(other.model).items())


def test_fractional_epochs_and_accumulation_size_the_schedule(obqa):
    task, examples = obqa  # 6 examples, batch 2: 3 batches an epoch, 2 steps with accumulation 2
    loaded = load_model("tiny-llama", device="cpu")
    training = TrainingConfig(lr=0.3, epochs=1.5, batch_size=2, grad_accum=2, scheduler="linear")
    result = train_adapter(loaded.model, loaded.tokenizer, task, examples, training, LORA, seed=0,
                           progress=False)
    assert result.steps == 3  # ceil(ceil(6 / 2) / 2 * 1.5)
    assert len(result.losses) == 3 and result.final_loss == result.losses[-1]
    assert result.lrs == pytest.approx([0.3, 0.2, 0.1])  # linear decay to 0 over 3 real steps


def test_saved_adapter_reloads_with_plain_peft(tmp_path, obqa):
    task, examples = obqa
    loaded = load_model("tiny-gpt2", device="cpu")
    training = TrainingConfig(lr=1e-2, epochs=2, batch_size=3)
    result = train_adapter(loaded.model, loaded.tokenizer, task, examples, training, LORA, seed=0,
                           progress=False)
    probe = task.encode(loaded.tokenizer, examples[1])[0]
    expected = logits(result.model, probe)
    target = tmp_path / "round-1" / "adapter"
    save_adapter(result.model, target)
    save_adapter(result.model, target)  # overwriting an existing adapter works
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "adapter_config.json",
                                                        "adapter_model.safetensors"]
    assert [p.name for p in target.parent.iterdir()] == ["adapter"]  # no temporary leftovers
    fresh = load_model("tiny-gpt2", device="cpu").model
    reloaded = PeftModel.from_pretrained(fresh, str(target)).eval()
    assert torch.equal(logits(reloaded, probe), expected)
    via_helper = load_adapter(remove_adapter(reloaded), target)
    assert torch.equal(logits(via_helper, probe), expected)

    # warm start: continues from the saved adapter instead of a fresh one; with dropout 0 its
    # first loss is exactly the saved adapter's answer-token loss
    nll = []
    for prompt, answer in (task.encode(loaded.tokenizer, ex) for ex in examples):
        logp = torch.log_softmax(logits(via_helper, prompt + answer)[:-1], -1)
        ids = torch.tensor(prompt + answer)[1:]
        nll += (-logp.gather(-1, ids[:, None])[:, 0])[len(prompt) - 1 :].tolist()
    warm = train_adapter(remove_adapter(via_helper), loaded.tokenizer, task, examples,
                         training.model_copy(update={"epochs": 1, "batch_size": 6}),
                         LORA.model_copy(update={"dropout": 0.0}), seed=0, init_adapter=target,
                         progress=False)
    assert warm.losses[0] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert warm.losses[0] < result.losses[0]


def test_user_errors(tmp_path, obqa):
    task, examples = obqa
    loaded = load_model("tiny-llama", device="cpu")
    with pytest.raises(StarloraError, match="no labelled examples"):
        train_adapter(loaded.model, loaded.tokenizer, task, [], TrainingConfig(), LORA, seed=0)
    with pytest.raises(ConfigError, match="not a saved adapter"):
        load_adapter(loaded.model, tmp_path)


def test_one_process_can_train_with_different_precisions(obqa):
    """accelerate keeps a process-wide state; a bf16 run followed by an fp32 one (the demo,
    then anything else in the same process) must both work."""
    task, examples = obqa
    loaded = load_model("tiny-llama", device="cpu")
    model = loaded.model
    for precision in ("bf16", "no", "bf16"):
        training = TrainingConfig(lr=1e-3, epochs=1, batch_size=4, mixed_precision=precision)
        result = train_adapter(model, loaded.tokenizer, task, examples[:4], training, LORA, seed=0,
                               progress=False)
        assert result.steps == 1 and torch.isfinite(torch.tensor(result.final_loss))
        model = remove_adapter(result.model)
