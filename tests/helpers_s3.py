"""A local S3 server for the tests: moto's S3 app on a free loopback port, behind a hook that can answer a request
itself (an injected 5xx) or act on it (kill a writer at its PUT of one object) before the server sees it."""

from __future__ import annotations

import threading
from typing import Callable

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

Hook = Callable[[str, str], int | None]  # (method, path) -> an HTTP status to answer instead, or None
UNAVAILABLE = b"<Error><Code>ServiceUnavailable</Code><Message>injected by the test</Message></Error>"


class S3Server:
    def __init__(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)
        self.hook: Hook | None = None

        def serve(environ, start_response):
            hook = self.hook
            status = hook(environ["REQUEST_METHOD"], environ["PATH_INFO"]) if hook else None
            if status:
                start_response(f"{status} Injected", [("Content-Type", "application/xml")])
                return [UNAVAILABLE]
            return app(environ, start_response)

        self.server = make_server("127.0.0.1", 0, serve, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join()


def fail_first_attempts(status: int = 503) -> Hook:
    """A hook failing the first request of each method and path once: every object read, write and listing of
    what runs meets one transient error, which the client must retry."""
    seen: set[tuple[str, str]] = set()
    lock = threading.Lock()

    def hook(method: str, path: str) -> int | None:
        with lock:
            if (method, path) in seen:
                return None
            seen.add((method, path))
        return status
    hook.failed = seen  # what was answered with `status` once
    return hook
