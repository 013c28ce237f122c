"""`peftlab serve` under hostile or broken conditions: slow clients, huge texts, a failing model, full
queues, malformed requests, and what the server tells whom. Each test runs the real app under uvicorn
on 127.0.0.1 with a tiny random model (no training), and each is bounded to a few seconds."""

import dataclasses
import json
import resource
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_serve import Server, call, metric, status_and_json, wait_for

from peftlab.serving.adapters import ServedModel, ServeError
from peftlab.serving.server import exposure_warning
from peftlab.serving.settings import ServeSettings

BODY = {"inputs": "good w1 w2", "adapter": "a"}


@pytest.fixture(scope="module")
def served(tiny_models):
    """The tiny random BERT as a classifier, served as two adapters ("a" and "b") of one model: requests
    for both share forward passes, as adapters of one base do."""
    model = ServedModel.from_model(tiny_models["bert"], name="a", max_length=16, device="cpu")
    model.adapters["b"] = dataclasses.replace(model.adapters["a"], name="b")
    return model


class Wrapped:
    """The served model with a hook before each forward pass (to sleep, record or fail) and, optionally,
    another tokenizer."""

    def __init__(self, served, before=None, tokenizer=None):
        self.__dict__.update(served.__dict__)
        self.served, self.before, self.passes = served, before, []
        if tokenizer is not None:
            self.tokenizer = tokenizer

    def logits(self, ids, adapters):
        self.passes.append((len(ids), list(adapters)))
        if self.before:
            self.before(ids, adapters)
        return self.served.logits(ids, adapters)

    def scores(self, adapter, logits):
        return self.served.scores(adapter, logits)

    def info(self):
        return self.served.info()


# ---------------------------------------------------------------- 1. slow uploads


def raise_open_files(needed):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < needed:
        pytest.skip(f"needs {needed} open files (RLIMIT_NOFILE soft {soft}, hard {hard}) and cannot raise it")


