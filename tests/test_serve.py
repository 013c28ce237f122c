"""`peftlab serve`: several adapters on one base, mixed batches, and every limit, over real HTTP."""

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest

from peftlab.cli import main
from peftlab.config_loading import validate_config
from peftlab.serving.adapters import ServedModel, ServeError
from peftlab.serving.batcher import MicroBatcher
from peftlab.serving.inference import Classifier
from peftlab.serving.server import create_app, uvicorn_config
from peftlab.serving.settings import ServeSettings
from peftlab.training.run import train

TEXTS = ["good w1 w2", "w3 awful w4 w5 w6 w7 w8", "lovely", "w9 w10 dull w11", "fine w1 w2 w3 w4 w5 w6 w7 w8 w9"]


def three_class_file(toy_files, root):
    """The toy task with a third class: texts holding both a positive and a negative word."""
    frame = pd.read_csv(toy_files[0])
    mixed = frame.sample(frac=0.3, random_state=0).copy()
    mixed["text"] = mixed["text"] + " good bad"
    mixed["label"] = "mixed"
    pd.concat([frame, mixed]).to_csv(root / "three.csv", index=False)
    return root / "three.csv"


def train_run(tiny_models, root, arch, name, train_file, eval_file, method):
    return train(validate_config({
        "model": {"name": str(tiny_models[arch]), "max_length": 16},
        "data": {"train_file": str(train_file), "eval_file": str(eval_file)},
        "method": method, "train": {"epochs": 2, "lr": 1e-2},
        "output": {"dir": str(root), "name": name, "progress": False, "cache_dir": str(root / "cache")},
    }))


@pytest.fixture(scope="module")
def runs(tiny_models, toy_files, tmp_path_factory):
    """Per architecture: LoRA on 2 labels, LoRA on 3 labels (another head width); DoRA and IA3 on BERT."""
    root = tmp_path_factory.mktemp("serve-runs")
    three = three_class_file(toy_files, root)
    lora = {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    made = {}
    for arch in ("bert", "roberta"):
        made[arch, "two"] = train_run(tiny_models, root, arch, f"{arch}-two", toy_files[0], toy_files[1], lora)
        made[arch, "three"] = train_run(tiny_models, root, arch, f"{arch}-three", three, three,
                                        {**lora, "targets": "all-linear"})
    made["bert", "dora"] = train_run(tiny_models, root, "bert", "bert-dora", toy_files[0], toy_files[1],
                                     {**lora, "kind": "dora"})
    made["bert", "ia3"] = train_run(tiny_models, root, "bert", "bert-ia3", toy_files[0], toy_files[1],
                                    {"kind": "ia3"})
    return made


def single_adapter(run, texts):
    return Classifier.from_run(run).probabilities(texts)


@pytest.mark.parametrize("mix_rows", [True, None])  # one pass routed by row (a GPU's way), or one per adapter
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_a_mixed_batch_equals_single_adapter_calls_row_for_row(runs, arch, mix_rows):
    specs = [("two", runs[arch, "two"]), ("three", runs[arch, "three"])]
    if arch == "bert":
        specs.append(("a", runs["bert", "dora"]))  # DoRA rows are run apart: peft does not mix them
    served = ServedModel.from_adapters(specs, device="cpu")
    served.mix_rows = mix_rows
    assert served.adapters["two"].mixable and served.adapters["three"].mixable
    assert arch != "bert" or not served.adapters["a"].mixable
    names = [name for name, _ in specs]
    adapters = [names[i % len(names)] for i in range(len(TEXTS) * 2)]
    texts = TEXTS * 2
    got = served.probabilities(served.tokenizer(texts)["input_ids"], adapters)
    for name, run in specs:
        rows = [i for i, a in enumerate(adapters) if a == name]
        want = single_adapter(run, [texts[i] for i in rows])
        assert np.allclose(np.stack([got[i] for i in rows]), want, atol=1e-5), name
    assert {len(p) for p in got} == {2, 3}



def test_one_adapter_passes_run_on_real_tokens_only_and_mixed_ones_by_row(runs):
    """On a CPU a pass through one adapter packs the texts' tokens (packed_tokens.py): the same answers
    as the padded pass. There adapters take a pass each; a pass of mixed adapters (mix_rows, a GPU's
    default) keeps its rows, which peft routes one by one."""
    import torch

    from peftlab.serving.inference import padded_inputs

    served = ServedModel.from_adapters([("two", runs["bert", "two"]), ("three", runs["bert", "three"])], device="cpu")
    last_layer = served.model.get_base_model().bert.encoder.layer[-1]
    seen = []
    last_layer.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[:2])))
    ids = served.tokenizer(TEXTS)["input_ids"]
    got = served.probabilities(ids, ["three"] * len(TEXTS))
    assert seen == [(1, sum(len(x) for x in ids))]  # one row of real tokens
    served.model.set_adapter(served.adapters["three"].key)
    with torch.inference_mode():
        padded = served.model(**padded_inputs(served.tokenizer, ids, served.device)).logits
    temperature = served.adapters["three"].temperature[0]  # answers are calibrated (calibration.py)
    assert np.allclose(np.stack(got), torch.softmax(padded / temperature, dim=-1).numpy(), atol=1e-5)

    mixed = ["two", "three"] * 2 + ["two"]
    seen.clear()
    served.probabilities(ids, mixed)  # on a CPU: a packed pass per adapter
    assert seen == [(1, sum(len(x) for x, a in zip(ids, mixed) if a == name)) for name in ("two", "three")]
    seen.clear()
    served.mix_rows = True
    served.probabilities(ids, mixed)
    assert seen == [(len(TEXTS), max(len(x) for x in ids))]  # one pass of padded rows


