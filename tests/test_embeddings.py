"""Prompt embeddings of the frozen base model (`starlora.scoring.embeddings`) and their cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from starlora.models import decoder_and_head
from starlora.scoring.embeddings import (
    EmbeddingCache,
    cached_embeddings,
    embed_prompts,
    embedding_cache_key,
)
from starlora.tasks import get_task


def prompts(tokenizer, n: int = 12) -> list[list[int]]:
    task = get_task("arith")
    return [task.prompt_ids(tokenizer, ex, 1024) for ex in task.generate("train", n, 0)]


def mean_state(model, ids: list[int]) -> np.ndarray:
    """The definition, one prompt at a time: the mean of the final hidden states."""
    body, _ = decoder_and_head(model)
    with torch.no_grad():
        h = body(input_ids=torch.tensor([ids])).last_hidden_state[0]
    return h.mean(dim=0).numpy()


def test_embeddings_are_mean_pooled_final_states_whatever_the_batch(tiny) -> None:
    P = prompts(tiny.tokenizer)
    assert len({len(p) for p in P}) > 1  # right padding in the batches below
    E = embed_prompts(tiny.model, tiny.tokenizer, P, progress=False)
    width = decoder_and_head(tiny.model)[0].config.hidden_size
    assert E.shape == (len(P), width) and E.dtype == np.float32
    for i in (0, 5, 11):
        np.testing.assert_allclose(E[i], mean_state(tiny.model, P[i]), rtol=1e-4, atol=1e-5)
    one_by_one = embed_prompts(tiny.model, tiny.tokenizer, P, batch_size=1, progress=False)
    np.testing.assert_allclose(E, one_by_one, rtol=1e-4, atol=1e-5)
    assert embed_prompts(tiny.model, tiny.tokenizer, [], progress=False).shape == (0, width)
    with pytest.raises(ValueError, match="empty prompt"):
        embed_prompts(tiny.model, tiny.tokenizer, [[]], progress=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_an_embedding_is_the_same_bits_whatever_is_embedded_beside_it(tiny, dtype) -> None:
    """Fixed shapes: a prompt embedded alone, among all, in another order, or among a few of
    other lengths gives the same bytes, so a cache shared by runs (and chunks, and processes'
    shares) holds what any of them would compute. Length-sorted batches failed this in bf16."""
    P = prompts(tiny.tokenizer, 24)
    assert len({len(p) for p in P}) > 3
    kw = dict(dtype=dtype, progress=False, max_tokens_per_batch=256)
    together = embed_prompts(tiny.model, tiny.tokenizer, P, **kw)
    order = np.random.default_rng(0).permutation(len(P))
    shuffled = embed_prompts(tiny.model, tiny.tokenizer, [P[i] for i in order], **kw)
    assert shuffled.tobytes() == together[order].tobytes()
    for i in (0, 7, 23):
        alone = embed_prompts(tiny.model, tiny.tokenizer, [P[i]], **kw)
        assert alone.tobytes() == together[i:i + 1].tobytes()
    few = [3, 11, 17, 20]
    assert embed_prompts(tiny.model, tiny.tokenizer, [P[i] for i in few], **kw).tobytes() == \
        together[few].tobytes()
    # the length-sorted batches of before (fixed_shapes=False): the same vectors, other bits
    sorted_ = embed_prompts(tiny.model, tiny.tokenizer, P, fixed_shapes=False, **kw)
    np.testing.assert_allclose(sorted_, together, rtol=0.05, atol=0.05)


def test_the_adapter_is_disabled_and_the_weights_restored(tiny) -> None:
    from starlora.adapters import attach_lora

    P = prompts(tiny.tokenizer, 4)
    plain = embed_prompts(tiny.model, tiny.tokenizer, P, progress=False)
    model = attach_lora(tiny.model, r=4, dropout=0.1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    model.train()
    np.testing.assert_allclose(embed_prompts(model, tiny.tokenizer, P, progress=False), plain,
                               rtol=1e-5, atol=1e-6)
    assert model.training  # the caller's mode is back
    bf16 = embed_prompts(model, tiny.tokenizer, P, dtype=torch.bfloat16, progress=False)
    assert bf16.dtype == np.float32 and next(model.parameters()).dtype == torch.float32
    np.testing.assert_allclose(bf16, plain, rtol=0.1, atol=0.1)


def test_the_cache_computes_each_prompt_once_and_resumes_to_the_same_bytes(
    tiny, tmp_path: Path
) -> None:
    P = prompts(tiny.tokenizer, 10)
    key = embedding_cache_key("fp", dtype=torch.float32, max_length=1024,
                              shape=("tokens", 4096))
    calls: list[int] = []

    def compute(chunk):
        calls.append(len(chunk))
        return embed_prompts(tiny.model, tiny.tokenizer, chunk, progress=False)

    whole = EmbeddingCache(tmp_path / "a", key, chunk_size=4).get_or_compute(P, compute)
    assert calls == [4, 4, 2]
    # killed after the first chunk: the second call computes only the rest, to the same bytes
    cache = EmbeddingCache(tmp_path / "b", key, chunk_size=4)

    def dies(chunk):
        if calls:
            raise KeyboardInterrupt
        return compute(chunk)

    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute(P, dies)
    assert calls == [4]
    resumed = EmbeddingCache(tmp_path / "b", key, chunk_size=4)
    again = resumed.get_or_compute(P, compute)
    assert calls == [4, 4, 2] and resumed.computed == 6
    assert again.tobytes() == whole.tobytes()
    # found on disk in any order and subset, duplicates included; nothing computed
    calls.clear()
    picked = [P[7], P[2], P[7]]
    found = EmbeddingCache(tmp_path / "b", key, chunk_size=4).get_or_compute(picked, compute)
    assert calls == [] and found.tobytes() == whole[[7, 2, 7]].tobytes()
    files = sorted(p.name for p in resumed.folder.iterdir())
    assert files[-1] == "key.json" and all(f.endswith(".safetensors") for f in files[:-1])


def test_the_cache_key_separates_what_changes_an_embedding(tiny, tmp_path: Path) -> None:
    P = prompts(tiny.tokenizer, 3)
    kw = dict(fingerprint="fp", max_length=1024, directory=tmp_path, progress=False)
    a = cached_embeddings(tiny.model, tiny.tokenizer, P, dtype=torch.float32, **kw)
    b = cached_embeddings(tiny.model, tiny.tokenizer, P, dtype=torch.bfloat16, **kw)
    assert len(list(tmp_path.iterdir())) == 2 and a.tobytes() != b.tobytes()
    c = cached_embeddings(tiny.model, tiny.tokenizer, P, dtype=torch.float32,
                          **{**kw, "max_length": 512})
    assert len(list(tmp_path.iterdir())) == 3 and np.array_equal(a, c)
    # another batch shape rounds other bits: another folder
    cached_embeddings(tiny.model, tiny.tokenizer, P, dtype=torch.float32, batch_size=2, **kw)
    assert len(list(tmp_path.iterdir())) == 4
    # no fingerprint: computed every time, nothing written
    cached_embeddings(tiny.model, tiny.tokenizer, P, dtype=torch.float32,
                      **{**kw, "fingerprint": "", "directory": tmp_path / "none"})
    assert not (tmp_path / "none").exists()


def test_out_of_memory_halves_the_shape_into_the_halved_shapes_cache(
    tiny, tmp_path: Path
) -> None:
    """A batch of more than 2 rows runs out of memory: uncached, `embed_prompts` halves its
    batches (8 -> 4 -> 2 rows); cached, the halved shape's folder gets the values, the bytes
    that shape computes when it fits, and the first shape's folder gets none."""
    P = prompts(tiny.tokenizer, 10)
    rows: list[int] = []

    def limited(module, args, kwargs):
        rows.append(int(kwargs["input_ids"].shape[0]))
        if rows[-1] > 2:
            raise torch.OutOfMemoryError("pretend")

    body = decoder_and_head(tiny.model)[0]
    fits = embed_prompts(tiny.model, tiny.tokenizer, P, batch_size=2, progress=False)
    handle = body.register_forward_pre_hook(limited, with_kwargs=True)
    try:
        halved = embed_prompts(tiny.model, tiny.tokenizer, P, batch_size=8, progress=False)
        assert rows[:2] == [8, 4] and set(rows[2:]) == {2}
        assert halved.tobytes() == fits.tobytes()
        with pytest.raises(torch.OutOfMemoryError):
            embed_prompts(tiny.model, tiny.tokenizer, P, batch_size=8, halve_on_oom=False,
                          progress=False)
        kw = dict(fingerprint="fp", dtype=torch.float32, max_length=1024, progress=False)
        cached = cached_embeddings(tiny.model, tiny.tokenizer, P, batch_size=8,
                                   directory=tmp_path, **kw)
    finally:
        handle.remove()
    assert cached.tobytes() == fits.tobytes()
    folders = {json.loads((f / "key.json").read_text())["batch"][1]: f
               for f in tmp_path.iterdir()}
    assert sorted(folders) == [2, 4, 8]
    assert not list(folders[8].glob("*.safetensors"))
    assert not list(folders[4].glob("*.safetensors"))
    # the halved shape's folder is what a run asking for 2 rows reads: nothing computed
    rows.clear()
    handle = body.register_forward_pre_hook(limited, with_kwargs=True)
    try:
        again = cached_embeddings(tiny.model, tiny.tokenizer, P, batch_size=2,
                                  directory=tmp_path, **kw)
    finally:
        handle.remove()
    assert rows == [] and again.tobytes() == fits.tobytes()


