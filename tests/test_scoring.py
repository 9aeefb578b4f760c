"""Scoring: PE/ME against a naive float64 reference, batching invariance, MC dropout, modes,
base scores with the adapter disabled, and the on-disk base-score cache."""

from __future__ import annotations

import copy
import json
import time
import warnings

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from starlora.adapters import attach_lora
from starlora.datafiles import load_examples
from starlora.errors import ConfigError, ScorerFallbackWarning
from starlora.models import cpu_has_native_bf16, load_model
from starlora.scoring import BaseScoreCache, Scores, base_cache_key, score_base, score_examples
from starlora.scoring.reference import reference_scores
from starlora.tasks import Example, get_task

TASK = get_task("jsonl")


@pytest.fixture(scope="module")
def examples(data_dir) -> list[Example]:
    """Very short to ~60-token examples: obqa items (2-token answers) plus hand-made ones."""
    obqa = load_examples(data_dir / "obqa" / "train.jsonl", get_task("obqa"), limit=4)
    return obqa + [
        Example("short", "Hi", "yes"),
        Example("long", "Tell me a story about a robot. " * 3, "Once upon a time a robot " * 8),
        Example("mid", "What is 2 + 3?", "It is 5, because 2 + 3 = 5."),
    ]


def with_lora(model, dropout: float = 0.0, seed: int = 0):
    """A peft model whose adapter really changes the outputs (lora_B is zero at init)."""
    torch.manual_seed(seed)  # lora_A's init draws from the global generator
    peft = attach_lora(model, r=4, dropout=dropout)
    gen = torch.Generator().manual_seed(seed)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return peft


def reference(model, tokenizer, examples, double=True) -> tuple[np.ndarray, np.ndarray]:
    """`starlora.scoring.reference.reference_scores` (one unbatched forward per example, full
    float64 softmax) of a float64 copy of the model (`double`), or of the model itself."""
    ref = (copy.deepcopy(model).double() if double else model).eval()
    return reference_scores(ref, tokenizer, TASK, examples)


def score(model, tokenizer, examples, **kw) -> Scores:
    return score_examples(model, tokenizer, TASK, examples, progress=False, **kw)


def test_matches_float64_reference_and_batching(tiny, examples):
    model = with_lora(tiny.model)
    pe, me = reference(model, tiny.tokenizer, examples)
    # padded batches of 3 mixing 2-token and 50-token answers: lots of padding
    s = score(model, tiny.tokenizer, examples, batch_size=3, max_padding=1.0, packed=False)
    np.testing.assert_allclose(s.pe, pe, rtol=1e-5)  # the issue asks for 1e-4
    np.testing.assert_allclose(s.me, me, rtol=1e-5)
    n = np.array([len(TASK.encode(tiny.tokenizer, ex)[1]) for ex in examples])
    np.testing.assert_array_equal(s.n_answer_tokens, n)
    np.testing.assert_allclose(s.pe_per_token, pe / n, rtol=1e-4)
    np.testing.assert_allclose(s.me_per_token, me / n, rtol=1e-4)
    assert s.ids == [ex.id for ex in examples]

    # layout (one row of packed sequences or padded rows), batch size, token budget and input
    # order do not change anything
    for kw in (
        dict(batch_size=1),
        dict(max_tokens_per_batch=64),
        dict(max_tokens_per_batch=10**6),
        dict(packed=False, max_tokens_per_batch=64),
        dict(packed=False, max_tokens_per_batch=10**6),
    ):
        other = score(model, tiny.tokenizer, examples, max_padding=1.0, **kw)
        np.testing.assert_allclose(other.pe, s.pe, rtol=1e-5)
        np.testing.assert_allclose(other.me, s.me, rtol=1e-5)
    flipped = score(model, tiny.tokenizer, examples[::-1])  # default: little padding
    assert flipped.ids == [ex.id for ex in examples[::-1]]
    np.testing.assert_allclose(flipped.select(s.ids).pe, s.pe, rtol=1e-5)
    np.testing.assert_allclose(flipped.select(s.ids).me, s.me, rtol=1e-5)


@pytest.fixture
def llama():
    return load_model("tiny-llama", device="cpu", dtype="float32", seed=0)


def test_mc_passes_sample_and_are_reproducible(llama, examples):
    # random tiny models predict near-uniformly, where entropy barely moves: sharpen the logits
    llama.model.model.norm.weight.data *= 30
    model = with_lora(llama.model, dropout=0.3)
    torch.manual_seed(123)
    s = score(model, llama.tokenizer, examples, mc_passes=3, max_tokens_per_batch=128)
    assert s.pe_passes.shape == s.me_passes.shape == (len(examples), 3)
    # every pass of every example differs from the others
    for passes in (s.pe_passes, s.me_passes):
        assert np.all(np.abs(np.diff(passes, axis=1)) > 1e-3)
    np.testing.assert_allclose(s.pe, s.pe_passes.mean(axis=1))
    torch.manual_seed(123)
    again = score(model, llama.tokenizer, examples, mc_passes=3, max_tokens_per_batch=128)
    np.testing.assert_array_equal(again.pe_passes, s.pe_passes)
    np.testing.assert_array_equal(again.me_passes, s.me_passes)
    # K = 1 is deterministic: the adapter is applied without dropout
    one = score(model, llama.tokenizer, examples)
    assert one.pe_passes is None
    pe, me = reference(model, llama.tokenizer, examples)
    np.testing.assert_allclose(one.pe, pe, rtol=1e-4)
    np.testing.assert_allclose(one.me, me, rtol=1e-4)


