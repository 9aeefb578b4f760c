"""The decoding loop (`starlora.generation.decode`) is transformers' ``generate`` written out:
the same tokens and logits, with each step reduced at once. Rows stop at different steps (a
mid-answer token is made a stop token), so padding, EOS and the rows that stopped are covered;
`compact` (dropping stopped rows) keeps the tokens and the per-token measures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from starlora.generation import BUCKET, decode, generate, stop_tokens
from starlora.tasks import Example, get_task

TASK = get_task("jsonl")
QUESTIONS = ["Hi", "What is 2 + 3?", "Tell me a story about a robot. " * 3,
             "Anna has 12 pencils. She gives away 5. How many are left?", "Why?"]


def prompts(tokenizer) -> list[list[int]]:
    return [TASK.prompt_ids(tokenizer, Example(f"q{i}", q, "")) for i, q in enumerate(QUESTIONS)]


def batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts left-padded into one batch: ids and mask [B, L]."""
    ps = prompts(tokenizer)
    longest = max(map(len, ps))
    ids = torch.full((len(ps), longest), tokenizer.pad_token_id or 0)
    mask = torch.zeros((len(ps), longest), dtype=torch.long)
    for r, p in enumerate(ps):
        ids[r, longest - len(p):] = torch.tensor(p)
        mask[r, longest - len(p):] = 1
    return ids, mask


