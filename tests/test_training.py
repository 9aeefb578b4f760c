"""Constraint-LoRA training on real tiny models (CPU, a handful of examples, few steps)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel

import starlora.train_setup
from starlora import models
from starlora.adapters import attach_lora, load_adapter, remove_adapter, save_adapter
from starlora.answer_loss import AnswerLoss, answer_cross_entropy
from starlora.config import LoraConfig, TrainingConfig
from starlora.datafiles import load_examples
from starlora.errors import ConfigError, StarloraError
from starlora.models import cpu_has_native_bf16, load_model, load_tokenizer, tiny_model
from starlora.tasks import get_task
from starlora.train_batches import LengthGroupedBatches, length_grouped_batches, padding_fraction
from starlora.training import (
    IGNORE,
    build_optimizer,
    collate,
    encode_example,
    resolve_mixed_precision,
    train_adapter,
)

REPO = Path(__file__).resolve().parents[1]

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
    training = TrainingConfig(epochs=1, batch_size=len(examples), lr=1e-4, mixed_precision="no")
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


def test_fixed_steps_train_as_many_steps_whatever_the_labelled_count(obqa):
    task, examples = obqa  # 6 examples, batch 2: 3 batches an epoch
    loaded = load_model("tiny-llama", device="cpu")
    training = TrainingConfig(lr=0.3, epochs=3, batch_size=2, scheduler="linear", steps=7)
    result = train_adapter(loaded.model, loaded.tokenizer, task, examples, training, LORA,
                           seed=0, progress=False)  # 7 steps: two passes and one batch
    assert result.steps == 7 and len(result.losses) == 7
    assert result.lrs == pytest.approx([0.3 * (7 - i) / 7 for i in range(7)])  # spans 7 steps
    fewer = train_adapter(remove_adapter(result.model), loaded.tokenizer, task, examples[:2],
                          training, LORA, seed=0, progress=False)  # 1 batch an epoch
    assert fewer.steps == 7 and len(fewer.losses) == 7
    one = train_adapter(remove_adapter(fewer.model), loaded.tokenizer, task, examples,
                        training.model_copy(update={"steps": 1}), LORA, seed=0, progress=False)
    assert one.steps == 1 and len(one.losses) == 1  # less than one pass


SAVE_ADAPTER = """
import sys
from starlora.adapters import attach_lora, save_adapter
from starlora.models import load_model
save_adapter(attach_lora(load_model("tiny-llama", device="cpu", seed=0).model, r=4), sys.argv[1])
"""


def test_an_adapter_saves_the_same_config_bytes_in_every_process(tmp_path):
    """peft writes ``target_modules`` from a set, whose order follows the process's string
    hashes: two runs of one experiment saved adapter_config.json in other orders."""
    script = tmp_path / "save.py"
    script.write_text(SAVE_ADAPTER)
    for seed in ("1", "2"):
        subprocess.run([sys.executable, str(script), str(tmp_path / seed)], check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed, "HF_HUB_OFFLINE": "1"})
    one, two = ((tmp_path / s / "adapter_config.json").read_bytes() for s in ("1", "2"))
    assert one == two and b'"target_modules": [\n    "down_proj",' in one


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
                         training.model_copy(update={"epochs": 1, "batch_size": 6,
                                                     "mixed_precision": "no"}),
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
    # the forward really runs in each precision: a base projection's output dtype, every call
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    seen: list[torch.dtype] = []
    # (the training forward passes: the loss check of the first batch runs in eval mode, in
    # the weights' precision)
    linear.register_forward_hook(
        lambda module, args, out: seen.append(out.dtype) if module.training else None)
    dtypes = {"bf16": torch.bfloat16, "no": torch.float32}
    losses = []
    for precision in ("bf16", "no", "bf16"):
        training = TrainingConfig(lr=1e-3, epochs=1, batch_size=4, mixed_precision=precision)
        seen.clear()
        result = train_adapter(model, loaded.tokenizer, task, examples[:4], training, LORA, seed=0,
                               progress=False)
        assert result.steps == 1 and torch.isfinite(torch.tensor(result.final_loss))
        assert result.mixed_precision == precision
        assert seen and set(seen) == {dtypes[precision]}, (precision, set(seen))
        assert all(p.dtype == torch.float32 for p in result.model.parameters())
        losses.append(result.final_loss)
        model = remove_adapter(result.model)
    assert losses[0] == losses[2] != losses[1]  # bf16 again is bf16, not what fp32 left behind


# -- answer-only loss -------------------------------------------------------------------------
def random_batch(vocab: int, shapes: list[tuple[int, int]], seed: int = 0) -> dict:
    """`collate` of random (prompt, answer) token lists of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    pairs = [(torch.randint(5, vocab, (p,), generator=g).tolist(),
              torch.randint(5, vocab, (a,), generator=g).tolist()) for p, a in shapes]
    return collate(pairs, pad_id=0)