# -- label-free: strategies on embeddings never read a pool item's answer -------------------
ARITH = get_task("arith").generate("train", 24, 3)
#: padded tokens a batch for these small pools: the default (4096 on a CPU) fills each width's
#: one batch with copies of its first prompt, 10 times the work for 40 prompts of 10 widths
SMALL_BATCH = 512


def pool_files(tmp_path: Path) -> dict[str, Path]:
    """The same 24 arith questions with gold answers, wrong answers and none."""
    out = {}
    for name in ("gold", "wrong", "none"):
        path = tmp_path / f"{name}.jsonl"
        answers = {"gold": [ex.answer for ex in ARITH], "wrong": ["#### 1"] * len(ARITH),
                   "none": [None] * len(ARITH)}[name]
        path.write_text("".join(json.dumps({"id": ex.id, "question": ex.question}
                                           | ({"answer": a} if a else {})) + "\n"
                                for ex, a in zip(ARITH, answers)))
        out[name] = path
    return out


def selections(model, tokenizer, path: Path, pe: bool) -> list[list[str]]:
    """typiclust's and (pe or random)+kmeans's choice of 6 from the file's first 20, the last
    4 labelled; PE on the model's own answers."""
    from starlora.acquisition import make_strategy
    from starlora.datafiles import load_examples
    from starlora.scoring import score_own_answers

    task = get_task("arith")
    examples = load_examples(path, task, require_answer=False)
    E = embed_prompts(model, tokenizer, [task.prompt_ids(tokenizer, ex, 1024)
                                         for ex in examples], progress=False,
                      max_tokens_per_batch=SMALL_BATCH)
    ids = [ex.id for ex in examples[:20]]
    table = {"embedding": E[:20], "labelled_embedding": E[20:]}
    inner = "random"
    if pe:
        scores, _ = score_own_answers(model, tokenizer, task, examples[:20], max_new_tokens=8,
                                      mc_passes=1, progress=False)
        table["pe"], inner = scores.pe, "pe"
    return [make_strategy(name, diversity=diversity, diversity_pool=2).select(
                ids, table, 6, query_index=0, rng=np.random.default_rng(11))
            for name, diversity in (("typiclust", "none"), (inner, "kmeans"))]


