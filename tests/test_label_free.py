"""Label-free uncertainty: the scores of a file do not depend on the answers it carries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from launching import sampled_batches, two_processes_in_one

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


# -- the loop: a strategy's first selection does not depend on the pool's answers ----------
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def pool_files(tmp_path: Path) -> tuple[dict[str, Path], list[str]]:
    """A jsonl pool of 8 sums with gold, wrong or no answers, and the settings of a run on it
    that labels 4 given examples, trains, scores the pool and selects 4 (human oracle: it
    pauses there, so the missing answers are never needed). 8, not more: whether a selection
    reads the answers does not depend on the pool's size, and each arm makes 3 runs."""
    questions = [f"What is {i} + {i % 5}?" for i in range(8)]
    pools = {}
    for name, answer in (("gold", lambda i: str(i + i % 5)), ("wrong", lambda i: str(99 - i)),
                         ("none", None)):
        path = tmp_path / f"pool-{name}.jsonl"
        path.write_text("".join(json.dumps({"id": f"p{i}", "question": q}
                                           | ({"answer": answer(i)} if answer else {})) + "\n"
                                for i, q in enumerate(questions)))
        pools[name] = path
    labelled, test = tmp_path / "labelled.jsonl", tmp_path / "test.jsonl"
    # (not "1 + 1": the same item as the pool's p1, which would leave the pool)
    labelled.write_text("".join(json.dumps({"id": f"l{i}", "question": f"What is {i} + 7?",
                                            "answer": str(i + 7)}) + "\n" for i in range(4)))
    test.write_text("".join(json.dumps({"id": f"t{i}", "question": f"What is {i} + 2?",
                                        "answer": str(i + 2)}) + "\n" for i in range(30, 34)))
    settings = ["task.name=jsonl", f"task.test={test}", f"task.labelled={labelled}",
                "active_learning.oracle=human", "active_learning.initial_size=4",
                "active_learning.query_size=4", "active_learning.rounds=2",
                "evaluation.max_new_tokens=8", "scoring.mc_passes=2"]
    return pools, settings


def first_selection(tmp_path: Path, overrides: list[str]) -> dict[str, list]:
    """{pool name: [round 0's scores.jsonl rows, its selected.jsonl rows]}."""
    from starlora.config import load_config
    from starlora.run.loop import run_experiment

    pools, settings = pool_files(tmp_path)
    out = {}
    for name, pool in pools.items():
        store = run_experiment(load_config(TINY, [*settings, f"task.train={pool}", *overrides]),
                               tmp_path / f"run-{name}", progress=False)
        assert len(store.pending()) == 4  # paused on the first query
        out[name] = [store.read_round(0, "scores.jsonl"), store.read_round(0, "selected.jsonl")]
    return out


#: strategies and options added for issue 33, each with the settings it needs
LABEL_FREE = {
    "length": ["active_learning.strategy=length"],
    "pe-dynamic, base_scores adapted": ["scoring.base_scores=adapted"],
    "pe-dynamic, base_scores own": ["scoring.base_scores=own"],  # the first study's
    "pe-dynamic, base_scores adapted, 3 samples": ["scoring.base_scores=adapted",
                                                   "scoring.samples=3"],
    "me-dynamic, per_token": ["active_learning.strategy=me-dynamic", "scoring.per_token=true"],
    "answer_entropy": ["active_learning.strategy=answer_entropy", "scoring.samples=4"],
    "disagreement": ["active_learning.strategy=disagreement", "scoring.samples=4"],
    "answer_entropy-dynamic": ["active_learning.strategy=answer_entropy-dynamic",
                               "scoring.samples=4"],
    "disagreement-dynamic": ["active_learning.strategy=disagreement-dynamic",
                             "scoring.samples=4", "active_learning.normalize=raw_full"],
}


@pytest.fixture(scope="module")
def adapted():
    """tiny-llama with a LoRA adapter whose B is not zero (the adapted model differs from the
    base model), and its tokenizer."""
    import torch

    from starlora.adapters import attach_lora
    from starlora.models import load_model

    loaded = load_model("tiny-llama", device="cpu", dtype="float32", seed=0)
    model = attach_lora(loaded.model, r=4, dropout=0.1)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return model, loaded.tokenizer


