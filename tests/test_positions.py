"""A model's maximum positions bound every sequence starlora feeds it.

GPT-2, OPT, GPT-NeoX and bigcode look their positions up in a learned table: one position past
its end is an IndexError on a CPU (a device-side assert on CUDA). So training, scoring and
evaluation cut to ``training.max_length`` capped at the model's positions
(`starlora.models.token_limit`), and generation cuts a prompt on the left to leave room for
``max_new_tokens`` (`starlora.models.prompt_room`). A prompt that fits is fed as before, token
for token. Each test here uses a tiny GPT-2 with 64 positions and prompts longer than that.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from starlora.config import EvaluationConfig, LoraConfig, TrainingConfig, load_config
from starlora.errors import ConfigError
from starlora.generation import decode, generate, stop_tokens
from starlora.models import Loaded, load_tokenizer, max_positions, tiny_model
from starlora.tasks import Example, get_task

POSITIONS = 64
NEW = 8
TASK = get_task("jsonl")


@pytest.fixture(scope="module")
def short_gpt2() -> Loaded:
    """A tiny random GPT-2 (learned position table) of `POSITIONS` positions."""
    tokenizer = load_tokenizer("tiny-gpt2")
    model = tiny_model("tiny-gpt2", tokenizer, n_positions=POSITIONS).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    return Loaded(model, tokenizer, "tiny-gpt2")


def long_question(words: int = 120) -> str:
    return " ".join(["invoices", "are", "due", "on", "tuesday"] * (words // 5))


def example(i: int = 0, words: int = 120, answer: str | None = "#### 7") -> Example:
    return Example(f"x{i}", f"{i}: " + long_question(words), answer)


def greedy(loaded: Loaded, prompt: list[int], steps: int = NEW) -> list[int]:
    """The reference: `decode` on `prompt` exactly as given, one row, no cutting."""
    ids = torch.tensor([prompt])
    out = decode(loaded.model, ids, torch.ones_like(ids), max_new_tokens=steps,
                 stop=stop_tokens(loaded.model, loaded.tokenizer), pad=0)
    return out.tokens[0]


def test_the_limits_read_the_model_and_cap_max_length(short_gpt2):
    from starlora.models import prompt_room, token_limit

    assert max_positions(short_gpt2.model) == POSITIONS
    assert token_limit(short_gpt2.model, 1024) == POSITIONS  # the default max_length, capped
    assert token_limit(short_gpt2.model, 32) == 32
    assert token_limit(short_gpt2.model, None) == POSITIONS
    assert prompt_room(short_gpt2.model, NEW) == POSITIONS - NEW
    with pytest.raises(ConfigError, match=r"evaluation.max_new_tokens: 64 generated tokens .* "
                                          r"64 positions .* at most 63"):
        prompt_room(short_gpt2.model, POSITIONS, "evaluation.max_new_tokens")


def test_a_nested_text_config_states_the_positions():
    """Gemma 3's multimodal model keeps its decoder's settings in ``text_config``; its top-level
    config states no position count."""
    from transformers import AutoModelForCausalLM, Gemma3Config

    config = Gemma3Config(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, max_position_embeddings=96, sliding_window=32),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=127, boi_token_index=126, eoi_token_index=125)
    model = AutoModelForCausalLM.from_config(config)
    assert getattr(model.config, "max_position_embeddings", None) is None
    assert max_positions(model) == 96


@pytest.mark.parametrize("fixed_shapes", [False, True])
def test_generation_cuts_a_long_prompt_to_leave_room_for_its_answer(short_gpt2, fixed_shapes):
    """A 100-token prompt on 64 positions: its last 56 tokens, then 8 new ones (the old code
    ran past the position table: IndexError)."""
    tok = short_gpt2.tokenizer
    long = TASK.prompt_ids(tok, example(words=100))
    assert len(long) > POSITIONS
    room = POSITIONS - NEW
    out = generate(short_gpt2.model, tok, [long], max_new_tokens=NEW, progress=False,
                   fixed_shapes=fixed_shapes)
    assert out.prompt_room == room
    assert out.tokens[0] == greedy(short_gpt2, long[-room:])
    assert len(out.tokens[0]) == NEW  # a random model does not stop: every position is used


def test_a_prompt_that_fits_is_fed_token_for_token(short_gpt2, monkeypatch):
    """What `decode` is fed: a prompt of exactly ``positions - max_new_tokens`` tokens (its
    answer then fits too, as the scorer will feed them) and an ordinary one, whole; one token
    more loses its first token. The greedy tokens are those of the prompt as fed."""
    import starlora.generation as generation

    fed: list[list[int]] = []

    def recording(model, ids, mask, **kwargs):
        fed.extend(row[m.bool()].tolist() for row, m in zip(ids, mask))
        return decode(model, ids, mask, **kwargs)

    monkeypatch.setattr(generation, "decode", recording)
    tok = short_gpt2.tokenizer
    ids = TASK.prompt_ids(tok, example(words=100))
    room = POSITIONS - NEW
    ordinary = TASK.prompt_ids(tok, Example("o", "What is 2 + 3?", None))
    fits, over = ids[-room:], ids[-room - 1:]
    out = generate(short_gpt2.model, tok, [fits, over, ordinary], max_new_tokens=NEW,
                   batch_size=1, progress=False)
    assert fed == [fits, over[1:], ordinary]  # cut, then sorted: longest first, ties in order
    assert out.tokens[0] == greedy(short_gpt2, fits)
    assert out.tokens[2] == greedy(short_gpt2, ordinary)


def test_evaluation_of_a_long_test_question_generates_within_the_positions(short_gpt2):
    """``training.max_length`` 1024 (the default) on a 64-position model: prompts cut to
    leave room for the answer, as the reviewer's 700-word test question needs."""
    from starlora.evaluation import evaluate

    tok = short_gpt2.tokenizer
    test = [example(i, words=100 + 20 * i) for i in range(3)] + [example(3, words=5)]
    result = evaluate(short_gpt2.model, tok, TASK, test, EvaluationConfig(max_new_tokens=NEW),
                      progress=False, max_length=1024)
    for ex, p in zip(test, result.predictions):
        prompt = TASK.prompt_ids(tok, ex)[-(POSITIONS - NEW):]
        assert p["generated"] == tok.decode(greedy(short_gpt2, prompt), skip_special_tokens=True)


