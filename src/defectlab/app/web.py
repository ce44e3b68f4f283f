"""The workbench web application: queue, review and dashboard pages over the database,
and the JSON endpoints the pages call. Server-rendered (Jinja2) with a little JavaScript.

Reading is open (bind loopback); every write needs a token: ``Authorization: Bearer
TOKEN`` for scripts, or a browser session opened with the token on ``/login``, whose
requests must also carry the session's CSRF token (``X-CSRF-Token`` header or ``csrf``
form field). File paths never come from the client: images are addressed by database id,
folders to scan are fixed when the app starts.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from defectlab import __version__
from defectlab.app import charts, stats
from defectlab.app.db import (
    VERDICTS,
    Database,
    Image,
    Inspection,
    ModelVersion,
    Review,
    Skipped,
    files_dir,
    utcnow,
)
from defectlab.app.ingest import (
    ingest_folder,
    register_version,
    store_result,
    version_inspector,
)
from defectlab.app.security import PRE_COOKIE, SESSION_COOKIE, Signer, ensure_token, token_id
from defectlab.data.io import (
    DEFAULT_MAX_PIXELS,
    ImageLimits,
    ImageReadError,
    ImageTooLargeError,
    decode_image,
    read_image,
    to_uint8,
    write_png,
)
from defectlab.deploy.backends import Inspector, score_images
from defectlab.deploy.serve import bind_socket, is_loopback
from defectlab.errors import ConfigError, DefectlabError
from defectlab.evaluate.visualize import colormap_rgb

logger = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
CLASS_RE = re.compile(r"^[\w\- ]{0,64}$")
REVIEWER_RE = re.compile(r"^[\w\-. ]{1,64}$")
VIEWS = ("flagged", "near", "audit", "all")
SORTS = ("score", "uncertainty", "newest")
REVIEWED = ("todo", "done", "any")
#: a part is "near the threshold" when its score is within this many score standard
#: deviations of the threshold
NEAR_BAND = 0.5
_MAGIC = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"BM", ".bmp"), (b"II*\x00", ".tif"))


class BodyTooLarge(Exception):
    pass


class UploadLimit:
    """Refuse request bodies over ``limit`` bytes: at once from ``Content-Length``, else
    as soon as the counted body passes it (chunked or lying clients)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        too_large = JSONResponse(
            {"detail": f"upload too large: the limit is {self.limit} bytes"},
            status_code=413,
            headers={"Connection": "close"},
        )
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await too_large(scope, receive, send)
                return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge:
            if not started:
                await too_large(scope, receive, send)


@dataclass
class Job:
    """Work over a second (scan, retrain) runs in a thread; the pages poll its progress."""

    id: str
    kind: str
    state: str = "running"
    done: int = 0
    total: int = 0
    message: str = ""
    started: float = field(default_factory=time.time)

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "done": self.done,
            "total": self.total,
            "message": self.message,
            "seconds": round(time.time() - self.started, 1),
        }


@dataclass
class Writer:
    token_id: int
    reviewer: str