def test_600_slow_uploads_hold_connections_not_slots(served):
    """600 clients send their headers and then a body byte now and then. Before, each held one of the
    512 request slots and every other request was 429; now a slot is taken once the body is in, and
    a normal request answers 200 at once."""
    slow = 600
    raise_open_files(2 * slow + 200)  # both ends of each connection are in this process
    sockets, stop = [], threading.Event()

    def trickle():  # a byte to each slow client every 0.2 s
        while not stop.wait(0.2):
            for s in list(sockets):
                try:
                    s.send(b" ")
                except OSError:
                    pass

    trickler = threading.Thread(target=trickle, daemon=True)
    with Server(served) as server:
        port = int(server.url.rsplit(":", 1)[1])
        head = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{")
        try:
            trickler.start()
            for _ in range(slow):
                connection = socket.create_connection(("127.0.0.1", port), timeout=5)
                connection.sendall(head)
                sockets.append(connection)
            state = server.server.server_state
            # every slow request reached the app: waiting for its body (or, before, answered 429)
            wait_for(lambda: len(state.tasks) + state.total_requests >= slow, 5, "the slow requests to arrive")
            assert metric(server.url, "peftlab_requests_in_flight") == 0
            started = time.perf_counter()
            status, answer = status_and_json(server.url, "/predict", BODY)
            took = time.perf_counter() - started
            assert status == 200, answer
            assert took < 1.0, f"a normal request took {took:.2f} s among {slow} slow uploads"
        finally:
            stop.set()
            trickler.join(5)
            for s in sockets:
                s.close()


def _until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends before it closes the connection (an answer may come in pieces)."""
    parts = []
    while part := sock.recv(4096):
        parts.append(part)
    return b"".join(parts)


def test_a_slow_body_is_408_and_a_slow_request_head_is_closed_at_the_read_deadline(served):
    """A byte now and then does not extend `read_timeout_s`: a body not in by then is answered 408, and
    a connection whose request head is not in by then is closed (uvicorn alone has no such deadline)."""
    with Server(served, read_timeout_s=0.6) as server:
        port = int(server.url.rsplit(":", 1)[1])
        bodies = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        heads = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        try:
            opened = time.monotonic()
            for s in bodies:
                s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{")
            for s in heads:
                s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            for _ in range(3):
                time.sleep(0.1)
                for s in bodies + heads:
                    s.sendall(b"1")
            for s in bodies:
                s.settimeout(3)
                answer = _until_closed(s)
                assert answer.startswith(b"HTTP/1.1 408") and b"within 0.6 s" in answer, answer
            for s in heads:
                s.settimeout(3)
                try:
                    assert s.recv(1000) == b""
                except ConnectionResetError:
                    pass
            assert time.monotonic() - opened < 2.5
            assert call(server.url, "/predict", BODY)[0] == 200
        finally:
            for s in bodies + heads:
                s.close()


def test_uvicorn_runs_with_bounded_connections_and_keep_alive(served):
    with Server(served, max_connections=3) as server:
        config = server.server.config
        assert config.limit_concurrency == 3 and config.timeout_keep_alive == 5
        assert call(server.url, "/predict", BODY)[0] == 200
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as big:  # a request head still
            big.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"x" * 20_000)  # unfinished
            assert big.recv(100).startswith(b"HTTP/1.1 400")  # past 16 KiB
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        try:
            wait_for(lambda: len(server.server.server_state.connections) >= 3, 5, "the idle connections")
            assert call(server.url, "/predict", BODY)[0] == 503  # a 4th connection
        finally:
            for s in idle:
                s.close()
        wait_for(lambda: len(server.server.server_state.connections) == 0, 5, "the idle connections to close")
        assert call(server.url, "/predict", BODY)[0] == 200


# ---------------------------------------------------------------- 2. huge texts


class RecordingTokenizer:
    """The tokenizer, recording the longest text each call gets; `delay` seconds a call."""

    def __init__(self, tokenizer, delay=0.0):
        self.tokenizer, self.delay, self.longest = tokenizer, delay, []

    def __call__(self, texts, **kwargs):
        batch = [texts] if isinstance(texts, str) else texts
        self.longest.append(max(len(t) for t in batch))
        time.sleep(self.delay)
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_text_over_max_text_chars_is_413_naming_the_limit(served):
    with Server(served, max_text_chars=1000) as server:
        for truncate in (True, False):
            status, answer = status_and_json(server.url, "/predict", {**BODY, "inputs": ["good", "w1 " * 400],
                                                                      "truncate": truncate})
            assert status == 413 and answer["error_type"] == "Validation"
            assert "input 1" in answer["error"] and "1000 characters" in answer["error"]
        assert call(server.url, "/predict", {**BODY, "inputs": "w1 " * 300, "truncate": True})[0] == 200


def test_a_long_text_is_cut_before_tokenising_with_the_same_answer(served):
    """A 60 000-character text with "truncate": the tokenizer sees a few hundred characters of it, and the
    answer is that of the text cut to max_length (16) tokens; without "truncate" it is 413 as before."""
    tokenizer = RecordingTokenizer(served.tokenizer)
    long_text = "good " + "w1 w2 bad " * 6000
    with Server(Wrapped(served, tokenizer=tokenizer)) as server:
        status, cut = status_and_json(server.url, "/predict", {**BODY, "inputs": long_text, "truncate": True})
        assert status == 200
        assert max(tokenizer.longest) < 2000, tokenizer.longest
        status, short = status_and_json(server.url, "/predict", {**BODY, "inputs": long_text[:200], "truncate": True})
        assert status == 200 and cut == short
        status, answer = status_and_json(server.url, "/predict", {**BODY, "inputs": long_text})
        assert status == 413 and "16 tokens" in answer["error"]
        assert max(tokenizer.longest) < 2000
    # the same token ids as the whole text's, for texts of long words, no spaces, or spaces at the cut
    from peftlab.serving.predictor import Predictor

    predictor = Predictor(served, ServeSettings())
    for text in (long_text, "w1" * 30000, "w1 " + "good" * 30000, "w1" * 400 + " " * 20000 + "w2 " * 200):
        whole = served.tokenizer(text, truncation=True, max_length=17)["input_ids"]
        assert served.tokenizer(predictor.covering_prefix(text, 17), truncation=True,
                                max_length=17)["input_ids"] == whole


def test_the_timeout_covers_tokenising(served):
    """A tokenizer that takes 1.5 s: past `timeout_s` (0.3) the answer is 504, not a late 200."""
    with Server(Wrapped(served, tokenizer=RecordingTokenizer(served.tokenizer, delay=1.5)), timeout_s=0.3) as server:
        started = time.perf_counter()
        status, answer = status_and_json(server.url, "/predict", BODY)
        assert (status, answer["error_type"]) == (504, "Timeout")
        assert time.perf_counter() - started < 1.2


# ---------------------------------------------------------------- 3. a failing forward pass


def test_a_request_that_breaks_the_model_fails_alone_and_health_tells_the_last_success(served, caplog):
    """Two requests of two adapters share a pass; one of them breaks the model. Each is run again alone:
    the other answers 200. /health reports when the last pass succeeded."""
    bad = served.tokenizer.convert_tokens_to_ids("dull")

    def before(ids, adapters):
        if any(bad in row for row in ids):
            raise RuntimeError("CUDA error: device-side assert at /secret/path/kernel.cu")

    model = Wrapped(served, before)
    with Server(model, max_wait_ms=500) as server:
        with ThreadPoolExecutor(2) as pool:
            good = pool.submit(status_and_json, server.url, "/predict", {"inputs": "good w1", "adapter": "a"})
            time.sleep(0.05)
            broken = pool.submit(status_and_json, server.url, "/predict", {"inputs": "dull w1", "adapter": "b"})
            assert good.result()[0] == 200
            status, answer = broken.result()
        assert (status, answer["error_type"]) == (500, "Backend")
        assert "secret" not in answer["error"] and "RuntimeError" not in answer["error"]
        assert "/secret/path/kernel.cu" in caplog.text  # the details are in the server's log
        assert model.passes[0][0] == 2 and sorted(model.passes[0][1]) == ["a", "b"]  # they did share a pass
        status, health = status_and_json(server.url, "/health")
        assert status == 200 and health["status"] == "ok" and 0 <= time.time() - health["last_success"] < 10


def test_health_is_503_when_passes_keep_failing_and_ok_again_after_a_success(served):
    broken = {"on": True}

    def before(ids, adapters):
        if broken["on"]:
            raise RuntimeError("the device is gone")

    with Server(Wrapped(served, before)) as server:
        assert call(server.url, "/predict", BODY)[0] == 500
        assert call(server.url, "/health")[0] == 200  # one failure may be the request's own
        for _ in range(2):
            assert call(server.url, "/predict", BODY)[0] == 500
        status, health = status_and_json(server.url, "/health")
        assert (status, health["error_type"]) == (503, "Unhealthy") and health["last_success"] is None
        assert health["failed_passes_since"] == 3
        broken["on"] = False
        assert call(server.url, "/predict", BODY)[0] == 200  # the server goes on serving
        status, health = status_and_json(server.url, "/health")
        assert status == 200 and health["failed_passes_since"] == 0 and health["last_success"] is not None


# ---------------------------------------------------------------- 4. the queue's rows


def test_rows_of_a_request_past_its_deadline_count_until_their_pass_ends(served):
    """A 4-text request times out (504) while its slow pass runs: it is no longer in flight, but its rows
    are still in the model. With --max-queue-rows 4 the next request is 429 at once, not a 504 later."""
    slow = {"left": 1}

    def before(ids, adapters):
        if slow["left"]:
            slow["left"] -= 1
            time.sleep(3.5)

    # The timeout leaves a busy machine time for an ordinary request; the slow pass outlasts it well.
    with Server(Wrapped(served, before), timeout_s=1.5, max_queue_rows=4) as server:
        status, answer = status_and_json(server.url, "/predict", {**BODY, "inputs": ["good"] * 4})
        assert (status, answer["error_type"]) == (504, "Timeout")
        assert metric(server.url, "peftlab_requests_in_flight") == 0
        assert metric(server.url, "peftlab_queue_rows") == 4
        started = time.perf_counter()
        status, answer = status_and_json(server.url, "/predict", BODY)
        assert (status, answer["error_type"]) == (429, "Overloaded") and "limit 4" in answer["error"]
        assert time.perf_counter() - started < 1.0  # at once, not after the 3.5 s pass
        wait_for(lambda: metric(server.url, "peftlab_queue_rows") == 0, 5, "the slow pass to end")
        assert call(server.url, "/predict", BODY)[0] == 200


# ---------------------------------------------------------------- 5. client mistakes


def test_client_mistakes_answer_4xx_with_a_short_message_and_the_server_goes_on(served):
    with Server(served) as server:
        cases = {
            "deeply nested": b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "lone surrogate": b'{"inputs": "good \\ud800", "adapter": "a"}',
            "lone surrogate in a list": b'{"inputs": ["good", "\\udfff"], "adapter": "a"}',
            "a number of 5000 digits": b'{"inputs": ' + b"1" * 5000 + b"}",
            "bytes not UTF-8": b'{"inputs": "\xff\xfe"}',
            "inputs a number": b'{"inputs": 5, "adapter": "a"}',
            "inputs an object": b'{"inputs": {"text": "good"}, "adapter": "a"}',
            "inputs a list of lists": b'{"inputs": [["good"]], "adapter": "a"}',
            "inputs null": b'{"inputs": null, "adapter": "a"}',
            "truncate a string": b'{"inputs": "good", "adapter": "a", "truncate": "yes"}',
            "truncate a number": b'{"inputs": "good", "adapter": "a", "truncate": 1}',
            "truncate null": b'{"inputs": "good", "adapter": "a", "truncate": null}',
            "adapter a list": b'{"inputs": "good", "adapter": ["a"]}',
            "adapter a lone surrogate": b'{"inputs": "good", "adapter": "\\ud800"}',
        }
        for case, raw in cases.items():
            status, text = call(server.url, "/predict", raw=raw)
            answer = json.loads(text)
            assert status in (400, 404, 422), (case, status, answer)
            assert set(answer) == {"error", "error_type"} and len(answer["error"]) < 200, (case, answer)
            assert "Traceback" not in answer["error"] and "Error" not in answer["error"], (case, answer)
        assert call(server.url, "/predict", BODY)[0] == 200


# ---------------------------------------------------------------- 6. what the server shows, and to whom


def test_docs_are_off_unless_asked_and_requests_must_be_json(served):
    with Server(served) as server:
        assert call(server.url, "/openapi.json")[0] == 404 and call(server.url, "/docs")[0] == 404
        for content_type in ("text/plain", "application/x-www-form-urlencoded", ""):
            status, answer = status_and_json(server.url, "/predict", BODY, {"Content-Type": content_type})
            assert (status, answer["error_type"]) == (415, "Validation") and "application/json" in answer["error"]
        assert call(server.url, "/predict", BODY, {"Content-Type": "application/json; charset=utf-8"})[0] == 200
    with Server(served, docs=True) as server:
        assert call(server.url, "/docs")[0] == 200
        assert "/predict" in json.loads(call(server.url, "/openapi.json")[1])["paths"]


def test_info_shows_no_local_path_without_a_key(served, tiny_models):
    local = str(tiny_models["bert"])
    on_a_path = dataclasses.replace(served, base=local)  # as adapters trained on a local model directory are
    with Server(on_a_path) as server:
        status, text = call(server.url, "/info")
        assert status == 200 and str(tiny_models["bert"].parent) not in text
        assert json.loads(text)["base"] == "bert"
    with Server(on_a_path, api_key="k") as server:
        assert call(server.url, "/info")[0] == 401
        status, text = call(server.url, "/info", headers={"Authorization": "Bearer k"})
        assert status == 200 and json.loads(text)["base"] == local


def test_a_warning_when_listening_beyond_loopback_with_no_key():
    assert exposure_warning(ServeSettings(host="127.0.0.1")) is None
    assert exposure_warning(ServeSettings(host="localhost")) is None
    assert exposure_warning(ServeSettings(host="::1")) is None
    assert exposure_warning(ServeSettings(host="0.0.0.0", api_key="k")) is None
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        assert "PEFTLAB_API_KEY" in exposure_warning(ServeSettings(host=host))


def test_serve_prints_the_warning_at_start(served, monkeypatch, capsys):
    import uvicorn

    from peftlab.serving import server as server_module

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: None)
    server_module.serve(served, ServeSettings(host="0.0.0.0", port=0))
    assert "no PEFTLAB_API_KEY" in capsys.readouterr().err
    server_module.serve(served, ServeSettings(host="127.0.0.1", port=0))
    assert "PEFTLAB_API_KEY" not in capsys.readouterr().err


def test_an_adapter_name_must_match_whole(tiny_models):
    for bad in ("abc\n", "a\nb", "a" * 65):
        with pytest.raises(ServeError, match="adapter name"):
            ServedModel.from_model(tiny_models["bert"], name=bad)
