"""``recalign serve``: a real HTTP server on 127.0.0.1 (a free port) with the tiny model, a real HTTP
client, concurrent requests, and every kind of bad request; the server is stopped at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import _lm_tiny  # noqa: E402

from recalign.data.loaders import load_dataset  # noqa: E402
from recalign.lm.loading import build_tiny_llama  # noqa: E402
from recalign.lm.recommend import RecommendSession  # noqa: E402
from recalign.serve import BackgroundServer, create_app  # noqa: E402

HIST = ["Toy Story (1995)", "Fargo (1996)", "Heat (1995)"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    torch.set_num_threads(1)
    data = _lm_tiny.write_ml100k_dir(tmp_path_factory.mktemp("ml"))
    tok = _lm_tiny.tiny_tokenizer()
    model = build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0).eval()
    session = RecommendSession(model, tok, load_dataset("ml-100k", data), max_history=4, label="tiny")
    session.fit_retriever("pop")
    session.retrieve = 8
    with BackgroundServer(create_app(session, max_body_bytes=4096)) as srv:
        assert srv.url.startswith("http://127.0.0.1:") and srv.port > 0
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            yield srv, client, session
    assert not srv.thread.is_alive()  # stopped when the module's tests are done


def _one_line_error(resp, status):
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert "\n" not in resp.text
    body = resp.json()
    assert list(body) == ["error"] and body["error"]
    return body["error"]


def test_health_and_openapi(server):
    _, client, _ = server
    h = client.get("/health")
    assert h.status_code == 200
    assert h.json() | {"requests": 0} == {
        "status": "ok", "model": "tiny", "kind": "lm", "items": len(_lm_tiny.TITLES), "retriever": "pop",
        "requests": 0,
    }  # fmt: skip
    spec = client.get("/openapi.json").json()
    assert {"/recommend", "/explain", "/health"} <= set(spec["paths"])
    assert {"RecommendRequest", "RecommendResponse", "ExplainRequest", "ErrorBody"} <= set(
        spec["components"]["schemas"]
    )
    docs = client.get("/docs")
    assert docs.status_code == 200 and "openapi.json" in docs.text


def test_recommend_and_explain(server):
    _, client, session = server
    r = client.post("/recommend", json={"history": HIST, "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["method"] == "exact" and body["seconds"] >= 0
    recs = body["recommendations"]
    assert [x["rank"] for x in recs] == [1, 2, 3, 4, 5]
    assert not set(HIST) & {x["title"] for x in recs}
    assert [x["title"] for x in recs] == [x.title for x in session.recommend(HIST, k=5, method="exhaustive")]
    two = client.post("/recommend", json={"history": HIST, "k": 3, "method": "two-stage"}).json()
    assert two["method"] == "two-stage" and len(two["recommendations"]) == 3
    cands = client.post(
        "/recommend", json={"history": HIST, "candidates": ["Jaws (1975)", "Babe (1995)"]}
    ).json()
    assert {x["title"] for x in cands["recommendations"]} == {"Jaws (1975)", "Babe (1995)"}
    with_expl = client.post("/recommend", json={"history": HIST, "k": 2, "explain": True}).json()
    assert all(isinstance(x["explanation"], str) for x in with_expl["recommendations"])
    e = client.post("/explain", json={"history": HIST, "item": "jaws (1975)"})
    assert e.status_code == 200, e.text
    assert e.json()["title"] == "Jaws (1975)" and isinstance(e.json()["explanation"], str)


def test_concurrent_requests_all_answered_alike(server):
    srv, client, _ = server
    payload = {"history": HIST, "k": 4}
    expected = client.post("/recommend", json=payload).json()["recommendations"]

    def call(i):
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            if i % 4 == 3:
                return c.get("/health").status_code, None
            resp = c.post("/recommend", json=payload)
            return resp.status_code, resp.json()["recommendations"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(call, range(16)))
    assert all(code == 200 for code, _ in results)
    assert all(recs == expected for _, recs in results if recs is not None)


@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        ({"history": ["Toy Stroy (1995)"]}, 422, "unknown history title 'Toy Stroy (1995)'"),
        ({"history": HIST, "candidates": ["Nope (2001)"]}, 422, "unknown candidate title"),
        ({"history": []}, 422, "history: List should have at least 1 item"),
        ({"history": HIST, "k": 0}, 422, "k: Input should be greater than or equal to 1"),
        ({"history": HIST, "k": 101}, 422, "k: Input should be less than or equal to 100"),
        ({"history": HIST, "k": 50}, 422, "field 'k': must be between 1 and 24"),
        ({"history": HIST, "k": "ten"}, 422, "k: Input should be a valid integer"),
        ({"history": HIST, "method": "two-stage", "k": 9}, 422, "at most the 8 retrieved items"),
        ({"history": HIST, "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
        ({"k": 3}, 422, "history: Field required"),
        ({"history": "Toy Story (1995)"}, 422, "history: Input should be a valid list"),
    ],
)
def test_bad_requests_are_one_line_4xx(server, payload, status, needle):
    _, client, _ = server
    assert needle in _one_line_error(client.post("/recommend", json=payload), status)


def test_malformed_oversized_and_unknown(server):
    _, client, _ = server
    headers = {"content-type": "application/json"}
    err = _one_line_error(
        client.post("/recommend", content=b'{"history": ["Heat (1995)"', headers=headers), 400
    )
    assert err.startswith("malformed JSON body")
    assert _one_line_error(client.post("/recommend", content=b"", headers=headers), 422)
    big = json.dumps({"history": ["Heat (1995)"] * 2000}).encode()
    assert "over 4096 bytes" in _one_line_error(client.post("/recommend", content=big, headers=headers), 413)

    def chunks():  # no Content-Length: the limit is enforced on the stream
        for _ in range(10):
            yield b" " * 1000

    assert _one_line_error(client.post("/recommend", content=chunks(), headers=headers), 413)
    assert _one_line_error(client.post("/explain", json={"history": HIST, "item": "Nope"}), 422)
    assert _one_line_error(client.post("/explain", json={"history": HIST}), 422) == "item: Field required"
    assert _one_line_error(client.get("/nowhere"), 404) == "Not Found"
    assert _one_line_error(client.get("/recommend"), 405) == "Method Not Allowed"
    assert client.get("/health").status_code == 200  # still serving


def test_cli_serve_starts_answers_and_stops(tmp_path):
    """``recalign serve`` as a user runs it: a subprocess on a free port, one request, then SIGTERM."""
    data = _lm_tiny.write_ml100k_dir(tmp_path / "ml")
    model = _lm_tiny.write_tiny_model(tmp_path / "model")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "recalign.cli.main", "serve", "--model", str(model), "--dataset", "ml-100k",
           "--path", str(data), "--port", "0", "--threads", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving on http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[2]
        deadline = time.monotonic() + 60
        while True:
            try:
                assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)
        r = httpx.post(f"{url}/recommend", json={"history": HIST, "k": 3}, timeout=60)
        if r.status_code != 200:  # show the server's own log (uvicorn prints the traceback of a 500)
            proc.terminate()
            pytest.fail(f"{r.status_code} {r.text}\n{proc.communicate(timeout=30)[1]}")
        assert len(r.json()["recommendations"]) == 3
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert "Loading weights" not in err and "FutureWarning" not in err  # quiet by default
