"""`edgevlm serve` end to end: real servers in subprocesses (torch made unimportable in them),
the official openai client for chat / streaming / embeddings, raw HTTP for the rest.

Two servers per module, on free loopback ports:
- ``server``: vlm + clip, API key, --max-queue 2, --ctx 512, 1 Mpx / 3 MB limits, an allowed
  image folder, a named label set.  Most tests, the bad-input table and the load test.
- ``open_server``: the same models, no key, --allow-remote-images, --shutdown-grace 1: remote
  fetches, then the SIGTERM test (last, it stops the process).
Models: a small random LLaVA (128-d, 4 layers; fp16, so a decode step is a few ms and a
400-token generation lasts long enough to cancel) and the bundled demo CLIP (8-bit).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import hf_tiny
from no_torch import _PREAMBLE, run_without_torch

torch = pytest.importorskip("torch")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-0123456789"
BOOT = "from edgevlm.cli import main\nsys.exit(main(sys.argv[1:]))\n"
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


# ------------------------------------------------------------------------------------ helpers
def _png(w: int, h: int, seed: int = 0, fmt: str = "PNG", flat: bool = False) -> bytes:
    arr = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    if flat:  # one colour: a large image in a few KB (the pixel limit, not the body limit, must trip)
        arr[:] = arr[0, 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def data_uri(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def image_msg(url: str, text: str = "Describe it.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path, key: str | None) -> None:
        self.proc, self.port, self.log, self.key = proc, port, log, key
        self.url = f"http://127.0.0.1:{port}"

    def call(self, method: str, path: str, body=None, *, key: str | None = "default", timeout: float = 60,
             headers: dict | None = None):
        """-> (status, headers, parsed JSON or text).  ``body``: dict (JSON) or raw bytes."""
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        h = {"Content-Type": "application/json", **(headers or {})}
        key = self.key if key == "default" else key
        if key:
            h["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, hdrs, raw = r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            status, hdrs, raw = e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()
        text = raw.decode()
        try:
            return status, hdrs, json.loads(text)
        except json.JSONDecodeError:
            return status, hdrs, text

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key or "none", max_retries=0, timeout=60)

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def metric(self, name: str) -> float:
        _, _, text = self.call("GET", "/metrics")
        m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
        assert m, f"{name} not in /metrics"
        return float(m.group(1))

    def wait_idle(self, timeout: float = 30) -> None:
        end = time.time() + timeout
        while time.time() < end:
            q = self.call("GET", "/health")[2]["queue"]
            if q["waiting"] == 0 and q["running"] == 0:
                return
            time.sleep(0.05)
        raise AssertionError("server did not become idle")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(cwd: Path, *args: str, key: str | None = None) -> Server:
    with socket.socket() as s:  # a free port (the tiny race with other processes is acceptable here)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = cwd / f"server-{port}.log"
    cmd = [sys.executable, "-c", _PREAMBLE + BOOT, "serve", *args, "--port", str(port)]
    if key:
        cmd += ["--api-key", key]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
    srv = Server(proc, port, log, key)
    end = time.time() + 90
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if srv.call("GET", "/health", timeout=2)[0] == 200:
                return srv
        except (urllib.error.URLError, ConnectionError, socket.timeout):
            time.sleep(0.1)
    srv.stop()
    raise AssertionError(f"server did not answer /health:\n{log.read_text()}")


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import contextlib

    from edgevlm.export import ExportConfig, export

    d = tmp_path_factory.mktemp("serve")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        src = hf_tiny.make_llava(d / "hf", vision="clip", text="llama", hidden=128, text_layers=4, intermediate=512,
                                 max_positions=1024)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            export(src, d / "vlm.evlm", ExportConfig(method="rtn", bits=16))
            export(ROOT / "models" / "demo-clip", d / "clip.evlm", ExportConfig(method="rtn", bits=8))
    finally:
        torch.set_num_threads(n)
    (d / "images").mkdir()
    (d / "images" / "cat.png").write_bytes(_png(40, 30, seed=1))
    (d / "photo.jpg").write_bytes(_png(64, 48, seed=2, fmt="JPEG"))
    (d / "secret.png").write_bytes(_png(8, 8))
    (d / "labels.json").write_text(json.dumps({"digits": {"labels": DIGITS, "prompt": "a photo of the digit {}"}}))
    return d


COMMON = ("vlm.evlm", "clip.evlm", "--name", "vlm", "--name", "clip", "--ctx", "512", "--threads", "1")


@pytest.fixture(scope="module")
def server(files):
    s = start_server(files, *COMMON, "--max-queue", "2", "--allowed-image-dir", str(files / "images"),
                     "--max-image-pixels", "1000000", "--max-body-bytes", "3000000",
                     "--label-sets", str(files / "labels.json"), key=KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def open_server(files):
    s = start_server(files, *COMMON, "--allow-remote-images", "--max-remote-image-bytes", "100000",
                     "--remote-timeout", "3", "--shutdown-grace", "1")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local(files):
    """The same models in-process: what the server must answer."""
    from edgevlm.runtime.dual import DualEncoder
    from edgevlm.runtime.vlm import Runtime

    return Runtime.load(files / "vlm.evlm", ctx=512), DualEncoder.load(files / "clip.evlm")


# ------------------------------------------------------------------------------------ openai client
def test_models_and_openapi_schema(server):
    c = server.client()
    assert {m.id for m in c.models.list().data} == {"vlm", "clip"}
    assert c.models.retrieve("clip").id == "clip"
    status, _, schema = server.call("GET", "/openapi.json", key=None)  # no key needed for the schema
    assert status == 200
    for p in ("/v1/chat/completions", "/v1/embeddings", "/v1/classify", "/v1/classify/state/export", "/v1/models",
              "/health", "/metrics"):
        assert p in schema["paths"], p
    assert "ChatCompletionRequest" in schema["components"]["schemas"]
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_chat_with_image_matches_the_runtime(server, local, files):
    rt, _ = local
    png = _png(32, 32, seed=3)
    msgs = image_msg(data_uri(png))
    r = server.client().chat.completions.create(model="vlm", messages=msgs, max_tokens=12, temperature=0)
    want = rt.generate([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}],
                       [Image.open(io.BytesIO(png))], max_tokens=12)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == want.prompt_tokens > hf_tiny.num_image_tokens("clip")
    assert r.usage.completion_tokens == len(want.token_ids) and r.usage.total_tokens == want.usage["total_tokens"]
    # a path under --allowed-image-dir is the same image as its data URI
    path = str(files / "images" / "cat.png")
    a = server.client().chat.completions.create(model="vlm", messages=image_msg(path), max_tokens=6, temperature=0)
    b = server.client().chat.completions.create(model="vlm", messages=image_msg(data_uri((files / "images" /
                                                                                         "cat.png").read_bytes())),
                                                max_tokens=6, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_chat_streaming_seed_and_stop(server):
    c = server.client()
    msgs = image_msg(data_uri(_png(32, 32, seed=4)))
    full = c.chat.completions.create(model="vlm", messages=msgs, max_tokens=24, temperature=0)
    chunks = list(c.chat.completions.create(model="vlm", messages=msgs, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # seeded sampling repeats; another seed (almost surely) differs over 24 tokens
    s = [c.chat.completions.create(model="vlm", messages=msgs, max_tokens=24, temperature=1.0, top_p=0.9, seed=k)
         .choices[0].message.content for k in (7, 7, 8)]
    assert s[0] == s[1] and s[0] != s[2]
    out = full.choices[0].message.content
    assert len(out) > 4, "precondition: the model says something"
    stop = out[2:4]
    cut = c.chat.completions.create(model="vlm", messages=msgs, max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == out[:out.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_embeddings_text_and_images(server, local, files):
    _, enc = local
    texts = ["a photo of a cat", "a photo of the digit seven"]
    r = server.client().embeddings.create(model="clip", input=texts)  # the client asks for base64 by default
    got = np.array([d.embedding for d in r.data], dtype=np.float32)
    np.testing.assert_allclose(got, enc.encode_text(texts), atol=1e-5)
    assert r.usage.prompt_tokens == sum(len(enc.tokenizer.encode([t], padding="do_not_pad")[0][0]) for t in texts)
    f = server.client().embeddings.create(model="clip", input="a photo of a cat", encoding_format="float")
    np.testing.assert_allclose(f.data[0].embedding, got[0], atol=1e-6)
    png = (files / "images" / "cat.png").read_bytes()
    st, _, body = server.call("POST", "/v1/embeddings", {"model": "clip", "input": [
        {"type": "image_url", "image_url": {"url": data_uri(png)}}, "a photo of a cat"]})
    assert st == 200, body
    img = np.array(body["data"][0]["embedding"], dtype=np.float32)
    np.testing.assert_allclose(img, enc.encode_image(Image.open(io.BytesIO(png)))[0], atol=1e-5)
    np.testing.assert_allclose(body["data"][1]["embedding"], got[0], atol=1e-5)


# ------------------------------------------------------------------------------------ classify
def _close(a: list[dict], b: list[dict], tol: float = 1e-5) -> bool:
    """Same labels in the same order, scores within ``tol`` (Q-TTA computes in float64, the
    plain zero-shot path in float32)."""
    return all(x["label"] == y["label"] and [s["label"] for s in x["scores"]] == [s["label"] for s in y["scores"]]
               and all(abs(s["score"] - t["score"]) <= tol for s, t in zip(x["scores"], y["scores"]))
               for x, y in zip(a, b, strict=True))


def test_classify_zero_shot_adaptation_and_state(server, local):
    _, enc = local
    imgs = [data_uri(_png(32, 32, seed=s)) for s in range(6)]
    base = {"model": "clip", "labels": DIGITS, "prompt": "a photo of the digit {}"}
    st, _, zs = server.call("POST", "/v1/classify", {**base, "images": imgs})
    assert st == 200, zs
    want = enc.classify([Image.open(io.BytesIO(base64.b64decode(u.split(",")[1]))) for u in imgs], DIGITS,
                        "a photo of the digit {}")
    for r, w in zip(zs["results"], want):
        assert r["label"] == DIGITS[int(np.argmax(w))] and abs(r["score"] - float(w.max())) < 1e-4
        assert abs(sum(s["score"] for s in r["scores"]) - 1) < 1e-4  # CLIP: softmax over the labels
    assert zs["adapted"] is False
    # the named label set is the same classifier
    assert server.call("POST", "/v1/classify", {"model": "clip", "label_set": "digits", "images": imgs})[2][
        "results"] == zs["results"]
    # a stream adapts: its caches fill, so reading it (adapt=false) no longer equals zero-shot
    s = {**base, "stream_id": "cam-test"}
    assert server.call("POST", "/v1/classify", {**s, "images": imgs, "reset": True})[2]["adapted"] is True
    st, _, adapted = server.call("POST", "/v1/classify", {**s, "images": imgs, "adapt": False})
    assert not _close(adapted["results"], zs["results"], 1e-3)
    st, _, exp = server.call("POST", "/v1/classify/state/export", s)
    assert st == 200 and exp["bytes"] > 0
    assert server.call("POST", "/v1/classify/reset", s)[2]["streams_reset"] == 1
    after_reset = server.call("POST", "/v1/classify", {**s, "images": imgs, "adapt": False})[2]
    assert _close(after_reset["results"], zs["results"])  # empty caches = zero-shot
    st, _, imp = server.call("POST", "/v1/classify/state/import", {**s, "state": exp["state"]})
    assert st == 200 and imp["imported"], imp
    restored = server.call("POST", "/v1/classify", {**s, "images": imgs, "adapt": False})[2]
    assert _close(restored["results"], adapted["results"], 0.0)
    # a state from other labels does not load
    st, _, bad = server.call("POST", "/v1/classify/state/import", {**s, "labels": ["cat", "dog"],
                                                                   "state": exp["state"]})
    assert st == 400 and "state" in bad["error"]["message"]
    st, _, miss = server.call("POST", "/v1/classify/state/export", {**s, "stream_id": "never-seen"})
    assert st == 404 and "never-seen" in miss["error"]["message"]


def test_health_and_metrics(server):
    st, _, h = server.call("GET", "/health", key=None)
    assert st == 200 and h["status"] == "ok" and h["models"] == ["vlm", "clip"] and h["queue"]["capacity"] == 2
    assert server.call("GET", "/metrics", key=None)[0] == 401
    server.client().chat.completions.create(model="vlm", messages=image_msg(data_uri(_png(32, 32))), max_tokens=4)
    st, hdrs, text = server.call("GET", "/metrics")
    assert st == 200 and hdrs["content-type"].startswith("text/plain; version=0.0.4")
    assert re.search(r'^edgevlm_requests_total\{route="/v1/chat/completions",status="200"\} [1-9]', text, re.M)
    assert 'edgevlm_request_duration_seconds_bucket{route="/v1/chat/completions",le="+Inf"}' in text
    assert server.metric("edgevlm_queue_capacity") == 2
    assert server.metric("edgevlm_completion_tokens_total") >= 4
    assert server.metric("edgevlm_process_resident_memory_bytes") > 10e6
    assert "edgevlm_time_to_first_token_seconds_count" in text and "edgevlm_queue_depth 0" in text


# ------------------------------------------------------------------------------------ bad input
def _chat(url: str, **kw) -> dict:
    return {"model": "vlm", "messages": image_msg(url), "max_tokens": 4, **kw}


BAD = {
    "malformed-json": (b'{"model": "vlm", "messages": [', {}, 400, "not valid JSON"),
    "wrong-type": (_chat("x", max_tokens="ten"), {}, 400, "max_tokens"),
    "messages-not-a-list": ({"model": "vlm", "messages": "hello"}, {}, 400, "messages"),
    "non-image-data-uri": (_chat("data:text/plain;base64,aGVsbG8="), {}, 400, "expected an image data URI"),
    "corrupt-image": (_chat(data_uri(b"not an image at all")), {}, 400, "not an image"),
    "bad-base64": (_chat("data:image/png;base64,@@@"), {}, 400, "not valid base64"),
    "huge-image": (_chat(data_uri(_png(1200, 1000, flat=True))), {}, 413, "--max-image-pixels"),
    "huge-body": ({"model": "vlm", "messages": [{"role": "user", "content": "x" * 3_100_000}]}, {}, 413,
                  "--max-body-bytes"),
    "unknown-model": ({**_chat("x"), "model": "gpt-4o"}, {}, 404, "does not exist"),
    "missing-key": (_chat("x"), {"key": None}, 401, "missing API key"),
    "wrong-key": (_chat("x"), {"key": "wrong-key-123456"}, 401, "incorrect API key"),
    "path-outside-folder": (_chat("/etc/hostname"), {}, 403, "outside the allowed image folder"),
    "path-escape": (_chat("../secret.png"), {}, 403, "outside the allowed image folder"),
    "remote-not-allowed": (_chat("http://127.0.0.1:9/cat.png"), {}, 403, "--allow-remote-images"),
    "prompt-over-ctx": ({"model": "vlm", "messages": [{"role": "user", "content": "hello " * 300}]}, {}, 400,
                        "context holds 512"),
    "prompt-over-ctx-stream": ({"model": "vlm", "stream": True,
                                "messages": [{"role": "user", "content": "hello " * 300}]}, {}, 400, "context"),
    "chat-on-clip": ({**_chat("x"), "model": "clip"}, {}, 400, "cannot chat"),
    "n-2": (_chat("x", n=2), {}, 400, "n=2"),
    ("embed", "embeddings-on-vlm"): ({"model": "vlm", "input": "hi"}, {}, 400, "no embedding head"),
    ("embed", "token-ids"): ({"model": "clip", "input": [1, 2, 3]}, {}, 400, "token-id input"),
    ("classify", "classify-on-vlm"): ({"model": "vlm", "labels": ["a", "b"], "image": "x"}, {}, 400,
                                      "CLIP/SigLIP"),
    ("classify", "adapt-without-stream"): ({"model": "clip", "labels": ["a", "b"], "image": data_uri(_png(8, 8)),
                                            "adapt": True}, {}, 400, "stream_id"),
    ("classify", "unknown-label-set"): ({"model": "clip", "label_set": "birds", "image": "x"}, {}, 404, "digits"),
    ("classify", "one-label"): ({"model": "clip", "labels": ["cat"], "image": "x"}, {}, 400, "at least two"),
}
ROUTE = {"embed": "/v1/embeddings", "classify": "/v1/classify"}


@pytest.mark.parametrize("case", list(BAD), ids=lambda c: c[1] if isinstance(c, tuple) else c)
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(server, case):
    body, kw, status, needle = BAD[case]
    path = ROUTE[case[0]] if isinstance(case, tuple) else "/v1/chat/completions"
    st, _, got = server.call("POST", path, body, **kw)
    assert st == status, got
    err = got["error"]
    assert needle in err["message"], err
    assert set(err) == {"message", "type", "param", "code"}
    assert server.call("GET", "/health")[0] == 200


def test_remote_images_when_allowed(open_server, files):
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    (files / "www").mkdir(exist_ok=True)
    (files / "www" / "cat.png").write_bytes((files / "images" / "cat.png").read_bytes())
    (files / "www" / "big.png").write_bytes(_png(300, 300))  # ~270 KB > --max-remote-image-bytes 100000
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(files / "www"))
    handler.log_message = lambda *a: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        def embed(url):
            return open_server.call("POST", "/v1/embeddings", {"model": "clip", "input": [
                {"type": "image_url", "image_url": {"url": url}}]})
        st, _, a = embed(base + "/cat.png")
        st2, _, b = embed(data_uri((files / "images" / "cat.png").read_bytes()))
        assert st == st2 == 200
        np.testing.assert_allclose(a["data"][0]["embedding"], b["data"][0]["embedding"], atol=1e-6)
        st, _, e = embed(base + "/big.png")
        assert st == 413 and "limit" in e["error"]["message"]
        st, _, e = embed(base + "/missing.png")
        assert st == 400 and "HTTP 404" in e["error"]["message"]
        # no --allowed-image-dir on this server: local paths are refused outright
        st, _, e = embed(str(files / "images" / "cat.png"))
        assert st == 403 and "--allowed-image-dir" in e["error"]["message"]
    finally:
        httpd.shutdown()


# ------------------------------------------------------------------------------------ README
def _readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {marker}:.*?-->\n```\w+\n(.*?)```", text, re.S)
    assert m, f"README has no {marker} block"
    return m.group(1)


@pytest.mark.parametrize("marker", ["serve-curl", "serve-openai"])
def test_readme_examples_run(server, files, marker):
    import shutil

    code = _readme_block(marker).replace("127.0.0.1:8080", f"127.0.0.1:{server.port}")
    env = {**os.environ, "EDGEVLM_API_KEY": KEY}
    if marker == "serve-curl":
        if shutil.which("curl") is None:
            pytest.skip("curl is not installed")
        r = subprocess.run(["bash", "-ec", code], cwd=files, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        health, chat, cls, emb = (json.loads(x) for x in r.stdout.strip().splitlines())
        assert health["status"] == "ok" and chat["object"] == "chat.completion" and chat["usage"]["total_tokens"] > 0
        assert cls["results"][0]["label"] in ("cat", "dog", "car") and cls["adapted"] is True
        assert len(emb["data"]) == 2 and len(emb["data"][1]["embedding"]) == 128
    else:
        r = subprocess.run([sys.executable, "-c", code], cwd=files, env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().splitlines()[-1] == "2 128"
        assert "completion_tokens=" in r.stdout


def test_server_modules_import_without_torch():
    r = run_without_torch("import edgevlm.server.launch, edgevlm.server.app, edgevlm.server.routes_chat, "
                          "edgevlm.server.routes_dual; print('OK')")
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr


# ------------------------------------------------------------------------------------ load, cancel, SIGTERM
def _fire(server: Server, kind: str, i: int) -> tuple[int, dict, str]:
    """One request of a mixed load; -> (status, headers, body text).  Never hangs: 60 s timeout."""
    img = data_uri(_png(32, 32, seed=i))
    body = {"chat": _chat(img, max_tokens=48, temperature=0), "stream": _chat(img, max_tokens=48, stream=True, temperature=0),
            "embed": {"model": "clip", "input": [{"type": "image_url", "image_url": {"url": img}}, "a cat"]},
            "classify": {"model": "clip", "labels": DIGITS, "image": img, "stream_id": f"load-{i % 3}"}}[kind]
    path = {"embed": "/v1/embeddings", "classify": "/v1/classify"}.get(kind, "/v1/chat/completions")
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()


def test_load_4x_oversubscription(server):
    """4 x (queue + the running slot) concurrent requests, 3 waves: every one ends in a result or
    a clean 503 with Retry-After; the server stays up; RSS returns to within 10%."""
    kinds = ["chat", "stream", "embed", "classify"]
    n = 4 * (2 + 1)

    def wave(pool):
        return list(pool.map(lambda i: (kinds[i % 4], *_fire(server, kinds[i % 4], i)), range(n)))

    with ThreadPoolExecutor(n) as pool:
        wave(pool)  # warm-up: every code path and buffer has been touched once
        server.wait_idle()
        before = server.rss()
        results = [r for _ in range(3) for r in wave(pool)]
        server.wait_idle()
    time.sleep(0.5)
    after = server.rss()
    ok = [r for r in results if r[1] == 200]
    busy = [r for r in results if r[1] == 503]
    assert len(ok) + len(busy) == len(results), [r[1:] for r in results if r[1] not in (200, 503)][:3]
    assert busy and len(ok) >= 3, (len(ok), len(busy))
    for kind, _, hdrs, text in busy:
        err = json.loads(text)["error"]
        assert int(hdrs["retry-after"]) >= 1 and err["code"] == "queue_full" and "--max-queue" in err["message"]
    for kind, _, _, text in ok:
        if kind == "stream":
            assert text.rstrip().endswith("data: [DONE]") and re.search(r'"finish_reason": "(length|stop)"', text)
        else:
            assert json.loads(text)["object"] in ("chat.completion", "list", "classification")
    assert server.metric("edgevlm_queue_depth") == 0
    print(f"\nload: {len(results)} requests, {len(ok)} x 200, {len(busy)} x 503; "
          f"RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")
    assert abs(after - before) <= 0.10 * before, (before, after)


def test_client_disconnect_cancels_generation(server):
    msgs = _chat(data_uri(_png(32, 32, seed=9)), max_tokens=400, temperature=0)
    st, _, full = server.call("POST", "/v1/chat/completions", msgs)
    assert st == 200 and full["usage"]["completion_tokens"] == 400, "precondition: a 400-token generation"
    server.wait_idle()
    before = server.metric("edgevlm_completion_tokens_total")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps({**msgs, "stream": True}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream
    conn.close()
    server.wait_idle()
    generated = server.metric("edgevlm_completion_tokens_total") - before
    assert 1 <= generated < 200, generated  # stopped early, not run to 400
    assert server.call("GET", "/health")[0] == 200


def test_sigterm_finishes_or_cancels_in_flight_work_and_exits(open_server):
    """Last test of the module: it stops open_server."""
    s = open_server
    msgs = _chat(data_uri(_png(32, 32, seed=11)), max_tokens=460, temperature=0)
    out: dict[str, object] = {}

    def stream():
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps({**msgs, "stream": True}),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        out["first"] = r.readline()
        out["stream"] = r.read().decode()

    t1 = threading.Thread(target=stream)
    t1.start()
    end = time.time() + 30
    while "first" not in out and time.time() < end:
        time.sleep(0.01)
    t2 = threading.Thread(target=lambda: out.setdefault("queued", s.call("POST", "/v1/chat/completions", msgs)))
    t2.start()
    while s.call("GET", "/health")[2]["queue"]["waiting"] < 1 and time.time() < end:
        time.sleep(0.01)
    s.proc.send_signal(signal.SIGTERM)
    t1.join(30)
    t2.join(30)
    assert s.proc.wait(30) in (0, -signal.SIGTERM)
    st, hdrs, body = out["queued"]
    assert st == 503 and "shutting down" in body["error"]["message"] and hdrs["retry-after"]
    text = out["stream"]
    assert text.rstrip().endswith("data: [DONE]") or "shutting down" in text, text[-300:]
    log = s.log.read_text()
    assert "shutdown complete" in log and "Traceback" not in log, log[-2000:]
