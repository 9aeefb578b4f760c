"""Temperature scaling of a run's last adapter: ``starlora calibrate RUN_DIR``.

One temperature T divides every logit of the adapted model. It is fitted on the run's own
labelled set, the one place this reads labels, and they are labels the run already owns:
T minimises the mean NLL of the gold answer tokens (the tokens training supervises,
`Task.encode`: the answer and its closing EOS, teacher-forced after the prompt), found on a
log-spaced grid of 121 temperatures in [0.05, 20] and refined by a parabola
(`starlora.confidence.best_on_grid`).

On the test set it then reports, before (T = 1) and after (the fitted T), the numbers of
`starlora.confidence` for each confidence signal that the temperature changes:

* generated answers: the answer-span probability (``answer``), the sequence probability
  (``msp``) and the geometric-mean token probability (``perplexity``) of each test item's
  generated answer as ``rounds/<k>/predictions.jsonl`` holds it, teacher-forced (the text is
  tokenised again, and closed with EOS when it is shorter than ``evaluation.max_new_tokens``;
  re-tokenising can differ from the generated tokens by a merge, so "before" is measured the
  same way as "after", not copied from the run's evaluation);
* choice tasks: the probability of the predicted choice, a softmax over the choices' summed
  log-probabilities at T.

Sequences are cut as the run cut them: labelled pairs as training did (to
``training.max_length`` capped at the model's positions), a test prompt as evaluation did
before generating, a choice pair as evaluation scored it. Correctness is the run's own
(``predictions.jsonl``); the predictions do not change. Writes
``rounds/<k>/calibration.json`` (`RunStore`). Under N processes (``torchrun``/``accelerate
launch``, DeepSpeed ZeRO-3 included) each runs a length-balanced share of the forward passes,
every process gets the fitted temperature, and the main process writes the file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from starlora import distributed as dist
from starlora import zero3
from starlora.confidence import best_on_grid, signal_metrics, temperature_grid
from starlora.errors import StarloraError
from starlora.io import read_jsonl
from starlora.run.data import load_data, make_task, set_aside_stop_set
from starlora.run.identity import data_hashes, require_precision, verify_data
from starlora.run.store import RunStore
from starlora.scoring.batching import fit as fit_pair
from starlora.tasks import Example

R = TypeVar("R")

#: sequences per forward pass (their logits over the vocabulary are held at once)
BATCH = 4


def _logits(model: Any, pairs: list[tuple[list[int], list[int]]], groups: list[int]
            ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per (prompt ids, answer ids) pair, in order: (its index, the float32 logits [A, V] that
    predict its A answer tokens, those tokens [A]). A batch is each run of consecutive pairs
    with one label in `groups` [len(pairs)]."""
    device = next(model.parameters()).device
    cuts = [i for i in range(1, len(pairs)) if groups[i] != groups[i - 1]]
    with zero3.inference_mode():
        for start, end in zip([0, *cuts], [*cuts, len(pairs)]):
            batch = pairs[start:end]
            longest = max(len(p) + len(a) for p, a in batch)
            ids = torch.zeros((len(batch), longest), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, (p, a) in enumerate(batch):
                ids[r, : len(p) + len(a)] = torch.tensor(p + a)
                mask[r, : len(p) + len(a)] = 1
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for r, (p, a) in enumerate(batch):
                logits = out[r, len(p) - 1 : len(p) + len(a) - 1].float().cpu()
                yield start + r, logits, torch.tensor(a)


def _logp(logits: torch.Tensor, targets: torch.Tensor, t: float) -> np.ndarray:
    """log p of `targets` [A] under softmax(logits / t), float64 [A]."""
    return torch.log_softmax(logits.double() / t, dim=-1)[torch.arange(len(targets)),
                                                          targets].numpy()


def _map_pairs(model: Any, pairs: list[tuple[list[int], list[int]]], fn: Callable[..., R], *,
               to: Literal["main", "all"] = "main") -> list[R] | None:
    """``[fn(j, logits [A, V], targets [A]) for each pair j]`` (`_logits`), in the order of
    `pairs`. The pairs, longest first, are cut into batches of `BATCH` before any process takes
    a share (`starlora.distributed.map_groups`), so a pair's logits are the same bits with one
    process or N; the list is on the main process (``to="all"``: on every process; else None
    on the others). Under ZeRO-3 the forward passes gather the partitioned weights
    (`starlora.zero3.forward_hooks`): every process runs as many batches, padding included."""
    def share(items: list[tuple[int, tuple[list[int], list[int]]]],
              groups: list[int] | None) -> list[R]:  # groups: None only if BATCH were 1
        groups = groups if groups is not None else list(range(len(items)))
        with zero3.forward_hooks(model):
            return [fn(items[i][0], logits, targets)
                    for i, logits, targets in _logits(model, [pair for _, pair in items], groups)]

    return dist.map_groups(share, list(enumerate(pairs)), [len(p) + len(a) for p, a in pairs],
                           BATCH, to=to)


def fit(model: Any, pairs: list[tuple[list[int], list[int]]]) -> dict[str, float]:
    """``temperature``, ``tokens`` and the mean NLL per answer token at T = 1 and at the fitted
    T, over the gold answers of `pairs` (module doc); on every process, each of N running a
    share of the forward passes."""
    grid = temperature_grid()

    def nll(_: int, logits: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, float]:
        """The pair's summed NLL at each grid temperature [G], and at T = 1."""
        z = logits.double()
        picked = z[torch.arange(len(targets)), targets]
        return (np.array([float((torch.logsumexp(z / t, dim=-1) - picked / t).sum())
                          for t in grid]),
                float((torch.logsumexp(z, dim=-1) - picked).sum()))

    found = _map_pairs(model, pairs, nll, to="all")
    sums, one = np.zeros(len(grid)), 0.0
    for pair_sums, pair_one in found:  # in the order of `pairs`, whatever the processes
        sums += pair_sums
        one += pair_one
    count = sum(len(a) for _, a in pairs)
    if not count:
        raise StarloraError("calibrate: the labelled set has no answer tokens")
    temperature = best_on_grid(grid, sums / count)
    after = -sum(_map_pairs(model, pairs, lambda _, lg, tg: float(_logp(lg, tg, temperature)
                                                                   .sum()), to="all"))
    return {"temperature": temperature, "tokens": count, "nll_t1": one / count,
            "nll_fitted": after / count}


def _generated_signals(model, tokenizer, task, test, predictions, cfg, temps, keep):
    from starlora.evaluation import answer_token_indices

    pairs, spans = [], []
    for ex, p in zip(test, predictions):
        text = p["generated"]
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) < cfg.evaluation.max_new_tokens:  # it stopped: closed as answers are
            ids += task.answer_end_ids(tokenizer)
        span = task.extract_span(text)
        spans.append(answer_token_indices(tokenizer, ids, text, span) if span else [])
        pairs.append((task.prompt_ids(tokenizer, ex, keep), ids))  # cut as evaluation cut it

    def signals(i: int, logits: torch.Tensor, targets: torch.Tensor) -> dict[float, tuple]:
        found = {}
        for t in temps:
            lp = _logp(logits, targets, t)
            found[t] = (math.exp(lp[spans[i]].sum()) if spans[i] else 0.0, math.exp(lp.sum()),
                        math.exp(lp.mean()) if len(lp) else 0.0)
        return found

    rows = _map_pairs(model, pairs, signals)
    if rows is None:  # another process has them
        return None
    return {t: {name: [row[t][n] for row in rows]
                for n, name in enumerate(("answer", "msp", "perplexity"))} for t in temps}


