"""Self-consistency measures on hand-computed examples."""

from __future__ import annotations

import math

import pytest

from starlora.scoring.consistency import agreement, answer_entropy, disagreement


def test_answer_entropy_of_hand_computed_distributions() -> None:
    assert answer_entropy(["7", "7", "7"]) == 0.0
    assert answer_entropy(["7"]) == 0.0
    # 1/2, 1/4, 1/4: 0.5·ln 2 + 2·0.25·ln 4 = 1.5·ln 2
    assert answer_entropy(["7", "7", "8", None]) == pytest.approx(1.5 * math.log(2))
    # all different: ln K; a missing answer is a class of its own
    assert answer_entropy(["1", "2", "3", None]) == pytest.approx(math.log(4))
    # two missing answers are one class: 1/2, 1/2
    assert answer_entropy([None, None, "3", "3"]) == pytest.approx(math.log(2))
    # exact comparison: "7" and "7.0" differ (normalising is the task's extract's job)
    assert answer_entropy(["7", "7.0"]) == pytest.approx(math.log(2))


def test_agreement_and_disagreement_with_a_reference() -> None:
    answers = ["7", "7", "8", None]
    assert agreement(answers, "7") == 0.5
    assert agreement(answers, None) == 0.25
    assert agreement(answers, "9") == 0.0
    assert disagreement(answers, "7") == 0.5
    assert disagreement(answers, None) == 0.75
    assert disagreement(["3", "3"], "3") == 0.0


def test_no_answers_is_an_error() -> None:
    for call in (lambda: answer_entropy([]), lambda: agreement([], "1")):
        with pytest.raises(ValueError, match="at least one sample"):
            call()