def test_adapters_on_another_base_or_with_bad_names_are_refused_before_loading(runs, tiny_models, tmp_path):
    with pytest.raises(ServeError, match="trained on"):
        ServedModel.from_adapters([("a", runs["bert", "two"]), ("b", runs["roberta", "two"])])
    with pytest.raises(ServeError, match="trained on"):
        ServedModel.from_adapters([("a", runs["bert", "two"])], base=str(tiny_models["roberta"]))
    for bad in ("../x", "/etc/passwd", "", "a b"):
        with pytest.raises(ServeError, match="adapter name"):
            ServedModel.from_adapters([(bad, runs["bert", "two"])])
    with pytest.raises(ServeError, match=r"different PEFT types.*b \(IA3\)"):
        ServedModel.from_adapters([("a", runs["bert", "two"]), ("b", runs["bert", "ia3"])])
    pickled = tmp_path / "pickled"
    shutil.copytree(runs["bert", "two"], pickled)
    (pickled / "model" / "adapter_model.safetensors").rename(pickled / "model" / "adapter_model.bin")
    with pytest.raises(ServeError, match="no adapter_model.safetensors"):
        ServedModel.from_adapters([("a", pickled)])
    with pytest.raises(ServeError, match="given twice"):
        ServedModel.from_adapters([("a", runs["bert", "two"]), ("a", runs["bert", "three"])])


def test_the_batcher_puts_waiting_requests_of_different_adapters_in_one_forward_pass():
    calls = []

    def forward(ids, adapters):
        calls.append((len(ids), sorted(set(adapters))))
        return [np.array([len(x)], dtype=float) for x in ids]

    batcher = MicroBatcher(forward, max_batch_tokens=40, max_wait_s=0.01)
    futures = [batcher.submit([[1] * n for n in lengths], adapter)
               for lengths, adapter in [([3, 5], "a"), ([4], "b"), ([2, 2, 2], "a"), ([9, 1], "b")]]
    batcher.start()  # all four are already waiting
    results = [f.result(timeout=5) for f in futures]
    batcher.stop()
    assert [[int(p[0]) for p in r] for r in results] == [[3, 5], [4], [2, 2, 2], [9, 1]]
    # 3 requests (6 rows, longest 5 -> 30 tokens) fit the budget; the 4th (longest 9) opens the next batch.
    assert calls[0] == (6, ["a", "b"]) and sum(n for n, _ in calls) == 8


