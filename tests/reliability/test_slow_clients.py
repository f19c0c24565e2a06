"""Slow clients against the real server: twenty sockets that send a request's head, or an upload's body, a
byte every couple of seconds are all closed within the deadlines (REQUEST_HEADER_TIMEOUT,
REQUEST_BODY_TIMEOUT, REQUEST_MIN_RATE), each slow upload gets a 408 with a reason, the temp files they
had staged are gone, and a quick client is served all the while."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.api.test_multipart import BOUNDARY, part
from tests.helpers import make_image_bytes
from tests.reliability.realserver import leftover_temp_files, real_server

CLIENTS = 10  # of each kind: ten slow heads and ten slow bodies
DRIP_SECONDS = 2.0  # one byte this often: well under the idle deadline, far under the rate


def _drip(sock: socket.socket, data: bytes, until: float) -> bytes:
    """Send `data` a byte at a time until the server closes the connection; what it answered, if anything."""
    answer = b""
    sock.settimeout(DRIP_SECONDS)
    for byte in data:
        if time.monotonic() > until:
            return answer or b"still open"
        try:
            sock.sendall(bytes([byte]))
            chunk = sock.recv(65536)
        except TimeoutError:
            continue  # nothing came back yet: keep dripping
        except OSError:
            break
        if not chunk:  # the server closed the connection
            break
        answer += chunk
    return answer or b"closed"


@pytest.mark.slow
def test_slow_heads_and_bodies_are_cut_off(tmp_path: Path, tiny_clip_dir: Path) -> None:
    storage = tmp_path / "storage"
    settings = {"REQUEST_HEADER_TIMEOUT": "6", "REQUEST_BODY_TIMEOUT": "5", "REQUEST_MIN_RATE": "1024"}
    image = make_image_bytes(7, size=(320, 240))
    body = part("file", image, filename="slow.jpg") + f"--{BOUNDARY}--\r\n".encode()
    with real_server(storage, tiny_clip_dir, **settings) as server:
        host, port = server.base.removeprefix("http://").split(":")
        head = f"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Filler: {'a' * 200}\r\n\r\n".encode()
        upload = (
            f"POST /images HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n"
        ).encode()
        answers: dict[str, bytes] = {}
        began = time.monotonic()
        give_up = began + 45

        def slow(name: str, prefix: bytes, data: bytes) -> None:
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(prefix)  # an upload's head and first KB arrive at once; the rest drips
                answers[name] = _drip(sock, data, give_up)

        threads = [threading.Thread(target=slow, args=(f"head-{i}", b"", head)) for i in range(CLIENTS)]
        threads += [
            threading.Thread(target=slow, args=(f"body-{i}", upload + body[:1024], body[1024:])) for i in range(CLIENTS)
        ]
        for thread in threads:
            thread.start()
        time.sleep(DRIP_SECONDS * 2)
        staged_while_dripping = len(leftover_temp_files(storage))
        quick = httpx.get(f"{server.base}/health", timeout=5)  # served while twenty clients drip
        for thread in threads:
            thread.join(timeout=60)
        elapsed = time.monotonic() - began

        assert quick.status_code == 200
        assert staged_while_dripping >= 1, "precondition: the slow uploads had begun staging their files"
        assert set(answers) == {f"{kind}-{i}" for kind in ("head", "body") for i in range(CLIENTS)}
        assert all(answers[f"head-{i}"] == b"closed" for i in range(CLIENTS)), answers
        for i in range(CLIENTS):
            answer = answers[f"body-{i}"]
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert b'"code":"request_timeout"' in answer and b"too slowly" in answer, answer
        assert elapsed < 30, f"the slow clients were cut off only after {elapsed:.0f} s"
        deadline = time.monotonic() + 10
        while leftover_temp_files(storage) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert leftover_temp_files(storage) == []
        assert httpx.get(f"{server.base}/images", timeout=5).json()["count"] == 0