def test_own_answer_scoring_of_a_cut_prompt_scores_what_the_scorer_sees(short_gpt2):
    """A 60-token prompt whose answer stops after one token (its first token made a stop
    token): the generation saw the prompt's last 56 tokens, the scorer (61 tokens, under 64)
    sees all 60, so the generation's own measurement is not used: the first pass equals the
    teacher-forced scorer's on the same answer tokens."""
    from starlora.scoring import score_examples, score_own_answers

    tok, model = short_gpt2.tokenizer, short_gpt2.model
    ids = TASK.prompt_ids(tok, example(words=100))
    ex = Example("cut", tok.decode(ids[-60:]), None)
    prompt = TASK.prompt_ids(tok, ex)
    assert POSITIONS - NEW < len(prompt) < POSITIONS - 1
    short = Example("short", "What is 2 + 3?", None)
    first = greedy(short_gpt2, prompt[-(POSITIONS - NEW):], steps=1)[0]
    before = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, first]
    try:
        scores, out = score_own_answers(model, tok, TASK, [ex, short], max_new_tokens=NEW,
                                        progress=False, mc_passes=1)
    finally:
        model.generation_config.eos_token_id = before
    assert out.tokens[0] == [first]
    forced = score_examples(model, tok, TASK, [ex, short], answer_ids=out.tokens,
                            mc_passes=1, progress=False)
    # (the last bits follow the batch: the cut pair is scored again in a batch of its own)
    np.testing.assert_allclose([scores.pe[0], scores.me[0]], [forced.pe[0], forced.me[0]],
                               rtol=1e-6)
    np.testing.assert_allclose(scores.pe[1], forced.pe[1], rtol=1e-5)


def test_training_cuts_pairs_to_the_model_positions(short_gpt2):
    """``training.max_length`` 1024 on a 64-position model trains on at most 64 tokens a pair
    (the old code fed the whole 100-token pair: IndexError in the answer loss)."""
    from starlora.adapters import remove_adapter
    from starlora.training import train_adapter

    tok = short_gpt2.tokenizer
    examples = [example(i, words=100) for i in range(2)]
    result = train_adapter(short_gpt2.model, tok, TASK, examples,
                           TrainingConfig(epochs=1, batch_size=2), LoraConfig(r=2),
                           seed=0, init_adapter=None, progress=False)
    remove_adapter(result.model)
    assert result.train_tokens == 2 * POSITIONS
    assert np.isfinite(result.final_loss)