class Server:
    """The real app under uvicorn on a free local port, in a thread of the test process."""

    def __init__(self, served, **settings):
        import uvicorn

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        options = ServeSettings(port=port, **settings)
        self.app = create_app(served, options)
        self.server = uvicorn.Server(uvicorn_config(self.app, options))  # the limits of `peftlab serve`
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def call(url, path, body=None, headers=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json",
                                                                     **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def status_and_json(*args, **kwargs):
    status, text = call(*args, **kwargs)
    return status, json.loads(text) if text.startswith(("{", "[")) else text


@pytest.fixture(scope="module")
def served(runs):
    return ServedModel.from_adapters([("sentiment", runs["bert", "two"]), ("mood", runs["bert", "three"]),
                                      ("dora", runs["bert", "dora"])], device="cpu")


def test_predict_answers_in_the_text_embeddings_inference_shape(served, runs):
    with Server(served) as server:
        status, one = status_and_json(server.url, "/predict", {"inputs": TEXTS[0], "adapter": "sentiment"})
        assert status == 200 and [set(x) for x in one] == [{"label", "score"}] * 2
        assert one[0]["score"] >= one[1]["score"] and abs(sum(x["score"] for x in one) - 1) < 1e-5
        status, many = status_and_json(server.url, "/predict", {"inputs": TEXTS, "adapter": "mood"})
        want = single_adapter(runs["bert", "three"], TEXTS)
        labels = served.adapters["mood"].labels
        for answer, probabilities in zip(many, want):
            assert {x["label"]: x["score"] for x in answer} == pytest.approx(dict(zip(labels, probabilities)),
                                                                             abs=1e-5)
        status, info = status_and_json(server.url, "/info")
        assert info["adapters"]["mood"]["labels"] == labels and info["limits"]["max_batch_inputs"] == 32
        assert "api_key" not in info["limits"] and info["adapters"]["dora"]["mixed_batches"] is False
        status, health = status_and_json(server.url, "/health")
        assert status == 200 and health["status"] == "ok" and health["failed_passes_since"] == 0
        assert 0 <= time.time() - health["last_success"] < 60


def test_every_limit_answers_with_a_clear_json_error(served):
    limits = dict(max_batch_inputs=4, max_payload_bytes=4000)
    with Server(served, **limits) as server:
        def error(body=None, raw=None, path="/predict"):
            status, answer = status_and_json(server.url, path, body, raw=raw)
            assert set(answer) == {"error", "error_type"}, answer
            return status, answer["error_type"], answer["error"]

        assert error({"inputs": [], "adapter": "sentiment"})[:2] == (400, "Empty")
        assert error({"inputs": "   ", "adapter": "sentiment"})[:2] == (400, "Empty")
        for name in ("../x", "/etc/passwd", "SENTIMENT", 3):
            status, kind, message = error({"inputs": "good", "adapter": name})
            assert (status, kind) == (404, "NotFound") and "sentiment" in message
        assert error({"inputs": ["good"] * 5, "adapter": "sentiment"})[:2] == (413, "Validation")
        # the body's size, not the text's tokens (a text of 2000 words is over 16 tokens too)
        status, kind, message = error({"inputs": "good " * 2000, "adapter": "sentiment"})
        assert (status, kind) == (413, "Validation") and "over the limit of 4000 bytes" in message
        status, text = chunked_post(server.url, b'{"inputs": "' + b"good " * 1000 + b'", "adapter": "sentiment"}')
        assert status == 413 and "over the limit of 4000 bytes" in json.loads(text)["error"]
        status, text = chunked_post(server.url, b'{"inputs": "good", "adapter": "sentiment"}')
        assert status == 200 and len(json.loads(text)) == 2  # chunked bodies are read, within the limit
        long_text = "good " + "w1 " * 40
        status, kind, message = error({"inputs": long_text, "adapter": "sentiment"})
        assert status == 413 and "16 tokens" in message and "truncate" in message
        status, answer = status_and_json(server.url, "/predict", {"inputs": long_text, "adapter": "sentiment",
                                                                  "truncate": True})
        assert status == 200 and len(answer) == 2
        assert error(raw=b"{not json")[:2] == (422, "Validation")
        assert error({"inputs": "good", "adapter": "sentiment", "top_k": 1})[:2] == (422, "Validation")
        assert error({"inputs": "good"})[:2] == (400, "Validation")  # three adapters: which one?
        status, metrics = call(server.url, "/metrics")
        assert 'peftlab_requests_total{adapter="",status="404"} 4.0' in metrics
        assert 'peftlab_requests_total{adapter="sentiment",status="200"} 2.0' in metrics  # truncated, chunked


def test_a_bearer_key_guards_everything_but_health(served):
    with Server(served, api_key="s3cret") as server:
        body = {"inputs": "good", "adapter": "sentiment"}
        assert status_and_json(server.url, "/predict", body)[1]["error_type"] == "Unauthorized"
        assert call(server.url, "/predict", body, {"Authorization": "Bearer wrong"})[0] == 401
        assert call(server.url, "/info")[0] == 401
        assert call(server.url, "/predict", body, {"Authorization": "Bearer s3cret"})[0] == 200
        assert call(server.url, "/health")[0] == 200


def chunked_post(url, body: bytes, chunk=512):
    """POST /predict with Transfer-Encoding: chunked (no Content-Length)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request("POST", "/predict", body=(body[i : i + chunk] for i in range(0, len(body), chunk)),
                           headers={"Content-Type": "application/json"}, encode_chunked=True)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


class SlowModel:
    """The served model with a forward pass that takes `delay` seconds (the first `times` passes)."""

    def __init__(self, served, delay, times=None):
        self.__dict__.update(served.__dict__)
        self.served, self.delay, self.times = served, delay, times

    def logits(self, ids, adapters):
        if self.times is None or self.times > 0:
            self.times = None if self.times is None else self.times - 1
            time.sleep(self.delay)
        return self.served.logits(ids, adapters)

    def scores(self, adapter, logits):
        return self.served.scores(adapter, logits)

    def info(self):
        return self.served.info()


def metric(url, name):
    line = next(line for line in call(url, "/metrics")[1].splitlines() if line.startswith(name + " "))
    return float(line.split()[-1])


def wait_for(condition, seconds=10.0, what="a condition"):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_over_the_concurrency_limit_is_429_at_once_and_a_slow_answer_is_504(served):
    # The timeout leaves a busy machine time for an ordinary request; the slow pass outlasts it well.
    with Server(SlowModel(served, 3.5, times=1), max_concurrent=1, timeout_s=1.5) as server:
        body = {"inputs": "good", "adapter": "sentiment"}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(call, server.url, "/predict", body)
            wait_for(lambda: metric(server.url, "peftlab_requests_in_flight") == 1, what="the first request's slot")
            started = time.perf_counter()
            status, answer = status_and_json(server.url, "/predict", body)
            assert (status, answer["error_type"]) == (429, "Overloaded")
            assert time.perf_counter() - started < 1.0  # at once: far less than the 3.5 s pass it would wait for
            status, text = first.result()
            assert status == 504 and json.loads(text)["error_type"] == "Timeout"
        # the slow pass ends (its rows leave the queue); the server goes on serving
        wait_for(lambda: metric(server.url, "peftlab_queue_rows") == 0, what="the slow pass to end")
        assert call(server.url, "/health")[0] == 200
        status, answer = status_and_json(server.url, "/predict", body)
        assert status == 200 and len(answer) == 2


def test_a_bounded_load_of_mixed_adapters_finishes_with_no_failed_request(served, runs):
    want = {name: single_adapter(runs["bert", key], TEXTS)
            for name, key in [("sentiment", "two"), ("mood", "three"), ("dora", "dora")]}
    failures, answered = [], []

    def client(index):
        adapter = list(want)[index % 3]
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            status, answer = status_and_json(server.url, "/predict", {"inputs": TEXTS, "adapter": adapter})
            labels = served.adapters[adapter].labels
            if status != 200 or not all(
                    np.allclose([{x["label"]: x["score"] for x in a}[label] for label in labels], p, atol=1e-5)
                    for a, p in zip(answer, want[adapter])):
                failures.append((status, answer))
            answered.append(adapter)

    with Server(served, max_wait_ms=20) as server:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(client, range(8)))
        metrics = call(server.url, "/metrics")[1]
    assert not failures and len(answered) >= 8
    # some forward passes held more than one adapter's rows
    mixed = next(line for line in metrics.splitlines() if line.startswith('peftlab_batch_adapters_bucket{le="1.0"}'))
    total = next(line for line in metrics.splitlines() if line.startswith("peftlab_batch_adapters_count"))
    assert float(mixed.split()[-1]) < float(total.split()[-1])


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_cli_serves_a_merged_export_until_stopped(runs, tmp_path):
    assert main(["export", str(runs["bert", "three"]), "--merged", str(tmp_path / "merged")]) == 0
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "peftlab", "serve", "--model", str(tmp_path / "merged"),
                                "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if call(url, "/health")[0] == 200:
                    break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
                time.sleep(0.2)
        status, answer = status_and_json(url, "/predict", {"inputs": TEXTS})
        want, labels = single_adapter(runs["bert", "three"], TEXTS), Classifier.from_run(runs["bert", "three"]).labels
        assert status == 200
        assert all(np.allclose([{x["label"]: x["score"] for x in a}[k] for k in labels], p, atol=1e-5)
                   for a, p in zip(answer, want))
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_the_cli_refuses_bad_adapter_arguments_with_one_line(runs, capsys):
    assert main(["serve", "--adapter", f"../x={runs['bert', 'two']}"]) == 2
    assert "adapter name '../x'" in capsys.readouterr().err
    assert main(["serve", "--adapter", "nothing"]) == 2
    assert "NAME=RUN" in capsys.readouterr().err
    assert main(["serve"]) == 2
    assert main(["serve", "--adapter", f"a={runs['bert', 'two']}", "--max-batch-inputs", "0"]) == 2
    assert "--max-batch-inputs" in capsys.readouterr().err
