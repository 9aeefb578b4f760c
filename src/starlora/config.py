"""Experiment configuration: one YAML file with sections model, lora, training, task, scoring,
active_learning, evaluation, output; ``--set section.key=value`` overrides any field.

Unknown keys and wrong types are errors that name the file, the line and the key::

    configs/obqa.yaml:14: training.lr: Input should be a valid number

Every default below is the STAR paper's unless its comment says otherwise.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from starlora.acquisition import STRATEGIES
from starlora.acquisition.base import (
    LAMBDA_END,
    LAMBDA_SCHEDULE,
    LAMBDA_SCHEDULES,
    LAMBDA_START,
)
from starlora.errors import ConfigError
from starlora.stopping import parse_rule
from starlora.tasks import TASKS, AnswerSource, PromptStyle


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = "smollm2-135m-instruct"  # built-in name, local folder, or Hub id
    device: str = "auto"  # auto = first GPU if any, else cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto = bf16 on GPUs with native bf16
    trust_remote_code: bool = False  # run the model repository's own code (off)
    # a Hub id's branch, tag or commit hash: pins the weights (None: the default branch)
    revision: str | None = None


class LoraConfig(_Section):
    r: int = Field(64, gt=0)  # rank of the LoRA update B·A
    alpha: float = Field(16, gt=0)  # scale of the update: alpha / r
    dropout: float = Field(0.1, ge=0, lt=1)  # on the input of A; also drives MC dropout
    target_modules: list[str] | None = None  # None = all attention + MLP projections
    init: Literal["gaussian", "default"] = "gaussian"  # Gaussian A, zero B, as the paper


class TrainingConfig(_Section):
    lr: float = Field(1.5e-4, gt=0)  # peak learning rate (AdamW)
    epochs: float = Field(3, gt=0)  # passes over the labelled set per round
    # optimizer steps per round whatever the labelled count (more passes over a small set,
    # fewer over a large one); None: `epochs` decides, so later rounds train for more steps
    steps: int | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)  # examples per optimizer step (before accumulation)
    grad_accum: int = Field(1, gt=0)  # batches accumulated per optimizer step
    max_grad_norm: float | None = 1.0  # gradient clipping; None = no clipping
    scheduler: Literal["linear", "cosine", "constant"] = "linear"  # learning-rate schedule
    warmup_ratio: float = Field(0.0, ge=0, lt=1)  # share of the steps spent warming up
    # constraint LoRA: decay on lora_B only. decoupled = AdamW-style decay of B (authors' code);
    # l2 = an explicit penalty b_decay/2 * ||B||^2 added to the loss; none = no constraint.
    b_decay: float = Field(0.5, ge=0)
    b_decay_mode: Literal["decoupled", "l2", "none"] = "decoupled"  # see b_decay
    warm_start: bool = False  # continue from the previous round's adapter (paper: fresh)
    # prompt + answer tokens, capped at the model's maximum positions; a longer pair loses its
    # prompt's oldest tokens (a chat prompt its template's header first), a generation's
    # prompt keeps room for max_new_tokens in those positions, and the run says how many
    # prompts each phase cut (docs: your own data, long prompts)
    max_length: int = Field(1024, gt=0)
    # autocast of the forward pass; auto = bf16 where the hardware has it natively (CUDA GPUs
    # with bf16, CPUs with AVX512-BF16 or AMX), else no (fp32). Not the paper's: it trained fp32
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"


def _known(value: str, names: Any, what: str) -> str:
    """`value` if it is one of `names` (read at validation time, so that tasks registered
    later count), else a ValueError listing them."""
    if value not in names:
        raise ValueError(f"unknown {what} {value!r}; known: {', '.join(sorted(names))}")
    return value


class TaskConfig(_Section):
    name: str = "obqa"  # gsm8k, boolq, obqa, jsonl (your own files), arith or calendar (generated)
    # data sources: .jsonl, .csv, .parquet, or hf:<dataset>[@<config>]:<split>
    train: str | None = None  # the pool; records may lack answers (see active_learning.oracle)
    test: str | None = None  # the evaluation split (answers required)
    labelled: str | None = None  # labels the user already has: the initial labelled set
    prompt_style: PromptStyle = "plain"  # chat: in a user turn of the chat template
    template: str | None = None  # str.format template with {question}; None = task default
    answer_prefix: str = " "  # put before the answer in plain style
    question_field: str = "question"  # the field (CSV: column) of the question
    answer_field: str = "answer"  # the field (column) of the answer
    id_field: str = "id"  # of the id; without one: from line and content
    choices: list[str] | None = None  # jsonl task: a fixed answer set
    answer_regex: str | None = None  # jsonl task: first group = final answer
    dedupe: bool = False  # drop records repeating an earlier question and answer
    pool_size: int | None = Field(None, gt=0)  # seeded random subset of the train file
    test_size: int | None = Field(None, gt=0)  # seeded random subset of the test file
    subset_seed: int = 0  # seed of those subsets (and of generated data), shared by all runs
    # drop pool records that repeat a test record (same normalised question; for choice tasks
    # the same option set in any order): they would inflate accuracy
    drop_test_overlap: bool = True


    @field_validator("name")
    @classmethod
    def _known_task(cls, v: str) -> str:
        return _known(v, TASKS, "task")


class ScoringConfig(_Section):
    mc_passes: int = Field(5, gt=0)  # Monte-Carlo dropout passes averaged per score
    # precision of the scoring forward passes: auto = bf16 on GPUs and on CPUs with native bf16
    # (avx512_bf16/AMX), float32 elsewhere; bf16 rankings agree with fp32 (docs/benchmarks.md)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    model_dropout: bool = False  # also sample the base model's own dropout layers
    batch_size: int | Literal["auto"] = "auto"  # auto: start large, halve on out-of-memory
    # tokens per batch when auto; default: 2048 on CPU (packed rows), 16384 on GPUs (padded)
    max_tokens_per_batch: int | None = Field(None, gt=0)
    # the baselines (pe, me, *-subtract) score with one deterministic pass, as the authors'
    # code does; the dynamic strategies keep mc_passes
    single_pass_baselines: bool = False
    # generated: PE/ME of the model's own answer (label-free, the default); gold: of the pool's
    # gold answer, as the authors' code does (needs answers in the pool)
    answers: AnswerSource = "generated"
    samples: int = Field(1, gt=0)  # generated answers per item: 1 greedy, N > 1 at temperature 1
    # the base term with generated answers: adapted (the default) = the base model scores the
    # adapted model's answer, the tokens the full term scores (no base generation, one more
    # forward pass); own = it scores its own greedy answer (the first study's runs; runs made
    # before this setting existed: ADDED_LATER). Why adapted: docs/strategies.md
    base_scores: Literal["own", "adapted"] = "adapted"
    # PE/ME of both terms as means over the answer's tokens instead of sums (not the paper's)
    per_token: bool = False
    max_new_tokens: int | None = Field(None, gt=0)  # of a generated answer; None: evaluation's


class ActiveLearningConfig(_Section):
    strategy: str = "pe"  # how queries are chosen (docs: strategies; why pe: results/README.md)
    initial_size: int = Field(500, gt=0)  # labels before round 0 (random picks)
    query_size: int = Field(500, gt=0)  # labels added per query
    rounds: int = Field(10, gt=0)  # training rounds; a query happens between two rounds
    budget: int | None = Field(None, gt=0)  # stop once this many examples are labelled
    # dynamic strategies: λ, the weight of the base model's uncertainty, falls from
    # lambda_start to lambda_end over the queries along this schedule
    lambda_schedule: str = LAMBDA_SCHEDULE  # linear, cosine, exponential or constant
    lambda_start: float = Field(LAMBDA_START, ge=0, le=1)  # λ at the first query
    lambda_end: float = Field(LAMBDA_END, ge=0, le=1)  # λ at the last query
    # minmax: dynamic mixes both terms min-max normalised over the pool (paper), subtract takes
    # the raw difference; raw_full: u_base is min-max normalised and u_full left raw in both,
    # as the authors' released code does
    normalize: Literal["minmax", "raw_full"] = "minmax"
    # score a seeded random subset of this many each round (at least query_size)
    pool_subsample: int | None = Field(None, gt=0)
    # kmeans: the query is one item per k-means cluster (prompt embeddings) of the strategy's
    # top diversity_pool x query_size, each its cluster's highest utility (not the paper's)
    diversity: Literal["none", "kmeans"] = "none"
    diversity_pool: float = Field(10, ge=1)  # see diversity
    # simulated: the pool's gold answers label the queries; human: the run stops after each
    # selection until the answers are imported (starlora export / import / annotate)
    oracle: Literal["simulated", "human"] = "simulated"
    # a query larger than the pool left: stop with an error, or take what is left (the run
    # then ends after the round that trains on the whole pool)
    on_exhausted: Literal["error", "take_rest"] = "error"
    # label-free stopping (starlora.stopping; not the paper's): N pool items set aside, never
    # selected, answered after every round; stop_when e.g. "agreement >= 0.95 for 2 rounds"
    stop_set: int = Field(0, ge=0)
    stop_when: str = "none"  # the stopping rule (see stop_set); none: run every round

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        return _known(v, STRATEGIES, "strategy")

    @field_validator("stop_when")
    @classmethod
    def _stopping_rule(cls, v: str) -> str:
        parse_rule(v)
        return v


    @field_validator("lambda_schedule")
    @classmethod
    def _known_schedule(cls, v: str) -> str:
        return _known(v, LAMBDA_SCHEDULES, "λ schedule")


class EvaluationConfig(_Section):
    mode: Literal["auto", "generate", "choice"] = "auto"  # auto: choice if the task has choices
    max_new_tokens: int = Field(256, gt=0)  # of a generated answer
    batch_size: int = Field(16, gt=0)  # test items per generation batch
    ece_bins: int = Field(15, gt=0)  # bins of the expected calibration error
    # K > 0: K answers sampled at temperature 1 per test item give the self-consistency
    # confidence (the share equal to the greedy answer); 0: off (not the paper's)
    samples: int = Field(0, ge=0)


class OutputConfig(_Section):
    run_dir: str | None = None  # --run-dir wins; default runs/<config name>
    report_to: list[str] = Field(default_factory=list)  # accelerate trackers, e.g. [tensorboard]
    keep_adapters: Literal["all", "last"] = "all"  # last: delete older rounds' adapters

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class ExperimentConfig(_Section):
    seed: int = Field(0, ge=0)  # of every random stream of a run (selection, training, ...)
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    active_learning: ActiveLearningConfig = Field(default_factory=ActiveLearningConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document to its 1-based line, for error messages."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = (*path, str(key.value))
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return lines


def _short(error: Exception) -> str:
    """A one-line reason for an error a YAML value raised outside the YAML parser."""
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error).split(":")[0]


class _Loader(yaml.SafeLoader):
    """YAML as configs mean it: only ``true``/``false`` (in any of YAML's cases) are booleans,
    as in YAML 1.2; ``yes``/``no``/``on``/``off`` stay words (a choice task's ``[yes, no]``),
    which a boolean setting still reads as true or false (pydantic)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                              re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def read_yaml(text: str) -> Any:
    """`text` read as YAML by a safe loader with YAML 1.2's booleans (`_Loader`): the one
    reader of configs and ``--set`` values."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"training.lr=1e-4"`` -> (["training", "lr"], 1e-4); the value is read as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item}: value is not valid YAML ({e})") from None
    except (ValueError, RecursionError) as e:  # an integer too long to convert, deep nesting
        raise ConfigError(f"--set {item}: value is not usable YAML ({_short(e)})") from None
    return key.strip().split("."), value


#: Settings added after runs were committed, each with the value that every run made before it
#: existed computed with. A run's stored ``config.yaml`` names every setting there was when it
#: was written, so one that it lacks means this value, whatever today's default is
#: (``load_config(..., stored=True)``), and `starlora.run.protocol` leaves a setting at this
#: value out of the protocol id. So a default may change without changing what an old run
#: directory says it did, or its id.
ADDED_LATER: dict[str, Any] = {
    "active_learning.diversity": "none", "active_learning.diversity_pool": 10.0,
    "active_learning.stop_set": 0, "evaluation.samples": 0, "model.revision": None,
    "scoring.base_scores": "own",
    "scoring.per_token": False, "training.steps": None,
}


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, stored: bool = False
) -> ExperimentConfig:
    """Read a YAML experiment config (or the defaults when `path` is None) and apply
    ``key.sub=value`` overrides. Raises ConfigError naming file, line and key. `stored`: `path`
    is a run's own ``config.yaml``, whose missing `ADDED_LATER` settings take the value runs
    had before the setting existed, not today's default."""
    data: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    where = "<defaults>"
    if path is not None:
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            hint = (f"; a run directory resumes with --run-dir {where}"
                    if (Path(path) / "config.yaml").is_file() else "")
            raise ConfigError(f"{where}: cannot read config ({e}){hint}") from None
        try:
            data = read_yaml(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f"{where}:{mark.line + 1}" if mark else where
            raise ConfigError(f"{at}: not valid YAML ({getattr(e, 'problem', e)})") from None
        except (ValueError, RecursionError) as e:  # an integer too long to convert, deep nesting
            raise ConfigError(f"{where}: not usable YAML ({_short(e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: the top level must be a mapping of sections")
        lines = _key_lines(text)
    if stored:
        for key, value in ADDED_LATER.items():
            section, name = key.split(".")
            if isinstance(data.get(section) or {}, dict):
                data[section] = {name: value, **(data.get(section) or {})}
    origin: dict[tuple[str, ...], str] = {}
    for item in overrides or []:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {'.'.join(keys)}: parent is not a section")
        node[keys[-1]] = value
        origin[tuple(keys)] = f"--set {item}"
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        found = sorted(_problem(err, where, lines, origin) for err in e.errors())
        if len(found) == 1:
            raise ConfigError(found[0][1]) from None
        raise ConfigError(f"{where}: {len(found)} problems:\n"
                          + "\n".join(text for _, text in found)) from None


def _problem(err: Any, where: str, lines: dict[tuple[str, ...], int],
             origin: dict[tuple[str, ...], str]) -> tuple[tuple[int, str], str]:
    """(sort key, ``"<file:line or --set ...>: <key>: <reason>"``) of one validation error;
    an unknown key names the known one it is closest to, if any."""
    loc = tuple(str(p) for p in err["loc"])
    key = ".".join(loc) or "(top level)"
    prefixes = [loc[:i] for i in range(len(loc), 0, -1)]
    override = next((origin[p] for p in prefixes if p in origin), None) or next(
        (item for keys, item in origin.items() if loc and keys[:len(loc)] == loc), None)
    line = next((lines[p] for p in prefixes if p in lines), None)
    at = override or (f"{where}:{line}" if line else where)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        section = ExperimentConfig.model_fields.get(loc[0]) if len(loc) == 2 else None
        known = (list(section.annotation.model_fields) if section else  # type: ignore[union-attr]
                 list(ExperimentConfig.model_fields))
        close = difflib.get_close_matches(loc[-1], known, n=1)
        msg = "unknown key" + (f" (did you mean {'.'.join([*loc[:-1], close[0]])}?)"
                               if close else "")
    return ((1, override) if override else (0, f"{line or 0:09d}")), f"{at}: {key}: {msg}"


def flatten_config(config: ExperimentConfig) -> dict[str, Any]:
    """``{"section.key": value}`` for every field (``seed`` stays top-level)."""
    out: dict[str, Any] = {}
    for section, value in config.model_dump(mode="json").items():
        if isinstance(value, dict):
            out.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            out[section] = value
    return out


def dump_config(config: ExperimentConfig) -> str:
    """The resolved config as YAML (every field, defaults included)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