def test_mc_masks_follow_the_example_not_its_batch(llama, examples):
    """An example's MC passes depend on its id and the seed only: scoring it alone, in other
    company, in another order or padded instead of packed gives the same per-pass values, so a
    pool split between processes scores as one process does."""
    llama.model.model.norm.weight.data *= 30
    model = with_lora(llama.model, dropout=0.3)
    kw = dict(mc_passes=3, seed=7, max_tokens_per_batch=128)
    whole = score(model, llama.tokenizer, examples, **kw)
    assert np.all(np.abs(np.diff(whole.pe_passes, axis=1)) > 1e-3)  # the masks really sample
    half = examples[1::2][::-1]  # another company, reversed order, other batches
    part = score(model, llama.tokenizer, half, **kw)
    padded = score(model, llama.tokenizer, half, packed=False, **kw)
    ref = whole.pe_passes[1::2][::-1]
    np.testing.assert_allclose(part.pe_passes, ref, rtol=1e-5)
    np.testing.assert_allclose(part.me_passes, whole.me_passes[1::2][::-1], rtol=1e-5)
    np.testing.assert_allclose(padded.pe_passes, ref, rtol=1e-4)
    # another id draws other masks
    renamed = [Example(ex.id + "'", ex.question, ex.answer) for ex in half]
    other = score(model, llama.tokenizer, renamed, **kw)
    assert np.all(np.abs(other.pe_passes - ref) > 1e-4)


def test_plain_path_draws_the_masks_of_the_fast_path(llama, examples, monkeypatch):
    """On the plain path (the self-check's fallback, and ZeRO-3's), peft runs the LoRA layers
    itself and its dropout draws each example's masks from the example's stream: the MC passes
    of the fused path, to float rounding, whatever the batch."""
    from starlora.scoring import engine

    llama.model.model.norm.weight.data *= 30
    model = with_lora(llama.model, dropout=0.3)
    kw = dict(mc_passes=3, seed=7, max_tokens_per_batch=128)
    fast = score(model, llama.tokenizer, examples, **kw)
    monkeypatch.setattr(engine, "fast_path_disagreement", lambda *a, **k: "forced")
    with pytest.warns(ScorerFallbackWarning, match="forced"):
        plain = score(model, llama.tokenizer, examples, **kw)
        part = score(model, llama.tokenizer, examples[1::2][::-1], **kw)  # other batches
    assert np.all(np.abs(np.diff(plain.pe_passes, axis=1)) > 1e-3)  # the masks really sample
    np.testing.assert_allclose(plain.pe_passes, fast.pe_passes, rtol=1e-5)
    np.testing.assert_allclose(plain.me_passes, fast.me_passes, rtol=1e-5)
    np.testing.assert_allclose(part.pe_passes, plain.pe_passes[1::2][::-1], rtol=1e-5)
    assert not any("forward" in vars(m) for m in model.modules())  # the patches are gone


def test_bfloat16_scoring_ranks_like_float32_and_leaves_the_model(llama, examples):
    model = with_lora(llama.model, dropout=0.0)
    held = {n: (t, t.data.clone()) for n, t in (*model.named_parameters(), *model.named_buffers())}

    def unchanged() -> bool:  # the very tensors, with their values, after the cast is undone
        now = dict((*model.named_parameters(), *model.named_buffers()))
        return now.keys() == held.keys() and all(
            now[n] is t and t.dtype == v.dtype and torch.equal(t.data, v)
            for n, (t, v) in held.items())

    fp32 = score(model, llama.tokenizer, examples)
    bf16 = score(model, llama.tokenizer, examples, dtype="bfloat16")
    assert unchanged()

    def boom(module, args):  # the self-check runs in float32; then the cast weights fail
        if next(module.parameters()).dtype == torch.bfloat16:
            raise RuntimeError("boom")

    hook = model.get_base_model().model.layers[0].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        score(model, llama.tokenizer, examples, dtype="bfloat16")
    hook.remove()
    assert unchanged()
    np.testing.assert_allclose(bf16.pe, fp32.pe, rtol=0.05)
    assert not np.allclose(bf16.pe, fp32.pe, rtol=1e-6)  # really computed in bf16
    assert list(np.argsort(bf16.pe)) == list(np.argsort(fp32.pe))
    with pytest.raises(ConfigError, match="scoring.dtype"):
        score(model, llama.tokenizer, examples, dtype="float16")


