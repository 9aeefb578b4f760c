"""Evaluation: ECE on a toy input, choice scoring, greedy generation, batch-size independence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel

from starlora.config import EvaluationConfig, LoraConfig, TrainingConfig
from starlora.datafiles import load_examples
from starlora.errors import ConfigError
from starlora.evaluation import evaluate, expected_calibration_error, resolve_mode
from starlora.models import load_model
from starlora.tasks import Example, get_task
from starlora.training import remove_adapter, save_adapter, train_adapter


@pytest.fixture(scope="module")
def obqa(data_dir):
    task = get_task("obqa")
    return task, load_examples(data_dir / "obqa" / "test.jsonl", task, limit=5)


def test_ece_matches_hand_computed_value():
    confidence = np.array([0.0, 0.1, 0.25, 0.3, 0.6, 0.9, 0.95, 1.0])
    correct = np.array([0, 1, 0, 1, 1, 1, 0, 1])
    # bins (0, .25], (.25, .5], (.5, .75], (.75, 1]; 0.0 joins the first, 0.25 is its upper edge
    # |1/3 - 0.35/3| * 3/8 + |1 - .3| * 1/8 + |1 - .6| * 1/8 + |2/3 - .95| * 3/8 = 0.325
    ece, bins = expected_calibration_error(confidence, correct, n_bins=4)
    assert ece == pytest.approx(0.325)
    assert [b["count"] for b in bins] == [3, 1, 1, 3]
    assert bins[0]["confidence"] == pytest.approx(0.35 / 3)
    assert bins[0]["accuracy"] == pytest.approx(1 / 3)
    assert bins[3] == pytest.approx({"lower": 0.75, "upper": 1.0, "count": 3, "confidence": 0.95,
                                     "accuracy": 2 / 3})
    ece, bins = expected_calibration_error(np.full(10, 0.8), np.arange(10) % 2, n_bins=15)
    assert ece == pytest.approx(0.3) and len(bins) == 15
    assert bins[0]["confidence"] is None and bins[11]["count"] == 10  # 0.8 in (11/15, 12/15]


def test_mode_follows_the_task(obqa):
    task, examples = obqa
    assert resolve_mode(task, examples, "auto") == "choice"
    gsm8k = get_task("gsm8k")
    assert resolve_mode(gsm8k, examples, "auto") == "generate"
    with pytest.raises(ConfigError, match="choice"):
        resolve_mode(gsm8k, examples, "choice")


def test_choice_scores_are_answer_loglikelihoods_independent_of_batch(tiny, obqa):
    task, examples = obqa
    results = [
        evaluate(tiny.model, tiny.tokenizer, task, examples,
                 EvaluationConfig(mode="auto", batch_size=b), progress=False)
        for b in (1, 7)
    ]
    one, many = results
    assert one.mode == "choice" and one.n == len(examples)
    assert [p["prediction"] for p in one.predictions] == [p["prediction"] for p in many.predictions]
    for a, b in zip(one.predictions, many.predictions):
        assert a["confidence"] == pytest.approx(b["confidence"], rel=1e-5)
    assert (one.accuracy, sum(b["count"] for b in one.bins)) == (many.accuracy, len(examples))

    # by hand: unpadded, one sequence at a time, sum of log p over the choice's tokens + EOS
    ex, pred = examples[2], one.predictions[2]
    by_hand = []
    for choice in task.choice_answers(ex):
        prompt, answer = task.encode(tiny.tokenizer, ex, answer=choice)
        assert answer[-1] == tiny.tokenizer.eos_token_id
        with torch.no_grad():
            logits = tiny.model(input_ids=torch.tensor([prompt + answer])).logits[0]
        logp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
        by_hand.append(logp.gather(-1, torch.tensor(answer)[:, None]).sum().item())
    assert pred["choice_logprobs"] == pytest.approx(by_hand, rel=1e-5)
    probs = np.exp(by_hand) / np.exp(by_hand).sum()
    assert pred["prediction"] == task.choices[int(np.argmax(by_hand))]
    assert pred["confidence"] == pytest.approx(probs.max(), rel=1e-5)
    assert pred["correct"] == (pred["prediction"] == ex.answer)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])  # rotary and absolute positions
def test_generation_does_not_depend_on_batch_size(arch, obqa):
    task, examples = obqa
    loaded = load_model(arch, device="cpu")
    side = loaded.tokenizer.padding_side
    one, many = (
        evaluate(loaded.model, loaded.tokenizer, task, examples,
                 EvaluationConfig(mode="generate", batch_size=b, max_new_tokens=6), progress=False)
        for b in (1, 4)
    )
    assert one.mode == many.mode == "generate"
    assert [p["generated"] for p in one.predictions] == [p["generated"] for p in many.predictions]
    for a, b in zip(one.predictions, many.predictions):
        assert a["logprob"] == pytest.approx(b["logprob"], rel=1e-4)
        assert a["logprob"] < 0 and a["confidence"] == pytest.approx(np.exp(a["logprob"]))
    assert loaded.tokenizer.padding_side == side


def test_trained_answer_is_generated_and_chosen_and_survives_reload(tmp_path):
    """Teach a tiny model to answer "yes": greedy generation then says " yes" and stops at EOS,
    choice scoring picks it, and the saved adapter reloaded with plain peft scores the same."""
    loaded = load_model("tiny-llama", device="cpu")
    task = get_task("jsonl", choices=["Yes", "No"], template="Question: {question}\nAnswer:")
    examples = [Example(f"q{i}", f"Is {i} a number?", "yes") for i in range(16)]
    generate = EvaluationConfig(mode="generate", max_new_tokens=8, batch_size=3)
    before = evaluate(loaded.model, loaded.tokenizer, task, examples[:4], generate, progress=False)
    assert before.accuracy == 0
    result = train_adapter(loaded.model, loaded.tokenizer, task, examples,
                           TrainingConfig(lr=1e-2, epochs=6, batch_size=8),
                           LoraConfig(r=8, dropout=0.0), seed=0, progress=False)
    after = evaluate(result.model, loaded.tokenizer, task, examples[:4], generate, progress=False)
    assert after.accuracy == 1
    assert {p["generated"] for p in after.predictions} == {" yes"}  # stopped at EOS
    assert min(p["logprob"] for p in after.predictions) > max(
        p["logprob"] for p in before.predictions
    )
    choice = EvaluationConfig(mode="choice", batch_size=3)
    chosen = evaluate(result.model, loaded.tokenizer, task, examples[:4], choice, progress=False)
    assert chosen.accuracy == 1 and {p["prediction"] for p in chosen.predictions} == {"yes"}

    save_adapter(result.model, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(remove_adapter(result.model), str(tmp_path / "adapter"))
    again = evaluate(reloaded, loaded.tokenizer, task, examples[:4], choice, progress=False)
    assert again.predictions == chosen.predictions and again.ece == chosen.ece