def test_typiclust_and_diversity_do_not_read_the_answers(tiny, tmp_path: Path) -> None:
    picks = [selections(tiny.model, tiny.tokenizer, path, pe=True)
             for path in pool_files(tmp_path).values()]
    assert picks[0] == picks[1] == picks[2]
    assert all(len(p) == 6 == len(set(p)) for p in picks[0])


@pytest.mark.slow
def test_smollm2_embeddings_tell_tasks_apart_and_do_not_read_the_answers(
    smol, tmp_path: Path, data_dir: Path
) -> None:
    """SmolLM2's mean-pooled prompt states put arith and GSM8K prompts (one template, other
    wording and length) in different k-means clusters, all but at most 2 of 40; typiclust and
    random+kmeans choose the same items whatever the answers."""
    from starlora.acquisition.diversity import kmeans
    from starlora.datafiles import load_examples

    arith, gsm8k = get_task("arith"), get_task("gsm8k")
    mixed = [arith.prompt_ids(smol.tokenizer, ex, 1024) for ex in ARITH[:20]] + \
        [gsm8k.prompt_ids(smol.tokenizer, ex, 1024)
         for ex in load_examples(data_dir / "gsm8k" / "test.jsonl", gsm8k)[:20]]
    E = embed_prompts(smol.model, smol.tokenizer, mixed, dtype=torch.bfloat16, progress=False,
                      max_tokens_per_batch=SMALL_BATCH)
    task = np.repeat([0, 1], 20)
    for seed in range(3):
        labels = kmeans(E, 2, np.random.default_rng(seed))
        assert min((labels != task).sum(), (labels == task).sum()) <= 2
    picks = [selections(smol.model, smol.tokenizer, path, pe=False)
             for path in pool_files(tmp_path).values()]
    assert picks[0] == picks[1] == picks[2]


def test_embeddings_take_the_width_the_head_reads() -> None:
    """OPT-350m projects the decoder's hidden_size down to word_embed_proj_dim before the
    head: the array was sized from hidden_size (64) for states 32 wide, and typiclust and
    k-means diversity failed with a broadcast error."""
    from starlora.models import load_model, tiny_model

    tokenizer = load_model("tiny-llama", device="cpu", dtype="float32").tokenizer
    opt = tiny_model("tiny-llama", tokenizer, model_type="opt", ffn_dim=128,
                     word_embed_proj_dim=32).eval()
    P = prompts(tokenizer, 4)
    E = embed_prompts(opt, tokenizer, P, progress=False)
    assert E.shape == (4, 32)
    np.testing.assert_allclose(E[1], mean_state(opt, P[1]), rtol=1e-4, atol=1e-5)
