"""Training's loss follows the model's own logits: `logit_transform` reads the text part of a
composite config, and a logit post-processing it does not know (Falcon-H1, HyperCLOVA X) is
caught on the first batch, which then trains through the model's own forward. Tiny real
models on the CPU."""

from __future__ import annotations

import warnings

import pytest
import torch

import starlora.answer_loss
from starlora.answer_loss import AnswerLoss, ModelLoss, loss_disagreement
from starlora.config import LoraConfig, TrainingConfig
from starlora.errors import LossFallbackWarning
from starlora.models import load_model, load_tokenizer, logit_transform, tiny_model
from starlora.tasks import get_task
from starlora.train_setup import check_pairs, collate, encode_example, setup_training
from starlora.training import train_adapter

LORA = LoraConfig(r=4, alpha=8, dropout=0.1)
TASK = get_task("arith")
EXAMPLES = TASK.generate("train", 4, 0)


def batch_of(tokenizer, examples=EXAMPLES) -> dict[str, torch.Tensor]:
    """The examples as one training batch (`collate` of `encode_example`)."""
    return collate([encode_example(TASK, tokenizer, ex) for ex in examples],
                   tokenizer.pad_token_id)


def own_and_ours(model, batch) -> tuple[float, float]:
    """The model's own ``forward(labels=...).loss`` and `AnswerLoss` on `batch` (no grad)."""
    with torch.no_grad():
        return model(**batch).loss.item(), AnswerLoss(model)(**batch).item()


def gemma4_with_text_cap(tokenizer) -> torch.nn.Module:
    """A tiny Gemma 4 (``Gemma4ForConditionalGeneration``, text only) whose soft-cap lives in
    ``config.text_config``, with head weights large enough for logits beyond the cap."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    vocab = len(tokenizer)
    text = dict(vocab_size=vocab, vocab_size_per_layer_input=vocab,
                hidden_size_per_layer_input=8, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                head_dim=16, global_head_dim=16, final_logit_softcapping=2.0,
                max_position_embeddings=512, sliding_window=64,
                layer_types=["sliding_attention", "full_attention"])
    config = AutoConfig.for_model("gemma4", text_config=text, vision_config=None,
                                  audio_config=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config).eval()
        torch.nn.init.normal_(model.get_output_embeddings().weight, std=1.0)
    return model


def unknown_post_processing(kind: str, tokenizer) -> torch.nn.Module:
    """A tiny model that multiplies its logits in ``forward`` by a factor `logit_transform`
    does not know: Falcon-H1's ``lm_head_multiplier``, HyperCLOVA X's ``logits_scaling``
    (a multiplier there, a divisor in Granite)."""
    factor = {"falcon_h1": dict(lm_head_multiplier=0.25),
              "hyperclovax": dict(logits_scaling=0.25)}[kind]
    model = tiny_model("tiny-llama", tokenizer, model_type=kind, **factor).eval()
    with torch.no_grad():  # away from near-uniform predictions: the factor shows clearly
        model.get_output_embeddings().weight.mul_(30)
    return model


def test_logit_transform_reads_the_soft_cap_of_a_composite_config():
    """Gemma 4 (as Gemma 3n) caps its logits with ``config.get_text_config()``'s cap: the
    answer-only loss does too, so it equals the model's own loss and the check keeps it."""
    tok = load_tokenizer("tiny-llama")
    model = gemma4_with_text_cap(tok)
    assert getattr(model.config, "final_logit_softcapping", None) is None  # text_config only
    assert logit_transform(model) is not None
    batch = batch_of(tok)
    own, ours = own_and_ours(model, batch)
    assert ours == pytest.approx(own, rel=1e-5)
    assert loss_disagreement(model, batch) is None


@pytest.mark.parametrize("kind", ["falcon_h1", "hyperclovax"])
def test_check_names_an_unknown_logit_post_processing(kind):
    tok = load_tokenizer("tiny-llama")
    model = unknown_post_processing(kind, tok)
    batch = batch_of(tok)
    own, ours = own_and_ours(model, batch)
    assert abs(own - ours) > 1e-3 * own  # what the answer-only loss alone would train on
    problem = loss_disagreement(model, batch)
    assert problem is not None and problem.startswith(f"{type(model).__name__}: the answer-only")
    assert f"{own:.6g}" in problem and f"{ours:.6g}" in problem