SHAPES = [(5, 3), (9, 7), (2, 1), (12, 4)]  # rows of different lengths, so with padding


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def model_and_ours(peft, batch, chunk_rows):
    """(model's own loss, its LoRA grads, AnswerLoss's loss, its LoRA grads), dropout off."""
    peft.train()
    expected = peft(**batch).loss
    expected.backward()
    want = lora_grads(peft)
    peft.zero_grad()
    loss = AnswerLoss(peft, chunk_rows)(**batch)
    loss.backward()
    got = lora_grads(peft)
    peft.zero_grad()
    return expected.item(), want, loss.item(), got


def assert_same_grads(got, want):
    assert got.keys() == want.keys() and any("lora_A" in n for n in got)
    flat_got, flat_want = (torch.cat([g[n].flatten() for n in sorted(g)]) for g in (got, want))
    assert flat_want.norm() > 0
    assert (flat_got - flat_want).norm() / flat_want.norm() < 1e-5
    for n in want:  # each matrix, not only the sum: none dropped or swapped
        assert (got[n] - want[n]).norm() <= 1e-4 * want[n].norm() + 1e-9, n


@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_answer_loss_equals_the_models_loss_and_gradients(tiny, chunk_rows):
    """fp32: the loss and every LoRA gradient equal those of ``model(**batch).loss`` (full
    logits), with the head applied at once or 3 answer rows at a time."""
    peft = attach_lora(tiny.model, r=8, dropout=0.0)
    torch.manual_seed(0)
    for name, p in peft.named_parameters():
        if "lora_B" in name:  # B != 0, so that A gets gradients too
            torch.nn.init.normal_(p, std=0.05)
    batch = random_batch(len(tiny.tokenizer), SHAPES)
    expected, want, loss, got = model_and_ours(peft, batch, chunk_rows)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert_same_grads(got, want)


@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_answer_loss_applies_the_models_logit_softcapping(chunk_rows):
    """A tiny Gemma 2 caps its logits (``tanh(z / cap) * cap``); the loss and gradients follow
    the model's forward, and would not without the cap."""
    tok = load_tokenizer("tiny-llama")
    model = tiny_model("tiny-llama", tok, model_type="gemma2", head_dim=16,
                       final_logit_softcapping=2.0)
    torch.manual_seed(0)
    torch.nn.init.normal_(model.get_output_embeddings().weight, std=1.0)  # logits beyond the cap
    peft = attach_lora(model.float(), r=8, dropout=0.0)
    torch.manual_seed(0)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    batch = random_batch(len(tok), SHAPES)
    expected, want, loss, got = model_and_ours(peft, batch, chunk_rows)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert_same_grads(got, want)
    with torch.no_grad():
        hidden = peft.get_base_model().model(input_ids=batch["input_ids"],
                                             attention_mask=batch["attention_mask"])[0]
        uncapped = answer_cross_entropy(hidden, batch["labels"], peft.get_output_embeddings())
    assert abs(uncapped.item() - expected) > 0.1 * expected


def test_answer_loss_counts_answer_tokens_only():
    """The gathered rows are the answer positions shifted by one: changing a prompt label's
    target or a padding position changes nothing; moving the answer by one position does."""
    hidden = torch.randn(2, 6, 4, dtype=torch.float64)
    head = torch.nn.Linear(4, 10, bias=False).double()
    labels = torch.full((2, 6), IGNORE)
    labels[0, 3:5] = torch.tensor([1, 2])
    labels[1, 1] = 7
    logp = torch.log_softmax(head(hidden), -1)
    by_hand = -(logp[0, 2, 1] + logp[0, 3, 2] + logp[1, 0, 7]) / 3
    for chunk_rows in (None, 1, 2):
        loss = answer_cross_entropy(hidden, labels, head, chunk_rows=chunk_rows)
        assert loss.item() == pytest.approx(by_hand.item(), rel=1e-12)
    shifted = torch.roll(labels, 1, dims=1)
    assert answer_cross_entropy(hidden, shifted, head).item() != pytest.approx(by_hand.item())


