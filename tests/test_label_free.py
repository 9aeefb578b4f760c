"""Label-free uncertainty: the scores of a file do not depend on the answers it carries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from starlora.cli import main
from starlora.datafiles import load_examples
from starlora.scoring import Scores, score_own_answers
from starlora.tasks import get_task

QUESTIONS = ["Tom has 3 apples and buys 4 more. How many apples does he have now?",
             "Anna has 12 pencils. She gives away 5. How many pencils does she have now?",
             "Sam has 2 bags with 6 cards in each bag. How many cards does he have now?"]
GOLD = ["3 + 4 = 7.\n#### 7", "12 - 5 = 7.\n#### 7", "2 x 6 = 12.\n#### 12"]
WRONG = ["#### 1", "#### 99", "#### 5"]


def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, answers in (("gold", GOLD), ("wrong", WRONG), ("none", [None] * 3)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"id": f"q{i}", "question": q}
                                           | ({"answer": a} if a else {})) + "\n"
                                for i, (q, a) in enumerate(zip(QUESTIONS, answers))))
        out[name] = path
    return out


def test_starlora_score_with_generated_answers_ignores_the_records_answers(tmp_path: Path) -> None:
    outputs = {}
    for name, path in files(tmp_path).items():
        out = tmp_path / f"{name}.scores.jsonl"
        assert main(["score", "--model", "tiny-llama", "--task", "gsm8k", "--data", str(path),
                     "--mc-passes", "2", "--max-new-tokens", "12", "--out", str(out)]) == 0
        outputs[name] = out.read_text()
    assert outputs["gold"] == outputs["wrong"] == outputs["none"]
    rows = [json.loads(line) for line in outputs["gold"].splitlines()]
    assert [r["id"] for r in rows] == ["q0", "q1", "q2"]
    assert all(r["pe"] > 0 and r["answer"] and len(r["pe_passes"]) == 2 for r in rows)
    # gold scoring does read them: the gold and the wrong file score differently
    for name in ("gold", "wrong"):
        main(["score", "--model", "tiny-llama", "--task", "gsm8k", "--answers", "gold",
              "--data", str(files(tmp_path)[name]), "--out", str(tmp_path / f"{name}.g.jsonl")])
    assert (tmp_path / "gold.g.jsonl").read_text() != (tmp_path / "wrong.g.jsonl").read_text()


def test_samples_estimate_predictive_entropy_as_a_mean_over_answers(tiny, tmp_path: Path) -> None:
    task = get_task("gsm8k")
    examples = load_examples(files(tmp_path)["none"], task, require_answer=False)
    scores, out = score_own_answers(tiny.model, tiny.tokenizer, task, examples,
                                    max_new_tokens=6, samples=3, seed=5, progress=False)
    assert len(out.tokens) == 9 and scores.pe.shape == (3,)
    # PE of each example = mean over its 3 samples of the sequence NLL of that sample, which
    # (one deterministic pass) is minus the sum of the log-probabilities it was drawn with
    nll = np.array([-out.logprobs[j].sum() for j in range(9)]).reshape(3, 3).mean(axis=1)
    np.testing.assert_allclose(scores.pe, nll, rtol=1e-4)
    again, _ = score_own_answers(tiny.model, tiny.tokenizer, task, examples[::-1],
                                 max_new_tokens=6, samples=3, seed=5, progress=False)
    assert again.ids == scores.ids[::-1]


@pytest.mark.slow
def test_smollm2_label_free_scores_do_not_read_the_answers(smol, tmp_path: Path) -> None:
    task = get_task("gsm8k")
    results = []
    for path in files(tmp_path).values():
        examples = load_examples(path, task, require_answer=False)
        scores, out = score_own_answers(smol.model, smol.tokenizer, task, examples,
                                        max_new_tokens=48, progress=False)
        results.append((scores.pe.tolist(), scores.me.tolist(), out.texts))
    assert results[0] == results[1] == results[2]
    assert all(p > 0 for p in results[0][0])


def test_answer_lengths_averaged_over_samples_are_kept_in_the_records() -> None:
    """Two examples, two generated answers each, of 3 and 4 tokens and of 5 and 5: the mean
    length 3.5 is written as 3.5 (not cut to 3) and read back; whole counts stay ints."""
    n = np.array([3, 4, 5, 5], np.int64)
    pe = np.array([3.0, 8.0, 5.0, 10.0])
    rows = Scores(ids=["a", "a", "b", "b"], pe=pe, pe_per_token=pe / n, me=pe, me_per_token=pe / n,
                  n_answer_tokens=n)
    scores = rows.mean_over(2)
    records = scores.to_records()
    assert [r["n_answer_tokens"] for r in records] == [3.5, 5]
    assert isinstance(records[1]["n_answer_tokens"], int)
    np.testing.assert_array_equal(Scores.from_records(records).n_answer_tokens, [3.5, 5.0])
    assert Scores.from_records(rows.to_records()).n_answer_tokens.dtype == np.int64
