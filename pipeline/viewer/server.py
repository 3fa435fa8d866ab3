"""The viewer's HTTP server: one page, a small JSON API, and the run directory's own files.

    GET  /                          the viewer page
    GET  /api/run                   layers, images, model status (live or not, and why)
    GET  /api/image?image=REF       the model's view of an image (PNG data URL) and its top-5
    POST /api/upload                an image file as the request body -> {"image": "uK"}
    GET  /api/activations?image=REF&layer=KEY       every channel of the layer as tiles
    GET  /api/unit?image=REF&layer=KEY&unit=N[&method=deconv|guided]   live map and backprop
    GET  /api/precomputed?layer=KEY&unit=N          top-9, panels, pattern, links, concept (results.h5)
    GET  /api/patterns?layer=KEY                    the layer's filter patterns as one sprite
    GET  /run/PATH                  a file of the run directory (the report, sheets, toolbox)

REF is a dataset image id or an upload's 'uK'. Nothing is ever written into the run
directory; /run/ serves regular files below it only (no '..', no link that leads out),
streamed in blocks.

Any web page the user visits can send requests to 127.0.0.1, so every request must name
this server in its Host (a DNS-rebound page names its own: 421), and a POST or a script's
request from another site is refused (Origin / Sec-Fetch-Site: 403). A client that sends
nothing for `timeout` seconds is dropped; each connection has its own thread, so stalled
ones never block the others.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from pipeline.viewer.page import page_html
from pipeline.viewer.session import Inputs, LiveModel, NotFound, RunView, png_url

logger = logging.getLogger(__name__)


class Viewer:
    """The state behind the server: the run (always), the model (when it loads)."""

    def __init__(self, run_dir: Path, max_upload_mb: float = 16, live: bool = True):
        self.view = RunView(run_dir)
        self.inputs = Inputs(self.view, int(max_upload_mb * 2**20))
        self.model: LiveModel | None = None
        self.banner = ""
        if live:
            try:
                self.model = LiveModel(self.view, self.inputs.spec)
            except Exception as err:  # noqa: BLE001 - any failure leaves the stored pictures usable
                self.banner = f"The model could not be loaded ({err}). Stored pictures only: no live panes."
                logger.warning("viewer: %s", self.banner)
        else:
            self.banner = "Started with --no-model: stored pictures only."

    def run_info(self) -> dict:
        info = self.view.summary()
        info.update(live=self.model is not None, banner=self.banner, images_problem=self.inputs.problem,
                    predictions=bool(self.model and self.model.classifier))
        return info

    def image(self, ref: str) -> dict:
        pixels = self.inputs.pixels(ref)
        out = {"image": ref, "png": png_url(pixels)}
        if self.model is not None:
            out["top5"] = self.model.predictions(pixels)
        return out

    def live(self) -> LiveModel:
        if self.model is None:
            raise NotFound(self.banner or "no model")
        return self.model


def _arg(query: dict, name: str, default=None) -> str:
    values = query.get(name)
    if not values:
        if default is None:
            raise ValueError(f"missing parameter {name!r}")
        return default
    return values[0]


LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")
FILE_BLOCK = 2**20  # /run/ files go out in blocks of this size, never whole


def split_host(value: str) -> tuple[str, int]:
    """A Host header 'name:port', '[v6]:port' or 'name' -> (lower-case name, port; 80 if
    none is written, -1 if it is not a number)."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port = value.partition(":")
    return name, int(port) if port.isdigit() else (80 if not port else -1)