def first_character_task():
    """arith whose `extract` reads the parity of an answer's first character: the random tiny
    model never writes a final answer arith's `extract` finds (every sample would be None,
    every self-consistency measure 0), and its first characters nearly always differ; two
    classes (and None for an empty answer) make the measures vary between items."""
    task = get_task("arith")
    task.extract = lambda text: str(ord(text.strip()[0]) % 2) if text.strip() else None
    return task


def pool_rows(adapted, overrides: list[str], answers: str = "none", needs=None, task=None):
    """(the score phase's rows for 12 arith problems, the run they were scored for) under the
    strategy and options `overrides` set, with the pool's answers gold, wrong or missing
    (`answers`); `needs` replaces the strategy's score columns; `task` (default:
    `first_character_task`) reads the final answers."""
    from starlora.config import load_config
    from starlora.run.context import Run
    from starlora.run.loop import config_strategy
    from starlora.run.pool_scores import score_rows
    from starlora.run.protocol import phase_seed
    from starlora.tasks import Example

    model, tokenizer = adapted
    cfg = load_config(TINY, ["evaluation.max_new_tokens=8", *overrides])
    task = task or first_character_task()
    pool = task.generate("train", 12, 0)
    pool = [Example(ex.id, ex.question, {"gold": ex.answer, "wrong": "#### 999",
                                         "none": None}[answers]) for ex in pool]
    run = Run(cfg, None, task, config_strategy(cfg, 2), None, 2, False, model, tokenizer,
              model=model)
    if needs is not None:
        run.strategy.needs = tuple(needs)
    return score_rows(run, pool, seed=phase_seed(cfg.seed, 0, "score"), model=model), run


def select_on(adapted, overrides: list[str], answers: str,
              task=None) -> tuple[list[dict], list[dict]]:
    """The score phase's rows and the first selection (4 of 12 arith problems) of the strategy
    and options `overrides` set, with the pool's answers gold, wrong or missing (`answers`)."""
    from starlora.run.protocol import stream

    rows, run = pool_rows(adapted, overrides, answers, task=task)
    columns = {c: np.array([r[c] for r in rows], float) for c in run.strategy.needs}
    selected = run.strategy.select_rows([r["id"] for r in rows], columns, 4, query_index=0,
                                        rng=stream(run.config.seed, 0, "select"))
    return rows, selected


@pytest.mark.parametrize("arm", LABEL_FREE)
def test_new_strategies_score_and_select_the_same_with_gold_wrong_or_missing_answers(
    arm: str, adapted
) -> None:
    """Label-free, and deterministic for a seed: the same rows and selection three times."""
    runs = [select_on(adapted, LABEL_FREE[arm], answers) for answers in ("gold", "wrong", "none")]
    assert runs[0] == runs[1] == runs[2]
    rows, selected = runs[0]
    assert len(rows) == 12 and len(selected) == 4


@pytest.mark.slow
@pytest.mark.parametrize("arm", LABEL_FREE)
def test_new_strategies_in_the_loop_select_the_same_with_gold_wrong_or_missing_answers(
    arm: str, tmp_path: Path
) -> None:
    runs = first_selection(tmp_path, LABEL_FREE[arm])
    assert runs["gold"] == runs["wrong"] == runs["none"]
    scores, selected = runs["gold"]
    assert len(scores) == 8 and len(selected) == 4


