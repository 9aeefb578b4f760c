"""Evaluation of a model on a task's test split: accuracy, calibration (ECE) and predictions.

Two modes:

* ``choice`` (tasks with a fixed answer set, e.g. boolq, obqa): every choice's answer text is
  scored by its log-likelihood after the prompt, the sum of ``log p`` over its answer tokens
  (a sum, not a mean, so choices of different lengths compete fairly), computed by the
  scoring engine. The closing EOS is included: that is exactly the sequence training
  supervises and scoring measures (see `Task.encode`), so "answer A and stop" competes with
  "answer B and stop" (on OBQA zero-shot, leaving EOS out cost 9.5 points of accuracy). The
  prediction is the argmax; its confidence is its probability under a softmax over the
  choices' total log-likelihoods.
* ``generate`` (open answers, e.g. gsm8k): greedy batched generation (`starlora.generation`) that
  stops at EOS or ``max_new_tokens``; the answer is extracted with ``task.extract``. The
  confidence is the probability of the final answer: ``exp(sum log p)`` over the generated
  tokens that produce the characters ``task.extract_span`` points at (a token counts when
  the characters it decodes to overlap the span), each token's ``log p`` conditioned on
  everything generated before it. A generation with no extractable answer gets confidence
  0.0: it is graded wrong, so a confidence of 0 is exactly calibrated for it and adds nothing
  to the ECE's sum over bins (it still counts in the number of examples). An answer whose
  span covers no generated token (only possible for an empty span at the very end) gets 0.0
  too. The probability of the whole generated sequence (all tokens up to and including EOS)
  is kept as ``sequence_confidence``; for a chain of thought it is about 0 whatever the
  answer, so its ECE (`EvalResult.ece_sequence`) is about the accuracy and says little about
  calibration. `EvalResult.ece` uses the answer's confidence.

That answer-span probability is the chance of copying a number the model's own chain just
computed, so it cannot see an error earlier in the chain: it is about 1 for right and wrong
answers alike. The other signals (`prediction_signals`) are ``msp`` (the sequence probability,
``exp(logprob)``), ``perplexity`` (``exp(logprob / tokens)``, the geometric-mean token
probability, i.e. 1 / perplexity) and, with ``evaluation.samples`` K > 0, ``consistency``:
the share of K answers sampled at temperature 1 (seeded per example) whose extracted answer
equals the greedy one (0 when the greedy answer has none). Each gets the numbers of
`starlora.confidence` (`EvalResult.signals`).

Batches are formed after sorting by length (less padding); results do not depend on the
batch size, or on how many processes share the work, beyond floating-point noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from starlora.confidence import (
    adaptive_ece,
    ece_from_bins,
    expected_calibration_error,
    signal_metrics,
)
from starlora.config import EvaluationConfig
from starlora.errors import ConfigError, StarloraError
from starlora.tasks import Example, Task

__all__ = ["EvalResult", "answer_token_indices", "ece_from_bins", "evaluate",
           "expected_calibration_error", "prediction_signals", "resolve_mode"]


@dataclass
class EvalResult:
    """Accuracy and expected calibration error (both in [0, 1]) over `n` examples.

    `ece` is the ECE of each prediction's ``confidence`` (the chosen choice's softmax
    probability, or in generate mode the final answer's probability); `ece_sequence` is the
    ECE of the whole generated sequence's probability with the same bins (generate mode only,
    else None). `bins` are the reliability bins of `ece` (see `expected_calibration_error`).
    `predictions` holds one dict per example in input order: ``id``, ``prediction``,
    ``gold``, ``correct``, ``confidence``, plus ``choice_logprobs`` (choice mode; nats, one per
    choice) or, in generate mode, ``generated`` (the text), ``logprob`` (its log-probability
    in nats), ``sequence_confidence`` (``exp(logprob)``), ``answer_logprob`` (nats, summed over
    the answer's tokens; None when no answer was extracted), ``answer_tokens`` (how many
    generated tokens the answer spans), ``tokens`` (how many were generated, EOS included),
    ``logprob_mean`` (``logprob / tokens``, nats per token) and, with ``evaluation.samples``
    K > 0, ``consistency`` (the share of K sampled answers equal to this one). ``confidence``
    is 0.0 when no answer was extracted (see the module doc). `signals`: per confidence
    signal (`prediction_signals`), `starlora.confidence.signal_metrics` plus ``bins`` (its
    equal-mass reliability bins).
    """

    accuracy: float
    ece: float
    n: int
    bins: list[dict] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)
    mode: str = "choice"
    ece_sequence: float | None = None
    signals: dict[str, dict] = field(default_factory=dict)


def resolve_mode(task: Task, examples: list[Example], mode: str) -> str:
    """``auto`` is ``choice`` when the task has a fixed answer set, else ``generate``."""
    has_choices = bool(task.choices) and task.choice_answers(examples[0]) is not None
    if mode == "auto":
        return "choice" if has_choices else "generate"
    if mode == "choice" and not has_choices:
        raise ConfigError(
            f"evaluation.mode: 'choice' needs a task with choices; {task.name} has none"
        )
    return mode


def _choice(model, tokenizer, task, examples, cfg, max_length, progress, seed,
            groups=None) -> list[dict]:
    from starlora.scoring import score_examples

    answers = [task.choice_answers(ex) for ex in examples]
    # one (prompt, choice) pair per choice; its log-likelihood is minus its PE, computed by the
    # scoring engine (LM head only at answer positions, deterministic with mc_passes=1)
    variants = [Example(f"{ex.id}\x1f{j}", ex.question, text)
                for ex, texts in zip(examples, answers) for j, text in enumerate(texts)]
    scores = -score_examples(model, tokenizer, task, variants, measures=("pe",),
                             batch_size=cfg.batch_size, max_length=max_length,
                             progress=progress, desc="choices").pe
    predictions, start = [], 0
    for ex, texts in zip(examples, answers):
        ll = scores[start : start + len(texts)]
        start += len(texts)
        probs = np.exp(ll - ll.max())
        probs /= probs.sum()
        best = int(np.argmax(ll))
        # canonicalise the choice label the way gold answers are (e.g. case for jsonl tasks)
        pred = task.gold(task.choices[best]) or task.choices[best]
        gold = task.gold(ex.answer)
        predictions.append({
            "id": ex.id, "prediction": pred, "gold": gold, "correct": task.is_correct(pred, gold),
            "confidence": float(probs[best]), "choice_logprobs": [float(x) for x in ll],
        })
    return predictions


def answer_token_indices(
    tokenizer: Any, tokens: list[int], text: str, span: tuple[int, int]
) -> list[int]:
    """Indices into `tokens` (generated ids that decode to `text`) of the tokens that produce
    the characters ``text[start:end]`` of `span` (character offsets).

    Token k covers the characters from the end of the decoded prefix ``tokens[:k]`` to the end
    of ``tokens[:k + 1]`` and belongs to the answer when that range overlaps the span (an empty
    span counts as its next character). A prefix whose decoding is not a prefix of `text` (a
    character split across tokens) adds no characters; its tokens go with the token that
    completes the character. Tokens that never produce characters (EOS) are never included.
    Costs one decode per token up to the span's end.
    """
    start, end = span[0], max(span[1], span[0] + 1)
    indices: list[int] = []
    pending: list[int] = []  # tokens since the last one that completed characters
    before = 0  # characters produced by the tokens so far
    for k in range(len(tokens)):
        if before >= end:
            break
        pending.append(k)
        prefix = tokenizer.decode(tokens[: k + 1], skip_special_tokens=True)
        if len(prefix) > before and text.startswith(prefix):
            if len(prefix) > start:  # [before, len(prefix)) overlaps [start, end)
                indices += pending
            before, pending = len(prefix), []
    return indices


def _generate(model, tokenizer, task, examples, cfg, max_length, progress, seed,
              groups=None) -> list[dict]:
    from starlora.generation import generate
    from starlora.models import prompt_window

    keep = prompt_window(model, max_length, cfg.max_new_tokens)  # room left for the answer
    prompts = [task.prompt_ids(tokenizer, ex, keep) for ex in examples]
    out = generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                   batch_size=cfg.batch_size, progress=progress, desc="generate")
    predictions = []
    for ex, tokens, logp, text in zip(examples, out.tokens, out.logprobs, out.texts):
        pred, span = task.extract(text), task.extract_span(text)
        gold = task.gold(ex.answer)
        logprob = float(logp.sum())
        answer = answer_token_indices(tokenizer, tokens, text, span) if span else []
        answer_logprob = float(logp[answer].sum()) if answer else None
        predictions.append({
            "id": ex.id, "prediction": pred, "gold": gold, "correct": task.is_correct(pred, gold),
            "confidence": float(np.exp(answer_logprob)) if answer else 0.0,
            "sequence_confidence": float(np.exp(logprob)), "logprob": logprob,
            "answer_logprob": answer_logprob, "answer_tokens": len(answer), "generated": text,
            "tokens": len(tokens), "logprob_mean": logprob / len(tokens) if tokens else 0.0,
        })
    if cfg.samples:
        sampled = _sampled_answers(model, tokenizer, task, examples, prompts, cfg, seed, progress,
                                   groups)
        for p, answers in zip(predictions, sampled):
            same = sum(a == p["prediction"] for a in answers) if p["prediction"] is not None else 0
            p["consistency"] = same / len(answers)
    return predictions


def _sampled_answers(model, tokenizer, task, examples, prompts, cfg, seed, progress,
                     groups=None) -> list[list[str | None]]:
    """Per example, the extracted answers of ``cfg.samples`` generations at temperature 1,
    seeded per example from `seed` and its id (the same draws whatever the batch or shard), a
    batch per example or per group of `groups` (`starlora.distributed.map_groups`)."""
    from starlora.generation import generate
    from starlora.scoring.options import example_seeds, unique_keys

    seeds = example_seeds(seed, unique_keys([ex.id for ex in examples]))
    out = generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                   samples=cfg.samples, temperature=1.0, seeds=seeds, progress=progress,
                   desc="sampling (self-consistency)", groups=groups)
    return [[task.extract(out.texts[j]) for j in out.of(i)] for i in range(len(examples))]


def evaluate(
    model: Any,
    tokenizer: Any,
    task: Task,
    examples: list[Example],
    evaluation: EvaluationConfig,
    *,
    progress: bool = True,
    max_length: int | None = None,
    seed: int = 0,
) -> EvalResult:
    """Accuracy, ECE and per-example predictions of `model` on `examples` (see module doc).

    The model is put in eval mode. Prompts are cut from the left as in training, to
    `max_length` capped at the model's maximum positions (`starlora.models.token_limit`; without
    `max_length`, to those positions), and generated answers' prompts further, to leave room for
    ``evaluation.max_new_tokens`` in those positions (`starlora.models.prompt_room`). `seed` seeds the self-consistency samples (``evaluation.samples``; per example
    from it and the example's id). Under several processes (`starlora.distributed`) each predicts a length-balanced
    share of `examples`; every process gets all predictions, in order, and computes the same
    metrics from them.
    """
    if not examples:
        raise StarloraError("evaluation: no test examples")
    from starlora import distributed as dist
    from starlora.generation import sampled_group_size
    from starlora.models import token_limit

    max_length = token_limit(model, max_length)
    mode = resolve_mode(task, examples, evaluation.mode)
    model.eval()
    predict = _choice if mode == "choice" else _generate

    def lengths() -> list[int]:
        return [len(task.prompt_ids(tokenizer, ex, max_length)) for ex in examples]

    def share(items: list[Example], groups: list[int] | None = None) -> list[dict]:
        return predict(model, tokenizer, task, items, evaluation, max_length,
                       progress and dist.is_main(), seed, groups)

    # under several processes each predicts its share; all get every prediction, in order;
    # sampled answers several prompts a batch, in groups cut before the shares (`map_groups`)
    size = sampled_group_size(evaluation.samples, evaluation.batch_size)
    size = size if mode == "generate" else 1
    predictions = dist.map_groups(share, examples, lengths, size, to="all")
    correct = np.array([p["correct"] for p in predictions], dtype=np.float64)
    confidence = np.array([p["confidence"] for p in predictions])
    ece, bins = expected_calibration_error(confidence, correct, evaluation.ece_bins)
    ece_sequence = None
    if mode == "generate":
        sequence = np.array([p["sequence_confidence"] for p in predictions])
        ece_sequence = expected_calibration_error(sequence, correct, evaluation.ece_bins)[0]
    signals = {name: {**signal_metrics(values, correct, evaluation.ece_bins),
                      "bins": adaptive_ece(values, correct, evaluation.ece_bins)[1]}
               for name, values in prediction_signals(predictions).items()}
    return EvalResult(
        accuracy=float(correct.mean()), ece=ece, n=len(examples), bins=bins,
        predictions=predictions, mode=mode, ece_sequence=ece_sequence, signals=signals,
    )


def prediction_signals(predictions: list[dict]) -> dict[str, np.ndarray]:
    """The confidence signals of ``predictions.jsonl`` rows, each [N] in [0, 1] (higher = more
    sure), named as in LM-Polygraph where it has the estimator (module doc): ``answer`` always;
    ``msp`` and ``perplexity`` for generated answers (``perplexity`` needs the ``tokens`` count,
    written since issue 34); ``consistency`` with ``evaluation.samples`` > 0. A signal is left
    out unless every row has it."""
    def column(get) -> np.ndarray | None:
        try:
            return np.array([float(get(p)) for p in predictions])
        except (KeyError, TypeError):
            return None

    found = {
        "answer": column(lambda p: p["confidence"]),
        "msp": column(lambda p: p["sequence_confidence"]),
        "perplexity": column(lambda p: np.exp(p["logprob_mean"])),
        "consistency": column(lambda p: p["consistency"]),
    }
    return {name: values for name, values in found.items() if values is not None}
