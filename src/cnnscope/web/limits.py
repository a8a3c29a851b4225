"""The server's limits: which requests get in at all, how much of a body is read, and how many run.

- :class:`RequestGuard` (ASGI middleware) answers before anything else: 400 when the Host header names
  no address of this server (DNS rebinding), 403 when a POST comes from another origin (CSRF), 413 when
  the Content-Length is over the body limit (nothing of the body is read).
- :func:`read_form` parses a form body in memory, stopping at the limits (413): nothing is written to
  disk; :func:`in_memory_form_route` makes FastAPI's own form parsing use it.
- :class:`AdmissionLimit`: at most ``running`` requests at once and ``waiting`` in line; past that, 503.
"""

from __future__ import annotations

import asyncio
import codecs
import io
from collections.abc import Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import unquote_plus, urlsplit

from fastapi.routing import APIRoute
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

try:
    import python_multipart
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import parse_options_header
except ModuleNotFoundError:  # python-multipart before 0.0.13 named its module multipart
    import multipart as python_multipart
    from multipart.exceptions import FormParserError
    from multipart.multipart import parse_options_header

#: The names under which the server is always reachable: the loopback interface.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
#: A text field (``options`` with a region mask as JSON, ...) may be this long.
MAX_FIELD_BYTES = 2**20
#: The body may be longer than the upload limit by this much: the other fields and the multipart framing.
FORM_OVERHEAD_BYTES = MAX_FIELD_BYTES + 64 * 2**10
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Busy(Exception):
    """Raised when the line is full; the client should retry later."""


class AdmissionLimit:
    def __init__(self, running: int = 1, waiting: int = 4) -> None:
        if running < 1 or waiting < 0:
            raise ValueError("running must be >= 1 and waiting >= 0")
        self.running, self.waiting = running, waiting
        self._semaphore: asyncio.Semaphore | None = None
        self._admitted = 0

    @asynccontextmanager
    async def slot(self):
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.running)
        if self._admitted >= self.running + self.waiting:
            raise Busy()
        self._admitted += 1
        try:
            async with self._semaphore:
                yield
        finally:
            self._admitted -= 1


def mebibytes(count: int) -> str:
    return f"{count // 2**20} MiB" if count % 2**20 == 0 else f"{count / 2**20:.1f} MiB"


@dataclass(frozen=True)
class FormLimits:
    """How much of a form is read: the file (``max_upload_bytes``), each text field, the counts of files
    and fields, and the whole body (``max_body_bytes``: the upload plus ``FORM_OVERHEAD_BYTES``)."""

    max_upload_bytes: int
    max_field_bytes: int = MAX_FIELD_BYTES
    max_files: int = 4
    max_fields: int = 64

    @property
    def max_body_bytes(self) -> int:
        return self.max_upload_bytes + FORM_OVERHEAD_BYTES


def _too_large(message: str) -> HTTPException:
    return HTTPException(status_code=413, detail=message)


def _decode(raw: bytes | bytearray, charset: str) -> str:
    try:
        return raw.decode(charset)
    except (UnicodeDecodeError, LookupError):
        return raw.decode("latin-1")


class _Part:
    __slots__ = ("data", "disposition", "filename", "headers", "name", "size")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.disposition = b""
        self.name = ""
        self.filename: str | None = None
        self.data: io.BytesIO | bytearray = bytearray()
        self.size = 0


class _MultipartReader:
    """python-multipart's streaming parser feeding parts into memory, with limits checked per byte."""

    def __init__(self, boundary: bytes, charset: str, limits: FormLimits) -> None:
        self.charset, self.limits = charset, limits
        self.items: list[tuple[str, str | UploadFile]] = []
        self.files = self.fields = 0
        self.part = _Part()
        self.header_name = bytearray()
        self.header_value = bytearray()
        self.parser = python_multipart.MultipartParser(
            boundary,
            {
                "on_part_begin": self.on_part_begin,
                "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end,
                "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value,
                "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished,
            },
        )

    def on_part_begin(self) -> None:
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        name, value = bytes(self.header_name).lower(), bytes(self.header_value)
        if name == b"content-disposition":
            self.part.disposition = value
        self.part.headers.append((name, value))
        self.header_name, self.header_value = bytearray(), bytearray()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.part.disposition)
        if b"name" not in options:
            raise HTTPException(400, "a multipart part has no name in its Content-Disposition header")
        self.part.name = _decode(options[b"name"], self.charset)
        if b"filename" in options:
            self.files += 1
            if self.files > self.limits.max_files:
                raise HTTPException(400, f"too many files in the form (at most {self.limits.max_files})")
            self.part.filename = _decode(options[b"filename"], self.charset)
            self.part.data = io.BytesIO()  # in memory, bounded below: never a temporary file
        else:
            self.fields += 1
            if self.fields > self.limits.max_fields:
                raise HTTPException(400, f"too many fields in the form (at most {self.limits.max_fields})")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.part
        part.size += end - start
        if part.filename is not None and part.size > self.limits.max_upload_bytes:
            raise _too_large(f"the upload is over the limit of {mebibytes(self.limits.max_upload_bytes)}")
        if part.filename is None and part.size > self.limits.max_field_bytes:
            raise _too_large(f"the field {part.name!r} is over the limit of {mebibytes(self.limits.max_field_bytes)}")
        if isinstance(part.data, io.BytesIO):
            part.data.write(data[start:end])
        else:
            part.data += data[start:end]

    def on_part_end(self) -> None:
        part = self.part
        if isinstance(part.data, io.BytesIO):
            part.data.seek(0)
            upload = UploadFile(part.data, size=part.size, filename=part.filename, headers=Headers(raw=part.headers))
            self.items.append((part.name, upload))
        else:
            self.items.append((part.name, _decode(part.data, self.charset)))