def stop_mid_answer(model, tokenizer, steps: int) -> list[int]:
    """Make a token that greedy decoding produces mid-answer a stop token; returns the stops."""
    out = generate(model, tokenizer, prompts(tokenizer), max_new_tokens=steps, progress=False)
    first = out.tokens[0]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, first[len(first) // 2]]
    return stop_tokens(model, tokenizer)


def reference(model, tokenizer, ids, mask, stop, steps: int, sampling: bool):
    """transformers' generate on the same batch: new tokens [B, T] and raw logits [B, T, V]."""
    config = GenerationConfig(max_new_tokens=steps, do_sample=sampling, num_beams=1,
                              temperature=1.0 if sampling else None, top_k=0 if sampling else None,
                              top_p=1.0 if sampling else None,
                              pad_token_id=tokenizer.pad_token_id or 0,
                              eos_token_id=stop, output_logits=True, return_dict_in_generate=True)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


def cut(row: list[int], stop: list[int]) -> int:
    return next((t + 1 for t, tok in enumerate(row) if tok in stop), len(row))


@pytest.mark.parametrize("sampling", [False, True])
def test_decode_is_generate_step_by_step(tiny, sampling):
    model, tok = tiny.model.eval(), tiny.tokenizer
    stop = stop_mid_answer(model, tok, 12)
    ids, mask = batch(tok)
    torch.manual_seed(5)
    want, logits = reference(model, tok, ids, mask, stop, 12, sampling)
    for compact in (False, True):
        torch.manual_seed(5)
        got = decode(model, ids, mask, max_new_tokens=12, stop=stop, pad=tok.pad_token_id or 0,
                     temperature=1.0 if sampling else 0.0, measure=True, compact=compact)
        lengths = []
        for r, row in enumerate(want.tolist()):
            n = cut(row, stop)
            lengths.append(n)
            assert got.tokens[r] == row[:n]
            logp = torch.log_softmax(logits[r, :n].double(), -1)
            picked = logp.gather(1, torch.tensor(row[:n])[:, None])[:, 0].numpy()
            entropy = -(logp.exp() * logp).sum(-1).numpy()
            np.testing.assert_allclose(got.logprobs[r], picked, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got.nll[r], -picked, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got.entropy[r], entropy, rtol=1e-5, atol=1e-6)
            if not compact:  # the very logits generate made: the measures to the bit
                z = logits[r, :n]
                lp = z - torch.logsumexp(z, -1, keepdim=True)
                chosen = torch.tensor(row[:n])[:, None]
                assert np.array_equal(got.nll[r], -lp.gather(1, chosen)[:, 0].double().numpy())
        if not sampling:
            assert len(set(lengths)) > 1  # rows stopped at different steps


def test_decode_stops_when_every_row_has_stopped(tiny):
    """No forward pass after the last row stopped; with compact, each pass runs only the rows
    still decoding."""
    model, tok = tiny.model.eval(), tiny.tokenizer
    stop = stop_mid_answer(model, tok, 12)
    ids, mask = batch(tok)
    for compact in (False, True):
        rows_seen: list[int] = []
        hook = model.get_input_embeddings().register_forward_hook(
            lambda m, args, out, seen=rows_seen: seen.append(args[0].shape[0]))
        try:
            got = decode(model, ids, mask, max_new_tokens=40, stop=stop,
                         pad=tok.pad_token_id or 0, compact=compact)
        finally:
            hook.remove()
        lengths = [len(t) for t in got.tokens]
        stopped = [n for n, t in zip(lengths, got.tokens) if t[-1] in stop]
        if len(stopped) == len(lengths):
            assert len(rows_seen) == max(lengths)
        live = [sum(n > step for n in lengths) for step in range(len(rows_seen))]
        assert rows_seen == (live if compact else [len(lengths)] * len(rows_seen))


def test_generate_compact_keeps_tokens_and_measures(tiny):
    model, tok = tiny.model.eval(), tiny.tokenizer
    stop_mid_answer(model, tok, 12)
    kw = dict(max_new_tokens=12, batch_size=3, progress=False, measure=True)
    a = generate(model, tok, prompts(tok), compact=False, **kw)
    b = generate(model, tok, prompts(tok), compact=True, **kw)
    assert a.tokens == b.tokens and a.texts == b.texts
    for x, y in ((a.nll, b.nll), (a.entropy, b.entropy), (a.logprobs, b.logprobs)):
        for u, v in zip(x, y):
            np.testing.assert_allclose(v, u, rtol=1e-5, atol=1e-6)


def test_smollm2_decode_is_generate(smol):
    model, tok = smol.model.eval(), smol.tokenizer
    stop = stop_tokens(model, tok)
    ids, mask = batch(tok)
    want, _ = reference(model, tok, ids, mask, stop, 24, False)
    got = decode(model, ids, mask, max_new_tokens=24, stop=stop, pad=tok.pad_token_id)
    assert got.tokens == [row[:cut(row, stop)] for row in want.tolist()]


def test_decode_refuses_a_model_without_a_cache_argument():
    """A forward without transformers 5's `cache` would see one token a step and no past:
    decode says so instead of returning wrong tokens."""

    class NoCache(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, past_key_values=None):
            raise AssertionError("must not be called")

    ids = torch.ones((1, 3), dtype=torch.long)
    with pytest.raises(ValueError, match="NoCache.*cache"):
        decode(NoCache(), ids, torch.ones_like(ids), max_new_tokens=2, stop=[0], pad=0)


def test_decode_repeat_prefills_once_and_samples_as_repeated_rows(tiny):
    """K samples of one prompt from one prefill (`repeat`): the same draws, tokens and
    measures as K copies of the prompt prefilled K times; the prefill runs one row."""
    model, tok = tiny.model.eval(), tiny.tokenizer
    stop = stop_tokens(model, tok)
    one, k = torch.tensor([prompts(tok)[3]]), 4  # one prompt, no padding
    kw = dict(max_new_tokens=12, stop=stop, pad=tok.pad_token_id or 0, temperature=1.0,
              measure=True)
    torch.manual_seed(11)
    want = decode(model, one.repeat(k, 1), torch.ones_like(one).repeat(k, 1), **kw)
    rows_seen: list[int] = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda m, args, out: rows_seen.append(tuple(args[0].shape)))
    try:
        torch.manual_seed(11)
        got = decode(model, one, torch.ones_like(one), repeat=k, **kw)
    finally:
        hook.remove()
    assert rows_seen[0] == (1, one.shape[1]) and rows_seen[1][0] <= k
    assert got.tokens == want.tokens
    assert len(set(map(tuple, got.tokens))) > 1  # the samples differ
    for x, y in ((got.logprobs, want.logprobs), (got.nll, want.nll),
                 (got.entropy, want.entropy)):
        for u, v in zip(x, y):
            np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def prefills(monkeypatch) -> list[int]:
    """A list that collects the prompt rows of every batch `generate` decodes."""
    import starlora.generation as generation

    rows: list[int] = []
    real = generation.decode

    def counted(model, ids, *args, **kwargs):
        rows.append(ids.shape[0])
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(generation, "decode", counted)
    return rows


