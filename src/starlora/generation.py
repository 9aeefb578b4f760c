"""Batched generation of answers: for evaluation and for label-free uncertainty.

`generate` takes prompt token ids and returns, per prompt and sample, the generated token ids
(up to and including the first stop token) and the log-probability of each. Prompts are sorted
by length and cut into batches (little padding), left-padded so that every row ends where
generation starts, and decoded with the model's KV cache (transformers' ``generate``); each row
stops at its own EOS (or any end-of-turn token the model's generation config names).

Greedy decoding is deterministic. Sampling (``temperature > 0``) generates each prompt's
samples as one batch, with torch's generator seeded by that prompt's seed, so a prompt's
samples do not depend on the other prompts or the batch size; the log-probabilities are then
those of the tempered distribution the tokens were drawn from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from starlora import zero3
from starlora.attention import attention_kernels


@dataclass
class Generated:
    """N prompts x S samples, row ``i * S + s`` = sample s of prompt i.

    `tokens` [N*S] lists of generated ids (the stop token included when one was generated);
    `logprobs` [N*S] float64 arrays of the same lengths (nats); `texts` [N*S] the decoded
    tokens without special tokens.
    """

    tokens: list[list[int]]
    logprobs: list[np.ndarray]
    texts: list[str]
    samples: int = 1

    def of(self, i: int) -> range:
        """Row indices of prompt i's samples."""
        return range(i * self.samples, (i + 1) * self.samples)

    def best_text(self, i: int) -> str:
        """Prompt i's most likely answer among its samples (the highest summed log-probability),
        stripped: the draft shown to people."""
        return self.texts[max(self.of(i), key=lambda j: float(self.logprobs[j].sum()))].strip()


def stop_tokens(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS and any end-of-turn token the model's generation config names."""
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stop = {tokenizer.eos_token_id, *(model_eos if isinstance(model_eos, list) else [model_eos])}
    stop.discard(None)
    return sorted(stop)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    samples: int = 1,
    temperature: float = 0.0,
    seeds: Sequence[int] | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> Generated:
    """Generate `samples` answers for each prompt (token ids) with `model` in eval mode.

    ``temperature == 0``: greedy, in batches of `batch_size` rows (several greedy samples
    would be copies: asking for them is an error). ``temperature > 0``: one batch of `samples`
    rows per prompt, seeded by ``seeds[i]`` (default: i).
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if samples < 1 or (samples > 1 and temperature <= 0):
        raise ValueError("several samples need a temperature > 0")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stop = stop_tokens(model, tokenizer)
    sampling = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sampling, num_beams=1,
        temperature=temperature if sampling else None, top_k=0 if sampling else None,
        top_p=1.0 if sampling else None, pad_token_id=pad, eos_token_id=stop or None,
        bos_token_id=tokenizer.bos_token_id, output_scores=True, return_dict_in_generate=True,
    )
    rows = [i for i in range(len(prompts)) for _ in range(samples)]
    order = sorted(range(len(rows)), key=lambda j: (-len(prompts[rows[j]]), j))
    if sampling:
        batch_size = samples
        seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    tokens: list[list[int]] = [[] for _ in rows]
    logprobs: list[np.ndarray] = [np.zeros(0) for _ in rows]
    was_training = model.training
    model.eval()
    try:
        # forward_hooks: a no-op unless the weights are partitioned (`starlora.zero3`)
        with zero3.inference_mode(), zero3.forward_hooks(model), attention_kernels(device):
            batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
            for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress,
                              dynamic_ncols=True):
                longest = max(len(prompts[rows[j]]) for j in batch)
                ids = torch.full((len(batch), longest), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), longest), dtype=torch.long)
                for r, j in enumerate(batch):
                    p = prompts[rows[j]]
                    ids[r, longest - len(p) :] = torch.tensor(p, dtype=torch.long)
                    mask[r, longest - len(p) :] = 1
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                           enabled=sampling):
                    if sampling:
                        torch.manual_seed(seeds[rows[batch[0]]])
                    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                         generation_config=config,
                                         synced_gpus=zero3.enabled())  # equal forward counts
                new = out.sequences[:, longest:].tolist()
                # log-softmax of the (tempered) scores the tokens were chosen from
                logp = model.compute_transition_scores(out.sequences, out.scores,
                                                       normalize_logits=True)
                logp = logp.double().cpu().numpy()
                for r, j in enumerate(batch):
                    n = next((t + 1 for t, tok in enumerate(new[r]) if tok in stop), len(new[r]))
                    tokens[j], logprobs[j] = new[r][:n], logp[r, :n]
    finally:
        model.train(was_training)
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    return Generated(tokens, logprobs, texts, samples)