def _choice_signals(model, tokenizer, task, test, predictions, temps, limit):
    pairs, owner = [], []
    for i, ex in enumerate(test):
        for text in task.choice_answers(ex):  # cut as evaluation's scoring cut them
            pairs.append(fit_pair(*task.encode(tokenizer, ex, answer=text), limit))
            owner.append(i)
    rows = _map_pairs(model, pairs, lambda _, logits, targets: {
        t: float(_logp(logits, targets, t).sum()) for t in temps})
    if rows is None:  # another process has them
        return None
    totals = {t: np.array([row[t] for row in rows]) for t in temps}
    out = {}
    for t in temps:
        conf = []
        for i, p in enumerate(predictions):
            ll = totals[t][[j for j, o in enumerate(owner) if o == i]]
            probs = np.exp(ll - ll.max()) / np.exp(ll - ll.max()).sum()
            chosen = int(np.argmax(p["choice_logprobs"]))
            conf.append(float(probs[chosen]))
        out[t] = {"answer": conf}
    return out


def calibrate(run_dir: str, *, progress: bool = True) -> dict[str, Any]:
    """Fit the temperature of the run's last adapter and measure the test set before and
    after (module doc); writes and returns ``rounds/<k>/calibration.json``'s content."""
    from starlora.adapters import load_adapter
    from starlora.models import load_model, prompt_window, token_limit
    from starlora.train_setup import encode_example

    store = RunStore.open(run_dir)
    cfg = store.config
    metrics = store.metrics()
    if not metrics:
        raise StarloraError(f"{run_dir}: no round finished yet")
    k = max(m["round"] for m in metrics)
    adapter = store.adapter_dir(k)
    if not store.has_adapter(k):
        raise StarloraError(f"{adapter}: round {k}'s adapter is gone; it cannot be calibrated")
    predictions = read_jsonl(store.paths.round_file(k, "predictions.jsonl"))
    task = make_task(cfg.task)
    data = set_aside_stop_set(load_data(cfg.task, task), cfg.active_learning.stop_set, cfg.seed)
    verify_data(store, data_hashes(cfg, data.pool, data.test, data.labelled, data.stop),
                ("pool", "test", "labelled"))  # the examples the run computed on
    by_id = {ex.id: ex for ex in [*data.pool, *data.labelled]}
    test = {ex.id: ex for ex in data.test}
    if sorted(test) != sorted(str(p["id"]) for p in predictions):
        raise StarloraError(f"{run_dir}: the test set rebuilt from config.yaml is not the one "
                            f"round {k} was evaluated on")
    test_examples = [test[str(p["id"])] for p in predictions]
    loaded = load_model(**cfg.model.model_dump())
    require_precision(store, cfg, loaded.model)
    model, tok = load_adapter(loaded.model, adapter), loaded.tokenizer
    labelled = [Example(r["id"], by_id[r["id"]].question, r["answer"], by_id[r["id"]].meta)
                for r in store.labelled() if r["id"] in by_id]
    limit = token_limit(model, cfg.training.max_length)  # as training and evaluation cut
    with zero3.forward_hooks(model):  # once for the three passes over the data (ZeRO-3)
        fitted = fit(model, [encode_example(task, tok, ex, limit) for ex in labelled])
        temps = (1.0, fitted["temperature"])
        if "choice_logprobs" in predictions[0]:
            signals = _choice_signals(model, tok, task, test_examples, predictions, temps,
                                      limit)
        else:
            signals = _generated_signals(model, tok, task, test_examples, predictions, cfg,
                                         temps, prompt_window(model, limit,
                                                              cfg.evaluation.max_new_tokens))
    correct = np.array([float(p["correct"]) for p in predictions])
    bins = cfg.evaluation.ece_bins

    def write() -> dict[str, Any]:
        result = {"round": k, "labelled": len(labelled), **fitted, "signals": {
            name: {when: _clean(signal_metrics(signals[t][name], correct, bins))
                   for when, t in (("before", temps[0]), ("after", temps[1]))}
            for name in signals[temps[0]]}}
        store.write_round(k, "calibration.json", result)
        return result

    return dist.on_main(write)


def _clean(found: dict[str, float]) -> dict[str, float | None]:
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in found.items()}


def summary(result: dict[str, Any]) -> str:
    """What `starlora calibrate` prints: the temperature and, per signal, before -> after."""
    lines = [f"round {result['round']}: temperature {result['temperature']:.3f} fitted on "
             f"{result['labelled']} labelled answers ({result['tokens']} tokens; NLL "
             f"{result['nll_t1']:.4f} -> {result['nll_fitted']:.4f} nats/token)"]
    for name, found in result["signals"].items():
        cells = []
        for q in ("ece", "ece-adaptive", "brier", "rcc-auc"):
            b, a = found["before"][q], found["after"][q]
            cells.append(f"{q} {'n/a' if b is None else f'{b:.4f}'} -> "
                         f"{'n/a' if a is None else f'{a:.4f}'}")
        lines.append(f"  {name + ':':<12} " + "  ".join(cells))
    return "\n".join(lines)
