"""HTTP inspection service: ``POST /inspect`` scores one uploaded image with a loaded model.

The model is loaded once (an :class:`~defectlab.deploy.backends.Inspector`) and shared by
every request. The limits exist so that overload and hostile input cost the service little
and never take it down:

* **Authentication.** With API keys (``api_keys``), every request but ``GET /health`` must
  carry one (``Authorization: Bearer KEY`` or ``X-API-Key: KEY``), compared in constant
  time; others get 401 before anything else happens. :func:`serve` refuses a non-loopback
  host without a key unless told ``insecure``. Keys travel in clear over plain HTTP: beyond
  one machine, put the service behind a TLS reverse proxy.
* **Pixel budget.** An upload whose header declares more than ``max_pixels`` pixels gets
  413 without being decoded (a small file can declare a huge image); other formats than
  PNG, JPEG, BMP and TIFF get 415, as undecodable images do.
* **Upload size.** ``/inspect`` bodies larger than ``max_upload_bytes`` get 413: at once when
  the ``Content-Length`` header says so (nothing is read), and otherwise the moment the
  counted body passes the limit (chunked uploads, lying headers); the connection is then
  closed rather than drained. Memory per request is bounded by the limit, not by what a
  client sends.
* **Admission.** At most ``max_concurrency + max_queue`` ``/inspect`` requests are inside the
  service at a time (uploading, waiting for a slot, or being scored); the next one gets 503
  with ``Retry-After`` before its body is read. Overload becomes fast refusals that a client
  can retry, instead of growing memory and latency. ``/health`` and ``/model`` are never
  refused.
* **Concurrency.** The CPU work of a request (decoding, the model, PNG encoding) runs in a
  worker thread (:func:`starlette.concurrency.run_in_threadpool`), so the event loop keeps
  accepting, parsing and refusing requests meanwhile; a semaphore lets at most
  ``max_concurrency`` such jobs run at once, the model's memory and the cores stay bounded.
* **Micro-batching.** A request that gets a slot takes every image waiting at that moment
  (up to ``max_batch``) into one :func:`~defectlab.deploy.backends.score_images` call; the
  others just receive their result. An idle service scores batches of one (no added
  latency); a busy one makes fewer, larger model calls. When a batch fails, its images are
  scored again one by one, so one image that breaks the model fails only its own request.

Errors are JSON ``{"detail": message}``: 400 empty upload, 401 no or wrong API key, 413 upload
or image too large, 415 not a decodable image, 422 malformed request (FastAPI's validation),
503 busy, 500 model failure (logged with its traceback; the worker goes on serving).
"""

from __future__ import annotations

import asyncio
import copy
import errno
import hmac
import ipaddress
import logging
import math
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from defectlab import __version__
from defectlab.data.io import (
    DEFAULT_MAX_PIXELS,
    ImageLimits,
    ImageReadError,
    ImageTooLargeError,
    decode_image,
    to_uint8,
)
from defectlab.deploy.backends import Inspector, open_inspector, score_images, use_tiles
from defectlab.errors import ConfigError, DataError, OutputError
from defectlab.evaluate.visualize import heatmap_overlay, mask_outline, png_base64

logger = logging.getLogger(__name__)

INSPECT_PATH = "/inspect"
#: seconds a refused client is asked to wait before retrying
RETRY_AFTER_S = 1
_DATA_URI = "data:image/png;base64,"
#: on 413 the connection is closed rather than drained of the rest of an oversized body
_CLOSE = {"Connection": "close"}
#: environment variable holding the accepted API keys (comma-separated)
API_KEY_ENV = "DEFECTLAB_API_KEY"
#: paths answered without an API key
OPEN_PATHS = frozenset({"/health"})


