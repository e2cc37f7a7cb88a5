"""`pipeline serve` over real HTTP: `pipeline serve` itself in a second process (and the app
in a thread where a test needs odd limits), on 127.0.0.1, over small indexes of a random tiny
GPT-2, asked with a real client (httpx). Answers are checked against independent paths: the
CLI's own search, the Encoder's vectors, metrics.py's similarity; every refusal is one JSON
line with its status; a folder rebuilt under the server is served anew without a failed
request (503s aside); concurrent requests share forward passes and get the answers they get
one by one. The batcher and the metrics text are also tested alone."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers_cli import ROOT, build_index, cli, stage_commands, write_corpus

from pipeline.analysis.metrics import METRICS, similarity, similarity_matrix
from pipeline.serve.batching import NO_BATCHING, Batcher, Limits, QueueFull, joins
from pipeline.serve.metrics import Metrics
from pipeline.serve.schema import validation_message

WAIT = 60  # seconds for a server to start, on a slow shared CI machine
KEY = "s3cret-key"
QUERIES = [f"{word} baked in the oven {i}" for i, word in
           enumerate(["bread", "rye loaf", "crusty roll", "sourdough", "cheese", "brie"] * 8)]


# --- set-up -----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`pipeline serve ARGS` in a second process, on a free port of 127.0.0.1."""

    def __init__(self, args: list, log: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "serve", *map(str, args), "--port",
                 str(self.port)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})})
        deadline = time.monotonic() + WAIT
        while not self.healthy():
            assert self.process.poll() is None, f"the server died: {log.read_text()}"
            assert time.monotonic() < deadline, f"no answer in {WAIT} s: {log.read_text()}"
            time.sleep(0.1)

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self):
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def indexes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    return {"bread": build_index(root, "bread", 120, "bread"),
            "cheese": build_index(root, "cheese", 60, "cheese")}


@pytest.fixture(scope="module")
def server(indexes, tmp_path_factory):
    running = Server(["--index", indexes["bread"], "--index", indexes["cheese"]],
                     tmp_path_factory.mktemp("logs") / "serve.log")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=WAIT,
                      limits=httpx.Limits(max_connections=64)) as http:
        yield http


def is_one_line_error(response) -> bool:
    body = response.json()
    return list(body) == ["error"] and isinstance(body["error"], str) and body["error"] \
        and "\n" not in body["error"] and "Traceback" not in body["error"]


def cli_search(index: Path, queries: list[str], k: int, tmp_path: Path) -> list[list[dict]]:
    """The CLI's own answer (`pipeline search --json`), for queries one per line."""
    file = tmp_path / "queries.txt"
    file.write_text("\n".join(queries) + "\n")
    result = cli("search", "--queries", file, "--index", index, "-k", k, "--json")
    assert result.exit_code == 0, result.output
    return [answer["hits"] for answer in json.loads(result.stdout)]