def test_sampled_prompts_decode_alone_or_by_group_and_draw_as_alone(tiny, monkeypatch):
    """Without groups each prompt's K samples are a batch (what `generate` always did: the
    draws of that batch under torch's global generator seeded alike); with `groups` a
    group's prompts share a batch, each prompt's rows drawn from a generator of its own."""
    model, tok = tiny.model.eval(), tiny.tokenizer
    ps, k, seeds = prompts(tok), 3, [101, 7, 55, 3, 20]
    kw = dict(max_new_tokens=10, samples=k, temperature=1.0, progress=False, seeds=seeds)
    rows = prefills(monkeypatch)
    alone = generate(model, tok, ps, **kw)
    assert rows == [1] * len(ps)  # one prompt row a batch (its K rows from one prefill)
    rows.clear()
    together = generate(model, tok, ps, groups=["a", "b", "a", "a", "b"], **kw)
    assert rows == [3, 2]  # group "a" holds the longest prompt, so it comes first
    assert together.tokens == alone.tokens  # fp32, tiny model: no draw near a boundary moved
    stop, pad = stop_tokens(model, tok), tok.pad_token_id or 0
    for i, p in enumerate(ps):
        one = torch.tensor([p])
        torch.manual_seed(seeds[i])
        before = decode(model, one, torch.ones_like(one), max_new_tokens=10, stop=stop,
                        pad=pad, temperature=1.0, repeat=k)
        assert before.tokens == [alone.tokens[j] for j in alone.of(i)]
    assert len({tuple(t) for t in together.tokens}) > len(ps)  # samples differ
    with pytest.raises(ValueError, match="4 group labels for 5 prompts"):
        generate(model, tok, ps, groups=[0, 0, 1, 1], **kw)


def test_a_group_of_sampled_prompts_gives_the_same_bits_whatever_else_is_generated(tiny):
    """A group's prompts decode as one batch whatever other groups there are, in whatever
    order: its tokens and log-probabilities are the same bits, which is what lets each
    process take whole groups (`starlora.run.pool_scores`) and match one process."""
    model, tok = tiny.model.eval(), tiny.tokenizer
    ps, seeds = prompts(tok), [101, 7, 55, 3, 20]
    kw = dict(max_new_tokens=10, samples=3, temperature=1.0, progress=False)
    everything = generate(model, tok, ps, seeds=seeds, groups=[0, 1, 0, 1, 1], **kw)
    mine = [1, 3, 4]  # group 1 alone, listed in another order
    share = generate(model, tok, [ps[i] for i in mine[::-1]], seeds=[seeds[i] for i in mine[::-1]],
                     groups=[7, 7, 7], **kw)
    for n, i in enumerate(mine[::-1]):
        for a, b in zip(share.of(n), everything.of(i)):
            assert share.tokens[a] == everything.tokens[b]
            assert share.logprobs[a].tobytes() == everything.logprobs[b].tobytes()