class InspectResult(BaseModel):
    """One inspected image. PNGs are base64 (no ``data:`` prefix) at the upload's own size."""

    filename: str = Field(description="the uploaded file's name")
    width: int
    height: int
    score: float = Field(description="image anomaly score; higher is more anomalous")
    is_defect: bool = Field(description="score >= image_threshold")
    image_threshold: float
    pixel_threshold: float
    defect_area_fraction: float = Field(description="fraction of pixels in the predicted mask")
    mask_png: str = Field(description="predicted mask, 8-bit grey PNG, 0 or 255")
    heatmap_png: str | None = Field(
        None, description="heat map, 8-bit grey PNG, map_range scaled to 0..255 (?heatmap=true)"
    )
    overlay_png: str | None = Field(
        None, description="RGB PNG: heat map over the image, mask outlined (?overlay=true)"
    )
    model: str
    backend: str
    elapsed_ms: float = Field(description="time in the service, queueing included")


class ErrorDetail(BaseModel):
    """Why a request was refused or failed."""

    detail: str


class Health(BaseModel):
    status: str


class Limits(BaseModel):
    max_upload_bytes: int
    max_pixels: int
    max_concurrency: int
    max_queue: int
    max_batch: int


class RequestCounts(BaseModel):
    """``/inspect`` answers since start: 2xx served, 503 rejected, other 4xx invalid, 5xx
    failed; in_flight are inside the service now."""

    served: int = 0
    rejected: int = 0
    invalid: int = 0
    failed: int = 0
    in_flight: int = 0


class ModelInfo(BaseModel):
    """:meth:`Inspector.info` (a backend may add keys) plus the service's limits and counts."""

    model_config = ConfigDict(extra="allow")

    model: str
    backend: str
    image_size: int
    channels: int
    image_threshold: float
    pixel_threshold: float
    map_range: tuple[float, float]
    tile: bool
    limits: Limits
    requests: RequestCounts


@dataclass
class _Job:
    """One upload, still encoded (it is decoded in the worker thread), and its answer."""

    data: bytes
    filename: str
    heatmap: bool
    overlay: bool
    future: asyncio.Future[dict[str, Any]]
    taken: bool = False


@dataclass
class _Batcher:
    """Runs jobs at most ``max_concurrency`` batches at a time, coalescing waiting jobs.

    Leader/follower: every request queues its job and competes for a slot; the winner takes
    the oldest waiting jobs (its own among them unless ``max_batch`` older ones wait) and runs
    them in a worker thread; a request whose job someone else took waits for its future.
    Everything happens on the event loop, so the queue needs no lock.
    """

    work: Callable[[list[_Job]], list[dict[str, Any] | Exception]]
    max_concurrency: int
    max_batch: int
    pending: deque[_Job] = field(default_factory=deque)
    batch_sizes: Counter[int] = field(default_factory=Counter)
    _slots: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.max_concurrency)

    async def run(self, job: _Job) -> dict[str, Any]:
        self.pending.append(job)
        try:
            while not job.taken:
                async with self._slots:
                    if not job.taken:
                        await self._run_batch()
            return await asyncio.shield(job.future)
        finally:
            if not job.taken:  # cancelled while waiting: nobody must score it any more
                self.pending.remove(job)

    async def _run_batch(self) -> None:
        batch = [self.pending.popleft() for _ in range(min(self.max_batch, len(self.pending)))]
        for job in batch:
            job.taken = True
        self.batch_sizes[len(batch)] += 1
        try:
            outcomes = await run_in_threadpool(self.work, batch)
        except Exception as exc:
            outcomes = [exc] * len(batch)
        except BaseException:  # cancelled: the followers must not wait forever
            _settle(batch, [RuntimeError("inspection cancelled")] * len(batch))
            raise
        _settle(batch, outcomes)


def _settle(jobs: list[_Job], outcomes: list[dict[str, Any] | Exception]) -> None:
    for job, outcome in zip(jobs, outcomes, strict=True):
        if job.future.done():
            continue
        if isinstance(outcome, Exception):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)


def _png(image: np.ndarray) -> str:
    return png_base64(image)[len(_DATA_URI) :]