def _folder(tmp_path: Path, short_gpt2: Loaded) -> Path:
    folder = tmp_path / "gpt2-64"
    short_gpt2.model.save_pretrained(folder)
    short_gpt2.tokenizer.save_pretrained(folder)
    return folder


def _long_config(tmp_path: Path, folder: Path, *overrides: str):
    rows = [{"id": f"p{i}", "question": long_question(30 + 40 * (i % 3)), "answer": "#### 7"}
            for i in range(6)]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text(json.dumps(
        {"id": "t0", "question": long_question(120), "answer": "#### 7"}) + "\n")
    return load_config(None, [
        f"model.name={folder}", "model.device=cpu", "model.dtype=float32", "lora.r=2",
        "task.name=jsonl", f"task.train={tmp_path / 'pool.jsonl'}",
        f"task.test={tmp_path / 'test.jsonl'}", "training.epochs=1", "training.batch_size=2",
        "scoring.mc_passes=1", "active_learning.strategy=pe", "active_learning.initial_size=2",
        "active_learning.query_size=2", "active_learning.rounds=2",
        f"evaluation.max_new_tokens={NEW}", *overrides])


def test_a_run_on_long_prompts_finishes(tmp_path, short_gpt2, capsys):
    """The reviewer's repro in small: long pool and test questions, the default
    ``training.max_length`` (1024) on a 64-position GPT-2 (the old code: IndexError)."""
    from starlora.run.loop import run_experiment

    config = _long_config(tmp_path, _folder(tmp_path, short_gpt2))
    store = run_experiment(config, tmp_path / "run", progress=False)
    assert [r["round"] for r in store.metrics()] == [0, 1]
    said = capsys.readouterr().err
    why = "training.max_length 1024, capped at the model's 64 positions"
    room = f"{why}, less evaluation.max_new_tokens {NEW} for the answer"
    for k in (0, 1):  # one line a phase and round, each naming the count, tokens and setting
        assert f"round {k}/1: evaluation: 1 of 1 prompts cut on the left to 56 tokens " \
               f"({room})" in said
        assert re.search(rf"round {k}/1: training: [1-9] of {2 + 2 * k} prompts cut on the "
                         rf"left so that prompt \+ answer fit in 64 tokens \({why}\)", said)
    assert re.search(rf"round 0/1: scoring: [1-4] of 4 prompts cut on the left to 56 tokens "
                     rf"\({re.escape(room)}\)", said)
    assert said.count("prompts cut") == 5


def test_max_new_tokens_that_leave_no_room_are_an_error_before_any_work(tmp_path, short_gpt2):
    from starlora.run.loop import run_experiment

    config = _long_config(tmp_path, _folder(tmp_path, short_gpt2),
                          f"evaluation.max_new_tokens={POSITIONS}")
    with pytest.raises(ConfigError, match="evaluation.max_new_tokens: 64 generated tokens"):
        run_experiment(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "rounds").exists()
    config = _long_config(tmp_path, _folder(tmp_path, short_gpt2),
                          f"scoring.max_new_tokens={POSITIONS + 1}")
    with pytest.raises(ConfigError, match="scoring.max_new_tokens: 65 generated tokens"):
        run_experiment(config, tmp_path / "run2", progress=False)


def test_a_phase_whose_prompts_fit_says_nothing(short_gpt2, capsys):
    """Only a cut is said: ordinary prompts leave the run's output as it was."""
    from starlora.acquisition import make_strategy
    from starlora.run.context import Run
    from starlora.run.cuts import training_cuts

    config = load_config(None, ["task.name=jsonl", "training.max_length=40"])
    run = Run(config, None, TASK, make_strategy("random", n_queries=1), None, 2, False,
              short_gpt2.model, short_gpt2.tokenizer)
    short = Example("s", "What is 2 + 3?", "#### 5")
    assert training_cuts(run, 0, [short, short]) == 0
    assert "[starlora]" not in capsys.readouterr().err
    assert training_cuts(run, 0, [short, example(words=100)]) == 1
    assert "round 0/1: training: 1 of 2 prompts cut on the left so that prompt + answer fit " \
           "in 40 tokens (training.max_length 40)\n" in capsys.readouterr().err
