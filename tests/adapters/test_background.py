"""Stopping blocking calls for real: a stream read in another thread is cut when `stop` is
set (what the Engine's build and push streams get), against a real local HTTP server."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator

import pytest
import requests
import urllib3.exceptions

from daemon.adapters.background import StreamCutter


class _Endless(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # a stream like the Engine's build output: it never ends
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            while True:
                self.wfile.write(b"6\r\nline\r\n\r\n")
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            self.server.closed.set()  # type: ignore[attr-defined]

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def endless() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Endless)
    server.closed = threading.Event()  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def test_a_stream_is_cut_when_stop_is_set(endless: http.server.ThreadingHTTPServer) -> None:
    stop = threading.Event()
    cuts: list[bool] = []
    session = requests.Session()
    cutter = StreamCutter(session, stop, lambda: cuts.append(True))
    failed: list[BaseException] = []
    read = threading.Event()

    def reader() -> None:
        url = f"http://127.0.0.1:{endless.server_address[1]}/"
        try:
            for _chunk in session.get(url, stream=True).raw.stream(6):
                read.set()
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            failed.append(exc)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    assert read.wait(5)
    stop.set()
    thread.join(2)
    assert not thread.is_alive() and failed  # the blocked read ended, with an error
    assert endless.closed.wait(2)  # type: ignore[attr-defined]  # the far end saw it close
    cutter.close()  # waits for on_cut (the build's step container removed)
    assert cuts == [True]


def test_a_stream_that_ends_first_is_left_alone(endless: http.server.ThreadingHTTPServer) -> None:
    stop = threading.Event()
    cuts: list[bool] = []
    cutter = StreamCutter(requests.Session(), stop, lambda: cuts.append(True))
    cutter.close()
    time.sleep(0.2)
    stop.set()
    time.sleep(0.2)
    assert cuts == []
