"""The HTTP side of `perlhf label serve`: uvicorn's h11 protocol with a deadline for request heads, and
`serving()`, which runs the server in a child process for notebooks, the load benchmark and the tests.

A child process rather than a thread, so the server has its own interpreter (and GIL) like in real use, and
`--stop-after` makes it stop by itself even if the parent dies without cleaning up.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from uvicorn.protocols.http.h11_impl import H11Protocol

import perlhf


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, plus one thing uvicorn lacks: a connection must send a complete request head
    within `header_timeout` seconds of opening, or of its previous response. uvicorn's timeout_keep_alive only
    starts after a response, so without this a connection that sends nothing, or its headers a byte at a
    time, is held open for ever (and counts against limit_concurrency)."""

    header_timeout = 10.0  # set by `perlhf label serve --header-timeout`

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        waiting_after = self.cycle  # a new request head replaces self.cycle

        def too_slow() -> None:
            if self.cycle is waiting_after and not self.transport.is_closing():
                self.transport.close()

        self.loop.call_later(self.header_timeout, too_slow)


@contextmanager
def serving(db: str | Path, labels_per_pair: int | None = None, stop_after: float = 300.0,
            start_timeout: float = 30.0, options: list[str] = ()) -> Iterator[str]:
    """Serve `db` on 127.0.0.1 and a free port; yields the base URL, stops the server on exit. `options` are
    more `perlhf label serve` flags."""
    command = [sys.executable, "-m", "perlhf.label", "serve", "--db", str(db), "--host", "127.0.0.1", "--port", "0",
               "--stop-after", str(stop_after), *options]
    if labels_per_pair is not None:
        command += ["--labels-per-pair", str(labels_per_pair)]
    env = dict(os.environ)
    root = str(Path(perlhf.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:  # keep reading, so a chatty server never blocks on a full pipe
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        seen = []
        while True:
            try:
                line = lines.get(timeout=start_timeout)
            except queue.Empty:
                raise RuntimeError(f"label server did not start in {start_timeout} s: {''.join(seen)}") from None
            if line is None:
                raise RuntimeError(f"label server exited with {process.wait()}: {''.join(seen)}")
            seen.append(line)
            found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if found:
                break
        yield f"http://127.0.0.1:{found.group(1)}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
