"""peftlab against the pipeline it replaces (HF Trainer + PEFT + DataCollatorWithPadding), same work.

Both fine-tune the same model on the same rows (peftlab's seeded, stratified subsample, so the data
are identical), with the same hyperparameters, epochs and seed, one after the other, each run in a
fresh Python process (`--same-process`: all in this one), and the table shows each figure and the
ratio peftlab / peer:

    .venv/bin/python bench/train_vs_trainer.py                       # CPU workload: MiniLM + tweets, LoRA and full
    .venv/bin/python bench/train_vs_trainer.py --methods lora --repeats 3 \
        --json bench/results/train-cpu-MACHINE-DATE-lora.json
    .venv/bin/python bench/train_vs_trainer.py --variants "default=;torch-dropout=speed.fast_dropout=false"
    .venv/bin/python bench/train_vs_trainer.py --workload imdb-shaped \
        --json bench/results/train-gpu-MACHINE-DATE.json   # on a GPU
    .venv/bin/python bench/train_vs_trainer.py --workload imdb-shaped --arch distilbert --methods lora --no-peer \
        --repeats 2 --variants "default=;masked=speed.unpadded_attention=false"   # an A/B of peftlab options

The GPU workload (`--workload imdb-shaped`, bench/imdb_shaped.py): distilbert-base and roberta-base
shapes with random weights, 25,000 synthetic texts with IMDB's token lengths (truncated at 512),
1 epoch, batch 32; it also reports model FLOPs utilisation against the GPU's bf16 peak.

peftlab runs once per variant: a name and the config overrides it applies (`;` between variants,
`,` between overrides). The default variants are peftlab's defaults (fp32 here) and bf16 autocast,
the speed option that changes numerics on a CPU; each shows its own accuracy. Repeats are
interleaved (peer, then every variant, then again), so a slow spell of the machine hits all alike.

Results worth keeping go to bench/results/ as `train-<machine>-<date>[-<variant>].json` (machine: cpu-
or gpu- and the model with its bf16 instructions, e.g. cpu-epyc-avx512bf16, gpu-h200; see
bench/results/README.md), and their figures to bench/RESULTS.md.

Train throughput counts training only (the peer's evaluations inside `trainer.train()` are taken
out of its time); tokens are real (non-pad) tokens; peak memory is each run's own (reset between runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from peftlab import environment
from peftlab.config_loading import apply_overrides, parse_overrides, validate_config
from peftlab.runs import load_run
from peftlab.tokens import prepare_data
from peftlab.training.run import train

RECIPES = {  # the seeds' CPU workload (../shared/OFFLINE.md); LoRA targets come with the model
    "lora": {"method": {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.1}, "lr": 5e-4},
    "full": {"method": {"kind": "full"}, "lr": 5e-5},
}
DEFAULTS = {  # per workload: n_train, n_eval, epochs, max_length, batch_size
    "tweets": {"n_train": 2000, "n_eval": 500, "epochs": 2, "max_length": 128, "batch_size": 16},
    "imdb-shaped": {"n_train": 25000, "n_eval": 2500, "epochs": 1, "max_length": 512, "batch_size": 32},
}


def models(args, root: Path) -> list[dict]:
    """The models of the chosen workload: label, model name or path, data section, LoRA targets."""
    if args.workload == "tweets":
        return [{"label": f"{args.model}/{args.data}", "model": args.model, "targets": ["query", "value"],
                 "data": {"source": args.data, "n_train": args.n_train, "n_eval": args.n_eval}}]
    import imdb_shaped

    built = []
    for arch in args.arch.split(","):
        model_dir, train_csv, eval_csv = imdb_shaped.build(arch, root, args.n_train, args.n_eval)
        built.append({"label": f"{arch}-base/imdb-shaped", "model": str(model_dir), "model_dir": model_dir,
                      "targets": imdb_shaped.LORA_TARGETS[arch],
                      "data": {"train_file": str(train_csv), "eval_file": str(eval_csv)}})
    return built


def workload(args, model: dict, method: str, out: Path, seed: int) -> dict:
    targets = {"targets": model["targets"]} if method == "lora" else {}
    return {
        "model": {"name": model["model"], "max_length": args.max_length},
        "data": model["data"],
        "method": RECIPES[method]["method"] | targets,
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "eval_batch_size": 64,
                  "lr": RECIPES[method]["lr"], "seed": seed, "weight_decay": 0.0, "checkpoint_each_epoch": False},
        "output": {"dir": str(out), "name": method, "overwrite": True, "progress": False, "save_model": False},
    }


def run_peftlab(raw: dict, overrides: dict) -> dict:
    summary = load_run(train(validate_config(apply_overrides(raw, overrides)))).summary
    return {"train_samples_per_s": summary["train_samples_per_s"], "train_tokens_per_s": summary["train_tokens_per_s"],
            "eval_samples_per_s": summary["eval_samples_per_s"], "peak_rss_mb": summary["peak_rss_mb"],
            **({"peak_gpu_memory_mb": summary["peak_gpu_memory_mb"]} if "peak_gpu_memory_mb" in summary else {}),
            "accuracy": summary["final"]["accuracy"], "f1_macro": summary["final"]["f1_macro"],
            "train_seconds": summary["train_seconds"]}


def run_peer(raw: dict, out: Path) -> dict:
    """The notebook: HF Trainer + PEFT, DataCollatorWithPadding, default arguments, eval each epoch."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    config = validate_config(raw)
    environment.reset_peak_memory()
    data = prepare_data(config)  # only for the same rows and labels; the peer tokenises them itself
    names = data.splits.labels.names
    model_dir = str(environment_model_dir(config.model.name))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(config.train.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    method = raw["method"]
    if method["kind"] == "lora":
        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=method["r"], lora_alpha=method["alpha"],
                                                 lora_dropout=method["dropout"], target_modules=method["targets"]))

    def dataset(table, labels):
        encoded = tokenizer(table.texts, truncation=True, max_length=config.model.max_length)
        return Dataset.from_dict({**encoded, "labels": labels})

    train_set = dataset(data.splits.train, data.train.labels.tolist())
    eval_set = dataset(data.splits.eval, data.eval.labels.tolist())

    def metrics(prediction):
        predicted = prediction.predictions.argmax(-1)
        return {"accuracy": accuracy_score(prediction.label_ids, predicted),
                "f1_macro": f1_score(prediction.label_ids, predicted, average="macro")}

    arguments = TrainingArguments(output_dir=str(out / "peer"), num_train_epochs=config.train.epochs,
                                  per_device_train_batch_size=config.train.batch_size,
                                  per_device_eval_batch_size=config.train.eval_batch_size,
                                  learning_rate=config.train.lr, eval_strategy="epoch", save_strategy="no",
                                  report_to=[], seed=config.train.seed, logging_strategy="epoch", disable_tqdm=True)
    trainer = Trainer(model=model, args=arguments, train_dataset=train_set, eval_dataset=eval_set,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=metrics)
    started = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - started
    eval_seconds = sum(r["eval_runtime"] for r in trainer.state.log_history if "eval_runtime" in r)
    final = [r for r in trainer.state.log_history if "eval_accuracy" in r][-1]
    train_seconds = total - eval_seconds
    samples = len(train_set) * config.train.epochs
    tokens = int(sum(len(x) for x in train_set["input_ids"])) * config.train.epochs
    evaluations = sum(1 for r in trainer.state.log_history if "eval_runtime" in r)
    return {"train_samples_per_s": samples / train_seconds, "train_tokens_per_s": tokens / train_seconds,
            "eval_samples_per_s": evaluations * len(eval_set) / eval_seconds,
            **environment.peak_memory_mb(),
            "accuracy": final["eval_accuracy"], "f1_macro": final["eval_f1_macro"], "train_seconds": train_seconds}


