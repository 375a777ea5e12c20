"""The ``srd`` command line: a thin layer over the spec loader and the pipeline."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from srd_ray.console import RunConsole
from srd_ray.errors import NothingToDo, SrdError


def _stage_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="srd", description="Selective Reflection Distillation on Ray")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_spec(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("spec", help="YAML job spec")
        command.add_argument(
            "--verbose", action="store_true",
            help="also show Ray's, the libraries' and the workers' own output (always in RUN_DIR/logs/srd.log)",
        )  # fmt: skip
        command.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a spec value, e.g. --set distill.num_workers=1 (repeatable)",
        )  # fmt: skip
        return command

    with_spec("validate", "validate a spec and print it with every default filled in")
    run = with_spec("run", "run the pipeline (or some stages) of a spec")
    run.add_argument("--stages", type=_stage_list, help="comma-separated stages to run (default: all enabled)")
    run.add_argument("--redo", type=_stage_list, default=[], help="delete and rerun these stages and all after them")

    rank = with_spec("rank", "run the rank stage alone on existing reflect output")
    rank.add_argument("--redo", action="store_true", help="replace an existing rank stage (and what follows it)")

    evaluate = with_spec("evaluate", "evaluate any model folder on the spec's eval sets (the paper's protocol)")
    evaluate.add_argument("--model", required=True, help="save_pretrained folder or hub id to evaluate")
    evaluate.add_argument("--name", help="label for the results (default: the folder's name)")

    report = commands.add_parser("report", help="write RUN_DIR/report/report.html with plots")
    report.add_argument("run_dir", help="run directory: a local path or an object-store URI")

    compare = commands.add_parser("compare", help="compare runs (e.g. SRD vs its curriculum: none baseline)")
    compare.add_argument("run_dirs", nargs="+")
    compare.add_argument("--out", type=Path, help="also write the table to this markdown file")

    tiny = commands.add_parser("make-tiny-models", help="build a tiny teacher/student pair with a local tokenizer")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--data", help="JSONL/Parquet to train the tokenizer on (default: generated demo data)")
    tiny.add_argument("--pretrain-steps", type=int, default=0, help="causal-LM steps for the student")
    tiny.add_argument("--seed", type=int, default=0)

    demo = commands.add_parser("make-demo-data", help="write the graded-difficulty demo data set as JSONL")
    demo.add_argument("out", type=Path)
    demo.add_argument("--train-rows", type=int, default=1200)
    demo.add_argument("--heldout-rows", type=int, default=200)
    demo.add_argument("--pretrain-rows", type=int, default=1200)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--chat", action="store_true", help="train and held-out rows as chat rows (messages)")
    return parser


# Exit codes: 0 done (or nothing to do, said why), 1 a stage failed (the message says why and what to do),
# 2 bad input (spec, data, models; or a stage whose inputs do not exist yet), 130 interrupted.
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from srd_ray.console import run_console
    from srd_ray.failures import InfrastructureError, StageFailed, explain

    with run_console(verbose=getattr(args, "verbose", False)) as console:
        try:
            return _dispatch(args)
        except SrdError as error:
            print(f"error: {error}", file=console.stream)
            return EXIT_BAD_INPUT
        except NothingToDo as why:
            print(f"nothing to do: {why}", file=console.stream)
            return 0
        except KeyboardInterrupt:
            # The run directory already records the interrupted stage; its finished parts are kept.
            print("interrupted: rerun the same command to resume where this run stopped", file=console.stream)
            return EXIT_INTERRUPTED
        except (StageFailed, InfrastructureError) as error:
            print(f"error: {error}", file=console.stream)
            _point_at_log(console)
            return EXIT_FAILED
        except Exception as error:  # not one of ours and not explained by a stage: still one line, and the log
            from srd_ray.console import log_traceback

            log_traceback(error)
            explained = explain(error, args.command)
            print(f"error: {explained}", file=console.stream)
            _point_at_log(console)
            return EXIT_BAD_INPUT if isinstance(explained, SrdError) else EXIT_FAILED


def _point_at_log(console: RunConsole) -> None:
    if console.log_location is not None:
        print(f"the full log, with the traceback: {console.log_location}", file=console.stream)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "make-demo-data":
        from srd_ray.demo_data import write_demo_data

        paths = write_demo_data(
            args.out, train_rows=args.train_rows, heldout_rows=args.heldout_rows,
            pretrain_rows=args.pretrain_rows, seed=args.seed, chat=args.chat,
        )  # fmt: skip
        print("\n".join(f"{split}: {path}" for split, path in paths.items()))
        return 0
    if args.command == "make-tiny-models":
        return _make_tiny_models(args)
    if args.command == "report":
        from srd_ray.report import write_report

        print(f"report: {write_report(args.run_dir)}")
        return 0
    if args.command == "compare":
        from srd_ray import storage
        from srd_ray.report import compare_runs

        table = compare_runs(args.run_dirs)
        print(table, end="")
        if args.out:
            storage.write_text(args.out, table)
        return 0

    from srd_ray.spec import dump_spec, load_spec

    spec = load_spec(args.spec, args.overrides)
    if args.command == "validate":
        print(dump_spec(spec), end="")
        return 0
    from srd_ray.pipeline import run_pipeline
    from srd_ray.report import summary_lines

    if args.command == "evaluate":
        from srd_ray.pipeline import evaluate_model

        label = args.name or Path(args.model.rstrip("/")).name
        results = evaluate_model(spec, args.model, label)
        for name, result in results.items():
            print(
                f"{label} {name}: ROUGE-L {result['rouge_l']:.2f} ± {result['rouge_l_std']:.2f}, exact match "
                f"{result['exact_match']:.1f} ({result['examples']} examples x {len(result['seeds'])} seeds)"
            )
        print(f"predictions: {spec.run_dir}/evaluate/{label}")
        return 0
    if args.command == "rank":
        manifest = run_pipeline(spec, stages=["rank"], redo=["rank"] if args.redo else None)
    else:
        manifest = run_pipeline(spec, stages=args.stages, redo=args.redo)
    print("\n".join(summary_lines(manifest)))
    print(f"run directory: {spec.run_dir}")
    _compare_with_baselines(spec.run_dir, manifest)
    return 0


def _compare_with_baselines(run_dir: str, manifest: dict) -> None:
    """After an SRD run, print it against any finished curriculum: none run beside it (its KD baseline)."""
    from srd_ray.report import compare_runs, find_baselines

    distill = manifest["stages"].get("distill", {}).get("summary") or {}
    baselines = find_baselines(run_dir) if distill.get("curriculum") == "srd" else []
    if baselines and manifest["stages"].get("evaluate", {}).get("status") == "complete":
        print("\nagainst the matched KD baseline(s):")
        print(compare_runs([*baselines, run_dir]), end="")


def _make_tiny_models(args: argparse.Namespace) -> int:
    from srd_ray.data import load_source
    from srd_ray.demo_data import write_demo_data
    from srd_ray.spec import DataSourceSpec, DataSpec, TinyModelsSpec
    from srd_ray.tiny_models import make_tiny_models

    if args.data:
        data = DataSpec(train=DataSourceSpec(path=args.data))
        table = load_source(data.train, data, label="--data").table
        texts = [p + r for p, r in zip(table["prompt"].to_pylist(), table["response"].to_pylist(), strict=True)]
    else:
        demo = write_demo_data(args.out / "demo_data", train_rows=2000, heldout_rows=1, pretrain_rows=1, seed=args.seed)
        rows = [json.loads(line) for line in Path(demo["train"]).read_text().splitlines()]
        texts = [row["prompt"] + row["output"] for row in rows]
    spec = TinyModelsSpec()
    spec = spec.model_copy(update={"student": spec.student.model_copy(update={"pretrain_steps": args.pretrain_steps})})
    paths = make_tiny_models(args.out, spec, texts, texts, seed=args.seed)
    print("\n".join(f"{role}: {path}" for role, path in paths.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