class _UrlencodedReader:
    def __init__(self, limits: FormLimits) -> None:
        self.limits = limits
        self.items: list[tuple[str, str | UploadFile]] = []
        self.name, self.value, self.size, self.fields = bytearray(), bytearray(), 0, 0
        self.parser = python_multipart.QuerystringParser(
            {
                "on_field_start": self.on_field_start,
                "on_field_name": self.on_field_name,
                "on_field_data": self.on_field_data,
                "on_field_end": self.on_field_end,
            }
        )

    def on_field_start(self) -> None:
        self.name, self.value, self.size = bytearray(), bytearray(), 0

    def grow(self, count: int) -> None:
        self.size += count
        if self.size > self.limits.max_field_bytes:
            raise _too_large(f"a form field is over the limit of {mebibytes(self.limits.max_field_bytes)}")

    def on_field_name(self, data: bytes, start: int, end: int) -> None:
        self.grow(end - start)
        self.name += data[start:end]

    def on_field_data(self, data: bytes, start: int, end: int) -> None:
        self.grow(end - start)
        self.value += data[start:end]

    def on_field_end(self) -> None:
        self.fields += 1
        if self.fields > self.limits.max_fields:
            raise HTTPException(400, f"too many fields in the form (at most {self.limits.max_fields})")
        self.items.append((unquote_plus(self.name.decode("latin-1")), unquote_plus(self.value.decode("latin-1"))))


def content_length(headers: Headers) -> int | None:
    try:
        return int(headers["content-length"])
    except (KeyError, ValueError):
        return None


async def read_form(request: Request, limits: FormLimits) -> FormData:
    """The request's form (multipart or urlencoded), read into memory: a Content-Length over
    ``limits.max_body_bytes`` is refused (413) before any byte is read, and reading stops (413) as soon
    as the body, the file or a field passes its limit. Other content types give an empty form."""
    kind, params = parse_options_header(request.headers.get("content-type"))
    if kind not in (b"multipart/form-data", b"application/x-www-form-urlencoded"):
        return FormData()
    length = content_length(request.headers)
    if length is not None and length > limits.max_body_bytes:
        raise _too_large(f"the request is {mebibytes(length)}, over the limit of {mebibytes(limits.max_body_bytes)}")
    if kind == b"multipart/form-data":
        if b"boundary" not in params:
            raise HTTPException(400, "malformed multipart form: no boundary in its Content-Type")
        charset = _decode(params.get(b"charset", b"utf-8"), "latin-1")
        try:
            charset = codecs.lookup(charset).name
        except LookupError:
            charset = "latin-1"
        reader: _MultipartReader | _UrlencodedReader = _MultipartReader(params[b"boundary"], charset, limits)
    else:
        reader = _UrlencodedReader(limits)
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limits.max_body_bytes:  # stop reading here: the rest never leaves the socket
                raise _too_large(f"the request is over the limit of {mebibytes(limits.max_body_bytes)}")
            reader.parser.write(chunk)
        reader.parser.finalize()
    except FormParserError:
        raise HTTPException(400, "malformed form data") from None
    return FormData(reader.items)


def in_memory_form_route(limits: FormLimits) -> type[APIRoute]:
    """An ``APIRoute`` class whose form parameters (``Form``, ``UploadFile``) are read by
    :func:`read_form`: in memory, within ``limits`` (Starlette's parser spools files over 1 MiB to disk)."""

    class InMemoryFormRequest(Request):
        async def form(self, **_starlette_limits) -> FormData:  # type: ignore[override]
            if self._form is None:
                self._form = await read_form(self, limits)
            return self._form

    class InMemoryFormRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def with_in_memory_form(request: Request):
                return await handler(InMemoryFormRequest(request.scope, request.receive))

            return with_in_memory_form

    return InMemoryFormRoute