def test_base_scores_adapted_scores_the_adapters_own_tokens_with_the_adapter_disabled(
    adapted,
) -> None:
    """With B = 0 the adapted model is the base model, so on the same tokens the base term
    equals the full term: with `adapted` it does, sample by sample; with `own` the base model
    scores its own samples (other draws), and the terms differ."""
    from starlora.scoring import score_base

    model, tokenizer = adapted
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    try:
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.zero_()
        samples = ["scoring.samples=3", "scoring.mc_passes=1", "scoring.dtype=float32"]
        on_adapted, _ = pool_rows(adapted, [*samples, "scoring.base_scores=adapted"])
        own, _ = pool_rows(adapted, [*samples, "scoring.base_scores=own"])
    finally:
        for n, p in model.named_parameters():
            if n in saved:
                p.data.copy_(saved[n])
    # (the full term's pass is measured while generating: equal to a forward within 1e-5)
    np.testing.assert_allclose([r["pe_base"] for r in on_adapted], [r["pe"] for r in on_adapted],
                               rtol=1e-4)
    assert [r["pe"] for r in own] == [r["pe"] for r in on_adapted]
    assert not np.allclose([r["pe_base"] for r in own], [r["pe_base"] for r in on_adapted])
    # with a trained adapter the base term is the base model on the adapter's answer
    rows, run = pool_rows(adapted, ["scoring.base_scores=adapted", "scoring.dtype=float32"],
                          needs=("pe_base", "answer_tokens"))
    from starlora.run.protocol import phase_seed
    from starlora.scoring import own_answers

    task = get_task("arith")
    pool = task.generate("train", 12, 0)
    out = own_answers(model, tokenizer, task, pool, max_new_tokens=8, progress=False,
                      seed=phase_seed(0, 0, "score"), max_length=run.config.training.max_length)
    base = score_base(model, tokenizer, task, pool, answer_ids=out.tokens, measures=("pe",),
                      max_length=run.config.training.max_length, progress=False)
    np.testing.assert_allclose([r["pe_base"] for r in rows], base.pe, rtol=1e-5)
    assert [r["answer_tokens"] for r in rows] == [len(t) for t in out.tokens]


def test_per_token_divides_both_terms_by_the_answers_tokens(adapted) -> None:
    needs = ("pe", "pe_base", "me", "me_base", "answer_tokens")
    single = ["scoring.mc_passes=1", "scoring.base_scores=adapted"]
    sums, _ = pool_rows(adapted, single, needs=needs)
    means, _ = pool_rows(adapted, [*single, "scoring.per_token=true"], needs=needs)
    for m in ("pe", "pe_base", "me", "me_base"):
        np.testing.assert_allclose([r[m] for r in means],
                                   [r[m] / r["answer_tokens"] for r in sums], rtol=1e-6)
    assert "pe_passes" not in means[0]


def test_self_consistency_columns_are_the_measures_of_the_extracted_samples(adapted) -> None:
    from starlora.run.protocol import phase_seed
    from starlora.scoring import own_answers
    from starlora.scoring.consistency import answer_entropy, disagreement

    model, tokenizer = adapted
    rows, run = pool_rows(adapted, ["scoring.samples=4"], needs=(
        "answer_entropy", "disagreement", "answer_entropy_base", "disagreement_base"))
    task = first_character_task()
    pool = task.generate("train", 12, 0)
    kw = dict(max_new_tokens=8, progress=False, seed=phase_seed(0, 0, "score"),
              max_length=run.config.training.max_length)
    sampled = own_answers(model, tokenizer, task, pool, samples=4, **kw)
    greedy = own_answers(model, tokenizer, task, pool, **kw)
    for i, row in enumerate(rows):
        answers = [task.extract(sampled.texts[j]) for j in sampled.of(i)]
        assert row["answer_entropy"] == answer_entropy(answers)
        assert row["disagreement"] == disagreement(answers, task.extract(greedy.texts[i]))
        assert 0 <= row["answer_entropy_base"] <= np.log(4) + 1e-12
        assert row["disagreement_base"] in (0, 0.25, 0.5, 0.75, 1)
    assert len({r["answer_entropy"] for r in rows}) > 1  # the tiny model does disagree
    assert len({r["disagreement_base"] for r in rows}) > 1


