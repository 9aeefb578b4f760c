"""Evaluation: ECE on a toy input, choice scoring, greedy generation, batch-size independence,
the final answer's confidence in generate mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel

from starlora.adapters import remove_adapter, save_adapter
from starlora.config import EvaluationConfig, LoraConfig, TrainingConfig
from starlora.datafiles import load_examples
from starlora.errors import ConfigError
from starlora.evaluation import (
    answer_token_indices,
    evaluate,
    expected_calibration_error,
    resolve_mode,
)
from starlora.models import load_model, load_tokenizer
from starlora.tasks import Example, JSONLTask, get_task
from starlora.training import train_adapter


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
        assert a["logprob"] < 0 and a["sequence_confidence"] == pytest.approx(np.exp(a["logprob"]))
        assert a["confidence"] == pytest.approx(b["confidence"], rel=1e-4)
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


class _PinnedAnswer(JSONLTask):
    """A jsonl task whose answer in each of the given generated texts is the given character
    span (random tiny models write no answer a real task would find)."""

    def __init__(self, spans: dict[str, tuple[int, int]]):
        super().__init__()
        self.spans = spans

    def _answer(self, text: str) -> tuple[str, int, int] | None:
        if text in self.spans:
            start, end = self.spans[text]
            return self._norm(text[start:end]), start, end
        return super()._answer(text)


def _greedy_by_hand(model, prompt: list[int], steps: int, eos: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation of `prompt` one full forward pass per token, unpadded, and the
    teacher-forced ``log p`` of each generated token (nats, shape (generated,))."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == eos:
                break
        logits = model(input_ids=torch.tensor([ids])).logits[0, len(prompt) - 1 : -1]
    new = ids[len(prompt) :]
    return new, torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(new)[:, None])[:, 0]


def test_generate_confidence_is_the_probability_of_the_answer_tokens(tiny):
    """In generate mode `confidence` is exp(sum log p) over exactly the tokens that write the
    extracted answer (here two tokens inside the generation), not over the whole generation."""
    tok, model = tiny.tokenizer, tiny.model
    questions = ["What is two plus two?", "Name a colour.", "Which city is the capital of France?"]
    examples = [Example(f"q{i}", q, "unknown") for i, q in enumerate(questions)]
    probe = JSONLTask(template="Question: {question}\nAnswer:")
    spans, expected = {}, []
    for ex in examples:
        new, logp = _greedy_by_hand(model, probe.encode(tok, ex)[0], 8, tok.eos_token_id)
        text = tok.decode(new, skip_special_tokens=True)
        ends = [len(tok.decode(new[:k], skip_special_tokens=True)) for k in range(len(new) + 1)]
        whole = [text.startswith(tok.decode(new[:k], skip_special_tokens=True))
                 for k in range(len(new) + 1)]
        # the answer: tokens a and a + 1, each writing whole characters, with tokens on both sides
        a = next(a for a in range(1, len(new) - 2)
                 if all(whole[a : a + 3]) and ends[a] < ends[a + 1] < ends[a + 2])
        spans[text] = (ends[a], ends[a + 2])
        expected.append((text, float(logp[a : a + 2].sum().exp()), float(logp.sum().exp())))
    # example 0's gold is its answer, so accuracy and the two ECEs are not trivial
    examples[0] = Example("q0", questions[0], list(spans)[0][slice(*spans[list(spans)[0]])])
    task = _PinnedAnswer(spans)
    task.template = probe.template
    result = evaluate(model, tok, task, examples,
                      EvaluationConfig(mode="generate", max_new_tokens=8, batch_size=3),
                      progress=False)
    assert result.mode == "generate"
    for pred, (text, answer_p, sequence_p) in zip(result.predictions, expected):
        assert pred["generated"] == text
        assert pred["confidence"] == pytest.approx(answer_p, rel=1e-4)
        assert pred["answer_tokens"] == 2
        assert pred["sequence_confidence"] == pytest.approx(sequence_p, rel=1e-4)
        assert pred["confidence"] > 1e3 * pred["sequence_confidence"]  # 6 more tokens of junk
    correct = np.array([p["correct"] for p in result.predictions], dtype=np.float64)
    assert correct.tolist() == [1.0, 0.0, 0.0]
    confidence = [p["confidence"] for p in result.predictions]
    sequence = [p["sequence_confidence"] for p in result.predictions]
    assert result.ece == pytest.approx(expected_calibration_error(confidence, correct)[0])
    assert result.ece_sequence == pytest.approx(expected_calibration_error(sequence, correct)[0])


def test_no_answer_gets_zero_confidence_and_choice_mode_no_sequence_ece(obqa):
    loaded = load_model("tiny-gpt2", device="cpu")
    task, examples = obqa
    generated = evaluate(loaded.model, loaded.tokenizer, get_task("gsm8k"), examples[:2],
                         EvaluationConfig(mode="generate", max_new_tokens=4), progress=False)
    for pred in generated.predictions:  # random junk holds no number
        assert pred["prediction"] is None and pred["answer_logprob"] is None
        assert pred["confidence"] == 0.0 and 0 < pred["sequence_confidence"] < 1
    chosen = evaluate(loaded.model, loaded.tokenizer, task, examples[:2],
                      EvaluationConfig(mode="choice"), progress=False)
    assert chosen.ece_sequence is None


@pytest.mark.parametrize("text,task,answer_text", [
    ("12 + 5 = 17. 17 - 3 = 14.\n#### 14", get_task("gsm8k"), "14"),
    ("Caf\u00e9 \U0001F642 costs 3 euros; the final answer is 1,250 \U0001F642!", get_task("gsm8k"),
     "1,250"),
    ("\U0001F642\u00e9\nrest", JSONLTask(), "\U0001F642\u00e9"),  # characters split across tokens
    (" the correct answer is false, because", get_task("boolq"), "false"),
])
def test_answer_tokens_are_those_whose_characters_overlap_the_span(text, task, answer_text):
    tok = load_tokenizer("tiny-llama")
    encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    tokens = encoded["input_ids"]
    assert tok.decode(tokens) == text
    start, end = task.extract_span(text)
    assert text[start:end] == answer_text
    # reference: the tokenizer's own character offsets of each token
    overlapping = [k for k, (s, e) in enumerate(encoded["offset_mapping"]) if s < end and e > start]
    assert 0 < len(overlapping) < len(tokens)
    got = answer_token_indices(tok, tokens + [tok.eos_token_id], text, (start, end))
    assert got == overlapping
    assert tok.decode([tokens[k] for k in got]).strip() == answer_text


def test_self_consistency_is_seeded_per_item_whatever_the_order_or_batch():
    """evaluation.samples K: each item's K sampled answers come from its own seed, so the
    share equal to the greedy answer does not depend on the order or batch size; the other
    signals are in every prediction (issue 34)."""
    loaded = load_model("tiny-llama", device="cpu", dtype="float32", seed=0)
    task = JSONLTask(answer_regex=r"(\S)")  # the first character: random models write some
    examples = [Example(f"q{i}", f"What is {i} plus {i}?", str(2 * i)) for i in range(5)]
    cfg = EvaluationConfig(max_new_tokens=6, batch_size=5, samples=4)
    a = evaluate(loaded.model, loaded.tokenizer, task, examples, cfg, progress=False, seed=3)
    b = evaluate(loaded.model, loaded.tokenizer, task, examples[::-1],
                 cfg.model_copy(update={"batch_size": 1}), progress=False, seed=3)
    by_id = {p["id"]: p for p in b.predictions}
    for p in a.predictions:
        assert p["consistency"] == by_id[p["id"]]["consistency"]
        assert p["consistency"] in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert p["logprob_mean"] == pytest.approx(p["logprob"] / p["tokens"])
    assert any(0 < p["consistency"] for p in a.predictions)  # the signal is not constant 0
    assert set(a.signals) == {"answer", "msp", "perplexity", "consistency"}
    assert set(a.signals["consistency"]) >= {"roc-auc", "rcc-auc", "brier", "ece-adaptive"}


def test_sampled_answers_share_batches_and_give_one_process_bits_in_two(monkeypatch):
    """evaluation.samples K >= 2: ``batch_size // K`` prompts' samples a batch (here 4 // 2),
    in groups cut before the processes take shares, so two processes (simulated in one:
    `launching.two_processes_in_one`) sample in the batches of one and give its consistency.
    (The greedy answers' logprobs may differ in their last bits: fp32 greedy batches are cut
    per share, `starlora.generation`.)"""
    from launching import sampled_batches, two_processes_in_one

    from starlora import distributed as dist

    loaded = load_model("tiny-llama", device="cpu", dtype="float32", seed=0)
    task = JSONLTask(answer_regex=r"(\S)")
    examples = [Example(f"q{i}", f"What is {i} plus {i}?" + " Think." * i, str(2 * i))
                for i in range(5)]
    cfg = EvaluationConfig(max_new_tokens=6, batch_size=4, samples=2)
    batches = sampled_batches(monkeypatch)
    one = evaluate(loaded.model, loaded.tokenizer, task, examples, cfg, progress=False, seed=3)
    assert sorted(batches) == [1, 2, 2]  # 5 prompts, 2 a batch
    monkeypatch.setattr(dist, "map_shards", two_processes_in_one)
    batches.clear()
    two = evaluate(loaded.model, loaded.tokenizer, task, examples, cfg, progress=False, seed=3)
    assert sorted(batches) in ([1, 1, 2, 2], [1, 2, 2, 2])  # the same 3, and a padding copy
    for a, b in zip(one.predictions, two.predictions, strict=True):
        assert (a["id"], a["prediction"], a["consistency"]) == \
            (b["id"], b["prediction"], b["consistency"])
        assert a["logprob"] == pytest.approx(b["logprob"], rel=1e-6)
