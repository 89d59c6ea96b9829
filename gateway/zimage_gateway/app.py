"""The HTTP side: routes, authentication, admission, and cancelling on client disconnect.

Handlers raise ``ApiError`` or our client's ``ZImageError``; ``_answer`` turns both into OpenAI's
error shape in one place, counts every answer, and keeps tracebacks in the log.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from importlib import resources
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, List, Optional, Tuple, TypeVar

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from zimage_client import GeneratedImage, ZImageError

from .auth import ApiKeys
from .errors import ApiError, from_client_error, invalid
from .limits import KeyLimiter
from .metrics import GatewayMetrics
from .params import EDIT_FILES, ImageRequest, parse_edit, parse_generation
from .pool import ServerPool
from .settings import GatewaySettings

__all__ = ["create_app", "images_body", "CLIENT_LEFT_STATUS"]

_LOGGER = logging.getLogger(__name__)
T = TypeVar("T")
# nginx's "client closed request": nobody reads it, but the access log and metrics show it.
CLIENT_LEFT_STATUS = 499
# An edit form's text fields: OpenAI's and ours number about twenty, none long but the prompt.
_MAX_FORM_FIELDS = 40
_MAX_FORM_FIELD_BYTES = 64 * 1024
# The playground's files by URL path: a fixed table, so no part of a request names a file.
_PAGES = {"/": ("playground.html", "text/html; charset=utf-8"),
          "/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
          "/playground.css": ("playground.css", "text/css; charset=utf-8")}
_PAGE_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


class _ClientLeft(Exception):
    """The HTTP client disconnected before its answer was ready."""


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _disconnect(receive: Callable[[], Awaitable[Dict[str, Any]]]) -> None:
    # Once the body has been read, the next ASGI message is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """``await work``, cancelling it if the client disconnects first (then ``_ClientLeft``)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise _ClientLeft()
    return task.result()


async def _limited_body(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body's chunks, refused with a 413 once they pass ``limit`` bytes (or say they will)."""
    too_large = ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise too_large
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise too_large
        yield chunk


async def _read_json(request: Request, limit: int) -> Any:
    body = bytearray()
    async for chunk in _limited_body(request, limit):
        body += chunk
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None


async def _read_edit_form(request: Request, limit: int) -> Tuple[Dict[str, str], Dict[str, List[bytes]]]:
    """An edit's multipart form as its text fields and its files by field name."""
    kind = request.headers.get("content-type", "")
    if kind.split(";")[0].strip().lower() != "multipart/form-data":
        raise ApiError(400, f"the request body must be multipart/form-data (OpenAI's images edit form), "
                            f"got {kind[:100]!r}", code="invalid_form")
    parser = MultiPartParser(request.headers, _limited_body(request, limit), max_files=len(EDIT_FILES) + 1,
                             max_fields=_MAX_FORM_FIELDS, max_part_size=_MAX_FORM_FIELD_BYTES)
    # In memory up to the body limit: the gateway's root filesystem is read-only (deploy/kubernetes).
    parser.spool_max_size = limit
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, f"the multipart form cannot be read: {exc.message}", code="invalid_form") from None
    fields: Dict[str, str] = {}
    files: Dict[str, List[bytes]] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, str):
                if name in fields:
                    raise invalid(name, "is given more than once; each field is allowed once")
                fields[name] = value
            elif name in EDIT_FILES:
                files.setdefault(name, []).append(await value.read())
            else:
                raise ApiError(400, f"unknown file parameter: {name!r}; files are allowed as "
                                    f"{', '.join(EDIT_FILES)}", param=name, code="unknown_parameter")
    finally:
        await form.close()
    return fields, files


def images_body(images: List[GeneratedImage], output_format: str) -> bytes:
    """The JSON answer with each image's base64 spliced in as bytes.

    The base64 alphabet needs no JSON escaping, and json.dumps of a 1024x1024 image's base64
    would scan megabytes of text for escapes and copy them twice (bench/results, gateway).
    ``seed`` and ``timings_ms`` are extensions; the SDKs keep unknown fields (model_extra).
    """
    entries = []
    for image in images:
        extensions = json.dumps({"seed": image.seed, "timings_ms": image.timings_ms}).encode()
        entries.append(b'{"b64_json":"' + base64.b64encode(image.data or b"") + b'",' + extensions[1:])
    head = json.dumps({"created": int(time.time()), "output_format": output_format,
                       "size": f"{images[0].width}x{images[0].height}", "background": "opaque"}).encode()
    return head[:-1] + b',"data":[' + b",".join(entries) + b"]}"