def test_bfloat16_self_check_runs_in_the_callers_precision(smol, examples):
    """A SmolLM2 adapter whose bf16 fast path and bf16 plain forward round apart by more than
    the bf16 tolerance (found by search: lora_B = 0.1 * N(0, 1), seed 0): the check runs on
    the fp32 caller, so bf16 scoring keeps the fast path, and its error against fp32 is of the
    order of the plain bf16 forward's (which a model that is itself bf16 falls back to)."""

    model = with_lora(smol.model, dropout=0.1, seed=0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.mul_(0.5)
    try:
        fp32 = score(model, smol.tokenizer, examples)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ScorerFallbackWarning)
            fast = score(model, smol.tokenizer, examples, dtype="bfloat16")
        with pytest.warns(ScorerFallbackWarning, match=r"ME .* vs .*"):  # bf16 vs bf16
            plain = score(copy.deepcopy(model).to(torch.bfloat16), smol.tokenizer, examples)
        for measure in ("pe", "me"):
            ref = getattr(fp32, measure)
            err_fast = np.abs(getattr(fast, measure) - ref).sum()
            err_plain = np.abs(getattr(plain, measure) - ref).sum()
            assert 0 < err_fast < 2 * err_plain + 1e-2 * np.abs(ref).sum(), measure
    finally:
        model.unload()


def test_mc_passes_identical_without_dropout(llama, examples):
    model = with_lora(llama.model, dropout=0.0)
    s = score(model, llama.tokenizer, examples, mc_passes=3)
    one = score(model, llama.tokenizer, examples)
    for k in range(3):
        np.testing.assert_array_equal(s.pe_passes[:, k], one.pe)
        np.testing.assert_array_equal(s.me_passes[:, k], one.me)


def test_only_dropout_trains_and_modes_are_restored(llama, examples):
    model = with_lora(llama.model, dropout=0.3)
    model.train()
    model.get_base_model().model.layers[1].eval()  # a mixed state must come back exactly
    before = {name: m.training for name, m in model.named_modules()}
    seen: dict[str, bool] = {}
    patched: set[str] = set()

    def spy(module, args):
        seen.update({name: m.training for name, m in model.named_modules()})
        patched.update(name for name, m in model.named_modules() if "forward" in vars(m))

    def unpatched() -> bool:
        return not any("forward" in vars(m) for m in model.modules())

    handle = model.get_base_model().model.layers[0].register_forward_pre_hook(spy)
    score(model, llama.tokenizer, examples[:2], mc_passes=2)
    training = {name for name, on in seen.items() if on}
    assert training and all(".lora_dropout" in name for name in training)
    assert {name: m.training for name, m in model.named_modules()} == before
    # every LoRA layer ran the scoring forward and its dropout drew from the example streams
    # (2 layers x 7 targets each); peft's own forwards are back
    layers = {n for n in patched if ".lora_dropout." not in n}
    assert len(layers) == 2 * 7 and unpatched()
    assert patched - layers == {f"{n}.lora_dropout.default" for n in layers}

    handle.remove()

    def boom(module, args):
        raise RuntimeError("boom")

    model.get_base_model().model.layers[0].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        score(model, llama.tokenizer, examples[:2], mc_passes=2)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert unpatched()


@pytest.mark.parametrize("packed", [False, True])
def test_halves_batch_on_out_of_memory(llama, examples, packed):
    expected = score(llama.model, llama.tokenizer, examples)
    calls = []

    def limited(module, args, kwargs):
        n = int((kwargs["position_ids"] == 0).sum())  # sequences in this batch, either layout
        calls.append(n)
        if n > 2:
            raise torch.OutOfMemoryError("pretend")

    llama.model.model.register_forward_pre_hook(limited, with_kwargs=True)
    s = score(llama.model, llama.tokenizer, examples, batch_size=8, max_padding=1.0, packed=packed)
    assert calls[:2] == [1, 1]  # the self-check: one sequence, fast and plain
    calls = calls[2:]
    assert (
        calls[:2] == [len(examples), 4] and sum(calls[2:]) == len(examples) and max(calls[2:]) <= 2
    )  # 8 -> 4 -> 2
    np.testing.assert_allclose(s.pe, expected.pe, rtol=1e-5)


def test_base_scores_equal_plain_model(llama, examples):
    plain = score(llama.model, llama.tokenizer, examples)
    # a plain model has no adapter to disable
    np.testing.assert_array_equal(
        score_base(llama.model, llama.tokenizer, TASK, examples, progress=False).pe, plain.pe
    )
    model = with_lora(llama.model, dropout=0.3)
    adapted = score(model, llama.tokenizer, examples)
    base = score_base(model, llama.tokenizer, TASK, examples, progress=False, mc_passes=4)
    np.testing.assert_allclose(base.pe, plain.pe, rtol=1e-6)
    np.testing.assert_allclose(base.me, plain.me, rtol=1e-6)
    assert base.pe_passes is None  # always deterministic
    assert np.all(np.abs(adapted.pe - plain.pe) > 1e-4)
    # the adapter is back on afterwards
    np.testing.assert_array_equal(score(model, llama.tokenizer, examples).pe, adapted.pe)