def make_handler(viewer: Viewer, allowed_names: tuple[str, ...] = LOCAL_NAMES, timeout: float = 30):
    run_root = viewer.view.run_dir
    names = {n.strip("[]").lower() for n in allowed_names}

    class Handler(BaseHTTPRequestHandler):
        server_version = "cnn-lens-viewer"

        def _refusal(self) -> tuple[int, str] | None:
            """Why this request may not be answered (status, reason), or None."""
            port = self.server.server_address[1]
            name, host_port = split_host(self.headers.get("Host", ""))
            local = self.connection.getsockname()[0].lower()  # the address the client reached
            if host_port != port or (name not in names and name != local):
                return 421, (f"Host {self.headers.get('Host')!r} is not this viewer's address: open it as "
                             f"http://127.0.0.1:{port}/ (or localhost, [::1], the --host given)")
            site = self.headers.get("Sec-Fetch-Site", "")
            origin = self.headers.get("Origin")
            if self.command != "GET" or self.headers.get("Sec-Fetch-Mode", "navigate") != "navigate":
                # a write, or a script's request: only from this viewer's own page (or no browser at all)
                if site not in ("", "same-origin", "none"):
                    return 403, f"a {site} request: only the viewer's own page may send it"
                if origin is not None and origin.lower() != f"http://{self.headers.get('Host', '').lower()}":
                    return 403, f"a request from {origin!r}: only the viewer's own page may send it"
            return None

        def parse_request(self) -> bool:
            if not super().parse_request():
                return False
            refused = self._refusal()
            if refused is not None:
                self.close_connection = True
                self._error(*refused)
                return False
            return True

        def log_message(self, fmt, *args):  # through logging, not stderr
            logger.debug("%s %s", self.address_string(), fmt % args)

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, payload, status: int = 200) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _error(self, status: int, message: str) -> None:
            self._json({"error": message}, status)

        def do_GET(self):  # noqa: N802 - the http.server name
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            route = parts.path
            try:
                if route == "/":
                    self._send(200, page_html().encode(), "text/html; charset=utf-8")
                elif route == "/api/run":
                    self._json(viewer.run_info())
                elif route == "/api/image":
                    self._json(viewer.image(_arg(query, "image")))
                elif route == "/api/activations":
                    pixels = viewer.inputs.pixels(_arg(query, "image"))
                    self._json(viewer.live().activations(pixels, viewer.view.layer(_arg(query, "layer")).key))
                elif route == "/api/unit":
                    pixels = viewer.inputs.pixels(_arg(query, "image"))
                    key = viewer.view.layer(_arg(query, "layer")).key
                    method = _arg(query, "method", "") or None
                    self._json(viewer.live().unit(pixels, key, int(_arg(query, "unit")), method))
                elif route == "/api/precomputed":
                    self._json(viewer.view.unit(_arg(query, "layer"), int(_arg(query, "unit"))))
                elif route == "/api/patterns":
                    self._json(viewer.view.patterns(_arg(query, "layer")))
                elif route.startswith("/run/"):
                    self._file(route[len("/run/"):])
                elif route == "/favicon.ico":
                    self._send(204, b"", "image/x-icon")
                else:
                    self._error(404, f"no such page: {route}")
            except NotFound as err:  # an unknown layer, unit, image or no model; other KeyErrors are bugs: 500
                self._error(404, str(err.args[0]) if err.args else str(err))
            except ValueError as err:
                self._error(400, str(err))
            except (ConnectionError, TimeoutError):  # the client went away or stalled: nobody to answer
                self.close_connection = True
            except Exception as err:  # noqa: BLE001 - one bad request never stops the server
                logger.exception("viewer: %s failed", self.path)
                self._error(500, f"{type(err).__name__}: {err}")

        def do_POST(self):  # noqa: N802
            if urlsplit(self.path).path != "/api/upload":
                return self._error(404, "only /api/upload takes a POST")
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                return self._error(411, "send the image with a Content-Length")
            if int(length) > viewer.inputs.max_upload_bytes:
                self.close_connection = True  # the body is not read
                return self._error(413, f"upload of {int(length)} bytes is above the limit of "
                                        f"{viewer.inputs.max_upload_bytes} (viewer --max-upload-mb)")
            try:
                data = self.rfile.read(int(length))
                ref = viewer.inputs.upload(data)
                self._json(viewer.image(ref))
            except ValueError as err:
                self._error(400, str(err))
            except (ConnectionError, TimeoutError):
                self.close_connection = True
            except Exception as err:  # noqa: BLE001
                logger.exception("viewer: upload failed")
                self._error(500, f"{type(err).__name__}: {err}")

        def _file(self, rel: str) -> None:
            path = (run_root / unquote(rel)).resolve()
            if not path.is_relative_to(run_root) or not path.is_file():
                return self._error(404, "not a file of this run directory")
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            with open(path, "rb") as f:  # streamed: a 1 GiB file costs one block of memory, not a GiB
                left = os.fstat(f.fileno()).st_size
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(left))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.end_headers()
                try:
                    while left > 0:
                        block = f.read(min(FILE_BLOCK, left))
                        if not block:  # the file shrank while it was sent: the length promised cannot be kept
                            break
                        self.wfile.write(block)
                        left -= len(block)
                except OSError:  # the client went away or stalled past the timeout
                    logger.debug("viewer: %s not sent to the end", rel)
                self.close_connection = True

    Handler.timeout = timeout  # the socket timeout of every connection (StreamRequestHandler.setup)
    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stalled connection never keeps the process alive
    request_queue_size = 128  # connections waiting for accept(): a burst of them is not refused

    def handle_error(self, request, client_address):  # through logging, not a traceback on stderr
        logger.debug("viewer: a connection from %s ended with an error", client_address[0], exc_info=True)


def make_server(viewer: Viewer, host: str = "127.0.0.1", port: int = 0, timeout: float = 30) -> ThreadingHTTPServer:
    """A listening server (not yet serving): Host must name `host` or a local address."""
    v6 = ":" in host

    class Server(_Server):
        address_family = socket.AF_INET6 if v6 else socket.AF_INET

    return Server((host.strip("[]"), port), make_handler(viewer, (*LOCAL_NAMES, host), timeout))


def serve(viewer: Viewer, host: str = "127.0.0.1", port: int = 0, ready=None, timeout: float = 30) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM); `ready(url)` is called once listening."""
    server = make_server(viewer, host, port, timeout)
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    url = f"http://{shown}:{server.server_address[1]}/"
    if viewer.model is not None:  # trace the backward programs while the user looks around
        threading.Thread(target=viewer.model.warm, name="warm", daemon=True).start()
    if ready is not None:
        ready(url)
    try:
        server.serve_forever()
    finally:
        server.server_close()