@dataclass
class _Service:
    inspector: Inspector
    tile: bool
    limits: Limits
    counts: RequestCounts = field(default_factory=RequestCounts)
    batcher: _Batcher = field(init=False)

    def __post_init__(self) -> None:
        self.batcher = _Batcher(self._inspect, self.limits.max_concurrency, self.limits.max_batch)
        self.image_limits = ImageLimits(max_pixels=self.limits.max_pixels)

    @property
    def capacity(self) -> int:
        return self.limits.max_concurrency + self.limits.max_queue

    def _inspect(self, jobs: list[_Job]) -> list[dict[str, Any] | Exception]:
        """Worker-thread body: decode each upload, score the decodable ones together, encode.
        Returns one result or exception per job; never raises for a job's own fault."""
        outcomes: list[dict[str, Any] | Exception] = []
        decoded: dict[int, np.ndarray] = {}
        for index, job in enumerate(jobs):
            try:
                decoded[index] = decode_image(
                    job.data, job.filename, self.inspector.channels, self.image_limits
                )
                outcomes.append({})
            except Exception as exc:  # ImageReadError, or a decoder bug: this upload's alone
                outcomes.append(exc)
        scored = self._score([decoded[i] for i in decoded])
        for index, result in zip(decoded, scored, strict=True):
            if isinstance(result, Exception):
                outcomes[index] = result
                continue
            try:
                outcomes[index] = self._describe(jobs[index], decoded[index], *result)
            except Exception as exc:
                outcomes[index] = exc
        return outcomes

    def _score(self, images: list[np.ndarray]) -> list[tuple[float, np.ndarray] | Exception]:
        """Score a batch; when it fails, each image alone, so only the culprit fails."""
        if not images:
            return []
        try:
            results = score_images(self.inspector, images, tile=self.tile)
            if not all(math.isfinite(s) and np.isfinite(heat).all() for s, heat in results):
                raise DataError(f"{self.inspector.model} produced non-finite scores")
        except Exception as exc:
            if len(images) == 1:
                return [exc]
            return [self._score([image])[0] for image in images]
        return list(results)

    def _describe(
        self, job: _Job, image: np.ndarray, score: float, heat: np.ndarray
    ) -> dict[str, Any]:
        inspector = self.inspector
        mask = heat >= inspector.pixel_threshold
        low, high = inspector.map_range
        result: dict[str, Any] = {
            "filename": job.filename,
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "score": float(score),
            "is_defect": bool(score >= inspector.image_threshold),
            "image_threshold": float(inspector.image_threshold),
            "pixel_threshold": float(inspector.pixel_threshold),
            "defect_area_fraction": float(mask.mean()),
            "mask_png": _png(mask.astype(np.uint8) * 255),
            "model": inspector.model,
            "backend": inspector.backend,
        }
        if job.heatmap:
            scaled = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
            result["heatmap_png"] = _png(to_uint8(np.clip(scaled, 0.0, 1.0)))
        if job.overlay:
            overlay = mask_outline(heatmap_overlay(image, heat, low, high), mask)
            result["overlay_png"] = _png(overlay)
        return result


