"""Slow clients are bounded (serving/client_timeouts.py): a request that does not arrive in time gets 408 in the
error envelope and its connection closed, whether it sends nothing, its headers a byte at a time (slowloris) or
a trickle of its body; a client that stops reading its stream is cut off, and its slot and engine request freed.
Against the fake engine, through real sockets; without these deadlines each of them hangs until the 20 s
socket timeout below."""

import json
import socket
import time

import httpx
import pytest

from serving.app import GatewaySettings, build_app
from serving.backends import Backend
from serving.client_timeouts import timed_protocol
from tests.fake_backend import running_app, running_fake_engine

READ_S, WRITE_S = 1.5, 1.5


@pytest.fixture(scope="module")
def engine_url():
    with running_fake_engine() as url:
        yield url


@pytest.fixture(scope="module")
def gateway_url(engine_url):
    app = build_app(GatewaySettings(backends=[Backend.external("fake", engine_url)], log=lambda m: None))
    with running_app(app, http=timed_protocol(read_s=READ_S, write_s=WRITE_S)) as url:
        yield url


def _connect(url: str, rcvbuf: int = 0) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window it offers
    sock.settimeout(20)
    sock.connect((host, int(port)))
    return sock


def _answer(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    start, data = time.monotonic(), b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - start


def _request_timeout(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"]["code"] == "request_timeout"


@pytest.mark.parametrize("sent", [b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"], ids=["nothing", "part-head"])
def test_a_connection_that_sends_too_little_gets_408_and_is_closed(gateway_url, sent):
    sock = _connect(gateway_url)
    sock.sendall(sent)
    answer, waited = _answer(sock)
    assert _request_timeout(answer) and READ_S * 0.9 < waited < READ_S + 3


def test_slowloris_headers_do_not_reset_the_deadline(gateway_url):
    sock = _connect(gateway_url)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    start = time.monotonic()
    try:
        for i in range(40):  # a header byte every 0.1 s: each arrives well within the deadline
            sock.sendall(b"X-Drip-%d: a\r\n" % i)
            time.sleep(0.1)
    except (BrokenPipeError, ConnectionResetError):
        pass
    answer, _ = _answer(sock)
    assert _request_timeout(answer) and time.monotonic() - start < READ_S + 3


def test_a_trickled_body_gets_408_and_the_next_request_is_served(gateway_url):
    body = json.dumps({"model": "fake", "prompt": "hi", "max_tokens": 2}).encode()
    sock = _connect(gateway_url)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
    answer, _ = _answer(sock)
    assert _request_timeout(answer)
    assert httpx.post(f"{gateway_url}/v1/completions", json=json.loads(body), timeout=10).status_code == 200


def test_a_keep_alive_connection_gets_a_new_deadline_for_each_request(gateway_url):
    with httpx.Client(timeout=10) as client:  # one connection, requests further apart than the deadline
        for _ in range(2):
            assert client.post(f"{gateway_url}/v1/completions", json={"model": "fake", "prompt": "hi"}).status_code == 200
            time.sleep(READ_S * 1.3)  # uvicorn's own keep-alive timeout (5 s) keeps it open meanwhile


def test_a_client_that_stops_reading_is_cut_off_and_its_stream_freed(gateway_url, engine_url):
    body = json.dumps({"model": "fake", "prompt": "BIG", "max_tokens": 4000, "stream": True}).encode()
    sock = _connect(gateway_url, rcvbuf=4096)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # then it reads no more: 16 MB wait to be sent
    time.sleep(0.5)
    assert httpx.get(f"{engine_url}/debug/open_streams").json()["open"] == 1  # held while the buffers fill
    deadline, open_streams = time.monotonic() + WRITE_S + 10, 1
    while open_streams and time.monotonic() < deadline:
        time.sleep(0.2)
        open_streams = httpx.get(f"{engine_url}/debug/open_streams").json()["open"]
    metrics = httpx.get(f"{gateway_url}/metrics").text
    assert open_streams == 0 and 'qserve_requests_in_flight{model="fake"} 0.0' in metrics
    assert 'status="499"' in metrics  # counted as a client that left
    sock.close()