def test_measures_subset_and_records(llama, examples):
    s = score(llama.model, llama.tokenizer, examples, measures=("pe",))
    assert np.all(np.isnan(s.me)) and np.all(np.isfinite(s.pe))
    records = s.to_records()
    assert records[0]["me"] is None and set(records[0]) == {
        "id",
        "pe",
        "pe_per_token",
        "me",
        "me_per_token",
        "n_answer_tokens",
    }
    json.dumps(records, allow_nan=False)
    back = Scores.from_records(records)
    np.testing.assert_array_equal(back.pe, s.pe)
    assert np.all(np.isnan(back.me))
    sub = s.select([examples[2].id, examples[0].id])
    assert sub.ids == [examples[2].id, examples[0].id] and sub.pe[1] == s.pe[0]
    with pytest.raises(ConfigError, match="measures"):
        score(llama.model, llama.tokenizer, examples, measures=("bogus",))


def _keys(tokenizer, examples, max_length=None) -> list[str]:
    from starlora.scoring import sequence_key
    from starlora.scoring.batching import fit

    return [sequence_key(*fit(*TASK.encode(tokenizer, ex), max_length)) for ex in examples]


def test_cache_hits_and_resumes(llama, examples, tmp_path):
    model = llama.model
    key = base_cache_key(llama.fingerprint, dtype=torch.float32)
    keys = _keys(llama.tokenizer, examples)
    calls: list[list[str]] = []

    def compute(chunk, keys):
        calls.append([ex.id for ex in chunk])
        return score(model, llama.tokenizer, chunk)

    cache = BaseScoreCache(tmp_path, key, chunk_size=3)
    first = cache.get_or_compute(examples, keys, compute)
    assert sorted(sum(calls, [])) == sorted(ex.id for ex in examples) and len(calls) == 3
    assert json.loads(cache.key_path.read_text()) == json.loads(json.dumps(key))

    calls.clear()
    again = BaseScoreCache(tmp_path, key).get_or_compute(examples[::-1], keys[::-1], compute)
    assert calls == [] and again.ids == [ex.id for ex in examples[::-1]]
    np.testing.assert_array_equal(again.select(first.ids).pe, first.pe)
    np.testing.assert_array_equal(again.select(first.ids).me, first.me)

    # a crash after 4 records, mid-way through the 5th line: resume computes only the rest,
    # and the writer cuts the torn tail before appending
    lines = cache.path.read_text().splitlines(keepends=True)
    cache.path.write_text("".join(lines[:4]) + lines[4][:20])
    resumed = BaseScoreCache(tmp_path, key).get_or_compute(examples, keys, compute)
    assert sorted(sum(calls, [])) == sorted(json.loads(x)["id"] for x in lines[4:])
    np.testing.assert_allclose(resumed.pe, first.pe, rtol=1e-6)
    on_disk = [json.loads(x)["key"] for x in cache.path.read_text().splitlines()]
    assert sorted(on_disk) == sorted(keys)  # the torn line is gone, nothing is doubled

    # another key (other measures, weights or dtype) is another file
    for other in (
        base_cache_key(llama.fingerprint, measures=("pe",), dtype=torch.float32),
        base_cache_key("tiny:other", dtype=torch.float32),
        base_cache_key(llama.fingerprint, dtype=torch.bfloat16),
    ):
        assert BaseScoreCache(tmp_path, other).path != cache.path
    with pytest.raises(ConfigError, match="fingerprint"):
        base_cache_key("", dtype=torch.float32)  # an unknown model must not share a key

    # score_base goes through the cache: its records (computed in fixed shapes, whose key
    # names the shape) are read back, not computed again
    via = BaseScoreCache(tmp_path, key)
    made = score_base(model, llama.tokenizer, TASK, examples, cache=via, progress=False)
    assert via.computed == len(examples)
    read = score_base(model, llama.tokenizer, TASK, examples, cache=via, progress=False)
    assert via.computed == 0
    np.testing.assert_array_equal(read.pe, made.pe)
    np.testing.assert_allclose(made.pe, first.pe, rtol=1e-5)


def test_cache_is_keyed_by_the_tokens_scored(llama, examples, tmp_path):
    """Same id, other question (arith with another subset_seed, two JSONL files numbered 1..N):
    computed anew. Other id, same tokens: reused. A max_length that cuts the prompt: anew."""
    from starlora.scoring import sequence_key

    cache = BaseScoreCache(tmp_path, base_cache_key(llama.fingerprint, dtype=torch.float32))

    def base(exs, max_length=None):
        out = score_base(llama.model, llama.tokenizer, TASK, exs, cache=cache, progress=False,
                         max_length=max_length)
        return out, cache.computed

    first, n = base([Example("1", "What is 2 + 3?", "5"), Example("2", "Name a colour.", "Red")])
    assert n == 2
    swapped, n = base([Example("1", "Name a colour.", "Red"), Example("2", "What is 2 + 3?", "5")])
    assert n == 0 and swapped.ids == ["1", "2"]
    np.testing.assert_array_equal(swapped.pe, first.pe[::-1])
    other, n = base([Example("1", "What is 2 + 4?", "6"), Example("x", "What is 2 + 3?", "5")])
    assert n == 1 and other.pe[1] == first.pe[0] and other.pe[0] != first.pe[0]
    twice, n = base([Example("a", "Hi", "yes"), Example("b", "Hi", "yes")])
    assert n == 1 and twice.pe[0] == twice.pe[1]  # one sequence is computed once
    _, n = base([examples[5]], max_length=20)  # the long example, its prompt cut
    assert n == 1
    # the prompt/answer boundary is part of the key
    assert sequence_key([1, 2], [3]) != sequence_key([1], [2, 3])
    assert sequence_key([1, 2], [3]) == sequence_key((1, 2), np.array([3]))