# -- length-grouped batches -------------------------------------------------------------------
def test_length_grouped_batches_pad_little_and_follow_the_seed():
    lengths = np.random.default_rng(0).integers(20, 500, size=1003).tolist()
    batches = length_grouped_batches(lengths, 8, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert sorted(len(b) for b in batches) == [3] + [8] * 125
    assert padding_fraction(lengths, batches) < 0.10
    random_batches = [list(range(i, min(i + 8, 1003))) for i in range(0, 1003, 8)]
    assert padding_fraction(lengths, random_batches) > 0.3  # what grouping saves
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # an OOM shows at step 1
    means = [np.mean([lengths[i] for i in b]) for b in batches[1:]]
    assert means != sorted(means) and means != sorted(means, reverse=True)  # order is shuffled
    assert batches == length_grouped_batches(lengths, 8, seed=3)
    assert batches != length_grouped_batches(lengths, 8, seed=4)
    assert batches != length_grouped_batches(lengths, 8, seed=3, epoch=1)

    sampler = LengthGroupedBatches(lengths, 8, seed=3)
    assert len(sampler) == 126
    assert list(sampler) == batches  # epoch 0, then 1
    assert list(sampler) == length_grouped_batches(lengths, 8, seed=3, epoch=1)
    sampler.set_epoch(0)  # as accelerate's data loader does before each pass
    assert list(sampler) == batches


def test_training_feeds_length_grouped_batches(monkeypatch, obqa):
    task, examples = obqa
    loaded = load_model("tiny-llama", device="cpu")
    seen = []

    def recording_collate(pairs, pad_id):
        seen.append([len(p) + len(a) for p, a in pairs])
        return collate(pairs, pad_id)

    monkeypatch.setattr(starlora.train_setup, "collate", recording_collate)
    training = TrainingConfig(lr=1e-3, epochs=2, batch_size=2)
    train_adapter(loaded.model, loaded.tokenizer, task, examples, training, LORA, seed=5,
                  progress=False)
    lengths = [sum(map(len, encode_example(task, loaded.tokenizer, ex, training.max_length)))
               for ex in examples]
    expected = [[lengths[i] for i in b] for epoch in (0, 1)
                for b in length_grouped_batches(lengths, 2, seed=5, epoch=epoch)]
    check, *fed = seen  # first the loss check's batch: the first batch, shortest first
    assert fed == expected
    assert check == sorted(expected[0])


# -- mixed precision --------------------------------------------------------------------------
def test_auto_mixed_precision_follows_the_hardware(monkeypatch, tmp_path):
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(models, "CPUINFO", info)
    assert not cpu_has_native_bf16()  # unreadable: no
    for flags, native in [("fpu avx2 avx512f avx512_bf16 avx512_vnni", True),
                          ("fpu avx2 amx_bf16 amx_tile", True),
                          ("fpu avx2 avx512f avx512bw avx512_vnni", False)]:
        info.write_text(f"processor\t: 0\nmodel name\t: AMD avx512_bf16 lookalike\n"
                        f"flags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        assert cpu_has_native_bf16() is native
        assert resolve_mixed_precision("auto", cpu) == ("bf16" if native else "no")
        assert resolve_mixed_precision("no", cpu) == "no"
        assert resolve_mixed_precision("bf16", cpu) == "bf16"
    # CUDA: bf16 only where the GPU has it natively, not emulated (pre-Ampere), for every
    # `auto`: the weights loaded in emulated bf16 while training ran without autocast, and
    # scoring took bf16 on any GPU
    from starlora.models import pick_dtype
    from starlora.scoring.options import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_mixed_precision("auto", cuda) == "bf16"
    assert pick_dtype("auto", cuda) == resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation)
    assert resolve_mixed_precision("auto", cuda) == "no"
    assert pick_dtype("auto", cuda) == resolve_dtype("auto", cuda) == torch.float32
    assert resolve_mixed_precision("auto", mps) == "no"
    assert resolve_mixed_precision("fp16", mps) == "fp16"


def test_mixed_precision_autocasts_the_forward(obqa):
    """bf16 and fp16 (with its grad scaler) really run the forward in 16 bits: their losses
    are close to fp32's but not equal; every run still trains the adapter."""
    task, examples = obqa
    losses = {}
    for precision in ("no", "bf16", "fp16"):
        loaded = load_model("tiny-llama", device="cpu")
        training = TrainingConfig(lr=1e-2, epochs=2, batch_size=3, mixed_precision=precision)
        result = train_adapter(loaded.model, loaded.tokenizer, task, examples, training, LORA,
                               seed=0, progress=False)
        assert result.mixed_precision == precision
        assert b_norm(result.model) > 0
        assert all(p.dtype == torch.float32 for p in result.model.parameters())
        losses[precision] = result.losses
    for precision in ("bf16", "fp16"):
        assert losses[precision][0] == pytest.approx(losses["no"][0], rel=1e-2)
        assert losses[precision][0] != losses["no"][0]


# -- several processes ------------------------------------------------------------------------
DDP_SCRIPT = """
import sys, torch
from accelerate import PartialState
from starlora.config import LoraConfig, TrainingConfig
from starlora.models import load_model
from starlora.datafiles import load_examples
from starlora.tasks import get_task
from starlora.training import train_adapter

torch.set_num_threads(1)
task = get_task("obqa")
examples = load_examples(sys.argv[1], task, limit=8)
loaded = load_model("tiny-llama", device="cpu")
training = TrainingConfig(lr=1e-2, epochs=2, batch_size=2, mixed_precision="no")
result = train_adapter(loaded.model, loaded.tokenizer, task, examples, training,
                       LoraConfig(r=8), seed=0, progress=False)
state = {k: v.detach() for k, v in result.model.named_parameters() if "lora_" in k}
rank = PartialState().process_index
torch.save({"losses": result.losses, "state": state}, f"{sys.argv[2]}/rank{rank}.pt")
"""


@pytest.mark.slow
def test_two_processes_train_one_adapter(data_dir, tmp_path):
    """Under DDP (2 CPU processes, gloo) each process trains on its own share of each batch,
    yet the gradients are all-reduced through the `AnswerLoss` wrapper: both end with the same
    adapter. (Calling the model's body without the DDP wrapper gives two different ones.) The
    logged losses are the whole batch's, the same in both (tests/test_distributed.py checks
    them, and the adapter, against one process)."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"]
    out = subprocess.run(
        [*torchrun, str(script), str(data_dir / "obqa" / "train.jsonl"), str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, **pythonpath()},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the whole batch's, all-reduced
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    assert b_norm_of(ranks[0]["state"]) > 0


def pythonpath() -> dict[str, str]:
    """PYTHONPATH for a subprocess that imports this checkout's starlora."""
    return {"PYTHONPATH": os.pathsep.join(
        [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}


def b_norm_of(state: dict[str, torch.Tensor]) -> float:
    return sum(v.pow(2).sum() for k, v in state.items() if "lora_B" in k).sqrt().item()


# -- benchmark --------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_benchmark_smoke(data_dir, tmp_path):
    """`benchmarks/training.py` runs end to end on a tiny model and ends with its summary; with
    ``--dtype bfloat16`` ours trains its own bf16 copy, alternating with the fp32 reference."""
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "training.py"), "--model", "tiny-llama",
         "--data", str(data_dir / "gsm8k" / "train.jsonl"), "--limit", "6", "--batch-size", "3",
         "--max-length", "64", "--lora-r", "4", "--dtype", "bfloat16", "--repeats", "2"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, **pythonpath()},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert any(line.startswith("  reference: wall") for line in lines)
    assert any(line.startswith("  ours: wall") for line in lines)
    assert any(line.startswith("device=") and line.endswith("ours_weights=torch.bfloat16")
               for line in lines)
    assert sum(line.startswith("  repeat 2 ") for line in lines) == 2
    last = lines[-1].split()
    assert [kv.split("=")[0] for kv in last] == ["ours_vs_reference", "loss_rel_diff"]
    assert float(last[0].split("=")[1]) > 0 and float(last[1].split("=")[1]) >= 0