def create_app(settings: GatewaySettings, pool: Optional[ServerPool] = None) -> FastAPI:
    metrics = GatewayMetrics()
    pool = pool or ServerPool(settings.servers, model_name=settings.triton_model,
                              inference_timeout_s=settings.inference_timeout_s, retries=settings.retries,
                              retry_backoff_s=settings.retry_backoff_s, metrics=metrics)
    keys = ApiKeys(settings.api_keys)
    limiter = KeyLimiter(settings.max_concurrent_per_key, settings.max_waiting_per_key, settings.max_wait_s)
    pages = {path: (resources.files(__package__).joinpath("static", name).read_bytes(), kind)
             for path, (name, kind) in _PAGES.items()}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await pool.close()

    app = FastAPI(title="zimage-gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])

    def authenticate(request: Request) -> str:
        if not keys.enabled:
            return "anonymous"
        key = keys.identify(request.headers.get("authorization"))
        if key is None:
            metrics.rejected.labels("unauthenticated").inc()
            raise ApiError(401, "missing or unknown API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"www-authenticate": "Bearer"})
        return key

    async def answer(route: str, handler: Callable[[], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        try:
            response = await handler()
        except ApiError as exc:
            response = _error_response(exc)
        except ZImageError as exc:
            response = _error_response(from_client_error(exc))
        except _ClientLeft:
            response = Response(status_code=CLIENT_LEFT_STATUS)
        except Exception:  # the traceback goes to the log, never to the client
            _LOGGER.exception("unexpected error on %s", route)
            response = _error_response(ApiError(500, "internal error in the gateway", type="server_error",
                                                code="internal_error"))
        if response.status_code == 429:
            metrics.rejected.labels("rate_limited").inc()
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.duration.labels(route).observe(time.perf_counter() - started)
        return response

    async def generate(request: Request, key: str, params: ImageRequest) -> Response:
        started = time.perf_counter()
        outcome = "error"

        async def admitted() -> Tuple[List[GeneratedImage], float]:
            async with limiter.slot(key):
                upstream_started = time.perf_counter()
                return await pool.generate(params), 1000 * (time.perf_counter() - upstream_started)

        try:
            # A client that leaves while waiting for a slot gives its waiting place back at once.
            images, upstream_ms = await _unless_client_leaves(request, admitted())
            outcome = "ok"
        except _ClientLeft:
            outcome = "client left, gRPC calls cancelled"
            metrics.disconnects.inc()
            raise
        finally:
            user = "" if params.user is None else f" user={params.user[:64]!r}"
            _LOGGER.info("%s%s n=%d size=%sx%s: %s after %.2f s", key, user, params.n, params.width, params.height,
                         outcome, time.perf_counter() - started)
        return Response(images_body(images, params.output_format), media_type="application/json",
                        # The servers' share of the answer time, so a client can tell the gateway's.
                        headers={"server-timing": f"upstream;dur={upstream_ms:.1f}"})

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> Response:
        async def handle() -> Response:
            key = authenticate(request)
            params = parse_generation(await _read_json(request, settings.max_body_bytes), model_id=settings.model_id,
                                      max_n=settings.max_n)
            return await generate(request, key, params)
        return await answer("generations", handle)

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> Response:
        async def handle() -> Response:
            key = authenticate(request)
            fields, files = await _read_edit_form(request, settings.max_image_bytes)
            params = parse_edit(fields, files, model_id=settings.model_id, max_n=settings.max_n)
            return await generate(request, key, params)
        return await answer("edits", handle)

    @app.post("/v1/images/variations")
    async def variations(request: Request) -> Response:
        async def handle() -> Response:
            authenticate(request)
            raise ApiError(501, "/v1/images/variations is not served: it is DALL-E 2's prompt-less variation; "
                                "use /v1/images/edits with a prompt", code="unsupported_endpoint")
        return await answer("variations", handle)

    def model_entry() -> Dict[str, Any]:
        return {"id": settings.model_id, "object": "model", "created": 0, "owned_by": "zimage-triton"}

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        async def handle() -> Response:
            authenticate(request)
            return JSONResponse({"object": "list", "data": [model_entry()]})
        return await answer("models", handle)

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> Response:
        async def handle() -> Response:
            authenticate(request)
            if model != settings.model_id:
                raise ApiError(404, f"model: {model!r} is not served; available: {settings.model_id!r}",
                               param="model", code="model_not_found")
            return JSONResponse(model_entry())
        return await answer("models", handle)

    @app.get("/health/live")
    async def live() -> Response:
        return JSONResponse({"status": "live"})

    @app.get("/health/ready")
    async def ready() -> Response:
        servers = await pool.readiness(settings.ready_timeout_s)
        any_ready = "ready" in servers.values()
        return JSONResponse({"status": "ready" if any_ready else "not ready", "servers": servers},
                            status_code=200 if any_ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def page(path: str) -> Callable[[], Awaitable[Response]]:
        content, kind = pages[path]

        async def serve() -> Response:
            return Response(content, media_type=kind, headers=_PAGE_HEADERS)
        return serve

    for path in pages:
        app.add_api_route(path, page(path), methods=["GET"], include_in_schema=False)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return _error_response(ApiError(exc.status_code, str(exc.detail), code="not_found"
                                        if exc.status_code == 404 else None))

    return app