def test_training_falls_back_to_the_models_own_loss_when_they_disagree():
    """HyperCLOVA X: a `LossFallbackWarning`, and the first step's loss (B = 0: the base
    model's, whatever the dropout) is the model's own loss on that batch, not AnswerLoss's."""
    tok = load_tokenizer("tiny-llama")
    model = unknown_post_processing("hyperclovax", tok)
    own, ours = own_and_ours(model, batch_of(tok))
    training = TrainingConfig(lr=1e-3, steps=2, batch_size=len(EXAMPLES), mixed_precision="no")
    with pytest.warns(LossFallbackWarning, match="HyperCLOVAXForCausalLM: the answer-only loss"):
        result = train_adapter(model, tok, TASK, EXAMPLES, training, LORA, seed=0,
                               progress=False)
    assert result.losses[0] == pytest.approx(own, rel=1e-5)
    assert result.losses[0] != pytest.approx(ours, rel=1e-4)


def test_check_keeps_the_fast_path_and_changes_nothing_where_losses_agree(monkeypatch):
    """Llama: the check passes silently, the round trains with `AnswerLoss`, and the losses and
    adapter are the very bits of a round trained without the check (LoRA dropout on: a random
    number drawn by the check, or a mode it left changed, would show)."""
    training = TrainingConfig(lr=1e-2, epochs=2, batch_size=2, mixed_precision="no")
    runs = []
    for check in (True, False):
        if not check:
            monkeypatch.setattr(starlora.answer_loss, "loss_disagreement", lambda *a, **k: None)
        loaded = load_model("tiny-llama", device="cpu", dtype="float32")
        with warnings.catch_warnings():
            warnings.simplefilter("error", LossFallbackWarning)
            s = setup_training(loaded.model, loaded.tokenizer, TASK, EXAMPLES, training, LORA,
                               seed=3, init_adapter=None, accelerator=None)
        assert type(s.accelerator.unwrap_model(s.wrapped)) is AnswerLoss
        s.accelerator.free_memory()
        loaded = load_model("tiny-llama", device="cpu", dtype="float32")
        result = train_adapter(loaded.model, loaded.tokenizer, TASK, EXAMPLES, training, LORA,
                               seed=3, progress=False)
        lora = {n: p.detach().clone() for n, p in result.model.named_parameters() if "lora_" in n}
        runs.append((result.losses, lora))
    (losses, lora), (losses_off, lora_off) = runs
    assert losses == losses_off and len(losses) == 4
    assert lora.keys() == lora_off.keys() and all(torch.equal(lora[n], lora_off[n]) for n in lora)


def test_check_pairs_stay_within_one_head_chunk():
    """Shortest pairs first, each cut to the budget, as many as fit padded (at least one);
    pairs without answer tokens are left out."""
    pairs = [([1] * 6, [2] * 2), ([1] * 2, [2] * 1), ([1] * 3, []), ([1] * 30, [2] * 3)]
    assert check_pairs(pairs, 20) == [([1] * 2, [2] * 1), ([1] * 6, [2] * 2)]
    assert check_pairs(pairs, 8) == [([1] * 2, [2] * 1)]
    assert check_pairs([([1] * 30, [2] * 3)], 10) == [([1] * 7, [2] * 3)]
    assert check_pairs([([1] * 3, [])], 10) == []


def test_model_loss_is_the_same_mean_over_answer_tokens():
    """What the check compares is comparable: on a model without post-processing the two
    losses agree (labels are -100 outside the answer, the model shifts them itself)."""
    tok = load_tokenizer("tiny-llama")
    model = tiny_model("tiny-llama", tok).eval()
    batch = batch_of(tok)
    with torch.no_grad():
        assert AnswerLoss(model)(**batch).item() == pytest.approx(
            ModelLoss(model)(**batch).item(), rel=1e-6)