class Workbench:
    """State shared by the requests: database, file store, signer, model cache, jobs."""

    def __init__(
        self,
        db: Database,
        files: Path,
        *,
        scan: list[Path],
        max_upload_bytes: int,
        max_pixels: int,
        device: str,
        retrain_options: dict[str, Any],
    ) -> None:
        self.db, self.files, self.scan = db, files, scan
        self.max_upload_bytes, self.max_pixels, self.device = max_upload_bytes, max_pixels, device
        self.retrain_options = retrain_options
        self.signer = Signer()
        self.jobs: dict[str, Job] = {}
        self._inspectors: dict[int, Inspector] = {}
        self._lock = threading.Lock()
        self._score_lock = threading.Lock()

    def inspector(self, version: ModelVersion) -> Inspector:
        with self._lock:
            if version.id not in self._inspectors:
                self._inspectors[version.id] = version_inspector(version, self.device)
            return self._inspectors[version.id]

    def start_scan(self) -> Job:
        """Inspect the folders given at start with the active version, in the background."""
        if not self.scan:
            raise HTTPException(409, "no folder to scan: start the app with --scan FOLDER")
        with self.db.sessions() as session:
            version = _version(session, self, None)

        def work(job: Job) -> str:
            inspector = self.inspector(version)
            parts = []
            for folder in self.scan:

                def follow(done: int, total: int) -> None:
                    job.done, job.total = done, total

                result = ingest_folder(
                    self.db,
                    version,
                    folder,
                    self.files,
                    inspector=inspector,
                    progress=False,
                    on_progress=follow,
                )
                parts.append(
                    f"{folder.name}: {result['n_inspected']} new, {result['n_already']} known, "
                    f"{result['n_skipped']} unreadable"
                )
            return "; ".join(parts)

        return self.start_job("scan", work)

    def start_job(self, kind: str, work: Callable[[Job], str]) -> Job:
        with self._lock:
            for job in self.jobs.values():
                if job.kind == kind and job.state == "running":
                    raise HTTPException(409, f"a {kind} job is already running ({job.id})")
            job = Job(id=uuid.uuid4().hex[:12], kind=kind)
            self.jobs[job.id] = job

        def run() -> None:
            try:
                job.message = work(job)
                job.state = "done"
            except DefectlabError as exc:
                job.state, job.message = "failed", str(exc)
            except Exception as exc:  # the job fails, the app goes on
                logger.exception("%s job failed", kind)
                job.state, job.message = "failed", f"{type(exc).__name__}: {exc}"

        threading.Thread(target=run, name=f"defectlab-{kind}", daemon=True).start()
        return job


def _version(session: Any, wb: Workbench, version_id: int | None) -> ModelVersion:
    if version_id is not None:
        version = session.get(ModelVersion, version_id)
        if version is None:
            raise HTTPException(404, f"model version {version_id} does not exist")
        return version
    version = wb.db.active_version(session)
    if version is None:
        raise HTTPException(
            404, "no model version yet: start with --run RUN or run `defectlab inspect`"
        )
    return version


def _date(text: str | None, name: str) -> dt.datetime | None:
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        raise HTTPException(422, f"{name}: not a date (YYYY-MM-DD): {text!r}") from None


def _choice(value: str | None, options: tuple[str, ...], name: str) -> str:
    value = value or options[0]
    if value not in options:
        raise HTTPException(422, f"{name} must be one of {', '.join(options)}; got {value!r}")
    return value


def queue_filters(params: Any) -> dict[str, Any]:
    """The queue's filters from query parameters, validated (4xx on bad values)."""
    version = params.get("version")
    if version not in (None, "") and not str(version).isdigit():
        raise HTTPException(422, f"version must be a number; got {version!r}")
    cls = params.get("cls") or ""
    if not CLASS_RE.match(cls):
        raise HTTPException(422, "cls: letters, digits, space, - and _ only (64 at most)")
    return {
        "view": _choice(params.get("view"), VIEWS, "view"),
        "sort": _choice(params.get("sort"), SORTS, "sort"),
        "reviewed": _choice(params.get("reviewed"), REVIEWED, "reviewed"),
        "cls": cls,
        "version": int(version) if version else None,
        "since": params.get("since") or "",
        "until": params.get("until") or "",
    }


