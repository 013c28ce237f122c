"""peftlab's own CPU inference against ONNX Runtime: same CPU, same exported model, same texts.

Trains (briefly) a LoRA run and a full fine-tuning run of MiniLM on the tweets at max_length 128, or
takes existing runs (--lora-run, --full-run), and exports each with `export_run(..., onnx=True,
raw=True)`: a merged plain-transformers model and its `model.onnx`, the same weights for every side
and no calibration temperature folded into the head. Then, for each model x corpus x batch size, it
answers the same texts three ways, in one process, with the same thread count:

- peftlab predict: `Classifier.probabilities` (what `peftlab predict` runs) around the exported model,
  with its speed plan: texts tokenised at once, sorted by length, batched, each batch padded to its
  own longest text.
- peftlab serve path: what `peftlab serve --model EXPORT` does with one request of `batch_size` texts,
  without HTTP: the texts tokenised, then the server's batcher pass (`MicroBatcher._run`: rows sorted
  longest first, split at the server's `max_batch_tokens`, `ServedModel.logits` per pass). Batches
  are taken in input order, as a server would receive them.
- ONNX Runtime: `InferenceSession(model.onnx)`, CPU provider, graph optimisation ORT_ENABLE_ALL,
  `intra_op_num_threads` = the thread count; batches in input order, each tokenised with the usual
  dynamic padding (`tokenizer(batch, padding=True, truncation=True, max_length=L, return_tensors="np")`).

Corpora: held-out tweets (short) at max_length 128, and 20 Newsgroups test posts (long) cut at 256
tokens by every side (MiniLM has 512 positions; the models were trained at 128).

Figures: texts/s over all texts, tokenisation included on every side; per-batch latency p50/p95 in
ms; the ratios peftlab / ORT; and the answers compared with ORT's: the share of texts whose top label
is the same, and the largest absolute difference of a softmax probability. Speeds and latencies are
medians over --repeats (sides take turns within a repeat, starting with a different side each time);
every side is warmed up on two batches first.

Per-batch latency: ORT and the serve path time each batch from its texts to its logits (tokenising
included). peftlab predict tokenises all texts before its first batch: its batches are timed by
stamping the start of each batch's padding (a wrapper around `serving.inference.padded_inputs`, so
`Classifier.probabilities` runs unchanged) and each batch is charged its share, by tokens, of the
tokenisation before them. Its batches are the length-sorted ones, ORT's and the serve path's those of
the input order, so the latencies are of different batches; texts/s are comparable as they are.

    .venv/bin/python bench/predict_vs_onnxruntime.py --json bench/results/predict-vs-ort-MACHINE-DATE.json
    .venv/bin/python bench/predict_vs_onnxruntime.py --lora-run runs/a --full-run runs/b --batch-sizes 64
    .venv/bin/python bench/predict_vs_onnxruntime.py --texts 64 --repeats 1 --train-steps 3 --n-train 64 \
        --n-eval 32 --batch-sizes 32                                   # a smoke run

Result files go to bench/results/ as `predict-vs-ort-<machine>-<date>.json` (machine: cpu- and the
CPU with its bf16 instructions, e.g. cpu-epyc-avx512bf16; the script prints a suggestion).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from peftlab import environment, tasks

REPO = Path(__file__).resolve().parent.parent
# corpus -> (data.source, max_length both sides cut at)
CORPORA = {"tweets": ("tweets", 128), "newsgroups": ("20newsgroups", 256)}
SIDES = ("predict", "serve", "ort")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


# --------------------------------------------------------------------------- machine


def cpu_flags() -> list[str]:
    """The instruction-set flags that decide CPU inference speed, as /proc/cpuinfo lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                present = set(value.split())
                return [flag for flag in CPU_FLAGS if flag in present]
    except OSError:
        pass
    return []


def machine_name() -> str:
    """A result-file machine name in bench/results/README.md's form (cpu-<model>-<bf16 instructions>)."""
    model = environment.cpu_model().lower()
    family = next((word for word in ("epyc", "xeon", "ryzen", "core") if word in model), "unknown")
    bf16 = (environment.cpu_bf16_matmul() or "nobf16").replace("_", "")
    return f"cpu-{family}-{bf16}"


