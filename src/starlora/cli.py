"""The ``starlora`` command line.

    starlora demo                       # a whole small experiment on the embedded model
    starlora run [CONFIG.yaml] [--set k=v ...] [--run-dir DIR]   # no CONFIG: resume DIR
    starlora status RUN_DIR [--json]
    starlora export RUN_DIR --out FILE [--format F]; starlora import RUN_DIR FILE [--format F]
    starlora annotate RUN_DIR [--host 127.0.0.1] [--port 8765] [--token T]
    starlora score --model M --task T --data FILE --out scores.jsonl
    starlora report RUN_DIR... --out DIR [--comparisons YAML]
    starlora uncertainty RUN_DIR...; starlora calibrate RUN_DIR   # test PE/ME; temperature

Errors caused by input (bad data, bad config, unknown model...) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, get_args

from starlora import __version__
from starlora.errors import StarloraError
from starlora.noise import LIBRARY_NOISE, library_noise_silenced  # noqa: F401 - re-exported
from starlora.run.formats import FORMATS  # of answer files (--format)
from starlora.tasks.base import AnswerSource, PromptStyle


def _cmd_version(args: argparse.Namespace) -> int:
    import peft
    import torch
    import transformers

    print(f"starlora {__version__} (torch {torch.__version__}, transformers "
          f"{transformers.__version__}, peft {peft.__version__})")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from starlora import distributed as dist
    from starlora.datafiles import load_examples
    from starlora.generation import sampled_group_size
    from starlora.io import write_jsonl
    from starlora.models import load_model
    from starlora.scoring import score_base, score_examples, score_own_answers
    from starlora.scoring.own_answers import GENERATION_BATCH
    from starlora.tasks import get_task

    measures = tuple(m.strip() for m in args.measures.split(",") if m.strip())
    generated = args.answers == "generated"
    task = get_task(args.task, prompt_style=args.prompt_style)
    examples = load_examples(args.data, task, limit=args.limit, require_answer=not generated)
    dist.setup(cpu=args.device == "cpu" or None)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    if args.adapter and not args.base:  # --base: the frozen model, without the adapter
        from starlora.adapters import load_adapter

        model = load_adapter(model, args.adapter)
    passes = 1 if args.base else args.mc_passes
    # checked by ScoringOptions (an unknown measure is a ConfigError)
    kwargs = dict(measures=measures, batch_size=args.batch_size, mc_passes=passes,
                  seed=args.seed, progress=dist.is_main())

    def records(share: list, groups: list[int] | None = None) -> list[dict]:
        """The output lines of `share` (this process's examples), in its order; `groups`:
        sampled answers a batch per group (`dist.map_groups`)."""
        if generated:
            scores, out = score_own_answers(model, tokenizer, task, share,
                                            max_new_tokens=args.max_new_tokens,
                                            samples=args.samples, groups=groups, **kwargs)
            rows = scores.to_records()
            for i, rec in enumerate(rows):
                rec["answer"] = out.best_text(i)
            return rows
        if args.base:
            return score_base(model, tokenizer, task, share, **kwargs).to_records()
        return score_examples(model, tokenizer, task, share, **kwargs).to_records()

    def lengths() -> list[int]:  # what each example costs: its prompt (+ gold answer) tokens
        if generated:
            return [len(task.prompt_ids(tokenizer, ex)) for ex in examples]
        return [sum(map(len, task.encode(tokenizer, ex))) for ex in examples]

    # every process scores its share; sampled answers several prompts a batch, in groups cut
    # before the shares, so the same batches whatever the process count
    per_group = sampled_group_size(args.samples, GENERATION_BATCH) if generated else 1
    rows = dist.map_groups(records, examples, lengths, per_group)
    if dist.is_main():
        write_jsonl(args.out, rows)
        print(f"wrote {len(examples)} scores to {args.out}", file=sys.stderr)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from starlora import distributed as dist
    from starlora.config import load_config
    from starlora.run.loop import run_experiment
    from starlora.run.oracle import waiting
    from starlora.run.store import RunPaths

    if args.config is None:  # resume from the run's own config.yaml
        if not args.run_dir:
            raise StarloraError("starlora run: give a config file, or --run-dir RUN to resume "
                                "a run from its own config.yaml")
        own = RunPaths(args.run_dir).config
        if not own.is_file():
            raise StarloraError(f"{args.run_dir}: not a run directory (no config.yaml); "
                                "give the config file to start a run there")
        config = load_config(own, args.set, stored=True)
        run_dir = args.run_dir
    else:
        config = load_config(args.config, args.set)
        run_dir = args.run_dir or config.output.run_dir or str(Path("runs") / Path(args.config).stem)
    if args.check:  # every input check of a run, without a model or a run directory
        from starlora.run.data import describe_plan
        from starlora.run.loop import checked_inputs

        _, data, n_rounds, _ = checked_inputs(config)
        print("\n".join([*describe_plan(config, data, n_rounds), f"run dir:  {run_dir}"]))
        return 0
    store = run_experiment(config, run_dir, allow_precision_change=args.allow_precision_change)
    if not dist.is_main():  # the main process reports
        return 0
    pending = store.pending()
    if pending:  # a human oracle: the run waits for answers
        print(waiting(run_dir, len(pending), store.current_round()))
        return 0
    print(f"run finished: {run_dir} (starlora status {run_dir}; starlora report {run_dir})")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from starlora.report_confidence import status_lines
    from starlora.run.store import RunStore

    status = RunStore.open(args.run_dir).status()
    print(json.dumps(status) if args.json else "\n".join(status_lines(args.run_dir, status)))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from starlora.run.labels import export_message, export_queries
    from starlora.run.store import RunStore

    n = export_queries(RunStore.open(args.run_dir), args.out, args.format, replace=args.force)
    print(export_message(n, args.out, args.format), file=sys.stderr)
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from starlora.run.labels import import_labels, import_message
    from starlora.run.store import RunStore

    store = RunStore.open(args.run_dir)
    applied, left = import_labels(store, args.file, args.format, revise=args.revise)
    print(import_message(store, args.run_dir, applied, left))
    return 0


def _cmd_annotate(args: argparse.Namespace) -> int:
    from starlora.annotate import serve

    serve(args.run_dir, host=args.host, port=args.port, token=args.token)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from starlora.report import build_report
    from starlora.run.finding import chosen_runs

    run_dirs, notes = chosen_runs(args.run_dirs, finished_only=args.finished_only)
    print("".join(f"note: {note}\n" for note in notes), end="", file=sys.stderr)
    written = build_report(run_dirs, args.out, args.comparisons, notes)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def _cmd_uncertainty(args: argparse.Namespace) -> int:
    from starlora import distributed as dist
    from starlora.run.uncertainty import write_test_uncertainty

    models: dict = {}  # runs of one model load it once
    for run_dir in args.run_dirs:  # under N processes each scores a share; the main writes
        done = write_test_uncertainty(run_dir, models=models)
        if dist.is_main():
            print(f"wrote {done.n} test items to {done.path}" if done.written
                  else f"skipped {run_dir}: {done.path} exists")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from starlora import distributed as dist
    from starlora.run.calibrate import calibrate, summary

    result = calibrate(args.run_dir)  # under N processes each runs a share; the main writes
    if dist.is_main():
        print(summary(result))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from starlora.demo import run_demo

    run_demo(args.out, overrides=args.set)
    return 0


RUN_DIR_HELP = "a run directory (what `starlora run` wrote: config.yaml, state.json, rounds/)"


def _command(sub: Any, name: str, summary: str, example: str) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` opens with `summary` and ends with `example`."""
    return sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                          epilog="example:\n  " + example.replace("\n", "\n  "),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="starlora",
        description="Data-efficient LLM fine-tuning: STAR active learning with constraint LoRA.",
        epilog="`starlora COMMAND --help` describes a command, with an example.")
    parser.add_argument("--version", action="version", version=f"starlora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "version", "print the versions of starlora, torch, transformers and peft",
                 "starlora version      # starlora --version prints starlora's alone, at once")
    p.set_defaults(func=_cmd_version)

    p = _command(sub, "demo", "run a small complete experiment on the embedded model",
                 "starlora demo --set seed=1     # another seed; stopped, it resumes")
    p.add_argument("--out", default="starlora-demo", help="output folder (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the demo config, e.g. --set scoring.answers=gold")
    p.set_defaults(func=_cmd_demo)

    p = _command(sub, "run", "run (or resume) an active-learning experiment",
                 "starlora run configs/tiny.yaml --set seed=1 --run-dir runs/tiny-1\n"
                 "starlora run --run-dir runs/tiny-1     # resume it from its own config.yaml")
    p.add_argument("config", nargs="?", help="experiment YAML (see configs/); without it, "
                   "--run-dir resumes the run from its own config.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set training.lr=1e-4 (repeatable)")
    p.add_argument("--run-dir", help="run directory (default: output.run_dir or runs/<config>)")
    p.add_argument("--allow-precision-change", action="store_true", help="resume although "
                   "`auto` dtypes resolve to another precision now (a CPU run on a GPU, say)")
    p.add_argument("--check", action="store_true", help="check the config and data files and "
                   "say what the run will do; no model is loaded and nothing is written")
    p.set_defaults(func=_cmd_run)

    p = _command(sub, "status", "show where a run stands: round, phase, labels, pending queries",
                 "starlora status runs/tiny-1 --json")
    p.add_argument("run_dir", help=RUN_DIR_HELP)
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=_cmd_status)

    p = _command(sub, "export", "write the queries a run waits for, for people to answer",
                 "starlora export runs/mine --out queries.csv     # CSV: from the name")
    p.add_argument("run_dir", help=RUN_DIR_HELP)
    p.add_argument("--format", choices=["auto", *FORMATS], default="auto",
                   help="auto (default: from the --out name, .jsonl, .csv, .json), jsonl, csv "
                        "(with an empty answer column), or label-studio (a tasks JSON, and its "
                        "labelling config beside it as <name>.label_config.xml)")
    p.add_argument("--out", required=True, help="output file (label-studio: a tasks JSON)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_cmd_export)

    p = _command(sub, "import", "read answers to a run's pending queries",
                 "starlora import runs/mine queries.csv")
    p.add_argument("run_dir", help=RUN_DIR_HELP)
    p.add_argument("file", help="answers: JSONL {id, answer}, CSV with id and answer columns, "
                   "or a Label Studio JSON export")
    p.add_argument("--format", choices=["auto", *FORMATS], default="auto",
                   help="auto: from the file name (.jsonl, .csv, .json)")
    p.add_argument("--revise", action="store_true", help="replace answers saved to the open query")
    p.set_defaults(func=_cmd_import)

    p = _command(sub, "annotate", "serve a local web page where people answer the queries",
                 "starlora annotate runs/mine --port 8800")
    p.add_argument("run_dir", help=RUN_DIR_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8765, help="port (default: %(default)s; 0: any free)")
    p.add_argument("--token", help="the access token the URL carries (default: a random one; "
                   "one given here shows in the process list)")
    p.set_defaults(func=_cmd_annotate)

    p = _command(sub, "score", "uncertainty scores (PE, ME) of a data file",
                 "starlora score --model smollm2-135m-instruct --task gsm8k --data test.jsonl "
                 "--out scores.jsonl")
    p.add_argument("--model", required=True, help="built-in name, local folder or Hub id")
    p.add_argument("--adapter", help="LoRA adapter folder (peft format)")
    p.add_argument("--base", action="store_true", help="score with the adapter disabled")
    p.add_argument("--task", required=True, help="a registered task (a wrong name lists them)")
    p.add_argument("--data", required=True,
                   help="data file (.jsonl, .csv, .parquet or hf:<dataset>[@<config>]:<split>)")
    p.add_argument("--answers", choices=get_args(AnswerSource), default="generated",
                   help="score the model's own answers (records need no answer; default) or "
                        "the records' gold answers")
    p.add_argument("--samples", type=int, default=1,
                   help="generated answers per record: 1 greedy (default), N > 1 at "
                        "temperature 1")
    p.add_argument("--max-new-tokens", type=int, default=256, help="of a generated answer")
    p.add_argument("--seed", type=int, default=0, help="of MC-dropout masks and samples")
    p.add_argument("--prompt-style", choices=get_args(PromptStyle), default="plain",
                   help="plain: the prompt text as it is (default); chat: in the model's chat "
                        "template, for an instruct model")
    p.add_argument("--measures", default="pe,me", help="comma-separated: pe, me (default both)")
    p.add_argument("--mc-passes", type=int, default=1,
                   help="Monte-Carlo dropout passes (default 1: no dropout)")
    p.add_argument("--batch-size", default="auto", type=lambda s: s if s == "auto" else int(s),
                   help="examples per batch, or auto (default: by tokens, halved on OOM)")
    p.add_argument("--limit", type=int, help="score only the first N records")
    p.add_argument("--device", default="auto", help="auto (first GPU, else cpu), cpu, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--out", required=True, help="output JSONL, one object per record")
    p.set_defaults(func=_cmd_score)

    p = _command(sub, "report", "learning curves, calibration and tables from runs",
                 "starlora report runs/random-* runs/pe-* --out report/")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help=RUN_DIR_HELP + "; several, or a folder: every run below it")
    p.add_argument("--out", default="report",
                   help="output folder for PNGs, Markdown and CSV (default: report/ here)")
    p.add_argument("--comparisons", metavar="YAML", default=None,
                   help="the study's declared primary comparisons (arm, baseline, optional "
                        "equivalence margin; docs/study.md); default: each STAR arm against "
                        "random and pe/me")
    p.add_argument("--finished-only", action="store_true", help="leave out runs still going "
                   "(by default drawn up to their last evaluated round, and said so)")
    p.set_defaults(func=_cmd_report)

    p = _command(sub, "uncertainty", "score a finished run's test items after its last round "
                 "(PE/ME, 1 pass and MC, gold and own answers)",
                 "starlora uncertainty runs/tiny-1 runs/tiny-2")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help=RUN_DIR_HELP + "; several")
    p.set_defaults(func=_cmd_uncertainty)

    p = _command(sub, "calibrate", "fit one temperature on a run's labelled answers (last "
                 "adapter); ECE, Brier and AURC on the test set before and after",
                 "starlora calibrate runs/tiny-1     # writes rounds/<last>/calibration.json")
    p.add_argument("run_dir", help=RUN_DIR_HELP)
    p.set_defaults(func=_cmd_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line; under ``torchrun``/``accelerate launch`` every process runs it (see
    `starlora.distributed`): the main process prints and writes, the others work on shares.

    Run as a command (`argv` None: ``sys.argv``) it silences `LIBRARY_NOISE`, ends with 141
    and no traceback when its output pipe closes (``| head``), and a process of a launch ends
    through `starlora.distributed.leave`; called with an argument list (tests, scripts) it
    leaves every warning alone and returns."""
    if argv is None:
        try:
            with library_noise_silenced():
                code = _main(None)
        except BrokenPipeError:  # (nor can stdout's flush at exit print)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            code = 141
        from starlora import distributed as dist

        if dist.world_size() > 1:  # one process of a launch: end it here (`dist.leave`)
            dist.leave(code)
        return code
    return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from starlora import distributed as dist
    from starlora.models import tune_cpu_allocator
    from starlora.plugins import load_plugins

    dist.follow_launcher()
    tune_cpu_allocator()
    # an error the main process raised is printed once; another process's, by it with its rank
    who = "" if dist.world_size() == 1 else f" (rank {dist.rank()})"
    try:
        load_plugins()  # strategies and tasks of your own, before any config is read
        code = args.func(args)
        dist.teardown()
        return code
    except StarloraError as e:
        if not dist.raised_on_main(e) or dist.is_main():
            print(f"starlora: error{who}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if dist.is_main():
            print("starlora: interrupted (a run resumes where it stopped: run the same command)",
                  file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