def test_self_consistency_with_one_sample_is_refused_before_any_work(tmp_path: Path) -> None:
    from starlora.config import load_config
    from starlora.errors import ConfigError
    from starlora.run.loop import run_experiment

    cfg = load_config(TINY, ["active_learning.strategy=disagreement-dynamic"])
    with pytest.raises(ConfigError, match="scoring.samples >= 2"):
        run_experiment(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


#: the self-consistency family on SmolLM2: one scoring of the columns that `answer_entropy`
#: and `disagreement-dynamic` read (the adapted model's 4 samples and greedy answer, the base
#: model's likewise), and each strategy's selection from them
SMOL_STRATEGIES = {"answer_entropy": ("answer_entropy",),
                   "disagreement-dynamic": ("disagreement", "disagreement_base")}


@pytest.mark.slow
def test_smollm2_self_consistency_strategies_select_the_same_with_gold_wrong_or_missing_answers(
    smol,
) -> None:
    """The real model (no adapter: the base term is the same model) and arith's own `extract`:
    the same rows and selections whatever answers the pool carries.

    The self-consistency strategies need the real model most: their columns are final
    answers read by arith's `extract`, which the random tiny model never writes (every sample
    would be None); the other new strategies' SmolLM2 check is the test below. `answer_entropy` and `disagreement-dynamic` share that code too (the same 4
    samples from the round's "score" stream and the same greedy answer): one scoring per pool
    computes both strategies' columns, and each strategy selects from its own."""
    from starlora.config import load_config
    from starlora.run.loop import config_strategy
    from starlora.run.protocol import stream

    settings = LABEL_FREE["disagreement-dynamic"]
    needs = [c for columns in SMOL_STRATEGIES.values() for c in columns]
    runs = []
    for answers in ("gold", "wrong", "none"):
        rows, _ = pool_rows((smol.model, smol.tokenizer), settings, answers, needs=needs,
                            task=get_task("arith"))
        ids = [r["id"] for r in rows]
        selected = {}
        for name in SMOL_STRATEGIES:
            cfg = load_config(TINY, ["evaluation.max_new_tokens=8", *LABEL_FREE[name]])
            strategy = config_strategy(cfg, 2)
            assert strategy.needs == SMOL_STRATEGIES[name]
            columns = {c: np.array([r[c] for r in rows], float) for c in strategy.needs}
            selected[name] = strategy.select_rows(ids, columns, 4, query_index=0,
                                                  rng=stream(cfg.seed, 0, "select"))
        runs.append((rows, selected))
    assert runs[0] == runs[1] == runs[2]
    rows, selected = runs[0]
    assert len(rows) == 12 and all(len(s) == 4 for s in selected.values())
    # SmolLM2 writes final answers arith reads, and they vary
    assert len({r["answer_entropy"] for r in rows}) > 1


@pytest.mark.slow
@pytest.mark.parametrize("arm", ["length", "pe-dynamic, base_scores adapted, 3 samples"])
def test_smollm2_length_and_adapted_base_scores_select_the_same_with_gold_or_missing_answers(
    smol, arm: str
) -> None:
    """`length` and STAR with ``base_scores: adapted`` (3 samples) on the real model: the same
    rows and selection with gold answers in the pool as with none. Gold against none is the
    stronger pair (a leak reads a present answer, or its value); the tiny-model test runs
    wrong answers too, for every arm."""
    runs = [select_on((smol.model, smol.tokenizer), LABEL_FREE[arm], answers,
                      task=get_task("arith")) for answers in ("gold", "none")]
    assert runs[0] == runs[1]
    rows, selected = runs[0]
    assert len(rows) == 12 and len(selected) == 4
    column = "answer_tokens" if arm == "length" else "pe_base"
    assert len({r[column] for r in rows}) > 1  # the column varies: a real ranking


@pytest.mark.parametrize("overrides", [
    ["active_learning.strategy=answer_entropy", "scoring.samples=4"],
    ["scoring.base_scores=adapted", "scoring.samples=3"],
])
def test_sampled_pool_answers_share_batches_and_give_one_process_bits_in_two(
    adapted, monkeypatch, overrides
) -> None:
    """Sampled answers are generated ``evaluation.batch_size // samples`` (tiny.yaml: 8 // 4
    or 8 // 3 = 2) prompts a batch, in groups cut before processes take their shares, so two
    processes give the very bits of one (a row's bits depend on its batch-mates). Two
    processes are simulated in one: `map_shards` hands each share of `dist.plan` to the
    function in turn and merges the results as `gather` does."""
    from starlora import distributed as dist

    batches = sampled_batches(monkeypatch)
    one, _ = pool_rows(adapted, overrides)
    assert batches == [2] * 6  # 12 prompts, 2 a batch

    monkeypatch.setattr(dist, "map_shards", two_processes_in_one)
    two, _ = pool_rows(adapted, overrides)
    assert [r["id"] for r in two] == [r["id"] for r in one]
    assert two == one