def queue_rows(
    session: Any, wb: Workbench, f: dict[str, Any], limit: int = 500
) -> tuple[ModelVersion, list[tuple[Inspection, Image, Review | None]]]:
    """Inspections of the chosen version that match the filters, in queue order."""
    version = _version(session, wb, f["version"])
    thr = version.image_threshold
    query = (
        select(Inspection, Image, Review)
        .join(Image, Image.id == Inspection.image_id)
        .outerjoin(Review, Review.image_id == Inspection.image_id)
        .where(Inspection.model_version_id == version.id)
    )
    if f["view"] == "flagged":
        query = query.where(Inspection.score >= thr)
    elif f["view"] == "audit":
        query = query.where(Inspection.audit.is_(True))
    elif f["view"] == "near":
        scores = session.scalars(
            select(Inspection.score).where(Inspection.model_version_id == version.id)
        ).all()
        band = NEAR_BAND * (float(np.std(scores)) if len(scores) > 1 else 0.0)
        query = query.where(Inspection.score.between(thr - band, thr + band))
    if f["reviewed"] == "todo":
        query = query.where(Review.id.is_(None))
    elif f["reviewed"] == "done":
        query = query.where(Review.id.is_not(None))
    if f["cls"]:
        query = query.where(Review.defect_class == f["cls"])
    since, until = _date(f["since"], "since"), _date(f["until"], "until")
    if since:
        query = query.where(Inspection.created_at >= since)
    if until:
        query = query.where(Inspection.created_at < until + dt.timedelta(days=1))
    order = {
        "score": (Inspection.score.desc(), Inspection.id),
        "uncertainty": (func.abs(Inspection.score - thr), Inspection.id),
        "newest": (Inspection.created_at.desc(), Inspection.id.desc()),
    }[f["sort"]]
    rows = session.execute(query.order_by(*order).limit(limit)).all()
    return version, [tuple(r) for r in rows]


def _query_string(f: dict[str, Any]) -> str:
    from urllib.parse import urlencode

    return urlencode({k: v for k, v in f.items() if v not in (None, "")})


def _png(image: np.ndarray) -> Response:
    if image.ndim == 3 and image.shape[2] == 3:
        image = image[:, :, ::-1]
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, [2, 1, 0, 3]]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image))
    if not ok:
        raise HTTPException(500, "could not encode the PNG")
    return Response(buf.tobytes(), media_type="image/png", headers={"Cache-Control": "no-store"})


def _load_heat(wb: Workbench, inspection: Inspection) -> np.ndarray:
    try:
        return np.load(wb.files / inspection.heatmap_file).astype(np.float32)
    except OSError:
        raise HTTPException(404, f"heat map of inspection {inspection.id} is missing") from None


