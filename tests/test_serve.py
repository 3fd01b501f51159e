"""`megabert serve`: the real server as a subprocess on tiny models, checked over HTTP (httpx) and with
the official `openai` client against the in-process pipelines and the `megabert embed` CLI."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from megabert.inference.pipelines import pipeline  # noqa: E402
from tests.test_pipelines import NER_LABELS, build_model_folder  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore"}
TEXTS = ["the cat", "paris is the capital of france .", "a dog", "john smith wrote a book in london ."]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A `python -m megabert serve` subprocess; ``url``, ``log()``, ``stop()``."""

    def __init__(self, folder: Path, log_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.health_seen: list[int] = []  # /health statuses while waiting for it
        self._log = open(log_path, "w")  # noqa: SIM115 -- a file, not a pipe: a full pipe would block the server
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "megabert", "serve", str(folder), "--port", str(self.port), "--device", "cpu", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env={**ENV, **(env or {})},
        )  # fmt: skip

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}: {self.log()}"
            try:
                status = httpx.get(self.url + "/health", timeout=2).status_code
                self.health_seen.append(status)
                if status == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-models")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "pretraining": build_model_folder(root / "pretraining", "MegatronBertForPreTraining", initializer_range=0.5),
            "rerank": build_model_folder(root / "rerank", "MegatronBertForSequenceClassification", num_labels=1, seed=3),
            "cls": build_model_folder(
                root / "cls", "MegatronBertForSequenceClassification", id2label={0: "neg", 1: "pos", 2: "neutral"},
                label2id={"neg": 0, "pos": 1, "neutral": 2},
            ),
            "ner": build_model_folder(
                root / "ner", "MegatronBertForTokenClassification", id2label=NER_LABELS,
                label2id={v: k for k, v in NER_LABELS.items()}, seed=4, head_scale=10.0,
            ),
            "qa": build_model_folder(root / "qa", "MegatronBertForQuestionAnswering", seed=5, head_scale=10.0),
            "mc": build_model_folder(root / "mc", "MegatronBertForMultipleChoice", seed=6),
        }  # fmt: skip