class _Gate:
    """ASGI middleware in front of ``POST /inspect``: upload size, admission, counting.

    It works below FastAPI so that it can refuse before the body is read and count every
    answer, including the 413 and 422 that never reach the endpoint.
    """

    def __init__(self, app: ASGIApp, service: _Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != INSPECT_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        service, counts = self.service, self.service.counts
        limit = service.limits.max_upload_bytes
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            declared = _content_length(scope)
            if declared is not None and declared > limit:
                await _refuse(
                    scope, receive, counting_send, 413, _too_large(limit, declared), _CLOSE
                )
                return
            if counts.in_flight >= service.capacity:
                await _refuse(
                    scope,
                    receive,
                    counting_send,
                    503,
                    f"busy: all {service.capacity} places taken (max_concurrency "
                    f"{service.limits.max_concurrency} + max_queue {service.limits.max_queue}); "
                    f"retry after {RETRY_AFTER_S} s",
                    {"Retry-After": str(RETRY_AFTER_S)},
                )
                return
            counts.in_flight += 1
            try:
                await self.app(scope, _limited(receive, limit), counting_send)
            finally:
                counts.in_flight -= 1
        finally:
            if status == 503:
                counts.rejected += 1
            elif status >= 500:
                counts.failed += 1
            elif status >= 400:
                counts.invalid += 1
            else:
                counts.served += 1


class _Auth:
    """ASGI middleware: with keys, every request but :data:`OPEN_PATHS` needs one of them;
    401 otherwise, before the body is read or a place in the service is taken."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]

    def accepts(self, scope: Scope) -> bool:
        given = b""
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                given = value.strip()
            elif name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
        matched = False
        for key in self.keys:  # every key is compared, whichever matches
            matched |= hmac.compare_digest(given, key)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self.accepts(scope):
            await self.app(scope, receive, send)
            return
        await _refuse(
            scope,
            receive,
            send,
            401,
            "missing or wrong API key: send Authorization: Bearer KEY or X-API-Key: KEY",
            {"WWW-Authenticate": "Bearer", **_CLOSE},
        )


def read_api_keys(path: str | Path) -> list[str]:
    """The keys in a file, one a line; blank lines and ``#`` comments are ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the API key file ({exc.strerror})") from exc
    keys = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not keys:
        raise ConfigError(f"{path}: the API key file holds no key")
    return keys


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so an occupied port or a bad host is one clear error
    (uvicorn would log its own lines and exit 3)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise OutputError(f"{host}: cannot listen on this host ({exc.strerror})") from exc
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = {
            errno.EADDRINUSE: "is already in use (is another service running? choose --port)",
            errno.EACCES: "needs privileges (ports below 1024); choose --port 1024 or above",
            errno.EADDRNOTAVAIL: "is not an address of this machine",
        }.get(exc.errno or -1, exc.strerror or str(exc))
        raise OutputError(f"{host}:{port} {reason}") from exc
    sock.set_inheritable(True)
    return sock


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large(limit: int, size: int | None = None) -> str:
    told = f" ({size} bytes)" if size is not None else ""
    return f"upload too large{told}: the limit is {limit} bytes"


def _limited(receive: Receive, limit: int) -> Receive:
    """``receive`` that raises 413 once more than ``limit`` body bytes arrived."""
    received = 0

    async def wrapped() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, _too_large(limit), headers=_CLOSE)
        return message

    return wrapped


async def _refuse(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    detail: str,
    headers: dict[str, str] | None = None,
) -> None:
    response = JSONResponse({"detail": detail}, status_code=status, headers=headers)
    await response(scope, receive, send)


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorDetail, "description": description}
    for status, description in {
        400: "empty upload",
        401: "missing or wrong API key (only when the service has keys)",
        413: "upload larger than max_upload_bytes, or image over max_pixels",
        415: "not a decodable image",
        500: "the model failed on this image",
        503: "busy: too many requests inside the service; see Retry-After",
    }.items()
}