def test_cache_reader_leaves_a_torn_file_alone(tmp_path):
    """Another process may be mid-append: reading must not rewrite the file (the old cache
    'repaired' it, cutting the other writer's line)."""
    cache = BaseScoreCache(tmp_path, {"any": "key"})
    tmp_path.mkdir(exist_ok=True)
    good = json.dumps({"key": "k1", "id": "a", "pe": 1.0}) + "\n"
    raw = (good + json.dumps({"key": "k2", "id": "b", "pe": 2.0})[:17]).encode()
    cache.path.write_bytes(raw)
    for _ in range(2):
        records = cache.load()
    assert cache.path.read_bytes() == raw
    assert list(records) == ["k1"]


def _fake_scores(chunk: list[Example]) -> Scores:
    """Scores whose PE is the number at the start of each example's id."""
    v = np.array([float(ex.id.split("-")[0]) for ex in chunk])
    return Scores([ex.id for ex in chunk], v, v, v, v, np.ones(len(chunk), np.int64))


def _cache_writer(directory: str, start: int, stop: int, go: str | None = None) -> None:
    """One process writing into a shared cache: examples start..stop-1 (long ids, so that
    appends take a while), four per `get_or_compute` call as loop rounds do; it waits for the
    file `go` first when given, and `compute` leaves a ``<go>.computing`` file behind."""
    import time
    from pathlib import Path

    while go is not None and not Path(go).exists():
        time.sleep(0.01)

    def compute(chunk, keys):
        if go is not None:
            Path(go + ".computing").touch()
        return _fake_scores(chunk)

    exs = [Example(f"{i}-" + "x" * 20000, f"q{i}", f"a{i}") for i in range(start, stop)]
    for a in range(start, stop, 4):
        part = range(a, min(stop, a + 4))
        cache = BaseScoreCache(directory, {"shared": 1}, chunk_size=2)
        got = cache.get_or_compute(exs[a - start : part.stop - start], [f"k{i}" for i in part],
                                   compute)
        assert list(got.pe) == list(part)


def _records(cache: BaseScoreCache) -> list[dict]:
    lines = cache.path.read_bytes().split(b"\n")
    assert lines[-1] == b""  # no torn tail
    return [json.loads(line) for line in lines[:-1]]  # every line parses


def test_cache_concurrent_writers(tmp_path):
    """Three processes append overlapping ranges to one cache file at once: every line parses
    and every sequence is there."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # the fake compute needs no fresh interpreter
    ranges = [(0, 40), (20, 60), (30, 70)]
    procs = [ctx.Process(target=_cache_writer, args=(str(tmp_path), a, b)) for a, b in ranges]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    records = _records(BaseScoreCache(tmp_path, {"shared": 1}))
    assert {r["key"] for r in records} == {f"k{i}" for i in range(70)}
    assert all(r["pe"] == float(r["key"][1:]) for r in records)


def test_cache_reader_does_not_cut_another_writers_line(tmp_path):
    """This process is mid-way through appending a record (holding the lock) when another
    process reads the file, computes and appends: both records end up in the file. (The old
    cache's reader rewrote the file without the torn line, and the rest of it was lost.)"""
    import multiprocessing as mp

    from filelock import FileLock

    cache = BaseScoreCache(tmp_path, {"shared": 1})
    go = str(tmp_path / "go")
    other = mp.get_context("fork").Process(target=_cache_writer, args=(str(tmp_path), 1, 3, go))
    other.start()
    line = json.dumps({"key": "k0", **_fake_scores([Example("0-a", "q", "a")]).to_records()[0]})
    with FileLock(str(cache.path) + ".lock"), open(cache.path, "ab") as f:
        f.write(line[:25].encode())
        f.flush()
        open(go, "w").close()  # the other process starts reading now
        for _ in range(3000):  # until it has read the file and computed
            if other.exitcode is not None or (tmp_path / "go.computing").exists():
                break
            time.sleep(0.01)
        f.write(line[25:].encode() + b"\n")
    other.join(60)
    assert other.exitcode == 0
    assert sorted(r["key"] for r in _records(cache)) == ["k0", "k1", "k2"]


def test_granite_logits_scaling(examples):
    """Granite divides its logits by ``config.logits_scaling``: the fast path does too, so the
    self-check passes and scores equal those of the model's own forward."""
    from transformers import GraniteConfig, GraniteForCausalLM

    from starlora.models import load_tokenizer

    tok = load_tokenizer("tiny-llama")
    config = GraniteConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        logits_scaling=8.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    granite = GraniteForCausalLM(config).eval()
    granite.model.norm.weight.data *= 30  # away from near-uniform predictions
    for model in (granite, with_lora(granite)):
        pe, me = reference(model, tok, examples)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ScorerFallbackWarning)
            s = score(model, tok, examples)
        np.testing.assert_allclose(s.pe, pe, rtol=1e-5)
        np.testing.assert_allclose(s.me, me, rtol=1e-5)


