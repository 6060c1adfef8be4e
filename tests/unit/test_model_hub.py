"""Model loading tells a model that does not exist (exit 2, never retried) from a hub that does not answer
(retried with bounded backoff, then exit 1). Real HTTP servers on 127.0.0.1 stand in for the hub."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from reembed.workers import model_loader
from reembed.workers.model_loader import ModelNotFoundError, ModelUnreachable, resolve_model_path


class _Hub(BaseHTTPRequestHandler):
    status = 404
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).hits.append(self.path)
        self.send_response(self.status)
        if self.status == 404:
            self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        body = b'{"error": "Repository not found"}' if self.status == 404 else b'{"error": "overloaded"}'
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _point_the_hub_at(monkeypatch, port: int) -> None:
    """Send hub look-ups to a server on 127.0.0.1 with a 1 s timeout and short waits between tries (the tests
    count the tries, not the waits)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    monkeypatch.setattr(model_loader, "HUB_WAIT_MULTIPLIER_S", 0.05)


@pytest.fixture
def hub(monkeypatch):
    """A hub on 127.0.0.1 answering every request with ``_Hub.status``."""
    _Hub.hits = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _point_the_hub_at(monkeypatch, server.server_address[1])
    yield _Hub
    server.shutdown()
    server.server_close()


@pytest.fixture
def silent_hub(monkeypatch):
    """A hub on 127.0.0.1 that accepts connections and never answers: every request times out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    paths: list[str] = []  # the path of each request received, never answered
    stop = threading.Event()

    def read_request(conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            paths.append(conn.recv(4096).split(b" ", 2)[1].decode())
        except (OSError, IndexError):
            pass

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn = listener.accept()[0]
            except OSError:
                continue
            accepted.append(conn)
            threading.Thread(target=read_request, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    _point_the_hub_at(monkeypatch, listener.getsockname()[1])
    yield paths
    stop.set()
    thread.join(timeout=5)
    for conn in accepted:
        conn.close()
    listener.close()


def test_a_model_the_hub_does_not_have_is_not_found_at_once(hub, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="'acme/no-such-model' is neither .* nor on the hub"):
        resolve_model_path("acme/no-such-model")
    assert len([h for h in hub.hits if h.startswith("/api/models/")]) == 1  # a 404 is an answer: no retry


def test_a_hub_that_never_answers_is_retried_then_reported_unreachable(silent_hub, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelUnreachable, match=r"did not answer for model 'acme/model' in 3 tries.*Timeout"):
        resolve_model_path("acme/model")
    tries = [p for p in silent_hub if p.startswith("/api/models/acme/model")]
    assert len(tries) == model_loader.HUB_ATTEMPTS  # asked once per try, never answered


def test_a_hub_error_5xx_is_retried_then_reported_unreachable(hub, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(hub, "status", 503)
    with pytest.raises(ModelUnreachable, match="503"):
        resolve_model_path("acme/model")
    assert len([h for h in hub.hits if h.startswith("/api/models/")]) == model_loader.HUB_ATTEMPTS


def test_local_and_bundled_models_never_ask_the_hub(silent_hub, tmp_path) -> None:
    assert (resolve_model_path("all-MiniLM-L6-v2") / "config.json").exists()
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing-model"))
    assert silent_hub == []
