"""Command line: parses arguments and calls the Python API, peftlab.api (imports stay lazy so --help is instant)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from peftlab.api.running import resolve_config
    from peftlab.config_loading import parse_overrides

    # `resume=auto` / `resume=PATH` is how to run, not part of the experiment: it stays out of the config.
    resume = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("resume=")), None)
    config = resolve_config(args.config, parse_overrides([o for o in args.overrides if not o.startswith("resume=")]))
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    if args.devices > 1 and "LOCAL_RANK" not in os.environ:
        # The config is valid; torchrun starts one process per device, each running this same command.
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.devices}",
                   "-m", "peftlab", "train", str(args.config), *args.overrides]
        print(f"peftlab train: starting {args.devices} processes: {' '.join(command[1:])}", file=sys.stderr, flush=True)
        os.execv(sys.executable, command)
    from peftlab.api import train
    from peftlab.training.resume import TrainingInterrupted

    try:
        train(config, resume=resume)
    except TrainingInterrupted as exc:
        print(f"peftlab train: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def _eval(args: argparse.Namespace) -> int:
    from peftlab.metrics import headline
    from peftlab.runs import load_run
    from peftlab.training.reevaluate import evaluate_run

    metrics = evaluate_run(args.run, args.overrides)
    print(headline(metrics))
    best = load_run(args.run).summary.get("best") or {}
    if not args.overrides and best:
        same = all(abs(metrics[k] - best[k]) <= 1e-6 for k in ("eval_loss", "accuracy", "f1_macro"))
        print("matches the run's saved best evaluation" if same else
              f"differs from the run's saved best evaluation: {headline(best)}")
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return 0


def _study(args: argparse.Namespace) -> int:
    from peftlab.api.studying import plan
    from peftlab.config_loading import parse_overrides
    from peftlab.studies.running import describe

    planned = plan(args.study, **parse_overrides(args.overrides))
    print(describe(planned))
    if args.dry_run:
        return 0
    from peftlab.api import study
    from peftlab.training.resume import TrainingInterrupted

    try:
        result = study(planned, progress=not args.no_progress, backend=args.backend, address=args.address,
                       retries=args.retries, write_report=not args.no_report)
    except TrainingInterrupted as exc:
        print(f"peftlab study: {exc}; run the study again to go on", file=sys.stderr)
        return exc.exit_code
    if result.page:
        print(f"\nreport: {result.page} (and report.md)")
    if result.failures:
        print(f"{len(result.failures)} run(s) failed: {', '.join(result.failures)}; run the study again to retry "
              "them", file=sys.stderr)
        return 1
    return 0


def _tune(args: argparse.Namespace) -> int:
    from peftlab.studies.tune import load_tune, run_tune

    tune = load_tune(args.tune, args.overrides)
    space = ", ".join(f"{k}: {v if isinstance(v, list) else f'{v.low:g}..{v.high:g}' + (' (log)' * v.log)}"
                      for k, v in tune.spec.space.items())
    print(f"tune {tune.spec.name}: {tune.spec.trials} trials over {space}; {tune.spec.metric}, "
          f"storage {tune.storage}")
    if args.dry_run:
        return 0
    record = run_tune(tune)
    print(f"\n{'trial':>6}  {'state':<9}{tune.spec.metric:>12}  params")
    for trial in record["trials"]:
        value = "" if trial["value"] is None else f"{trial['value']:.4f}"
        print(f"{trial['number']:>6}  {trial['state']:<9}{value:>12}  {trial['params']}")
    if record["best"]:
        best = record["best"]
        print(f"best: trial {best['number']} ({tune.directory / best['run']}) {tune.spec.metric} {best['value']:.4f} "
              f"with {best['params']}")
    for number, error in record.get("failures", {}).items():
        print(f"trial {number} failed: {error}", file=sys.stderr)
    done = sum(t["state"] in ("COMPLETE", "PRUNED") for t in record["trials"])
    if record.get("failures") and done < tune.spec.trials:
        print(f"{done}/{tune.spec.trials} trials done; run the command again to go on", file=sys.stderr)
        return 1
    return 0


def _report(args: argparse.Namespace) -> int:
    from peftlab.api import report

    print(f"report: {report(*args.paths, out=args.out)} (and report.md)")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from peftlab.studies.report import compare_text

    print(compare_text(args.paths))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from peftlab.serving.predict import predict_file

    rows = predict_file(args.run, args.input, args.output, args.text_column, args.batch_size,
                        pair_column=args.text_pair_column, raw=args.raw_scores, abstain_below=args.abstain_below)
    if args.output:
        print(f"{rows} predictions written to {args.output}", file=sys.stderr)
    return 0


def _export(args: argparse.Namespace) -> int:
    from peftlab.serving.export import export_run

    out = export_run(args.run, args.merged, onnx=args.onnx, force=args.force, raw=args.raw_scores)
    print(f"exported {args.run} to {out}" + (" (with model.onnx, checked with onnxruntime)" if args.onnx else ""))
    return 0


SERVE_OPTIONS = ("host", "port", "max_batch_inputs", "max_payload_bytes", "max_concurrent", "max_batch_tokens",
                 "max_wait_ms", "timeout_s", "max_text_chars", "max_queue_rows", "read_timeout_s", "max_connections")


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from peftlab.serving.adapters import ServedModel, ServeError
    from peftlab.serving.settings import ServeSettings

    try:
        from peftlab.serving.server import serve
    except ImportError as exc:
        raise ServeError(f"peftlab serve needs FastAPI, uvicorn and prometheus-client ({exc}): "
                         "pip install 'peftlab[serve]'") from None

    if bool(args.adapter) == bool(args.model):
        raise ServeError("give either --adapter NAME=RUN (one or more) or --model PATH")
    specs = []
    for item in args.adapter or []:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise ServeError(f"--adapter {item!r}: expected NAME=RUN_DIRECTORY")
        specs.append((name, Path(path)))
    limits = {key: getattr(args, key) for key in SERVE_OPTIONS if getattr(args, key) is not None}
    try:
        settings = ServeSettings(**limits, auto_truncate=args.auto_truncate, docs=args.docs,
                                api_key=os.environ.get("PEFTLAB_API_KEY") or None)
    except ValidationError as exc:
        problems = [f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" for e in exc.errors()]
        raise ServeError("; ".join(problems)) from None
    served = (ServedModel.from_adapters(specs, base=args.base, device=args.device) if specs else
              ServedModel.from_model(args.model, name=args.name, device=args.device))
    serve(served, settings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftlab", description="Fine-tune and compare text classifiers.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train and evaluate one run from a config",
                                description="Train one run. Overrides are dotted keys: method.r=16 train.epochs=5")
    train.add_argument("config", type=Path, help="YAML config file")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides (values parse as YAML); "
                       "resume=auto or resume=PATH continues from a checkpoint of this run")
    train.add_argument("--print-config", action="store_true", help="print the resolved, validated config and exit")
    train.add_argument("--devices", type=int, default=1, help="data-parallel processes (one per GPU, or CPU "
                       "processes), started with torchrun; the same as `torchrun --nproc-per-node N -m peftlab train`")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("eval", help="re-evaluate a finished run")
    evaluate.add_argument("run", type=Path, help="run directory (runs/<name>)")
    evaluate.add_argument("overrides", nargs="*", help="e.g. data.eval_file=other.csv")
    evaluate.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    evaluate.set_defaults(func=_eval)

    study = commands.add_parser("study", help="run every cell of a study (resumable), then write its report",
                                description="Run a study: a base config x a grid x seeds. Finished runs are "
                                            "skipped, so running it again resumes. Overrides: seeds=2 or "
                                            "section.key=value for the base config.")
    study.add_argument("study", type=Path, help="study YAML file (see studies/)")
    study.add_argument("overrides", nargs="*", help="seeds=N, metric=..., or base-config overrides (data.n_train=500)")
    study.add_argument("--dry-run", action="store_true", help="list the runs it would make and exit")
    study.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    study.add_argument("--no-progress", action="store_true", help="no per-run progress bars")
    study.add_argument("--backend", choices=["local", "ray"], default="local",
                       help="local: one run after another here (default); ray: every run a Ray task with the "
                            "study's `resources`, on a local Ray or the cluster at --address")
    study.add_argument("--address", help="Ray cluster to join (e.g. auto, ray://head:10001); default: start one here")
    study.add_argument("--retries", type=int, default=1, help="Ray: retries of a run whose worker died (default 1)")
    study.set_defaults(func=_study)

    tune = commands.add_parser("tune", help="hyper-parameter search with Optuna; every trial an ordinary run",
                               description="Search a tune file's space (format: docs/scaling.md); "
                                           "weak trials are pruned on the per-epoch metric. Run it again, or on "
                                           "more machines with a shared `storage` URL, to go on.")
    tune.add_argument("tune", type=Path, help="tune YAML file")
    tune.add_argument("overrides", nargs="*",
                      help="trials=N, storage=URL (or storage=env:VARNAME), or base-config overrides")
    tune.add_argument("--dry-run", action="store_true", help="validate the space and exit")
    tune.set_defaults(func=_tune)

    report = commands.add_parser("report", help="write report.md + report.html with plots for a study or runs")
    report.add_argument("paths", type=Path, nargs="+", help="a study directory, or run directories")
    report.add_argument("--out", type=Path, help="report directory (default <study>/report)")
    report.set_defaults(func=_report)

    compare = commands.add_parser("compare", help="print a comparison table of runs or studies")
    compare.add_argument("paths", type=Path, nargs="+", help="run directories or a study directory")
    compare.set_defaults(func=_compare)

    predict = commands.add_parser("predict", help="label texts with a finished run's model",
                                  description="Stream texts through a run's classifier; one JSON line per row "
                                              "with label, score and every class probability.")
    predict.add_argument("run", type=Path, help="run directory")
    predict.add_argument("--input", required=True, help="csv / tsv / jsonl / parquet file, or - for stdin "
                                                         "(one text per line)")
    predict.add_argument("--output", type=Path, help="JSONL file (default: stdout)")
    predict.add_argument("--text-column", default="text", help="column or field holding the text (default text)")
    predict.add_argument("--text-pair-column", default=None,
                         help="column or field holding the second text, for a run trained on text pairs")
    predict.add_argument("--batch-size", type=int, default=64)
    predict.add_argument("--raw-scores", action="store_true",
                         help="the model's own probabilities, not those calibrated on the eval split")
    predict.add_argument("--abstain-below", type=float, default=None, metavar="P",
                         help="mark rows whose top probability is below P (\"abstain\": true)")
    predict.set_defaults(func=_predict)

    export = commands.add_parser("export", help="write a run as a plain transformers model (adapters merged)")
    export.add_argument("run", type=Path, help="run directory")
    export.add_argument("--merged", type=Path, required=True,
                        help="output directory: new or empty (an existing export only with --force)")
    export.add_argument("--onnx", action="store_true", help="also write model.onnx, verified with onnxruntime")
    export.add_argument("--force", action="store_true",
                        help="replace an earlier peftlab export at --merged (never anything else)")
    export.add_argument("--raw-scores", action="store_true",
                        help="keep the head as trained (default: divided by the calibration temperature)")
    export.set_defaults(func=_export)

    serve = commands.add_parser(
        "serve", help="serve classifiers over HTTP (several adapters on one base model)",
        description="POST /predict {\"inputs\": \"text\" | [...], \"adapter\": NAME, \"truncate\": bool}; "
                    "GET /health /info /metrics. Set PEFTLAB_API_KEY to require 'Authorization: Bearer <key>'.")
    serve.add_argument("--adapter", action="append", metavar="NAME=RUN",
                       help="a finished adapter run (LoRA, IA3, ...) served under NAME; repeat for more")
    serve.add_argument("--base", help="the base model the adapters were trained on (checked against each run)")
    serve.add_argument("--model", type=Path, help="instead of adapters: one finished run of any method, or a "
                                                  "merged export")
    serve.add_argument("--name", default="default", help="the name a --model is served under (default: default)")
    serve.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if there is one)")
    from peftlab.serving.settings import ServeSettings

    for key in SERVE_OPTIONS:
        field = ServeSettings.model_fields[key]
        serve.add_argument(f"--{key.replace('_', '-')}", type=field.annotation, metavar=key.split("_")[-1].upper(),
                           help=f"{field.description or key} (default {field.default})")
    serve.add_argument("--auto-truncate", action="store_true",
                       help="truncate over-long texts unless a request says \"truncate\": false (default: 413)")
    serve.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json (default: off)")
    serve.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Options may come after the overrides (`train CONFIG a.b=1 --print-config`): argparse leaves
    # such trailing overrides unparsed, so they are collected here.
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if "=" not in item or item.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from peftlab.errors import USER_ERRORS

    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"peftlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `peftlab study S --dry-run | head`: the reader left; exit quietly as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print(f"peftlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