def versions() -> dict[str, str]:
    found = environment.library_versions()
    for name in ("onnxruntime", "onnx"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


# --------------------------------------------------------------------------- models and texts


def train_runs(workdir: Path, steps: int, n_train: int, n_eval: int) -> dict[str, Path]:
    """A LoRA run (configs/tweets-lora.yaml) and a full fine-tuning run of MiniLM on the tweets at
    max_length 128, trained for `steps` steps only: this measures inference, not accuracy."""
    import peftlab

    data = {"source": "tweets", "n_train": n_train, "n_eval": n_eval}
    train = {"epochs": 1, "max_steps": steps, "checkpoint_each_epoch": False}
    output = {"dir": str(workdir / "runs"), "progress": False, "overwrite": True}
    lora = peftlab.train(REPO / "configs" / "tweets-lora.yaml", data=data, train=train,
                         output=output | {"name": "lora"})
    full = peftlab.train({"model": {"name": "minilm", "max_length": 128}, "data": data, "method": {"kind": "full"},
                          "train": train | {"batch_size": 16, "lr": 5e-5}, "output": output | {"name": "full"}})
    return {"lora": Path(lora.path), "full": Path(full.path)}


def export(run: Path, out: Path) -> Path:
    """The run merged into a plain transformers model with model.onnx, raw scores (no temperature)."""
    from peftlab.serving.export import export_run

    return export_run(run, out, onnx=True, force=True, raw=True)


def corpus_texts(source: str, n: int) -> list[str]:
    """Up to `n` texts of the source's evaluation split (held out from any training run's rows), in
    the split's order."""
    from peftlab.config_loading import validate_config
    from peftlab.splits import prepare_splits

    config = validate_config({"model": {"name": "minilm"}, "data": {"source": source, "n_eval": n}})
    return list(prepare_splits(config.data).eval.texts)


@dataclass
class Sides:
    """The three ways of answering with one exported model."""

    classifier: object  # peftlab.serving.inference.Classifier
    served: object  # peftlab.serving.adapters.ServedModel
    session: object  # onnxruntime.InferenceSession
    tokenizer: object  # ORT's own tokenizer, loaded from the export
    max_batch_tokens: int


def load_sides(export_dir: Path, threads: int, max_batch_tokens: int) -> Sides:
    import onnxruntime

    from peftlab.config import SpeedConfig
    from peftlab.models import load_classifier, load_tokenizer
    from peftlab.serving.adapters import ServedModel
    from peftlab.serving.inference import Classifier
    from peftlab.speed.plan import inference_plan

    device = torch.device("cpu")
    model = load_classifier(str(export_dir)).to(device).eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    plan = inference_plan(SpeedConfig(), device, model.config.model_type)
    # max_length is set per corpus (set_length); the export's own is what it was trained at.
    classifier = Classifier(model, load_tokenizer(str(export_dir)), labels, 128, device, plan)
    served = ServedModel.from_model(export_dir, device="cpu")
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(export_dir / "model.onnx"), options,
                                           providers=["CPUExecutionProvider"])
    return Sides(classifier, served, session, load_tokenizer(str(export_dir)), max_batch_tokens)


def set_length(sides: Sides, max_length: int) -> None:
    """Every side cuts texts at `max_length` (the tokenizers' own limit raised to match, so that none
    warns of sequences longer than the length the export was trained at)."""
    sides.classifier.max_length = max_length
    for tokenizer in (sides.classifier.tokenizer, sides.served.tokenizer, sides.tokenizer):
        tokenizer.model_max_length = max(tokenizer.model_max_length, max_length)


# --------------------------------------------------------------------------- the three sides


@dataclass
class Pass:
    """One side's answers to all texts: the probabilities, the wall time, each batch's seconds."""

    probabilities: np.ndarray
    seconds: float
    batch_seconds: list[float]