def test_fixed_shapes_cut_batches_by_each_prompts_own_width():
    from starlora.generation import _batches

    lengths = [40, 33, 31, 17, 16, 5]  # rows, longest first (generate's order)
    got = _batches(list(range(6)), lengths, 2, fixed=True)
    widths = [(n // BUCKET + 1) * BUCKET for n in lengths]
    assert [w for _, w in got] == [48, 32, 32, 16]  # 16 tokens: width 32 (padding always)
    assert [b for b, _ in got] == [[0, 1], [2, 3], [4, 4], [5, 5]]
    for batch, width in got:
        assert len(batch) == 2 and {widths[j] for j in batch} == {width}
    assert sorted({j for b, _ in got for j in b}) == list(range(6))
    assert _batches(list(range(6)), lengths, 4, fixed=False) == [([0, 1, 2, 3], 40), ([4, 5], 16)]


def test_bf16_greedy_answers_do_not_depend_on_their_batch_mates(tiny):
    """In bf16 a row's numbers change with its batch (the kernels round by the row count, and
    a longer batch-mate's padding enters attention), which flips near-tie tokens; on the CPU
    this was written on, every prompt below got other bits among the others than alone with
    length-sorted batches (``fixed_shapes=False``).
    Greedy decoding below fp32 fixes them by default: each prompt alone and among the others
    (another row count, other batch-mates) gives the same tokens, log-probabilities and
    entropies, bit for bit."""
    model, tok = tiny.model.to(torch.bfloat16).eval(), tiny.tokenizer
    ps = [get_task("arith").prompt_ids(tok, ex) for ex in get_task("arith").generate("train", 12, 0)]
    assert len({len(p) // BUCKET for p in ps}) > 1  # more than one width
    kw = dict(max_new_tokens=12, batch_size=6, progress=False, measure=True)
    together = generate(model, tok, ps, **kw)
    for i, p in enumerate(ps):
        alone = generate(model, tok, [p], **kw)
        assert alone.tokens[0] == together.tokens[i]
        for name in ("logprobs", "nll", "entropy"):
            assert getattr(alone, name)[0].tobytes() == getattr(together, name)[i].tobytes()


def test_base_answers_below_fp32_are_cached_under_their_fixed_shapes(tmp_path, monkeypatch):
    """A fixed-shape answer's bits depend on the row count and bucket, so the base answers'
    cache key holds them below fp32 (one file per row count); fp32's key is as before (one file
    whatever the row count: its tokens do not depend on the batch)."""
    import importlib
    import json

    from starlora.models import load_model

    own_answers = importlib.import_module("starlora.scoring.own_answers")  # the module
    monkeypatch.setattr(own_answers, "default_score_cache_dir", lambda: tmp_path)
    loaded = load_model("tiny-llama", device="cpu", dtype="float32", seed=0)
    model, tok = loaded.model.eval(), loaded.tokenizer
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        for rows in (2, 3):
            got = own_answers.base_answers(model, tok, prompts(tok), fingerprint="tiny",
                                           dtype=dtype, max_new_tokens=6, batch_size=rows,
                                           progress=False)
            assert len(got.tokens) == len(QUESTIONS)
    keys = [json.loads(p.read_text()) for p in tmp_path.glob("*.key.json")]
    shapes = sorted(str(k["generation"].get("fixed_shapes")) for k in keys)
    assert shapes == ["None", "{'bucket': 16, 'rows': 2}", "{'bucket': 16, 'rows': 3}"]


def test_generation_stops_at_the_chat_templates_turn_end() -> None:
    """A model whose EOS and generation config name another token (as a config converted from
    a GGUF file may leave out Gemma's ``<end_of_turn>``) still stops at the token its chat
    template closes an assistant turn with: here the head always picks that token, and each
    answer is that one token, not `max_new_tokens` of them."""
    import copy

    from starlora.models import load_model
    from starlora.tasks.base import turn_end_ids

    loaded = load_model("tiny-llama", device="cpu", dtype="float32")
    model, tok = loaded.model, copy.deepcopy(loaded.tokenizer)
    turn = turn_end_ids(tok)[-1]  # <|im_end|>
    tok.eos_token = "<|endoftext|>"
    model.generation_config.eos_token_id = tok.eos_token_id
    assert tok.eos_token_id != turn and turn in stop_tokens(model, tok)
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[turn] = 1e3
    model.set_output_embeddings(biased)
    out = generate(model, tok, prompts(tok), max_new_tokens=6, progress=False)
    assert out.tokens == [[turn]] * len(QUESTIONS)