def assert_same_hits(got: list[dict], want: list[dict], tol: float = 1e-5):
    """Equal hits, except that two documents whose scores tie within `tol` may swap: a
    batched forward pass rounds a little differently from a forward pass alone."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["rank"] == w["rank"] and g["score"] == pytest.approx(w["score"], abs=tol)
        if g["doc_id"] == w["doc_id"]:
            assert (g["row"], g["chunk"], g["text"]) == (w["row"], w["chunk"], w["text"])
        else:
            assert abs(g["score"] - w["score"]) < tol


# --- the batcher and the metrics text, alone --------------------------------------------------

def run_batched(items, limits: Limits, cost=lambda item: 1):
    """Submit all items at once; (results, the batches process saw)."""
    batches = []

    def process(batch):
        batches.append(list(batch))
        return [item * 10 for item in batch]

    async def main():
        batcher = Batcher(process, cost, limits)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(i) for i in items))
        finally:
            await batcher.stop()

    return asyncio.run(main()), batches


def test_the_batcher_answers_each_request_from_shared_batches():
    results, batches = run_batched(list(range(40)), Limits(window_s=0.01))
    assert results == [i * 10 for i in range(40)]
    assert len(batches) < 40 and sorted(i for b in batches for i in b) == list(range(40))


def test_the_batcher_keeps_batches_within_the_budget():
    _, batches = run_batched(list(range(9)), Limits(window_s=0.01, max_cost=10), lambda i: 5)
    assert [len(b) for b in batches] == [2, 2, 2, 2, 1]
    _, alone = run_batched(list(range(5)), NO_BATCHING)
    assert [len(b) for b in alone] == [1] * 5
    assert joins([], 10_000, Limits(max_cost=10))  # a request over the budget runs alone


def test_the_batcher_refuses_when_its_queue_is_full_and_fails_a_batch_whole():
    async def main():
        started = threading.Event()

        def process(batch):
            started.set()
            time.sleep(0.2)
            if "bad" in batch:
                raise ValueError("bad batch")
            return batch

        batcher = Batcher(process, lambda item: 1, Limits(window_s=0, max_items=2, max_queue=2))
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit("a"))
        while not started.is_set():
            await asyncio.sleep(0.001)
        queued = [asyncio.ensure_future(batcher.submit(x)) for x in ("bad", "c")]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await batcher.submit("d")
        assert await first == "a"
        outcomes = await asyncio.gather(*queued, return_exceptions=True)
        assert [str(o) for o in outcomes] == ["bad batch", "bad batch"]
        assert await batcher.submit("e") == "e"  # the loop goes on after a failed batch
        await batcher.stop()

    asyncio.run(main())


def test_a_lone_request_does_not_wait_out_the_window():
    async def main():
        batcher = Batcher(lambda batch: batch, lambda item: 1, Limits(window_s=1.0))
        await batcher.start()
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await batcher.submit("alone") == "alone"
        await batcher.stop()
        return loop.time() - start

    assert asyncio.run(main()) < 0.5


def test_metrics_are_prometheus_text():
    metrics = Metrics()
    metrics.observe_request("/search", 200, 0.003)
    metrics.observe_request("/search", 200, 0.2)
    metrics.observe_batch("a", 3, 5)
    text = metrics.render({'we"ird': 2})
    assert 'pipeline_requests_total{route="/search",status="200"} 2' in text.splitlines()
    assert 'pipeline_request_duration_seconds_bucket{route="/search",le="0.005"} 1' in text
    assert 'pipeline_request_duration_seconds_bucket{route="/search",le="+Inf"} 2' in text
    assert 'pipeline_batch_requests_bucket{index="a",le="2"} 0' in text
    assert 'pipeline_batch_requests_bucket{index="a",le="4"} 1' in text
    assert 'pipeline_queue_depth{index="we\\"ird"} 2' in text
    assert text.endswith("\n") and "# TYPE pipeline_batch_texts histogram" in text


def test_validation_problems_are_one_line():
    assert validation_message([{"type": "json_invalid", "loc": ("body", 5), "msg": "JSON "
                                "decode error", "ctx": {"error": "Expecting value"}}]) \
        == "malformed JSON: Expecting value"
    assert validation_message([{"type": "int_type", "loc": ("body", "k"), "msg": "Input should "
                                "be a valid integer"}] * 2) \
        == "k: Input should be a valid integer (and 1 more)"


# --- answers ----------------------------------------------------------------------------------

def test_health_and_info(client, indexes):
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["default_index"] == "bread" and set(info["indexes"]) == {"bread", "cheese"}
    bread = info["indexes"]["bread"]
    index_json = json.loads((indexes["bread"] / "index.json").read_text())
    identity = index_json["embed_identity"]
    assert bread == {"documents": 120, "rows": 120, "dim": index_json["dim"],
                     "key": index_json["key"], "recall": index_json["recall"],
                     "model": identity["model"], "model_sha256": identity["model_sha256"],
                     "tokenizer": identity["tokenizer"]}
    assert info["indexes"]["cheese"]["documents"] == 60


def test_search_answers_as_the_cli_searches(client, indexes, tmp_path):
    queries = ["bread baked for 3 hours", "oven 5", "number 42"]
    for query, want in zip(queries, cli_search(indexes["bread"], queries, 5, tmp_path),
                           strict=True):
        got = client.get("/search", params={"q": query, "k": 5}).json()
        assert (got["index"], got["query"], got["k"], got["truncated"]) == \
            ("bread", query, 5, False)
        assert_same_hits(got["hits"], want)
    posted = client.post("/search", json={"queries": queries, "k": 4, "index": "cheese"}).json()
    assert posted["index"] == "cheese" and [r["query"] for r in posted["results"]] == queries
    for result, want in zip(posted["results"], cli_search(indexes["cheese"], queries, 4,
                                                          tmp_path), strict=True):
        assert not result["truncated"]
        assert_same_hits(result["hits"], want)
    one = client.post("/search", json={"query": queries[0], "k": 5}).json()
    assert one["index"] == "bread" and len(one["results"]) == 1


def test_embeddings_are_the_encoders_vectors(client, tiny_encoder):
    texts = ["a loaf of rye", "brie and camembert", "x" * 3]
    want = tiny_encoder.embed_texts(texts)
    got = client.post("/embed", json={"input": texts}).json()
    assert got["dim"] == want.shape[1] and got["model"] == tiny_encoder.spec
    assert got["truncated"] == [False] * 3
    np.testing.assert_allclose(got["embeddings"], want, atol=1e-5)
    single = client.post("/embed", json={"input": texts[0], "index": "cheese"}).json()
    np.testing.assert_allclose(single["embeddings"], want[:1], atol=1e-5)
    openai = client.post("/v1/embeddings", json={"input": texts, "model": "bread"}).json()
    assert openai["object"] == "list" and openai["model"] == tiny_encoder.spec
    assert [d["index"] for d in openai["data"]] == [0, 1, 2]
    assert {d["object"] for d in openai["data"]} == {"embedding"}
    np.testing.assert_allclose([d["embedding"] for d in openai["data"]], want, atol=1e-5)
    tokens = sum(len(t) for t in tiny_encoder.tokenizer.encode_batch(texts))
    assert openai["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    packed = client.post("/v1/embeddings", json={"input": "brie and camembert",
                                                 "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(vector, want[1], atol=1e-5)


def test_similarity_is_metrics_similarity(client, tiny_encoder):
    texts = ["rye bread", "sourdough loaf", "blue cheese"]
    vectors = tiny_encoder.embed_texts(texts)
    for metric in METRICS:
        got = client.post("/similarity", json={"texts": texts, "metric": metric}).json()
        assert got["metric"] == metric
        np.testing.assert_allclose(got["matrix"], similarity_matrix(vectors, metric), atol=1e-5)
    pairs = client.post("/similarity", json={"pairs": [texts[:2], texts[1:]]}).json()
    assert pairs["metric"] == "cosine"
    np.testing.assert_allclose(pairs["scores"], [similarity(vectors[0], vectors[1]),
                                                 similarity(vectors[1], vectors[2])], atol=1e-5)


def test_overlong_input_is_cut_to_the_context_and_says_so(client, indexes, tmp_path):
    long = "bread baked in a stone oven " * 200  # far past the tiny model's 128 tokens
    got = client.get("/search", params={"q": long, "k": 3}).json()
    assert got["truncated"] is True
    assert_same_hits(got["hits"], cli_search(indexes["bread"], [long], 3, tmp_path)[0])
    embedded = client.post("/embed", json={"input": [long, "short"]}).json()
    assert embedded["truncated"] == [True, False]
    posted = client.post("/search", json={"queries": ["short", long]}).json()
    assert [r["truncated"] for r in posted["results"]] == [False, True]


def test_the_page_is_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


# --- refusals ---------------------------------------------------------------------------------

REFUSALS = [
    ("GET", "/search", {"params": {"q": ""}}, 422),
    ("GET", "/search", {"params": {"q": "  \t "}}, 422),
    ("GET", "/search", {"params": {}}, 422),
    ("GET", "/search", {"params": {"q": "bread", "k": 0}}, 422),
    ("GET", "/search", {"params": {"q": "bread", "k": 1001}}, 422),
    ("GET", "/search", {"params": {"q": "bread", "k": "ten"}}, 422),
    ("GET", "/search", {"params": {"q": "bread", "index": "nope"}}, 404),
    ("GET", "/search", {"params": {"q": "bread", "index": "../cheese"}}, 404),
    ("POST", "/search", {"content": b'{"queries": ["bread"', "headers":
                         {"content-type": "application/json"}}, 422),
    ("POST", "/search", {"json": {"queries": "bread"}}, 422),
    ("POST", "/search", {"json": {"queries": ["bread"], "k": "5"}}, 422),
    ("POST", "/search", {"json": {"queries": ["bread", " "]}}, 422),
    ("POST", "/search", {"json": {"queries": []}}, 422),
    ("POST", "/search", {"json": {"query": "a", "queries": ["b"]}}, 422),
    ("POST", "/search", {"json": {"querys": ["bread"]}}, 422),
    ("POST", "/search", {"json": [1, 2]}, 422),
    ("POST", "/search", {"json": {"queries": ["bread"] * 257}}, 413),
    ("POST", "/search", {"json": {"query": "bread", "index": "nope"}}, 404),
    ("POST", "/embed", {"json": {"input": 5}}, 422),
    ("POST", "/embed", {"json": {"input": ""}}, 422),
    ("POST", "/embed", {"json": {}}, 422),
    ("POST", "/embed", {"json": {"input": ["x"] * 300}}, 413),
    ("POST", "/v1/embeddings", {"json": {"input": "x", "model": "gpt-4"}}, 404),
    ("POST", "/v1/embeddings", {"json": {"input": [[1, 2]]}}, 422),
    ("POST", "/similarity", {"json": {"texts": ["a", "b"], "metric": "jaccard"}}, 422),
    ("POST", "/similarity", {"json": {"pairs": [["a", "b", "c"]]}}, 422),
    ("POST", "/similarity", {"json": {"metric": "cosine"}}, 422),
    ("GET", "/nowhere", {}, 404),
    ("DELETE", "/search", {}, 405),
]


@pytest.mark.parametrize(("method", "path", "options", "status"), REFUSALS)
def test_refusals_are_one_json_line(client, method, path, options, status):
    response = client.request(method, path, **options)
    assert response.status_code == status, response.text
    assert is_one_line_error(response), response.text


def test_a_body_over_the_limit_is_413(client):
    response = client.post("/embed", json={"input": ["crumb " * 1000] * 2000})  # ~12 MB
    assert response.status_code == 413 and is_one_line_error(response)


def test_a_serve_that_cannot_start_says_why_in_one_line(tmp_path, monkeypatch):
    result = cli("serve", "--index", tmp_path / "missing")
    assert result.exit_code == 1 and result.output.startswith("error:")
    assert len(result.output.strip().splitlines()) == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("serve", "--index", tmp_path / "missing", "--port", port)
    assert result.output.startswith(f"error: cannot listen on 127.0.0.1:{port}: ")
    assert len(result.output.strip().splitlines()) == 1
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "uvicorn" else real(name, *a))
    result = cli("serve", "--index", tmp_path / "missing")
    assert result.output.strip() == ("error: `pipeline serve` needs uvicorn: pip install "
                                     "'gpt2-semantic-pipeline[serve]'")


# --- batching ---------------------------------------------------------------------------------

def batch_sizes(metrics_text: str, index: str) -> tuple[int, int]:
    """(batches of one request, all batches) of an index, from /metrics."""
    values = {}
    for line in metrics_text.splitlines():
        if line.startswith("pipeline_batch_requests_") and f'index="{index}"' in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return (int(values[f'pipeline_batch_requests_bucket{{index="{index}",le="1"}}']),
            int(values[f'pipeline_batch_requests_count{{index="{index}"}}']))


def test_concurrent_requests_share_batches_and_get_the_same_answers(client):
    alone = [client.get("/search", params={"q": q, "k": 5}).json() for q in QUERIES]
    texts = QUERIES[:8]
    vectors_alone = client.post("/embed", json={"input": texts}).json()["embeddings"]
    before = batch_sizes(client.get("/metrics").text, "bread")

    def search(query):
        return client.get("/search", params={"q": query, "k": 5}).json()

    def embed(text):
        return client.post("/embed", json={"input": text}).json()["embeddings"][0]

    with ThreadPoolExecutor(len(QUERIES) + len(texts)) as pool:
        searches = [pool.submit(search, q) for q in QUERIES]
        embeds = [pool.submit(embed, t) for t in texts]
        together = [f.result() for f in searches]
        vectors_together = [f.result() for f in embeds]
    for got, want in zip(together, alone, strict=True):
        assert got["query"] == want["query"]
        assert_same_hits(got["hits"], want["hits"])
    np.testing.assert_allclose(vectors_together, vectors_alone, atol=1e-5)
    singles, batches = batch_sizes(client.get("/metrics").text, "bread")
    new_batches = batches - before[1]
    assert new_batches < len(QUERIES) + len(texts)  # some forward passes answered several
    assert new_batches - (singles - before[0]) > 0


def test_metrics_count_requests_by_route_and_status(client):
    client.get("/search", params={"q": "bread", "k": 0})
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    lines = response.text.splitlines()
    assert any(line.startswith('pipeline_requests_total{route="/search",status="422"} ')
               for line in lines)
    assert any(line.startswith('pipeline_request_duration_seconds_count{route="/search"} ')
               for line in lines)
    assert 'pipeline_queue_depth{index="bread"} 0' in lines


def test_a_kept_alive_connection_answers_at_once(client):
    """`pipeline serve` binds a TCP socket (proto IPPROTO_TCP), on which asyncio turns Nagle's
    algorithm off: otherwise each answer after a connection's first waits ~40 ms for an ACK
    that the client delays."""
    times = []
    for _ in range(9):
        start = time.perf_counter()
        assert client.get("/health").status_code == 200
        times.append(time.perf_counter() - start)
    assert sorted(times)[4] < 0.02, times


def test_no_cors_unless_asked(client):
    response = client.get("/health", headers={"Origin": "http://page.test"})
    assert "access-control-allow-origin" not in response.headers


@pytest.fixture
def thread_server(indexes):
    """The app (batching off, room for one waiting request) in uvicorn in this process."""
    import uvicorn

    from pipeline.serve.app import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # see below
    sock.bind(("127.0.0.1", 0))
    app = create_app([indexes["bread"]], batching=False, limits=Limits(max_queue=1))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    uv.should_exit = True
    thread.join(WAIT)
    sock.close()


def test_a_full_queue_is_503_with_retry_after(thread_server):
    heavy = {"input": [f"loaf {i} " + "crust and crumb " * 40 for i in range(256)]}
    with httpx.Client(base_url=thread_server, timeout=WAIT) as http:
        for _ in range(3):  # the requests must meet in the queue: on a loaded CI, try again
            with ThreadPoolExecutor(12) as pool:
                answers = list(pool.map(lambda _: http.post("/embed", json=heavy), range(12)))
            statuses = [a.status_code for a in answers]
            if 503 in statuses:
                break
        assert set(statuses) == {200, 503}, statuses
        refused = next(a for a in answers if a.status_code == 503)
        assert refused.headers["retry-after"] == "1" and is_one_line_error(refused)
        singles, batches = batch_sizes(http.get("/metrics").text, "bread")
        assert singles == batches > 0  # batching off: one request per forward pass


# --- a second server: API key, CORS, reloading ----------------------------------------------

@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """`pipeline serve` with PIPELINE_API_KEY and --cors-origin, over a folder of its own."""
    root = tmp_path_factory.mktemp("live")
    index = build_index(root, "live", 80, "bread")
    running = Server(["--index", index, "--cors-origin", "http://page.test"], root / "serve.log",
                     env={"PIPELINE_API_KEY": KEY})
    yield running, index, root
    running.stop()


def authorized(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_the_api_key_guards_every_route_but_health_and_the_page(live):
    server, _, _ = live
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/").status_code == 200  # static; it asks for the key
    for path in ("/info", "/metrics", "/search?q=bread"):
        refused = httpx.get(server.url + path)
        assert refused.status_code == 401 and is_one_line_error(refused)
        assert refused.headers["www-authenticate"] == "Bearer"
        assert httpx.get(server.url + path, headers=authorized("wrong")).status_code == 401
        assert httpx.get(server.url + path, headers=authorized()).status_code == 200
    posted = httpx.post(server.url + "/embed", json={"input": "x"})
    assert posted.status_code == 401


def test_cors_answers_the_origin_it_was_given(live):
    server, _, _ = live
    preflight = httpx.options(server.url + "/search", headers={
        "Origin": "http://page.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://page.test"
    answer = httpx.get(server.url + "/info", headers={"Origin": "http://page.test",
                                                      **authorized()})
    assert answer.headers["access-control-allow-origin"] == "http://page.test"
    other = httpx.get(server.url + "/info", headers={"Origin": "http://evil.test",
                                                     **authorized()})
    assert "access-control-allow-origin" not in other.headers


def reloads(server: Server) -> int:
    text = httpx.get(server.url + "/metrics", headers=authorized()).text
    line = 'pipeline_index_reloads_total{index="live",outcome="loaded"} '
    return sum(int(float(x.split()[-1])) for x in text.splitlines() if x.startswith(line))


def test_sighup_reloads_and_keeps_serving(live):
    server, _, _ = live
    before = reloads(server)
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + WAIT
    while reloads(server) == before:
        assert server.process.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    assert server.healthy()


def test_a_rebuilt_folder_is_served_anew_without_failed_requests(live):
    server, index, root = live
    statuses, seen, stop = [], [], threading.Event()

    def keep_asking():
        with httpx.Client(base_url=server.url, headers=authorized(), timeout=WAIT) as http:
            while not stop.is_set():
                answer = http.get("/search", params={"q": "baked in the oven", "k": 3})
                statuses.append(answer.status_code)
                if answer.status_code == 200:
                    seen.append({h["doc_id"].split("-")[0] for h in answer.json()["hits"]})
                time.sleep(0.01)

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        while not seen:  # the old documents first
            assert asker.is_alive() and set(statuses) <= {200}, statuses
            time.sleep(0.01)
        for args in stage_commands(write_corpus(root / "cheese.jsonl", 50, "cheese"), index):
            result = cli(*args)  # the server holds a snapshot, not the folder's lock
            assert result.exit_code == 0, result.output
        deadline = time.monotonic() + WAIT
        while not seen or seen[-1] != {"cheese"}:
            assert time.monotonic() < deadline, f"still answering {seen[-1:]}"
            time.sleep(0.05)
    finally:
        stop.set()
        asker.join(WAIT)
    # Every request answered, each from one generation: the old documents, then the new.
    assert set(statuses) == {200}, set(statuses)
    assert seen[0] == {"bread"} and all(s in ({"bread"}, {"cheese"}) for s in seen), seen
    info = httpx.get(server.url + "/info", headers=authorized()).json()
    assert info["indexes"]["live"]["documents"] == 50


def test_clients_that_hang_up_mid_request_cost_nothing(server, client):
    """Clients that send a search and close at once: no error in the server's log or its
    metrics, and the next request is answered as before."""
    before = client.get("/search", params={"q": "bread", "k": 3}).json()
    request = (f"GET /search?q=bread+in+the+oven&k=5 HTTP/1.1\r\nHost: 127.0.0.1:"
               f"{server.port}\r\n\r\n").encode()
    for _ in range(40):
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
            sock.sendall(request)  # and hang up without reading the answer
    post = (f"POST /embed HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"input\": ").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
        sock.sendall(post)  # a body cut short by the hang-up
    time.sleep(1)
    assert server.process.poll() is None and server.healthy()
    assert client.get("/search", params={"q": "bread", "k": 3}).json() == before
    metrics = client.get("/metrics").text
    assert 'status="500"' not in metrics
    assert "Traceback" not in server.log.read_text()