def run_here(side: str, raw: dict, out: Path, overrides: dict | None = None) -> dict:
    return run_peer(raw, out) if side == "peer" else run_peftlab(raw, overrides or {})


def run_in_fresh_process(side: str, raw: dict, out: Path, overrides: dict | None = None) -> dict:
    """One run in a new Python process, so that no run's speed depends on what ran before it: one
    process measured full fine-tuning about 5% slower after the peer's run than alone, and a setting
    peftlab makes for its CPU training (glibc's) would carry over to the peer's next run. On a GPU
    every run is then a process's first (bench/HISTORY.md: about 7% slower than later ones)."""
    spec = out / f"run-{time.time_ns()}.json"
    spec.write_text(json.dumps({"side": side, "raw": raw, "out": str(out), "overrides": overrides or {}}))
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one-run", str(spec)], check=True)
    return json.loads(spec.with_suffix(".result.json").read_text())


def one_run(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    figures_ = run_here(spec["side"], spec["raw"], Path(spec["out"]), spec["overrides"])
    spec_path.with_suffix(".result.json").write_text(json.dumps(figures_))
    return 0


def environment_model_dir(name: str) -> str:
    from peftlab.assets import resolve_model_name

    return resolve_model_name(name)


FIGURES = ["train_samples_per_s", "train_tokens_per_s", "eval_samples_per_s", "peak_rss_mb", "peak_gpu_memory_mb",
           "mfu", "accuracy", "f1_macro"]


def figures(side: dict) -> list[str]:
    return [key for key in FIGURES if key in side]


def with_mfu(side: dict, model: dict, method: str, device: str) -> dict:
    """Model FLOPs utilisation of training against the GPU's bf16 peak (imdb-shaped workload on a GPU)."""
    import imdb_shaped

    peak = imdb_shaped.bf16_peak(device)
    if "model_dir" not in model or peak is None:
        return side
    mean_length = side["train_tokens_per_s"] / side["train_samples_per_s"]
    flops = imdb_shaped.train_flops_per_token(model["model_dir"], method == "full", mean_length)
    return side | {"mfu": flops * side["train_tokens_per_s"] / peak}


QUALITY = ("accuracy", "f1_macro")


def aggregate(runs: list[dict]) -> dict:
    """Speeds and memory: medians over the repeats. Quality: the mean over their seeds, its std and
    each seed's figure."""
    summary = {key: statistics.median(r[key] for r in runs) for key in runs[0] if key not in QUALITY}
    for key in QUALITY:
        values = [r[key] for r in runs]
        summary[key] = statistics.fmean(values)
        summary[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[key + "_per_seed"] = values
    return summary


def quality_p_values(ours: dict, peer: dict) -> dict:
    """Welch's t-test of each quality figure over the seeds, peftlab against the peer: the two sides
    draw different random streams for a seed, so the runs are not paired."""
    from scipy import stats

    return {f"{key}_p": float(stats.ttest_ind(ours[key + "_per_seed"], peer[key + "_per_seed"], equal_var=False).pvalue)
            for key in QUALITY if len(ours.get(key + "_per_seed", ())) > 1 and len(peer.get(key + "_per_seed", ())) > 1}


def parse_variants(text: str) -> dict[str, dict]:
    """`"default=;bf16=train.precision=bf16"` -> {"default": {}, "bf16": {"train.precision": "bf16"}}."""
    variants = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, _, overrides = item.partition("=")
        variants[name] = parse_overrides([o for o in overrides.split(",") if o])
    return variants


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(DEFAULTS), default="tweets")
    parser.add_argument("--model", default="minilm", help="tweets workload: the model")
    parser.add_argument("--data", default="tweets", help="tweets workload: the data source")
    parser.add_argument("--arch", default="distilbert,roberta", help="imdb-shaped workload: architectures")
    for key in ("n_train", "n_eval", "epochs", "max_length", "batch_size"):
        parser.add_argument("--" + key.replace("_", "-"), type=int, help="default: the workload's own")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--variants", default="default=;bf16=train.precision=bf16",
                        help="peftlab variants: NAME=OVERRIDE,OVERRIDE;NAME=... (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each side, repeat i with train seed SEED+i (the data rows stay the same); "
                             "speeds are medians, accuracy and F1 means over the seeds")
    parser.add_argument("--seed", type=int, default=42, help="train seed of the first repeat (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the figures and ratios here (results kept in the "
                        "repository: bench/results/train-MACHINE-DATE[-VARIANT].json)")
    parser.add_argument("--no-peer", action="store_true",
                        help="peftlab's variants only: their figures without the peer's or ratios (A/B runs "
                             "of peftlab options when the peer's run would take most of the time)")
    parser.add_argument("--same-process", action="store_true",
                        help="run every run in this process (by default each runs in a fresh Python process)")
    parser.add_argument("--one-run", type=Path, help=argparse.SUPPRESS)  # a fresh process's run: its spec file
    args = parser.parse_args(argv)
    if args.one_run:
        return one_run(args.one_run)
    for key, value in DEFAULTS[args.workload].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    variants = parse_variants(args.variants)

    run = run_here if args.same_process else run_in_fresh_process
    results = []
    hardware = environment.hardware()
    bf16 = environment.BF16_MATMUL_NAMES.get(hardware["cpu_bf16"], "no native bf16")
    device = hardware.get("gpu") or f"{hardware['cpu_count']} CPU cores ({hardware['cpu']}, {bf16})"
    with tempfile.TemporaryDirectory() as tmp:
        for model in models(args, Path(tmp)):
            for method in args.methods.split(","):
                peer_runs, our_runs = [], {name: [] for name in variants}
                for repeat in range(args.repeats):
                    raw = workload(args, model, method, Path(tmp), args.seed + repeat)
                    if not args.no_peer:
                        peer_runs.append(run("peer", raw, Path(tmp)))
                    for name, overrides in variants.items():
                        our_runs[name].append(run("peftlab", raw, Path(tmp), overrides))
                peer = with_mfu(aggregate(peer_runs), model, method, device) if peer_runs else {}
                for name, runs in our_runs.items():
                    ours = with_mfu(aggregate(runs), model, method, device)
                    row = {"workload": f"{model['label']} {method} n_train={args.n_train} epochs={args.epochs}",
                           "variant": name, "overrides": variants[name], "device": device, "repeats": args.repeats,
                           "seeds": list(range(args.seed, args.seed + args.repeats)),
                           "peer": peer, "peftlab": ours}
                    for key in figures(ours):
                        row[f"{key}_ratio"] = ours[key] / peer[key] if peer.get(key) else float("nan")
                    row |= quality_p_values(ours, peer)
                    results.append(row)
                    print_row(row)
                    if args.json:  # after every row: a run cut short still leaves what it measured
                        write_json(args.json, results)
    return 0


def write_json(path: Path, results: list[dict]) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    partial.replace(path)


def print_row(row: dict) -> None:
    print(f"\n{row['workload']}, peftlab {row['variant']} {row['overrides'] or ''} on {row['device']} "
          f"(speeds: median of {row['repeats']}; accuracy and F1: mean over seeds {row['seeds']})")
    print(f"{'figure':<22}{'peer':>12}{'peftlab':>12}{'ratio':>9}")
    for key in figures(row["peftlab"]):
        print(f"{key:<22}{row['peer'].get(key, float('nan')):>12.3f}{row['peftlab'][key]:>12.3f}"
              f"{row[key + '_ratio']:>8.2f}x")
    for key in QUALITY:
        print(f"{key + ' std':<22}{row['peer'].get(key + '_std', float('nan')):>12.3f}"
              f"{row['peftlab'][key + '_std']:>12.3f}"
              + (f"   difference p = {row[key + '_p']:.2f} (Welch)" if key + "_p" in row else ""))
    sys.stdout.flush()


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