class _PostProcessedLlama(LlamaForCausalLM):
    """Post-processes its logits in ``forward`` in a way the fast path cannot know."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3 + 0.5
        return out


def test_unknown_logit_processing_falls_back_to_plain_forward(llama, examples):

    llama.model.model.norm.weight.data *= 30
    odd = _PostProcessedLlama(llama.model.config)
    odd.load_state_dict(llama.model.state_dict())
    model = with_lora(odd.eval(), dropout=0.3)
    pe, me = reference(model, llama.tokenizer, examples, double=False)  # its own logits
    with pytest.warns(ScorerFallbackWarning, match=r"_PostProcessedLlama: the fast scorer "
                      r"disagrees with model.forward\(...\).logits \(PE .* vs .*\); scoring "
                      r"with the plain forward path"):
        s = score(model, llama.tokenizer, examples, max_tokens_per_batch=128)
    np.testing.assert_allclose(s.pe, pe, rtol=1e-5)
    np.testing.assert_allclose(s.me, me, rtol=1e-5)
    # MC passes on the plain path: peft's dropout samples, reproducibly
    with pytest.warns(ScorerFallbackWarning):
        torch.manual_seed(1)
        mc = score(model, llama.tokenizer, examples, mc_passes=2, max_tokens_per_batch=128)
        torch.manual_seed(1)
        again = score(model, llama.tokenizer, examples, mc_passes=2, max_tokens_per_batch=128)
    assert np.all(np.abs(np.diff(mc.pe_passes, axis=1)) > 1e-4)
    np.testing.assert_array_equal(again.pe_passes, mc.pe_passes)
    assert not any("forward" in vars(m) for m in model.modules())


def test_self_check_is_silent_on_known_models(tiny, examples):

    for model in (tiny.model, with_lora(tiny.model, dropout=0.3)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ScorerFallbackWarning)
            score(model, tiny.tokenizer, examples[:3])
            score(model, tiny.tokenizer, examples[:3], mc_passes=2, model_dropout=True)


def test_mask_sampler_rate_gain_and_seed():
    from starlora.scoring.lora_fastpath import MaskSampler

    def drop(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
        # project onto the identity: h is the masked input itself
        return sampler.project(x, torch.eye(x.shape[1], dtype=x.dtype), p)

    sampler = MaskSampler(torch.device("cpu"))
    sampler.block_elements = 4096  # many blocks: they must not repeat masks
    sampler.reseed(7)
    x = torch.ones(1000, 500)
    y, gain = drop(x, 0.1)
    assert abs((y == 0).float().mean().item() - 0.1) < 2e-3
    assert set(y.unique().tolist()) == {0.0, 1.0} and abs(gain - 1 / 0.9) < 1e-4
    blocks = y.view(-1, 8, 500)  # 4096 // 500 = 8 rows a block
    assert not torch.equal(blocks[0], blocks[1])
    assert not torch.equal(y, drop(x, 0.1)[0])  # the stream moves on
    sampler.reseed(7)
    torch.testing.assert_close(drop(x, 0.1)[0], y, rtol=0, atol=0)
    # any dtype, any p in (0, 1): kept elements are x itself, the gain undoes the drop rate
    for dtype, p in ((torch.bfloat16, 0.3), (torch.float64, 0.999), (torch.float32, 1e-6)):
        z = torch.randn(300, 70, dtype=torch.float64).to(dtype)
        out, gain = drop(z, p)
        kept = out != 0
        torch.testing.assert_close(out[kept], z[kept], rtol=0, atol=0)
        assert out.dtype == dtype and abs(kept.double().mean().item() * gain - 1) < 0.05 + 3 * p


def test_mask_sampler_dropout_applies_the_masks_of_project():
    """`dropout` (peft's own LoRA forward) masks each sequence's rows as `project` (the fused
    layers) does, scaled by the gain; padding rows are zeroed; an input whose rows the layout
    does not fit (a layer that sees other rows than the tokens) gets torch's dropout."""
    from starlora.scoring.lora_fastpath import MaskSampler

    sampler = MaskSampler(torch.device("cpu"))
    sampler.block_elements = 256  # several blocks per sequence
    x = torch.randn(2, 40, 24)  # 2 right-padded rows of 40: sequences of 37 and 25 tokens
    layout = ([11, 12], [0, 40], [37, 25])
    sampler.begin_pass(*layout)
    h, gain = sampler.project(x.reshape(-1, 24), torch.eye(24), 0.3)
    sampler.begin_pass(*layout)
    out = sampler.dropout(x, 0.3)
    assert out.shape == x.shape and gain > 1
    torch.testing.assert_close(out.reshape(-1, 24), h * gain)
    assert out[0, 37:].abs().sum() == 0 and out[1, 25:].abs().sum() == 0
    kept = out[0, :37] != 0
    assert 0.6 < kept.float().mean() < 0.8
    sampler.begin_pass(*layout)
    torch.manual_seed(0)
    other = sampler.dropout(torch.ones(30, 24), 0.3)  # 30 rows: the layout does not fit
    assert other.unique().tolist() == pytest.approx([0.0, 1 / 0.7])


def test_mask_sampler_off_cpu_uses_torch_dropout():
    """The path GPUs take (torch's dropout, seeded by ``torch.manual_seed`` per pass), run here
    on CPU tensors: the drop rate is p, the kept elements are already rescaled (gain 1) and
    the masks repeat under the same torch seed."""
    from starlora.scoring.lora_fastpath import MaskSampler

    sampler = MaskSampler(torch.device("cpu"))
    sampler.cpu = False
    x = torch.ones(1000, 500)
    torch.manual_seed(3)
    y, gain = sampler.project(x, torch.eye(500), 0.2)
    assert gain == 1.0 and abs((y == 0).float().mean().item() - 0.2) < 3e-3
    assert set(y.unique().tolist()) == {0.0, 1 / 0.8}
    torch.manual_seed(3)
    torch.testing.assert_close(sampler.project(x, torch.eye(500), 0.2)[0], y, rtol=0, atol=0)


@pytest.mark.parametrize("vocab_tile", [None, 1000, 777])  # one tile; 5 tiles; a ragged last one
def test_answer_measures_in_vocabulary_tiles(vocab_tile):
    """The tiled LM head with its float64 merge equals log-softmax over the whole vocabulary,
    for a head with a bias and a soft-capping transform, targets in every tile (the first and
    last token included)."""
    from starlora.scoring.measures import answer_measures

    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(32, 5000)
    with torch.no_grad():
        head.weight.copy_(torch.randn(5000, 32, generator=gen))
        head.bias.copy_(torch.randn(5000, generator=gen))
    hidden = torch.randn(300, 32, generator=gen)
    targets = torch.randint(0, 5000, (300,), generator=gen)
    targets[:3] = torch.tensor([0, 4999, 777])

    def cap(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z / 30) * 30

    with torch.no_grad():
        logp = torch.log_softmax(cap(copy.deepcopy(head).double()(hidden.double())), -1)
        nll, ent = answer_measures(hidden, head, targets, cap, True, vocab_tile)
        pe_only, no_ent = answer_measures(hidden, head, targets, cap, False, vocab_tile)
    torch.testing.assert_close(nll, -logp.gather(1, targets[:, None])[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent, -(logp.exp() * logp).sum(-1), rtol=1e-5, atol=0)
    torch.testing.assert_close(pe_only, nll, rtol=1e-6, atol=1e-7)
    whole = answer_measures(hidden, head, targets, cap, True, None)  # the merge adds ~nothing
    torch.testing.assert_close((nll, ent), whole, rtol=1e-6, atol=1e-6)
    # tiles of 9 to 64 rows (a ragged last one) give the same numbers
    few_rows = answer_measures(hidden, head, targets, cap, True, vocab_tile, max_elements=49728)
    torch.testing.assert_close(few_rows, (nll, ent), rtol=1e-6, atol=1e-6)
    assert no_ent.isnan().all()
    with pytest.raises(ConfigError, match="token id 5000"):
        answer_measures(hidden, head, targets.clamp(min=5000), cap, True, vocab_tile)


def _layer_outputs(layer, x, sampler=None):
    """(peft's forward, `LoraScoringForward`) of one LoRA layer on x."""
    from starlora.scoring.lora_fastpath import LoraScoringForward

    with torch.inference_mode():
        return layer(x), LoraScoringForward(layer, sampler)(x)


@pytest.mark.parametrize("rows", [3, 400])  # below / above the merge threshold
def test_fused_lora_forward_equals_peft(tiny, rows):
    from starlora.scoring.lora_fastpath import lora_linears

    model = with_lora(tiny.model).eval()
    layers = lora_linears(model)
    assert layers, "every tiny architecture gets peft LoRA Linear layers"
    gen = torch.Generator().manual_seed(0)
    for layer in layers:
        x = torch.randn(1, rows, layer.in_features, generator=gen)
        ours, peft = _layer_outputs(layer, x)
        torch.testing.assert_close(ours, peft, rtol=1e-5, atol=1e-5)
        with model.disable_adapter():  # falls back to peft: the base layer alone
            torch.testing.assert_close(*_layer_outputs(layer, x), rtol=0, atol=0)


def test_fused_lora_mc_masks_are_unbiased(llama):
    from starlora.scoring.lora_fastpath import MaskSampler, lora_linears

    model = with_lora(llama.model, dropout=0.3).eval()
    layer = lora_linears(model)[0]
    sampler = MaskSampler(torch.device("cpu"))
    x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(1))
    det, _ = _layer_outputs(layer, x)
    samples = torch.stack([_layer_outputs(layer, x, sampler)[1] for _ in range(4000)])
    assert samples.std(0).min() > 1e-3  # every output element moves between passes
    lora = det - layer.base_layer(x)  # the adapter's deterministic contribution
    # the MC mean converges on the deterministic output (dropout is rescaled, not biased)
    err = (samples.mean(0) - det).abs() / (samples.std(0) / 4000**0.5)
    assert err.max() < 5 and lora.abs().mean() > 10 * samples.std(0).mean() / 4000**0.5


def test_dora_falls_back_to_peft_and_still_samples(llama, examples):
    from peft import LoraConfig, get_peft_model

    llama.model.model.norm.weight.data *= 30
    torch.manual_seed(0)
    model = get_peft_model(
        llama.model, LoraConfig(r=4, lora_dropout=0.3, use_dora=True, target_modules=["q_proj", "v_proj"])
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    pe, me = reference(model, llama.tokenizer, examples)
    one = score(model, llama.tokenizer, examples)
    np.testing.assert_allclose(one.pe, pe, rtol=1e-4)
    np.testing.assert_allclose(one.me, me, rtol=1e-4)
    mc = score(model, llama.tokenizer, examples, mc_passes=2)
    assert np.all(np.abs(np.diff(mc.pe_passes, axis=1)) > 1e-4)


def test_wrapped_lora_forward_is_left_alone(llama, examples):
    from starlora.scoring.lora_fastpath import lora_linears

    model = with_lora(llama.model, dropout=0.3)
    layer = lora_linears(model)[0]
    calls = []
    original = layer.forward

    def hooked(x, *args, **kwargs):  # what accelerate's hooks install
        calls.append(x.shape)
        return original(x, *args, **kwargs)

    layer.forward = hooked
    expected = score(model, llama.tokenizer, examples)
    assert calls and vars(layer)["forward"] is hooked  # used while scoring, still in place
    assert layer not in lora_linears(model)
    del layer.forward
    np.testing.assert_allclose(score(model, llama.tokenizer, examples).pe, expected.pe, rtol=1e-5)


@pytest.mark.slow
def test_smollm2_scores_match_float64(smol, data_dir):
    """The real model (large activations, a 49k vocabulary, answers longer than one LM-head
    chunk): packed batches, the merged adapter (K = 1) and the shifted-logit PE/ME stay within
    1e-5 of float64."""
    gsm8k = get_task("gsm8k")
    examples = load_examples(data_dir / "gsm8k" / "test.jsonl", gsm8k, limit=10)
    examples = sorted(examples, key=lambda ex: -len(gsm8k.encode(smol.tokenizer, ex)[1]))[:2]
    torch.manual_seed(0)
    model = attach_lora(copy.deepcopy(smol.model), r=16)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 1e-3)
    s = score_examples(model, smol.tokenizer, gsm8k, examples, progress=False)
    ref = copy.deepcopy(model).double().eval()
    for i, ex in enumerate(examples):
        p, a = gsm8k.encode(smol.tokenizer, ex)
        assert len(a) > 85  # more answer positions than one chunk of logits
        with torch.no_grad():
            logp = torch.log_softmax(ref(input_ids=torch.tensor([p + a])).logits[0], -1)
        at = logp[len(p) - 1 : len(p) + len(a) - 1]
        assert s.pe[i] == pytest.approx(-at[torch.arange(len(a)), torch.tensor(a)].sum().item(), rel=1e-5)
        assert s.me[i] == pytest.approx(-(at.exp() * at).sum().item(), rel=1e-5)


def test_cached_base_scores_do_not_follow_batch_mates(smol, tmp_path):
    """A cached record must not depend on which run met its sequence first: in bf16 on
    SmolLM2, length-sorted packed batches moved an example's PE by up to 0.5 nats with its
    batch-mates on an Intel Xeon with AMX (checked below, so that this test can fail); the
    cache's fixed shapes give the same bits whatever the history of the file. Whether the mates
    matter is the CPU's bf16 kernels' doing: on an AMD EPYC with avx512_bf16 they changed no
    bit, and there the test runs the cache's checks and then skips, since it cannot show the
    fix. On a CPU without native bf16, torch emulates it: on an AVX2 AMD EPYC the mates changed
    no bit either, and the test ran past 8 minutes, so it skips at once."""
    if not cpu_has_native_bf16():
        pytest.skip("bf16 is emulated on this CPU: batch-mates change no bit, and it is slow")
    task = get_task("arith")
    pool = task.generate("train", 48, 1)
    kw = dict(progress=False, dtype=torch.bfloat16)
    packed = [score_examples(smol.model, smol.tokenizer, task, part, **kw).pe
              for part in (pool, pool[:24])]
    mates_matter = np.abs(packed[0][:24] - packed[1]).max() > 1e-3  # unfixed

    key = base_cache_key(smol.fingerprint, dtype=torch.bfloat16)
    at_once = score_base(smol.model, smol.tokenizer, task, pool,
                         cache=BaseScoreCache(tmp_path / "a", key), **kw)
    grown = BaseScoreCache(tmp_path / "b", key)
    for part in (pool[::5], pool[1::2], pool[::-1]):  # other subsets first, then the rest
        later = score_base(smol.model, smol.tokenizer, task, part, cache=grown, **kw)
    assert grown.computed > 0
    np.testing.assert_array_equal(later.pe[::-1], at_once.pe)
    np.testing.assert_array_equal(later.me[::-1], at_once.me)
    # the shape is in the key: another batch size is another file
    other = BaseScoreCache(tmp_path / "a", key)
    score_base(smol.model, smol.tokenizer, task, pool[:3], cache=other, batch_size=4, **kw)
    assert other.computed == 3
    if not mates_matter:
        pytest.skip("this CPU's bf16 kernels give the same bits whatever the batch-mates: the "
                    "cache's checks passed, but here they cannot show the fix")