def create_app(
    inspector: Inspector,
    *,
    max_upload_bytes: int = 20 * 2**20,
    max_concurrency: int = 2,
    max_queue: int = 64,
    tile: bool | None = None,
    max_batch: int = 8,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    api_keys: Sequence[str] = (),
) -> FastAPI:
    """The inspection service around an already loaded model (see the module docstring for
    what the limits guard against). ``max_batch=1`` turns micro-batching off; with
    ``api_keys`` every request but ``/health`` needs one of them. ``tile=None`` scores
    as the model was trained (stitched tiles for a run trained on tiles)."""
    tile = use_tiles(inspector, tile)
    if any(not key or key != key.strip() for key in api_keys):
        raise ConfigError("API keys must be non-empty and without surrounding spaces")
    for name, value, least in (
        ("max_upload_bytes", max_upload_bytes, 1),
        ("max_pixels", max_pixels, 1),
        ("max_concurrency", max_concurrency, 1),
        ("max_queue", max_queue, 0),
        ("max_batch", max_batch, 1),
    ):
        if value < least:
            raise ConfigError(f"{name} must be >= {least}, got {value}")
    limits = Limits(
        max_upload_bytes=max_upload_bytes,
        max_pixels=max_pixels,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        max_batch=max_batch,
    )
    service = _Service(inspector, tile, limits)
    app = FastAPI(
        title="defectlab inspection service",
        version=__version__,
        description=f"Anomaly scores, masks and heat maps from the {inspector.model} model.",
    )
    app.state.service = service
    app.add_middleware(_Gate, service=service)
    if api_keys:  # added last, so it runs first: no key, no admission
        app.add_middleware(_Auth, keys=list(api_keys))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": f"internal error: {exc}"}, status_code=500)

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        """Liveness: answers while the service runs, busy or not."""
        return Health(status="ok")

    @app.get("/model", response_model=ModelInfo)
    async def model_info() -> ModelInfo:
        """The model behind /inspect, the service limits and request counts."""
        extra = {
            "map_range": inspector.map_range,
            "tile": tile,
            "limits": limits,
            "requests": service.counts,
        }
        return ModelInfo(**(inspector.info() | extra))

    @app.post(
        INSPECT_PATH,
        response_model=InspectResult,
        response_model_exclude_none=True,
        responses=_ERRORS,
    )
    async def inspect(
        image: Annotated[UploadFile, File(description="the image: PNG, JPEG, BMP or TIFF")],
        heatmap: Annotated[bool, Query(description="include the heat map PNG")] = False,
        overlay: Annotated[bool, Query(description="include the overlay PNG")] = False,
    ) -> dict[str, Any]:
        """Score one image: anomaly score, decision, mask; heat map and overlay on request."""
        started = time.perf_counter()
        name = image.filename or "upload"
        data = await image.read()
        if not data:
            raise HTTPException(400, f"{name}: empty file (0 bytes)")
        job = _Job(data, name, heatmap, overlay, asyncio.get_running_loop().create_future())
        try:
            result = await service.batcher.run(job)
        except ImageTooLargeError as exc:
            raise HTTPException(413, str(exc), headers=_CLOSE) from exc
        except ImageReadError as exc:
            raise HTTPException(415, str(exc)) from exc
        except Exception as exc:
            logger.error("inspection of %s failed", name, exc_info=exc)
            raise HTTPException(500, f"{name}: the model failed: {exc}") from exc
        result["elapsed_ms"] = (time.perf_counter() - started) * 1000.0
        return result

    return app


def serve(
    path: str | Path,
    *,
    backend: str = "torch",
    device: str = "auto",
    host: str = "127.0.0.1",
    port: int = 8000,
    tile: bool | None = None,
    max_upload_bytes: int = 20 * 2**20,
    max_concurrency: int = 2,
    max_queue: int = 64,
    max_batch: int = 8,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    api_keys: Sequence[str] = (),
    insecure: bool = False,
) -> None:
    """Load the model at ``path`` once and serve it with uvicorn (one process; concurrency
    comes from worker threads, so the model is in memory once) until interrupted.

    A host other than loopback needs ``api_keys`` or ``insecure=True``; the port is bound
    before the model is loaded, so an occupied one fails at once."""
    import uvicorn

    if not api_keys and not is_loopback(host):
        if not insecure:
            raise ConfigError(
                f"refusing to serve on {host} without an API key: anyone who can reach it "
                f"could use it. Give --api-key or {API_KEY_ENV} (and put a TLS reverse proxy "
                "in front), or --insecure to serve openly anyway"
            )
        logger.warning(
            "serving on %s WITHOUT an API key (--insecure): anyone who can reach it can use it",
            host,
        )
    sock = bind_socket(host, port)
    try:
        inspector = open_inspector(path, backend, device)
        app = create_app(
            inspector,
            max_upload_bytes=max_upload_bytes,
            max_concurrency=max_concurrency,
            max_queue=max_queue,
            tile=tile,
            max_batch=max_batch,
            max_pixels=max_pixels,
            api_keys=api_keys,
        )
    except BaseException:
        sock.close()
        raise
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["defectlab"] = {"handlers": ["default"], "level": "INFO"}
    config = uvicorn.Config(app, host=host, port=port, workers=1, log_config=log_config)
    logger.info(
        "serving %s (%s backend, run %s) on http://%s:%d — POST /inspect, docs at /docs",
        inspector.model,
        inspector.backend,
        inspector.run_dir,
        host,
        port,
    )
    uvicorn.Server(config).run(sockets=[sock])


__all__ = ["API_KEY_ENV", "InspectResult", "ModelInfo", "create_app", "read_api_keys", "serve"]