@pytest.fixture(scope="module")
def servers(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """The servers most tests use, started together (each loads in its own process)."""
    logs = tmp_path_factory.mktemp("serve-logs")
    started = {
        # Each batch waits 0.1 s, so that concurrent requests queue up and share batches.
        "main": Server(
            folders["pretraining"], logs / "main.log", "--max-client-batch-size", "256", "--max-batch-tokens", "2048",
            env={"MEGABERT_SERVE_TEST_DELAY": "0.1"},
        ),
        "rerank": Server(folders["rerank"], logs / "rerank.log"),
        "cls": Server(folders["cls"], logs / "cls.log"),
        # Every batch waits 1 s; one request at a time; a key: for 401, 429 and the SIGTERM drain.
        "slow": Server(
            folders["pretraining"], logs / "slow.log", "--max-concurrent-requests", "1", "--api-key", "s3cret",
            env={"MEGABERT_SERVE_TEST_DELAY": "1.0"},
        ),
        # Every batch waits 2 s; small body limit and a 3 s request timeout.
        "limits": Server(
            folders["pretraining"], logs / "limits.log", "--max-body-bytes", "2000", "--request-timeout", "3",
            env={"MEGABERT_SERVE_TEST_DELAY": "2.0"},
        ),
        # The first batch after the warm-up raises.
        "ner": Server(folders["ner"], logs / "ner.log", env={"MEGABERT_SERVE_TEST_FAIL_BATCHES": "1"}),
    }  # fmt: skip
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


def post(server: Server, route: str, body: object, **kwargs: object) -> httpx.Response:
    return httpx.post(server.url + route, json=body, timeout=60, **kwargs)


def assert_error(response: httpx.Response, status: int, *words: str) -> str:
    """A JSON error of ``status`` whose one-line message holds ``words``."""
    assert response.status_code == status, response.text
    body = response.json()
    message = body["error"]["message"] if isinstance(body["error"], dict) else body["error"]
    assert "\n" not in message and "Traceback" not in message
    for word in words:
        assert word in message, message
    return message


# ------------------------------------------------------------------------ embeddings
def test_openai_client_matches_megabert_embed(servers: dict[str, Server], folders: dict[str, Path]) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=servers["main"].url + "/v1", api_key="unused", max_retries=0)
    response = client.embeddings.create(model="tiny", input=TEXTS)  # the client asks for base64 by default
    got = np.array([item.embedding for item in sorted(response.data, key=lambda d: d.index)])
    as_floats = client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float")
    cli = subprocess.run(
        [sys.executable, "-m", "megabert", "embed", str(folders["pretraining"]), *TEXTS, "--normalize", "--device", "cpu"],
        capture_output=True, text=True, timeout=120, env=ENV,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    want = np.array([json.loads(line)["embedding"] for line in cli.stdout.splitlines()])
    assert got.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.array([d.embedding for d in as_floats.data]), want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # unit length, as OpenAI's
    n_tokens = sum(len(ids) for ids in pipeline("feature-extraction", folders["pretraining"]).tokenizer(TEXTS)["input_ids"])
    assert response.usage.prompt_tokens == response.usage.total_tokens == n_tokens
    assert response.model == "tiny" and response.object == "list"
    # Token ids as input give the vector of the text they spell.
    ids = [t["id"] for t in post(servers["main"], "/tokenize", {"inputs": TEXTS[1], "add_special_tokens": False}).json()[0]]
    by_ids = client.embeddings.create(model="tiny", input=[ids])
    np.testing.assert_allclose(by_ids.data[0].embedding, want[1], atol=1e-5)
    with pytest.raises(openai.UnprocessableEntityError) as caught:  # OpenAI's error shape, which the client reads
        client.embeddings.create(model="tiny", input=[])
    assert caught.value.body["message"] == "input: empty (give at least one input)" and caught.value.body["param"] == "input"


def test_embed_tei_route_and_batch_invariance(servers: dict[str, Server], folders: dict[str, Path]) -> None:
    server = servers["main"]
    embed = pipeline("feature-extraction", folders["pretraining"], device="cpu")
    got = post(server, "/embed", {"inputs": TEXTS, "normalize": False}).json()
    np.testing.assert_allclose(got, embed(TEXTS, pooling="mean"), atol=1e-5)
    single = post(server, "/embed", {"inputs": TEXTS[0]}).json()  # normalize defaults to true (TEI)
    np.testing.assert_allclose(single, embed([TEXTS[0]], pooling="mean", normalize=True), atol=1e-5)

    # One text alone, among 200 texts of mixed lengths (several forward passes of the 2048-token
    # budget), and in 16 concurrent requests (batched together by the worker): the same vector.
    target = "john smith wrote a book in london ."
    words = "the cat sat on a big red house in paris and wrote music".split()
    rng = np.random.default_rng(0)
    crowd = [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(199)]
    crowd.insert(117, target)
    alone = np.array(post(server, "/embed", {"inputs": [target], "normalize": False}).json()[0])
    mixed = np.array(post(server, "/embed", {"inputs": crowd, "normalize": False}).json())
    assert mixed.shape == (200, 32)
    np.testing.assert_allclose(mixed[117], alone, atol=1e-6, rtol=0)
    np.testing.assert_allclose(mixed, embed(crowd, pooling="mean"), atol=1e-5)
    with ThreadPoolExecutor(16) as pool:
        bodies = [{"inputs": [target] if i % 4 == 0 else crowd[i * 10 : i * 10 + 5] + [target], "normalize": False} for i in range(16)]
        answers = list(pool.map(lambda body: post(server, "/embed", body).json(), bodies))
    for answer in answers:
        np.testing.assert_allclose(answer[-1], alone, atol=1e-6, rtol=0)
    metrics = httpx.get(server.url + "/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines() if line and line[0] != "#"}
    # Some batch held several requests (the concurrent ones), so the invariance above was across requests.
    assert values['megabert_batch_requests_bucket{le="1.0"}'] < values["megabert_batch_requests_count"]
    assert values["megabert_batch_requests_sum"] > values["megabert_batch_requests_count"]
    assert 'megabert_requests_total{route="/embed",status="200"}' in metrics
    assert "megabert_batch_tokens_bucket" in metrics and "megabert_queue_seconds_count" in metrics
    assert "megabert_queue_depth 0.0" in metrics
    # One access-log line per request.
    assert server.log().count('"POST /embed" 200') >= 19


# ------------------------------------------------------------------------ the other routes
def test_head_routes_match_pipelines(servers: dict[str, Server], folders: dict[str, Path]) -> None:
    server = servers["main"]
    fill = pipeline("fill-mask", folders["pretraining"], device="cpu")
    texts = ["paris is the [MASK] of france .", "the [MASK] wrote a [MASK] ."]
    got = post(server, "/fill-mask", {"inputs": texts, "parameters": {"top_k": 3}}).json()
    want = fill(texts, top_k=3)
    assert [[x["token"] for x in got[0]]] == [[x["token"] for x in want[0]]]
    assert [[x["token"] for x in m] for m in got[1]] == [[x["token"] for x in m] for m in want[1]]
    np.testing.assert_allclose([x["score"] for x in got[0]], [x["score"] for x in want[0]], atol=1e-5)
    assert got[0][0]["sequence"] == want[0][0]["sequence"]
    one = post(server, "/fill-mask", {"inputs": texts[0]}).json()  # one input: one result
    assert [x["token"] for x in one] == [x["token"] for x in fill(texts[0])]

    nsp = pipeline("next-sentence", folders["pretraining"], device="cpu")
    pairs = [["the cat", "a dog"], ["paris is big", "london is old"]]
    got = post(server, "/next-sentence", {"inputs": pairs}).json()
    want = nsp([tuple(p) for p in pairs])
    np.testing.assert_allclose([g["probability"] for g in got], [w["probability"] for w in want], atol=1e-5)
    single = post(server, "/next-sentence", {"inputs": pairs[1]}).json()
    assert single["probability"] == pytest.approx(want[1]["probability"], abs=1e-5)

    tokens = post(server, "/tokenize", {"inputs": ["the cats"]}).json()[0]
    assert [t["text"] for t in tokens] == ["[CLS]", "the", "cat", "s", "[SEP]"]
    assert [(t["start"], t["stop"]) for t in tokens[1:-1]] == [(0, 3), (4, 7), (7, 8)]
    ids = [t["id"] for t in tokens]
    assert post(server, "/decode", {"ids": ids}).json() == ["the cats"]
    assert post(server, "/decode", {"ids": [ids, ids], "skip_special_tokens": False}).json() == ["[CLS] the cats [SEP]"] * 2

    info = httpx.get(server.url + "/info").json()
    assert info["model_type"] == "pretraining" and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["config"]["hidden_size"] == 32 and info["max_input_length"] == 64
    assert info["limits"]["max_client_batch_size"] == 256 and info["limits"]["max_batch_tokens"] == 2048
    assert "/fill-mask" in info["routes"] and "/predict" not in info["routes"] and info["version"]


def test_predict_and_rerank(servers: dict[str, Server], folders: dict[str, Path]) -> None:
    classify = pipeline("text-classification", folders["cls"], device="cpu")
    inputs = ["a good movie", ["bad film", "the dog"]]
    got = post(servers["cls"], "/predict", {"inputs": inputs}).json()
    want = classify([inputs[0], tuple(inputs[1])], top_k=None)
    for g, w in zip(got, want):
        assert [x["label"] for x in g] == [x["label"] for x in w]
        np.testing.assert_allclose([x["score"] for x in g], [x["score"] for x in w], atol=1e-5)
    raw = post(servers["cls"], "/predict", {"inputs": "a good movie", "raw_scores": True}).json()
    raw_want = classify("a good movie", top_k=None, function_to_apply="none")
    assert [x["label"] for x in raw] == [x["label"] for x in raw_want]
    np.testing.assert_allclose([x["score"] for x in raw], [x["score"] for x in raw_want], atol=1e-5)
    assert_error(post(servers["cls"], "/rerank", {"query": "q", "texts": ["a"]}), 404, "1-label", "3 labels")

    scorer = pipeline("text-classification", folders["rerank"], device="cpu")
    query, texts = "who wrote the book ?", ["john smith wrote it", "the cat", "paris is a city", "a book"]
    got = post(servers["rerank"], "/rerank", {"query": query, "texts": texts, "return_text": True}).json()
    logits = [r["score"] for r in scorer([(query, t) for t in texts], function_to_apply="none")]
    scores = 1 / (1 + np.exp(-np.array(logits)))
    order = list(np.argsort(-scores, kind="stable"))
    assert [g["index"] for g in got] == order
    assert [g["text"] for g in got] == [texts[i] for i in order]
    np.testing.assert_allclose([g["score"] for g in got], scores[order], atol=1e-5)
    raw = post(servers["rerank"], "/rerank", {"query": query, "texts": texts, "raw_scores": True}).json()
    assert "text" not in raw[0]
    np.testing.assert_allclose(sorted((g["score"] for g in raw), reverse=True), sorted(logits, reverse=True), atol=1e-5)


# ------------------------------------------------------------------------ errors and limits
def test_bad_requests_are_json_errors_naming_the_field(servers: dict[str, Server]) -> None:
    server = servers["main"]
    bad = httpx.post(server.url + "/embed", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(bad, 422, "body", "JSON")
    assert_error(post(server, "/embed", {"normalize": True}), 422, "inputs", "missing")
    assert_error(post(server, "/embed", {"inputs": []}), 422, "inputs", "empty")
    assert_error(post(server, "/embed", {"inputs": ["ok", 3]}), 422, "inputs[1]", "string")
    assert_error(post(server, "/embed", {"inputs": "ok", "normalize": "yes"}), 422, "normalize")
    assert_error(post(server, "/embed", {"inputs": "ok", "colour": 1}), 422, "colour", "unknown")
    assert_error(post(server, "/v1/embeddings", {"input": "ok", "encoding_format": "hex"}), 422, "encoding_format")
    assert_error(post(server, "/v1/embeddings", {"input": [[5, 10**6]]}), 422, "input[0]", "vocabulary")
    assert_error(post(server, "/fill-mask", {"inputs": "no mask here"}), 422, "input 0", "[MASK]")
    assert_error(post(server, "/fill-mask", {"inputs": "a [MASK]", "parameters": {"top_kk": 2}}), 422, "top_kk")
    # Too long without truncate names the input and the limit; with truncate it is cut.
    long = "the cat " * 40
    assert_error(post(server, "/embed", {"inputs": ["short", long]}), 422, "input 1", "(64)", '"truncate": true')
    assert len(post(server, "/embed", {"inputs": [long], "truncate": True}).json()[0]) == 32
    assert_error(post(server, "/embed", {"inputs": ["a"] * 257}), 413, "257", "--max-client-batch-size 256")
    # A route without its head: 404 naming the heads the model has.
    assert_error(post(server, "/predict", {"inputs": "x"}), 404, "masked-lm", "next-sentence")
    assert_error(post(server, "/question-answering", {"inputs": {"question": "q", "context": "c"}}), 404, "masked-lm")
    assert_error(post(server, "/nowhere", {}), 404, "/nowhere", "/embed")
    assert_error(httpx.get(server.url + "/embed"), 405, "GET", "POST")
    assert post(server, "/embed", {"inputs": "still serving"}).status_code == 200
    assert "Traceback" not in server.log()


def test_api_key_and_429(servers: dict[str, Server]) -> None:
    server = servers["slow"]
    # /health answers 503 until the warm-up batch is answered (how many 503s the poll saw
    # depends on the machine's load: test_health_waits_for_the_warm_up checks the 503 itself).
    assert server.health_seen[-1] == 200 and set(server.health_seen) <= {200, 503}
    assert httpx.get(server.url + "/health").status_code == 200  # /health needs no key
    assert_error(post(server, "/embed", {"inputs": "a"}), 401, "API key")
    assert_error(post(server, "/embed", {"inputs": "a"}, headers={"Authorization": "Bearer wrong"}), 401)
    assert httpx.get(server.url + "/info").status_code == 401
    auth = {"Authorization": "Bearer s3cret"}
    results: dict[str, httpx.Response] = {}
    first = threading.Thread(target=lambda: results.update(first=post(server, "/embed", {"inputs": "a"}, headers=auth)))
    first.start()
    time.sleep(0.4)  # the first request now sits in its 1 s batch
    second = post(server, "/embed", {"inputs": "b"}, headers=auth)
    first.join()
    assert_error(second, 429, "--max-concurrent-requests 1")
    assert second.headers["retry-after"] == "1"
    assert results["first"].status_code == 200 and len(results["first"].json()[0]) == 32


def test_failed_batch_fails_only_its_requests(servers: dict[str, Server], folders: dict[str, Path]) -> None:
    server = servers["ner"]
    text = "john smith worked for apple in new york ."
    failed = post(server, "/token-classification", {"inputs": text})
    assert_error(failed, 500, "inference failed", "MEGABERT_SERVE_TEST_FAIL_BATCHES")
    params = {"aggregation_strategy": "simple"}
    got = post(server, "/token-classification", {"inputs": [text], "parameters": params})
    assert got.status_code == 200, got.text
    want = pipeline("token-classification", folders["ner"], device="cpu")([text], aggregation_strategy="simple")
    assert [(e["entity_group"], e["start"], e["end"]) for e in got.json()[0]] == [
        (e["entity_group"], e["start"], e["end"]) for e in want[0]
    ]
    np.testing.assert_allclose([e["score"] for e in got.json()[0]], [e["score"] for e in want[0]], atol=1e-5)


def metric_values(server: Server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and line[0] != "#"}


def test_body_limit_timeout_and_disconnect(servers: dict[str, Server]) -> None:
    server = servers["limits"]
    # Over --max-body-bytes: 413 naming the limit, before any parsing (invalid JSON is not a 422
    # here), with or without a content-length (a chunked body is counted as it arrives).
    big = json.dumps({"inputs": ["the cat " * 300]}).encode()
    response = httpx.post(server.url + "/embed", content=big, headers={"content-type": "application/json"})
    assert_error(response, 413, f"body: {len(big)} bytes", "--max-body-bytes 2000")
    assert_error(httpx.post(server.url + "/embed", content=b"{" * 3000), 413, "--max-body-bytes 2000")
    chunks = (b"x" * 500 for _ in range(6))
    assert_error(httpx.post(server.url + "/v1/embeddings", content=chunks), 413, "--max-body-bytes 2000")
    assert httpx.get(server.url + "/info").json()["limits"]["max_body_bytes"] == 2000

    # --request-timeout 3, 2 s a batch, one batch per set of parameters: A (0-2 s) answers; B runs
    # 2-4 s and times out at ~3.3 s (503, its answer unread); C would start at 4 s and is dropped
    # from the queue at ~3.6 s; D's client gives up at ~1.4 s: dropped from the queue too.
    before = metric_values(server)
    results: dict[str, object] = {}

    def send(name: str, body: dict, timeout: float = 60) -> None:
        try:
            results[name] = httpx.post(server.url + "/embed", json=body, timeout=timeout)
        except httpx.TimeoutException as exc:
            results[name] = exc

    bodies = {
        "A": ({"inputs": "a"}, 60), "B": ({"inputs": "b", "normalize": False}, 60),
        "C": ({"inputs": "c", "truncate": True}, 60), "D": ({"inputs": "d", "normalize": False, "truncate": True}, 0.5),
    }  # fmt: skip
    threads = []
    for name, (body, timeout) in bodies.items():
        threads.append(threading.Thread(target=send, args=(name, body, timeout)))
        threads[-1].start()
        time.sleep(0.3)
    for thread in threads:
        thread.join()
    assert results["A"].status_code == 200, results["A"].text
    assert_error(results["B"], 503, "--request-timeout 3")
    assert results["B"].headers["retry-after"] == "1"
    assert_error(results["C"], 503, "--request-timeout 3")
    assert isinstance(results["D"], httpx.TimeoutException)
    time.sleep(0.5)
    after = metric_values(server)
    dropped = {k: after.get(k, 0) - before.get(k, 0) for k in after if k.startswith("megabert_dropped_requests_total")}
    assert dropped == {'megabert_dropped_requests_total{reason="timeout"}': 1,
                       'megabert_dropped_requests_total{reason="disconnected"}': 1}, dropped  # fmt: skip
    # Only A and B reached the model; C and D never ran.
    assert after["megabert_batch_requests_count"] - before["megabert_batch_requests_count"] == 2
    assert after["megabert_queue_depth"] == 0
    assert post(server, "/embed", {"inputs": "still serving"}).status_code == 200


def test_sigterm_drains_in_flight_and_exits_0(servers: dict[str, Server]) -> None:
    server = servers["slow"]
    auth = {"Authorization": "Bearer s3cret"}
    results: dict[str, httpx.Response] = {}
    flight = threading.Thread(target=lambda: results.update(r=post(server, "/embed", {"inputs": "in flight"}, headers=auth)))
    flight.start()
    time.sleep(0.4)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    # Arriving during the drain (new connections, the in-flight request's batch still running):
    # 503 with a JSON error, on every route; /health says so too.
    late = post(server, "/embed", {"inputs": "too late"}, headers=auth)
    assert_error(late, 503, "shutting down")
    assert late.headers["connection"] == "close"
    assert_error(post(server, "/v1/embeddings", {"input": "too late"}, headers=auth), 503, "shutting down")
    assert httpx.get(server.url + "/health", timeout=5).status_code == 503
    assert server.proc.poll() is None  # still draining
    flight.join()
    assert server.proc.wait(30) == 0, server.log()
    assert results["r"].status_code == 200 and len(results["r"].json()[0]) == 32
    assert "megabert serve: stopped" in server.log()
    with pytest.raises(httpx.TransportError):  # no longer accepting
        httpx.get(server.url + "/health", timeout=2)


# ------------------------------------------------------------------------ more heads (slower)
@pytest.mark.slow
def test_question_answering_and_multiple_choice(folders: dict[str, Path], tmp_path: Path) -> None:
    qa_server, mc_server = Server(folders["qa"], tmp_path / "qa.log"), Server(folders["mc"], tmp_path / "mc.log")
    try:
        qa_server.wait_ready()
        mc_server.wait_ready()
        items = [{"question": "who wrote it ?", "context": "john smith wrote it in paris ."},
                 {"question": "where did mary play ?", "context": "mary played music in london ."}]  # fmt: skip
        got = post(qa_server, "/question-answering", {"inputs": items, "parameters": {"top_k": 2}}).json()
        want = pipeline("question-answering", folders["qa"], device="cpu")(items, top_k=2)
        for g, w in zip(got, want):
            assert [a["answer"] for a in g] == [a["answer"] for a in w]
            np.testing.assert_allclose([a["score"] for a in g], [a["score"] for a in w], atol=1e-5)
        one = post(qa_server, "/question-answering", {"inputs": items[0]}).json()
        assert one["answer"] == want[0][0]["answer"]

        question = {"question": "the man broke his toe . why ?", "choices": ["he dropped a book", "the cat", "a red car"]}
        got = post(mc_server, "/multiple-choice", {"inputs": question}).json()
        want = pipeline("multiple-choice", folders["mc"], device="cpu")(question)
        assert got["label"] == want["label"] and got["choice"] == want["choice"]
        np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-5)
        assert_error(post(mc_server, "/fill-mask", {"inputs": "a [MASK]"}), 404, "classifier")
    finally:
        qa_server.stop()
        mc_server.stop()
    assert qa_server.proc.returncode == 0 and mc_server.proc.returncode == 0


def test_responses_are_not_held_by_nagle(servers: dict[str, Server]) -> None:
    # The listening socket says IPPROTO_TCP, so asyncio sets TCP_NODELAY on each connection;
    # without it every response's body waited ~40 ms for the client's delayed ACK.
    from megabert.commands.serve import _listen

    sock = _listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()
    with httpx.Client(base_url=servers["cls"].url) as client:
        assert client.get("/health").status_code == 200


def test_health_waits_for_the_warm_up(folders: dict[str, Path]) -> None:
    """In process: /health is 503 ("loading") while the model has not answered its warm-up batch, then 200."""
    from fastapi.testclient import TestClient

    from megabert.serving.app import build_app, load_service, warm_up

    service = load_service(folders["cls"], device="cpu")
    app = build_app(service)
    try:
        with TestClient(app) as client:
            waiting = client.get("/health")
            assert waiting.status_code == 503 and waiting.json() == {"status": "loading"}, waiting.text
            warm_up(service)
            assert client.get("/health").status_code == 200
    finally:
        service.batcher.stop(timeout=10)


def test_missing_extra_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    import builtins

    from megabert.cli import main

    real_import = builtins.__import__

    def no_uvicorn(name: str, *args: object, **kwargs: object) -> object:
        if name == "uvicorn":
            raise ModuleNotFoundError("No module named 'uvicorn'", name="uvicorn")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvicorn)
    assert main(["serve", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "megabert serve: error: megabert serve needs fastapi, uvicorn and prometheus_client: pip install 'megabert[serve]'"
