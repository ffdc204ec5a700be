"""uvicorn in-process, as `tide serve` and the tests run it.

The socket is bound before the model loads, so a taken port is a one-line error at once rather
than after a long load. On Ctrl+C or SIGTERM (or ``should_exit``), uvicorn stops accepting and
waits for open requests; the scheduler is closed first, so those end quickly: the running
decode at its next step, the waiting ones with a 503."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn

from tide_local.errors import TideError, UsageError

GRACEFUL_SECONDS = 30  # the most the stop waits for open requests once their decodes are cancelled


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0: a free one), not yet listening."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise UsageError(f"--host {host}: {err.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise TideError(f"cannot listen on {url(host, port)}: {err.strerror}") from None
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve to anything
        return False


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Server(uvicorn.Server):
    """uvicorn's server with tide's start and stop.

    on_started: called once listening (the startup line). before_stop: called when the stop
    begins (the scheduler's close). A stop asked by a signal is the normal end: `run` returns
    and the signal is not raised again (uvicorn would, making the exit code 130)."""

    def __init__(self, app, *, on_started: Callable[[], None] | None = None,
                 before_stop: Callable[[], None] | None = None, log_level: str = "warning"):
        super().__init__(uvicorn.Config(app, log_level=log_level, access_log=False,
                                        timeout_graceful_shutdown=GRACEFUL_SECONDS))
        self.on_started, self.before_stop = on_started, before_stop

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    async def shutdown(self, sockets=None) -> None:
        if self.before_stop is not None:
            self.before_stop()
        await super().shutdown(sockets=sockets)
        if self.force_exit:  # uvicorn skips the app's shutdown then; ours is bounded: run it, leave nothing half-done
            await self.lifespan.shutdown()

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        getattr(self, "_captured_signals", []).clear()


@dataclass
class Running:
    """A server running in a thread of this process (see `serve_in_thread`)."""

    url: str
    port: int
    server: Server
    thread: threading.Thread


@contextlib.contextmanager
def serve_in_thread(app, *, host: str = "127.0.0.1", start_timeout: float = 60, stop_timeout: float = 60):
    """Serve `app` (from `create_app`) on a free port of `host` in a daemon thread until the block
    ends, then stop it as Ctrl+C would. For programs that drive a server themselves: the tests,
    benchmarks."""
    sock = bind(host, 0)
    started = threading.Event()
    server = Server(app, on_started=started.set, before_stop=app.state.scheduler.close)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    if not started.wait(start_timeout):
        server.should_exit = True
        raise TideError(f"the server did not start within {start_timeout:g} s")
    port = sock.getsockname()[1]
    try:
        yield Running(url(host, port), port, server, thread)
    finally:
        server.should_exit = True
        thread.join(stop_timeout)