def _split_host(value: str) -> tuple[str, int | None] | None:
    """``host[:port]`` (IPv6 in brackets; a bare IPv6 address is taken whole) as (lowercase name without a
    trailing dot or brackets, port or None); None when malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else None
    elif value.count(":") == 1:
        name, port_text = value.split(":")
    else:
        name, port_text = value, None
    if port_text is not None and not (port_text.isdigit() and len(port_text) <= 5):
        return None
    name = name.rstrip(".")
    if not name:
        return None
    return name, int(port_text) if port_text is not None else None


def _origin(value: str) -> tuple[str, str, int] | None:
    """``scheme://host[:port]`` as (scheme, host, port with the scheme's default); None when malformed."""
    try:
        parts = urlsplit(value.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    default = {"http": 80, "https": 443, "ws": 80, "wss": 443}.get(parts.scheme)
    if port is None and default is None:
        return None
    return parts.scheme, parts.hostname.rstrip("."), port if port is not None else default


class RequestGuard:
    """ASGI middleware: the Host header must name this server (the loopback names, the address the
    request came in on, or an ``allowed_hosts`` entry: ``name`` for any port, ``name:port``, ``*`` for
    any host), else 400; a POST (any method but GET, HEAD, OPTIONS) that carries an ``Origin`` must come
    from the page's own origin or an ``allowed_origins`` entry (``scheme://host[:port]``, ``*`` for any),
    and one without ``Origin`` must not say ``Sec-Fetch-Site: cross-site`` or ``same-site``, else 403
    (requests without either header, as curl sends them, pass); a Content-Length over ``max_body_bytes``
    gets 413 before a byte of the body is read. Answers are JSON ``{"error": ...}``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        allowed_hosts: Iterable[str] = (),
        allowed_origins: Iterable[str] = (),
        max_body_bytes: int | None = None,
    ) -> None:
        self.app = app
        self.any_host = self.any_origin = False
        self.hosts: set[tuple[str, int | None]] = {(name, None) for name in LOOPBACK_HOSTS}
        for entry in allowed_hosts:
            if entry.strip() == "*":
                self.any_host = True
                continue
            parsed = _split_host(entry)
            if parsed is None:
                raise ValueError(f"allowed host {entry!r} is not a host name or address, with an optional :port")
            self.hosts.add(parsed)
        self.origins: set[tuple[str, str, int]] = set()
        for entry in allowed_origins:
            if entry.strip() == "*":
                self.any_origin = True
                continue
            origin = _origin(entry)
            if origin is None:
                raise ValueError(f"allowed origin {entry!r} is not of the form scheme://host[:port]")
            self.origins.add(origin)
        self.max_body_bytes = max_body_bytes

    def host_allowed(self, host: str, scope: Scope) -> bool:
        parsed = _split_host(host)
        if parsed is None:
            return False
        if self.any_host:
            return True
        name, port = parsed
        if (name, None) in self.hosts or (name, port) in self.hosts:
            return True
        server = scope.get("server")
        return bool(server) and str(server[0]).lower().strip("[]") == name  # the address it was reached at

    def origin_allowed(self, origin: str, host: str, scheme: str) -> bool:
        if self.any_origin:
            return True
        parsed = _origin(origin)
        if parsed is None:  # "null" (a sandboxed frame, a file: page) or garbage
            return False
        own = _origin(f"{scheme}://{host}") if host else None
        return parsed == own or parsed in self.origins

    def problem(self, scope: Scope) -> tuple[int, str] | None:
        headers = Headers(scope=scope)
        host = headers.get("host")
        if host is not None and not self.host_allowed(host, scope):
            return 400, (
                f"this server does not answer to the host {host[:100]!r}; start it with --allow-host to add a name"
            )
        if scope.get("method", "GET") not in SAFE_METHODS:
            origin = headers.get("origin")
            if origin is not None:
                if not self.origin_allowed(origin, host or "", scope.get("scheme", "http")):
                    return 403, (
                        f"cross-origin request from {origin[:100]!r} refused; start the server with "
                        "--allow-origin to allow that page"
                    )
            elif headers.get("sec-fetch-site", "").lower() in ("cross-site", "same-site"):
                return 403, "cross-site request refused (no Origin header to check against --allow-origin)"
        length = content_length(headers)
        if self.max_body_bytes is not None and length is not None and length > self.max_body_bytes:
            return 413, f"the request is {mebibytes(length)}, over the limit of {mebibytes(self.max_body_bytes)}"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = self.problem(scope)
            if problem is not None:
                status, message = problem
                await JSONResponse({"error": message}, status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)