@contextlib.contextmanager
def batch_stamps(stamps: list[tuple[float, int]]):
    """Record (time, tokens) at the start of each batch's padding in `Classifier.probabilities`."""
    from peftlab.serving import inference

    original = inference.padded_inputs

    def stamped(tokenizer, ids, device, types=None):
        stamps.append((time.perf_counter(), sum(len(row) for row in ids)))
        return original(tokenizer, ids, device, types)

    inference.padded_inputs = stamped
    try:
        yield
    finally:
        inference.padded_inputs = original


def run_predict(sides: Sides, texts: list[str], batch_size: int) -> Pass:
    """peftlab predict: one `Classifier.probabilities` call; batches timed from padding to padding,
    each charged its share (by tokens) of the tokenisation and sorting before the first batch."""
    stamps: list[tuple[float, int]] = []
    with batch_stamps(stamps):
        started = time.perf_counter()
        probabilities = sides.classifier.probabilities(texts, batch_size)
        ended = time.perf_counter()
    before = stamps[0][0] - started
    total_tokens = sum(tokens for _, tokens in stamps)
    ends = [t for t, _ in stamps[1:]] + [ended]
    batches = [end - t + before * tokens / total_tokens for (t, tokens), end in zip(stamps, ends)]
    return Pass(probabilities, ended - started, batches)


def run_serve(sides: Sides, texts: list[str], batch_size: int, max_length: int) -> Pass:
    """peftlab serve's work for requests of `batch_size` texts in input order: tokenise, then the
    batcher's pass over the request's rows (sorted, split at max_batch_tokens, ServedModel.logits)."""
    from peftlab.serving.batcher import Job, MicroBatcher

    served = sides.served
    adapter = next(iter(served.adapters))
    batcher = MicroBatcher(served.logits, sides.max_batch_tokens, max_wait_s=0.0)
    logits, batches = [], []
    started = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        begun = time.perf_counter()
        ids = served.tokenizer(texts[start : start + batch_size], truncation=True, max_length=max_length,
                               return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        logits.extend(batcher._run([Job(ids, adapter)])[0])
        batches.append(time.perf_counter() - begun)
    seconds = time.perf_counter() - started
    return Pass(tasks.outputs("single_label", np.stack(logits)), seconds, batches)


def run_ort(sides: Sides, texts: list[str], batch_size: int, max_length: int) -> Pass:
    """ONNX Runtime, batches in input order, each tokenised with dynamic padding to its longest text."""
    names = [i.name for i in sides.session.get_inputs()]
    logits, batches = [], []
    started = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        begun = time.perf_counter()
        batch = sides.tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                                max_length=max_length, return_tensors="np")
        feed = {name: np.asarray(batch[name], dtype=np.int64) for name in names}
        logits.append(sides.session.run(["logits"], feed)[0])
        batches.append(time.perf_counter() - begun)
    seconds = time.perf_counter() - started
    return Pass(tasks.outputs("single_label", np.concatenate(logits)), seconds, batches)


def run_side(side: str, sides: Sides, texts: list[str], batch_size: int, max_length: int) -> Pass:
    if side == "predict":
        return run_predict(sides, texts, batch_size)
    if side == "serve":
        return run_serve(sides, texts, batch_size, max_length)
    return run_ort(sides, texts, batch_size, max_length)


# --------------------------------------------------------------------------- figures


def padding_shares(sides: Sides, texts: list[str], batch_size: int, max_length: int) -> dict[str, float]:
    """The share of padded positions in the batches of each order: length-sorted (predict) and input
    order (serve path before its batcher sorts rows, ORT)."""
    lengths = np.array([len(ids) for ids in sides.tokenizer(texts, truncation=True, max_length=max_length,
                                                            return_attention_mask=False)["input_ids"]])

    def share(order: np.ndarray) -> float:
        chunks = [lengths[order[i : i + batch_size]] for i in range(0, len(order), batch_size)]
        padded = sum(len(c) * c.max() for c in chunks)
        return float(1 - lengths.sum() / padded)

    return {"sorted": share(np.argsort(-lengths, kind="stable")), "input_order": share(np.arange(len(lengths))),
            "mean_tokens": float(lengths.mean())}


