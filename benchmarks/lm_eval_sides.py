"""lm-evaluation-harness as the other side of `scoring.py --lm-eval` and `generation.py --lm-eval`.

lm-eval is a benchmark-only dependency (``pip install starlora[bench]``, lm-eval 0.4.13); the
harness's `HFLM` wraps the very model object our side uses (for bf16, a bf16 copy, as lm-eval's
own ``dtype="bfloat16"`` would load it), in eval mode, at a fixed batch size.

Helpers here: `hflm` (the wrapper), `LmEvalSplit` (a task whose prompt/answer token split is
lm-eval's, so that both sides score the very same tokens), `alternate` (the two sides timed in
alternation, medians and the median of paired ratios), `model_flops` (the matmul work a forward
needs) and `profile_table` (a ``torch.profiler`` summary of one call).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from starlora.tasks import Example, Task


def lm_eval_version() -> str:
    """The installed lm-eval's version; SystemExit naming the extra when it is missing."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"--lm-eval needs lm-eval: pip install 'starlora[bench]' ({e})") from e
    return lm_eval.__version__


def hflm(model: torch.nn.Module, tokenizer: Any, batch_size: int) -> Any:
    """lm-eval's `HFLM` around `model` (a peft model's injected base model: the LoRA layers run
    as peft runs them), at `batch_size` requests per forward."""
    import logging

    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # "pretrained is not a str"
    base = getattr(model, "get_base_model", lambda: model)()
    return HFLM(pretrained=base, tokenizer=tokenizer, batch_size=batch_size,
                device=str(next(model.parameters()).device))


def loglikelihood_requests(pairs: list[tuple[str, str]]) -> list[Any]:
    """lm-eval `Instance`s asking the log-likelihood of each (context, continuation)."""
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def generate_requests(contexts: list[str], until: list[str], max_gen_toks: int) -> list[Any]:
    """lm-eval `Instance`s for greedy ``generate_until`` on each context."""
    from lm_eval.api.instance import Instance

    kwargs = {"until": until, "max_gen_toks": max_gen_toks, "do_sample": False}
    return [Instance("generate_until", {}, (c, dict(kwargs)), i) for i, c in enumerate(contexts)]


def lm_eval_split(task: Task) -> Task:
    """`task` with lm-eval's context/continuation split and no EOS: the prompt's trailing
    whitespace (a chat template's final newline) moves to the front of the answer, as
    ``LM._encode_pair`` moves it, so that both sides score the same tokens."""

    class LmEvalSplit(type(task)):
        def prompt(self, ex: Example, tokenizer: Any = None) -> str:
            return super().prompt(ex, tokenizer).rstrip()

        def encode(self, tok: Any, ex: Example, answer: str | None = None,
                   add_eos: bool = True) -> tuple[list[int], list[int]]:
            full = super().prompt(ex, tok)
            space = full[len(full.rstrip()):]
            text = space + self.target(ex.answer if answer is None else answer)
            return self.prompt_ids(tok, ex), list(tok(text, add_special_tokens=False)["input_ids"])

    return LmEvalSplit(task.prompt_style, task.template, task.answer_prefix)


def alternate(sides: dict[str, Callable[[], Any]], repeats: int,
              between: Callable[[], None] | None = None) -> tuple[dict[str, list[float]], dict]:
    """Run each side `repeats` times, alternating which goes first; returns (seconds per side
    [repeats], last result per side). `between` runs after every repeat (e.g. a matmul probe)."""
    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    results: dict[str, Any] = {}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            results[name] = sides[name]()
            times[name].append(time.perf_counter() - t)
        if between is not None:
            between()
    return times, results


def paired_ratio(slow: list[float], fast: list[float]) -> float:
    """Median of the paired ratios slow[i] / fast[i]."""
    return statistics.median(s / f for s, f in zip(slow, fast))


def model_flops(model: torch.nn.Module, lengths: list[int], head_positions: int) -> float:
    """Matmul FLOPs of one forward over sequences of `lengths` tokens (no padding): the decoder
    body's weights (LoRA included) at every token, causal attention (2 x hidden x L^2 per layer:
    QK^T and AV, half the square), the LM head at `head_positions` positions only."""
    cfg = getattr(model, "config", None) or model.get_base_model().config
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    params = {id(p): p.numel() for p in model.parameters()}
    body = sum(params.values()) - params.get(id(emb), 0) - params.get(id(head), 0)
    tokens = sum(lengths)
    attn = 2 * cfg.hidden_size * cfg.num_hidden_layers * sum(n * n for n in lengths)
    return 2.0 * body * tokens + attn + 2.0 * head.numel() * head_positions


def profile_table(fn: Callable[[], Any], rows: int = 12) -> str:
    """``torch.profiler`` summary of one call of `fn` (CPU ops by self time, top `rows`)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