def _mask_file(wb: Workbench, relative: str) -> np.ndarray:
    image = cv2.imread(str(wb.files / relative), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise HTTPException(404, "mask file is missing")
    return image


def create_app(
    url: str | Database,
    *,
    run: str | Path | None = None,
    files: str | Path | None = None,
    scan: list[str | Path] | None = None,
    max_upload_bytes: int = 20 * 2**20,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device: str = "cpu",
    retrain_options: dict[str, Any] | None = None,
) -> FastAPI:
    """The workbench on database ``url``; ``run`` registers (and, when it is the first,
    activates) a model version. A database without tokens gets one, printed once."""
    db = url if isinstance(url, Database) else Database(url)
    folder = files_dir(db.url, files)
    folder.mkdir(parents=True, exist_ok=True)
    wb = Workbench(
        db,
        folder,
        scan=[Path(p).resolve() for p in scan or []],
        max_upload_bytes=max_upload_bytes,
        max_pixels=max_pixels,
        device=device,
        retrain_options=retrain_options or {},
    )
    if run is not None:
        register_version(db, run, device=device)
    first = ensure_token(db)
    if first is not None:
        print(
            "workbench write token (shown once; stored hashed — keep it, log in with it):\n"
            f"    {first}",
            flush=True,
        )
    wb.first_token = first  # type: ignore[attr-defined]  # tests read it; never served
    templates = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"]),
    )
    templates.filters["num"] = lambda v, d=3: "–" if v is None else f"{v:.{d}g}"
    templates.filters["pct"] = lambda v: "–" if v is None else f"{100 * v:.0f}%"

    app = FastAPI(title="defectlab workbench", version=__version__, docs_url="/api/docs")
    app.state.workbench = wb
    app.add_middleware(UploadLimit, limit=max_upload_bytes)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.exception_handler(DefectlabError)
    async def defectlab_error(request: Request, exc: DefectlabError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    def session_of(request: Request) -> tuple[int, str] | None:
        return wb.signer.read_session(request.cookies.get(SESSION_COOKIE))

    def page(request: Request, name: str, **context: Any) -> HTMLResponse:
        cookie = request.cookies.get(SESSION_COOKIE)
        who = session_of(request)
        html = templates.get_template(name).render(
            reviewer=who[1] if who else None,
            csrf=wb.signer.csrf(cookie) if who and cookie else "",
            version_text=__version__,
            path=request.url.path,
            **context,
        )
        return HTMLResponse(html)

    async def writer(request: Request, form: Any = None) -> Writer:
        """Who may write: a bearer token, or a session with its CSRF token."""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            found = await run_in_threadpool(token_id, db, header[7:].strip())
            if found is None:
                raise HTTPException(401, "invalid token")
            name = request.headers.get("x-reviewer", f"token-{found}")
            if not REVIEWER_RE.match(name):
                raise HTTPException(422, "X-Reviewer: letters, digits, space, . - _ (64 at most)")
            return Writer(found, name)
        who = session_of(request)
        if who is None:
            raise HTTPException(401, "log in with the workbench token first (/login)")
        sent = request.headers.get("x-csrf-token") or (form.get("csrf") if form else None)
        if not wb.signer.check_csrf(request.cookies.get(SESSION_COOKIE), sent):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page")
        return Writer(*who)

    # --- pages -----------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/queue", status_code=303)

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, error: str = "") -> HTMLResponse:
        pre = request.cookies.get(PRE_COOKIE) or uuid.uuid4().hex
        response = page(
            request, "login.html", login_csrf=wb.signer.csrf("login:" + pre), error=error
        )
        response.set_cookie(PRE_COOKIE, pre, httponly=True, samesite="strict")
        return response

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form()
        pre = request.cookies.get(PRE_COOKIE)
        if not pre or not wb.signer.check_csrf("login:" + pre, str(form.get("csrf") or "")):
            raise HTTPException(403, "missing or wrong CSRF token: reload the login page")
        name = str(form.get("reviewer") or "").strip()
        if not REVIEWER_RE.match(name):
            return RedirectResponse(
                "/login?error=name: letters, digits, space, . - _ (1 to 64)", status_code=303
            )
        found = await run_in_threadpool(token_id, db, str(form.get("token") or "").strip())
        if found is None:
            return RedirectResponse("/login?error=wrong token", status_code=303)
        response = RedirectResponse("/queue", status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            wb.signer.session_cookie(found, name),
            httponly=True,
            samesite="strict",
        )
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        form = await request.form()
        await writer(request, form)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    @app.get("/queue", response_class=HTMLResponse)
    def queue(request: Request) -> HTMLResponse:
        f = queue_filters(request.query_params)
        with db.sessions() as session:
            version, rows = queue_rows(session, wb, f)
            versions = session.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
            classes = sorted(
                c for c in session.scalars(select(Review.defect_class).distinct()).all() if c
            )
        return page(
            request,
            "queue.html",
            rows=rows,
            version=version,
            versions=versions,
            classes=classes,
            f=f,
            qs=_query_string(f),
            views=VIEWS,
            sorts=SORTS,
            reviewed_options=REVIEWED,
        )

    @app.get("/review/{inspection_id}", response_class=HTMLResponse)
    def review_page(request: Request, inspection_id: int) -> HTMLResponse:
        f = queue_filters(request.query_params)
        with db.sessions() as session:
            inspection = session.get(Inspection, inspection_id)
            if inspection is None:
                raise HTTPException(404, f"inspection {inspection_id} does not exist")
            image = session.get(Image, inspection.image_id)
            version = session.get(ModelVersion, inspection.model_version_id)
            review = session.scalars(select(Review).where(Review.image_id == image.id)).first()
            f["version"] = version.id
            # neighbours come from the whole ordered queue, so a part just reviewed keeps its
            # place: "previous" goes back to it, "next" skips to the next part the filter keeps
            _, rows = queue_rows(session, wb, f | {"reviewed": "any"}, limit=5000)
            ids = [r[0].id for r in rows]
            wanted = {
                "any": [True] * len(rows),
                "todo": [r[2] is None for r in rows],
                "done": [r[2] is not None for r in rows],
            }[f["reviewed"]]
            classes = sorted(
                c for c in session.scalars(select(Review.defect_class).distinct()).all() if c
            )
        position = ids.index(inspection_id) if inspection_id in ids else -1
        previous = ids[position - 1] if position > 0 else None
        following = (
            next((ids[i] for i in range(position + 1, len(ids)) if wanted[i]), None)
            if position >= 0
            else None
        )
        return page(
            request,
            "review.html",
            inspection=inspection,
            image=image,
            version=version,
            review=review,
            classes=classes,
            previous=previous,
            following=following,
            position=position,
            total=len(ids),
            qs=_query_string(f),
        )

    @app.get("/dashboard", response_class=HTMLResponse)
    def dashboard(request: Request, version: int | None = None) -> HTMLResponse:
        with db.sessions() as session:
            chosen = _version(session, wb, version)
            numbers = stats.dashboard(session, chosen)
            versions = session.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
            skipped = session.scalars(select(Skipped).order_by(Skipped.id.desc()).limit(20)).all()
        implied = numbers["implied"]["threshold"] if numbers["implied"] else None
        return page(
            request,
            "dashboard.html",
            version=chosen,
            versions=versions,
            n=numbers,
            skipped=skipped,
            histogram=Markup(
                charts.histogram_svg(
                    numbers["histogram"],
                    {"current": chosen.image_threshold, "implied by reviews": implied},
                )
            ),
            drift=Markup(charts.drift_svg(numbers["drift"], chosen.image_threshold)),
        )

    @app.get("/versions", response_class=HTMLResponse)
    def versions_page(request: Request) -> HTMLResponse:
        with db.sessions() as session:
            versions = session.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
            counts = db.counts(session)
        return page(
            request,
            "versions.html",
            versions=versions,
            counts=counts,
            scan=[str(p) for p in wb.scan],
            jobs=[j.public() for j in wb.jobs.values()],
        )

    # --- files (by id only) ----------------------------------------------------------------

    @app.get("/files/image/{image_id}.png")
    def image_file(image_id: int) -> Response:
        with db.sessions() as session:
            image = session.get(Image, image_id)
        if image is None:
            raise HTTPException(404, f"image {image_id} does not exist")
        try:
            pixels = read_image(image.path, 3, ImageLimits(max_pixels=wb.max_pixels))
        except ImageReadError as exc:
            raise HTTPException(
                410, f"image {image_id} can no longer be read: {exc.reason}"
            ) from None
        return _png(to_uint8(pixels))

    def _inspection(inspection_id: int) -> tuple[Inspection, Image, ModelVersion]:
        with db.sessions() as session:
            inspection = session.get(Inspection, inspection_id)
            if inspection is None:
                raise HTTPException(404, f"inspection {inspection_id} does not exist")
            return (
                inspection,
                session.get(Image, inspection.image_id),
                session.get(ModelVersion, inspection.model_version_id),
            )

    @app.get("/files/heat/{inspection_id}.png")
    def heat_file(inspection_id: int) -> Response:
        inspection, _, version = _inspection(inspection_id)
        heat = _load_heat(wb, inspection)
        span = max(version.map_high - version.map_low, 1e-12)
        level = np.clip((heat - version.map_low) / span, 0, 1)
        # the middle of the range is the pixel threshold: clear below a quarter of the range
        # (normal texture), half-opaque at the threshold, opaque at twice its excess
        alpha = np.clip(255 * (level - 0.25) / 0.75, 0, 255).astype(np.uint8)
        return _png(np.dstack([colormap_rgb(level), alpha]))

    @app.get("/files/outline/{inspection_id}.png")
    def outline_file(inspection_id: int) -> Response:
        inspection, _, _ = _inspection(inspection_id)
        mask = _mask_file(wb, inspection.mask_file) > 127
        out = np.zeros((*mask.shape, 4), np.uint8)
        if mask.any():
            binary = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT)
            contours, _ = cv2.findContours(
                binary, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE, offset=(-1, -1)
            )
            thickness = max(1, round(max(mask.shape) / 256))
            cv2.drawContours(out, contours, -1, (255, 40, 40, 255), thickness)
        return _png(out)

    @app.get("/files/mask/{inspection_id}.png")
    def mask_file(inspection_id: int) -> Response:
        inspection, _, _ = _inspection(inspection_id)
        return _png(_mask_file(wb, inspection.mask_file))

    @app.get("/files/review-mask/{image_id}.png")
    def review_mask_file(image_id: int) -> Response:
        with db.sessions() as session:
            review = session.scalars(select(Review).where(Review.image_id == image_id)).first()
        if review is None or not review.mask_file:
            raise HTTPException(404, f"image {image_id} has no corrected mask")
        return _png(_mask_file(wb, review.mask_file))

    # --- JSON API ----------------------------------------------------------------------------

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        with db.sessions() as session:
            return {"status": "ok", "revision": db.revision, **db.counts(session)}

    def review_json(review: Review | None) -> dict[str, Any] | None:
        if review is None:
            return None
        return {
            "image_id": review.image_id,
            "verdict": review.verdict,
            "defect_class": review.defect_class,
            "has_mask": bool(review.mask_file),
            "reviewer": review.reviewer,
            "revision": review.revision,
            "updated_at": review.updated_at.isoformat(timespec="seconds"),
        }

    def save_review(image_id: int, expected: int, changes: dict[str, Any], who: Writer) -> Review:
        """Apply ``changes`` if the review is still at revision ``expected`` (0: none yet);
        409 otherwise. One transaction: the row and its revision move together."""
        with db.transaction() as session:
            if session.get(Image, image_id) is None:
                raise HTTPException(404, f"image {image_id} does not exist")
            current = session.scalars(select(Review).where(Review.image_id == image_id)).first()
            if current is None:
                if expected != 0:
                    raise HTTPException(409, "this review was deleted meanwhile; reload")
                values = {"verdict": "defect", "defect_class": "", "mask_file": ""} | changes
                review = Review(image_id=image_id, reviewer=who.reviewer, revision=1, **values)
                session.add(review)
                try:
                    session.flush()
                except IntegrityError:
                    raise HTTPException(
                        409, "another reviewer saved this image first; reload to see it"
                    ) from None
                return review
            done = session.execute(
                update(Review)
                .where(Review.id == current.id, Review.revision == expected)
                .values(
                    **changes,
                    reviewer=who.reviewer,
                    revision=Review.revision + 1,
                    updated_at=utcnow(),
                )
            )
            if done.rowcount != 1:  # raising rolls the transaction back
                now = session.execute(
                    select(Review.reviewer, Review.revision).where(Review.id == current.id)
                ).one()
                raise HTTPException(
                    409,
                    f"{now.reviewer} changed this review meanwhile (now revision "
                    f"{now.revision}, you had {expected}); reload to see it",
                )
            session.expire_all()
            return session.scalars(select(Review).where(Review.id == current.id)).one()

    @app.post("/api/reviews/{image_id}")
    async def post_review(image_id: int, request: Request) -> dict[str, Any]:
        who = await writer(request)
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, "the body must be JSON") from None
        if not isinstance(body, dict):
            raise HTTPException(422, "the body must be a JSON object")
        verdict = body.get("verdict")
        if verdict not in VERDICTS:
            raise HTTPException(422, f"verdict must be one of {', '.join(VERDICTS)}")
        cls = body.get("defect_class", "")
        if not isinstance(cls, str) or not CLASS_RE.match(cls):
            raise HTTPException(422, "defect_class: letters, digits, space, - and _ (64 at most)")
        expected = body.get("revision", 0)
        if not isinstance(expected, int) or expected < 0:
            raise HTTPException(422, "revision must be the review's revision you saw (0: none)")
        changes = {"verdict": verdict, "defect_class": cls.strip()}
        review = await run_in_threadpool(save_review, image_id, expected, changes, who)
        return review_json(review) or {}

    @app.post("/api/reviews/{image_id}/mask")
    async def post_mask(image_id: int, request: Request) -> dict[str, Any]:
        who = await writer(request)
        form = await request.form()
        upload = form.get("mask")
        if upload is None or isinstance(upload, str):
            raise HTTPException(422, "send the mask as the multipart file field 'mask'")
        revision = str(form.get("revision") or "0")
        if not revision.isdigit():
            raise HTTPException(422, "revision must be a number")
        data = await upload.read()
        with db.sessions() as session:
            image = session.get(Image, image_id)
        if image is None:
            raise HTTPException(404, f"image {image_id} does not exist")
        try:
            mask = decode_image(data, "mask", 1, ImageLimits(max_pixels=wb.max_pixels))
        except ImageTooLargeError as exc:
            raise HTTPException(413, str(exc)) from None
        except ImageReadError as exc:
            raise HTTPException(415, str(exc)) from None
        if mask.shape[:2] != (image.height, image.width):
            raise HTTPException(
                422,
                f"mask is {mask.shape[1]}×{mask.shape[0]}, the image is "
                f"{image.width}×{image.height}",
            )
        relative = f"reviews/{image.sha256[:2]}/{image.sha256}-{uuid.uuid4().hex[:8]}.png"
        binary = (mask[:, :, 0] > 0.5).astype(np.uint8) * 255
        await run_in_threadpool(write_png, wb.files / relative, binary)
        review = await run_in_threadpool(
            save_review, image_id, int(revision), {"mask_file": relative}, who
        )
        return (review_json(review) or {}) | {"mask_pixels": int((binary > 0).sum())}

    @app.post("/api/upload")
    async def upload(request: Request) -> dict[str, Any]:
        await writer(request)
        form = await request.form()
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise HTTPException(422, "send the image as the multipart file field 'image'")
        data = await upload.read()
        if not data:
            raise HTTPException(400, "empty upload")
        suffix = next((s for magic, s in _MAGIC if data.startswith(magic)), None)
        if suffix is None and data[:4] == b"MM\x00*":
            suffix = ".tif"
        if suffix is None:
            raise HTTPException(415, "not a PNG, JPEG, BMP or TIFF image")
        with db.sessions() as session:
            version = _version(session, wb, None)
        inspector = await run_in_threadpool(wb.inspector, version)
        try:
            pixels = decode_image(
                data, "upload", inspector.channels, ImageLimits(max_pixels=wb.max_pixels)
            )
        except ImageTooLargeError as exc:
            raise HTTPException(413, str(exc)) from None
        except ImageReadError as exc:
            raise HTTPException(415, str(exc)) from None
        import hashlib

        sha = hashlib.sha256(data).hexdigest()
        stored = wb.files / "uploads" / f"{sha}{suffix}"
        if not stored.exists():
            from defectlab.data.io import atomic_write

            await run_in_threadpool(atomic_write, stored, lambda tmp: tmp.write_bytes(data))

        def score_and_store() -> dict[str, Any]:
            with wb._score_lock:
                ((score, heat),) = score_images(inspector, [pixels])
            with db.transaction() as session:
                version_row = session.get(ModelVersion, version.id)
                row = store_result(
                    session,
                    wb.files,
                    version_row,
                    path=str(stored.resolve()),
                    sha=sha,
                    size_bytes=len(data),
                    image=pixels,
                    score=score,
                    heat=heat,
                    source="upload",
                )
                if row is None:
                    row = session.scalars(
                        select(Inspection)
                        .join(Image, Image.id == Inspection.image_id)
                        .where(Image.sha256 == sha, Inspection.model_version_id == version.id)
                    ).one()
                    return {
                        "inspection_id": row.id,
                        "image_id": row.image_id,
                        "new": False,
                        "score": row.score,
                        "is_defect": row.is_defect,
                    }
                return {
                    "inspection_id": row.id,
                    "image_id": row.image_id,
                    "new": True,
                    "score": row.score,
                    "is_defect": row.is_defect,
                }

        try:
            return await run_in_threadpool(score_and_store)
        except IntegrityError:
            raise HTTPException(409, "the same image is being stored by another request") from None

    @app.post("/api/scan")
    async def scan(request: Request) -> dict[str, Any]:
        await writer(request)
        return wb.start_scan().public()

    @app.post("/api/retrain")
    async def retrain_endpoint(request: Request) -> dict[str, Any]:
        await writer(request)
        from defectlab.app.retrain import retrain

        def work(job: Job) -> str:
            job.total = 1
            result = retrain(db, wb.files, progress=False, **wb.retrain_options)
            job.done = 1
            return result["summary"]

        return wb.start_job("retrain", work).public()

    @app.post("/api/versions/{version_id}/promote")
    async def promote(version_id: int, request: Request) -> Response:
        form = None
        if request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")
        ):
            form = await request.form()
        await writer(request, form)
        with db.transaction() as session:
            version = session.get(ModelVersion, version_id)
            if version is None:
                raise HTTPException(404, f"model version {version_id} does not exist")
            session.execute(
                update(ModelVersion).where(ModelVersion.status == "active").values(status="retired")
            )
            version.status = "active"
        if form is not None:
            return RedirectResponse("/versions", status_code=303)
        return JSONResponse({"id": version_id, "status": "active"})

    @app.get("/api/jobs/{job_id}")
    def job_status(job_id: str) -> dict[str, Any]:
        job = wb.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"job {job_id} does not exist")
        return job.public()

    @app.get("/api/queue")
    def queue_api(request: Request) -> dict[str, Any]:
        f = queue_filters(request.query_params)
        with db.sessions() as session:
            version, rows = queue_rows(session, wb, f)
            return {
                "version": version.id,
                "items": [
                    {
                        "inspection_id": i.id,
                        "image_id": img.id,
                        "score": i.score,
                        "is_defect": i.is_defect,
                        "review": review_json(r),
                    }
                    for i, img, r in rows
                ],
            }

    return app


def run_app(
    url: str,
    *,
    run: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    files: str | Path | None = None,
    scan: list[str] | None = None,
    device: str = "cpu",
    max_upload_mb: float = 20.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    insecure: bool = False,
) -> None:
    """Serve the workbench with uvicorn until interrupted; the port is bound first so an
    occupied one fails at once."""
    import uvicorn

    if not is_loopback(host) and not insecure:
        raise ConfigError(
            f"refusing to listen on {host}: the pages are readable without a token. Keep the "
            "default 127.0.0.1 (use an SSH tunnel or a TLS reverse proxy), or give --insecure"
        )
    if max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb must be positive, got {max_upload_mb}")
    sock = bind_socket(host, port)
    try:
        app = create_app(
            url,
            run=run,
            files=files,
            scan=list(scan or []),
            max_upload_bytes=round(max_upload_mb * 2**20),
            max_pixels=max_pixels,
            device=device,
        )
    except BaseException:
        sock.close()
        raise
    if scan:
        app.state.workbench.start_scan()
    print(f"workbench on http://{host}:{port}/queue (database {url})", flush=True)
    config = uvicorn.Config(app, host=host, port=port, workers=1, log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])