def agreement(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    """Share of identical top labels and the largest absolute probability difference."""
    return {"label_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
            "max_prob_diff": float(np.abs(ours - theirs).max())}


def summarise(passes: list[Pass], n_texts: int) -> dict[str, float]:
    """Medians over the repeats of texts/s and of each repeat's per-batch p50/p95 (ms)."""
    return {"texts_per_s": statistics.median(n_texts / p.seconds for p in passes),
            "p50_ms": statistics.median(float(np.percentile(p.batch_seconds, 50)) * 1000 for p in passes),
            "p95_ms": statistics.median(float(np.percentile(p.batch_seconds, 95)) * 1000 for p in passes),
            "batches": len(passes[0].batch_seconds),
            "texts_per_s_each_repeat": [n_texts / p.seconds for p in passes]}


def measure(sides: Sides, texts: list[str], batch_size: int, max_length: int, repeats: int) -> dict:
    """One model x corpus x batch size: every side warmed up, then `repeats` rounds of all sides."""
    for side in SIDES:
        run_side(side, sides, texts[: 2 * batch_size], batch_size, max_length)
    passes: dict[str, list[Pass]] = {side: [] for side in SIDES}
    for repeat in range(repeats):
        turn = SIDES[repeat % len(SIDES):] + SIDES[: repeat % len(SIDES)]
        for side in turn:
            passes[side].append(run_side(side, sides, texts, batch_size, max_length))
    row = {side: summarise(passes[side], len(texts)) for side in SIDES}
    ort = passes["ort"][0].probabilities
    row["predict"] |= agreement(passes["predict"][0].probabilities, ort)
    row["serve"] |= agreement(passes["serve"][0].probabilities, ort)
    row["predict_vs_ort"] = row["predict"]["texts_per_s"] / row["ort"]["texts_per_s"]
    row["serve_vs_ort"] = row["serve"]["texts_per_s"] / row["ort"]["texts_per_s"]
    row["padding"] = padding_shares(sides, texts, batch_size, max_length)
    return row


# --------------------------------------------------------------------------- output


def header(meta: dict) -> str:
    v = meta["versions"]
    return (f"CPU: {meta['cpu']} ({meta['cpu_count']} cores; flags: {' '.join(meta['cpu_flags']) or 'none listed'}), "
            f"{meta['threads']} threads on every side\n"
            f"torch {v['torch']}, onnxruntime {v['onnxruntime']}, transformers {v['transformers']}, "
            f"peftlab {v['peftlab']}\n"
            f"texts/s include tokenisation on every side; medians of {meta['repeats']} repeat(s); "
            "predict: length-sorted batches; serve path and ORT: batches in input order\n"
            f"suggested result name: bench/results/predict-vs-ort-{meta['machine']}-{time.strftime('%Y-%m-%d')}.json")


def print_table(corpus: str, max_length: int, n_texts: int, rows: list[dict]) -> None:
    groups = [("", 12), ("texts/s", 27), ("peftlab / ORT", 17), ("ms per batch p50/p95", 45),
              ("same top label", 16), ("max |prob diff|", 20), ("padding %", 15)]
    names = [f"{'model':<6}{'batch':>6}", f"{'predict':>9}{'serve':>9}{'ORT':>9}", f"{'predict':>9}{'serve':>8}",
             f"{'predict':>15}{'serve':>15}{'ORT':>15}", f"{'predict':>9}{'serve':>7}", f"{'predict':>10}{'serve':>10}",
             f"{'sorted':>7}{'input':>8}"]
    print(f"\n{corpus}: {n_texts} texts, max_length {max_length}")
    print(" | ".join(f"{title:^{width}}" for title, width in groups))
    print(" | ".join(names))
    for row in rows:
        p, s, o = row["predict"], row["serve"], row["ort"]

        def ms(side: dict) -> str:
            return f"{side['p50_ms']:.1f}/{side['p95_ms']:.1f}"

        print(" | ".join([
            f"{row['model']:<6}{row['batch_size']:>6}",
            f"{p['texts_per_s']:>9.1f}{s['texts_per_s']:>9.1f}{o['texts_per_s']:>9.1f}",
            f"{row['predict_vs_ort']:>8.2f}x{row['serve_vs_ort']:>7.2f}x",
            f"{ms(p):>15}{ms(s):>15}{ms(o):>15}",
            f"{p['label_agreement']:>9.3f}{s['label_agreement']:>7.3f}",
            f"{p['max_prob_diff']:>10.1e}{s['max_prob_diff']:>10.1e}",
            f"{100 * row['padding']['sorted']:>7.1f}{100 * row['padding']['input_order']:>8.1f}"]))
    print("padding %: padded positions in length-sorted batches (predict) and input-order batches (serve "
          "path, ORT);\nsame top label, max |prob diff|: each peftlab side against ORT")
    sys.stdout.flush()


def write_json(path: Path, meta: dict, rows: list[dict]) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    partial.replace(path)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from peftlab.serving.settings import ServeSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=2000, help="texts per corpus (default %(default)s)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeats", type=int, default=3, help="rounds of all sides; figures are medians")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch and ORT intra-op threads (default: all cores, %(default)s)")
    parser.add_argument("--corpora", nargs="+", choices=sorted(CORPORA), default=list(CORPORA))
    parser.add_argument("--workdir", type=Path, help="trained runs and exports go here (default: a temporary "
                        "directory, removed at the end)")
    parser.add_argument("--lora-run", type=Path, help="an existing LoRA run to export instead of training one")
    parser.add_argument("--full-run", type=Path, help="an existing full fine-tuning run to export instead")
    parser.add_argument("--train-steps", type=int, default=30, help="steps of each run trained here")
    parser.add_argument("--n-train", type=int, default=500, help="training rows of each run trained here")
    parser.add_argument("--n-eval", type=int, default=200, help="evaluation rows of each run trained here")
    parser.add_argument("--max-batch-tokens", type=int, default=ServeSettings().max_batch_tokens,
                        help="the serve path's token budget per forward pass (default: the server's, %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the figures here (bench/results/"
                        "predict-vs-ort-MACHINE-DATE.json)")
    args = parser.parse_args(argv)
    if (args.lora_run is None) != (args.full_run is None):
        parser.error("give both --lora-run and --full-run, or neither (both are then trained)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hardware = environment.hardware()
    meta = {"cpu": hardware["cpu"], "cpu_count": hardware["cpu_count"], "cpu_flags": cpu_flags(),
            "machine": machine_name(), "threads": args.threads, "versions": versions(),
            "git_revision": environment.git_revision(), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "texts": args.texts, "batch_sizes": args.batch_sizes, "repeats": args.repeats,
            "max_batch_tokens": args.max_batch_tokens,
            "corpora": {name: {"source": CORPORA[name][0], "max_length": CORPORA[name][1]} for name in args.corpora}}
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="predict-vs-ort-")))
        workdir.mkdir(parents=True, exist_ok=True)
        if args.lora_run:
            runs = {"lora": args.lora_run, "full": args.full_run}
        else:
            runs = train_runs(workdir, args.train_steps, args.n_train, args.n_eval)
        meta["runs"] = {name: str(path) for name, path in runs.items()}
        exports = {name: export(path, workdir / "exports" / name) for name, path in runs.items()}
        texts = {name: corpus_texts(CORPORA[name][0], args.texts) for name in args.corpora}
        print(header(meta), flush=True)

        rows: list[dict] = []
        for model_name, export_dir in exports.items():
            sides = load_sides(export_dir, args.threads, args.max_batch_tokens)
            for corpus in args.corpora:
                max_length = CORPORA[corpus][1]
                set_length(sides, max_length)
                for batch_size in args.batch_sizes:
                    row = {"model": model_name, "corpus": corpus, "max_length": max_length,
                           "texts": len(texts[corpus]), "batch_size": batch_size,
                           **measure(sides, texts[corpus], batch_size, max_length, args.repeats)}
                    rows.append(row)
                    if args.json:  # after every row: a run cut short still leaves what it measured
                        write_json(args.json, meta, rows)
            del sides
        for corpus in args.corpora:
            print_table(corpus, CORPORA[corpus][1], len(texts[corpus]), [r for r in rows if r["corpus"] == corpus])
    return 0


if __name__ == "__main__":
    sys.exit(main())
