"""The prompts a phase cuts on the left, said once per phase and round.

A sequence longer than the model may see loses its prompt's oldest tokens: in training and
teacher-forced scoring, a prompt + answer pair longer than ``training.max_length`` capped at
the model's positions (`starlora.models.token_limit`, `starlora.scoring.batching.fit`); in a
generation, a prompt longer than that or than the room the model's positions leave for
``max_new_tokens`` (`starlora.models.prompt_window`). With ``prompt_style: chat`` that cut takes
the chat template's header first. Nothing is said when nothing is cut, so a run whose
prompts fit prints what it printed before.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlora.models import prompt_window, token_limit
from starlora.run.context import Run
from starlora.tasks import Example


def say_cuts(run: Run, k: int, phase: str, lengths: Sequence[int], keep: int | None, *,
             pairs: bool, new_tokens: tuple[str, int] | None = None) -> int:
    """Say, as round `k`'s line, how many of `lengths` (tokens of each prompt, or of each prompt
    + answer when `pairs`) are over `keep` tokens, and why: ``training.max_length``, the model's
    positions if they are fewer, and the (setting, value) of `new_tokens` when the room it
    takes is what cut. Returns the count (0: nothing said)."""
    cut = sum(n > keep for n in lengths) if keep is not None else 0
    if not cut:
        return 0
    setting = run.config.training.max_length
    limit = token_limit(run.base_model, setting)  # below the setting: the model's positions
    why = f"training.max_length {setting}"
    if limit is not None and limit < setting:
        why += f", capped at the model's {limit} positions"
    if new_tokens is not None and limit is not None and keep < limit:
        why += f", less {new_tokens[0]} {new_tokens[1]} for the answer"
    to = f"so that prompt + answer fit in {keep} tokens" if pairs else f"to {keep} tokens"
    run.say(k, f"{phase}: {cut} of {len(lengths)} prompts cut on the left {to} ({why})")
    return cut


def _pair_lengths(run: Run, examples: Sequence[Example]) -> list[int]:
    return [sum(map(len, run.task.encode(run.tokenizer, ex))) for ex in examples]


def _prompt_lengths(run: Run, examples: Sequence[Example]) -> list[int]:
    return [len(run.task.prompt_ids(run.tokenizer, ex)) for ex in examples]


def training_cuts(run: Run, k: int, examples: Sequence[Example]) -> int:
    """Say how many of the labelled `examples` training cuts (prompt + gold answer pairs)."""
    keep = token_limit(run.base_model, run.config.training.max_length)
    return say_cuts(run, k, "training", _pair_lengths(run, examples), keep, pairs=True)


def evaluation_cuts(run: Run, k: int, examples: Sequence[Example]) -> int:
    """Say how many of the test (and stop-set) `examples` evaluation cuts: their prompts
    before generating, or their prompt + choice pairs (the longest choice) in choice mode."""
    from starlora.evaluation import resolve_mode

    cfg = run.config
    if resolve_mode(run.task, list(examples), cfg.evaluation.mode) == "choice":
        lengths = [max(_pair_lengths(run, [Example(ex.id, ex.question, text) for text in
                                           run.task.choice_answers(ex) or []]), default=0)
                   for ex in examples]
        keep = token_limit(run.base_model, cfg.training.max_length)
        return say_cuts(run, k, "evaluation", lengths, keep, pairs=True)
    new = ("evaluation.max_new_tokens", cfg.evaluation.max_new_tokens)
    keep = prompt_window(run.base_model, cfg.training.max_length, new[1])
    return say_cuts(run, k, "evaluation", _prompt_lengths(run, examples), keep, pairs=False,
                    new_tokens=new)


def scoring_cuts(run: Run, k: int, candidates: Sequence[Example], scored: bool) -> int:
    """Say how many pool `candidates` the score phase cuts: their prompts before the model
    answers them (``scoring.answers: generated``), their prompt + gold answer pairs (gold), or,
    when only embeddings are computed (not `scored`), their prompts. (A generated answer too
    long for what ``training.max_length`` leaves after its prompt is cut again when scored;
    that cut depends on the answer and is not counted here.)"""
    cfg = run.config
    limit = token_limit(run.base_model, cfg.training.max_length)
    if scored and cfg.scoring.answers == "gold":
        return say_cuts(run, k, "scoring", _pair_lengths(run, candidates), limit, pairs=True)
    if not scored:
        return say_cuts(run, k, "scoring", _prompt_lengths(run, candidates), limit, pairs=False)
    section = "scoring" if cfg.scoring.max_new_tokens else "evaluation"
    keep = prompt_window(run.base_model, cfg.training.max_length, run.max_new_tokens)
    return say_cuts(run, k, "scoring", _prompt_lengths(run, candidates), keep, pairs=False,
                    new_tokens=(f"{section}.max_new_tokens", run.max_new_tokens))
