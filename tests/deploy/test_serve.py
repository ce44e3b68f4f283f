"""The HTTP inspection service: endpoints, bad uploads, saturation, micro-batching, a bounded
load test on loopback and the OpenAPI contract (schemathesis)."""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import schemathesis
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.core import NOT_SET

import defectlab.api as dl
from defectlab.cli import build_parser
from defectlab.deploy.backends import Inspector, open_inspector
from defectlab.deploy.serve import create_app
from tests.conftest import textured, with_defect, write_image

SIZE = 48  # uploads; the model works at 32 px


def png(array: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", array)
    assert ok
    return buffer.tobytes()


def decode_png(text: str) -> np.ndarray:
    array = cv2.imdecode(np.frombuffer(base64.b64decode(text), np.uint8), cv2.IMREAD_UNCHANGED)
    assert array is not None
    return array


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pixelstats run trained on tiny synthetic images (well under a second)."""
    root = tmp_path_factory.mktemp("serve")
    rng = np.random.default_rng(3)
    for i in range(16):
        write_image(root / "data" / "normal" / f"n{i:02d}.png", textured(rng, SIZE))
    for i in range(4):
        image, mask = with_defect(textured(rng, SIZE), rng)
        write_image(root / "data" / "defect" / f"d{i:02d}.png", image)
        write_image(root / "data" / "masks" / f"d{i:02d}.png", mask)
    dl.train("pixelstats", root / "data", root / "run", image_size=32, device="cpu", progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def inspector(run_dir: Path) -> Inspector:
    return open_inspector(run_dir, "torch", "cpu")


@pytest.fixture(scope="module")
def client(inspector: Inspector) -> Iterator[TestClient]:
    with TestClient(create_app(inspector)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    """A normal image, the same with a bright blob, and an all-white one (8-bit grey)."""
    rng = np.random.default_rng(11)
    normal = textured(rng, SIZE)
    defect = normal.copy()
    cv2.circle(defect, (30, 20), 7, 250, -1)
    return {"normal": normal, "defect": defect, "white": np.full((SIZE, SIZE), 255, np.uint8)}


def upload(name: str, data: bytes, kind: str = "image/png") -> dict[str, tuple[str, bytes, str]]:
    return {"image": (name, data, kind)}


# --- endpoints --------------------------------------------------------------------------------


def test_health_and_model(client: TestClient, inspector: Inspector) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/model").json()
    assert info["model"] == "pixelstats" and info["backend"] == "torch"
    assert info["image_size"] == 32 and info["channels"] == 1
    assert info["image_threshold"] == pytest.approx(inspector.image_threshold)
    assert info["map_range"] == pytest.approx(list(inspector.map_range))
    assert info["limits"] == {
        "max_upload_bytes": 20 * 2**20,
        "max_pixels": 100_000_000,
        "max_concurrency": 2,
        "max_queue": 64,
        "max_batch": 8,
    }
    assert set(info["requests"]) == {"served", "rejected", "invalid", "failed", "in_flight"}


def test_inspect_normal_and_defect(client: TestClient, images: dict[str, np.ndarray]) -> None:
    normal = client.post("/inspect", files=upload("normal.png", png(images["normal"])))
    defect = client.post("/inspect", files=upload("defect.png", png(images["defect"])))
    assert normal.status_code == defect.status_code == 200
    n, d = normal.json(), defect.json()
    assert d["score"] > n["score"]
    assert d["is_defect"] and d["defect_area_fraction"] > 0
    assert d["defect_area_fraction"] > n["defect_area_fraction"]
    for result, name in ((n, "normal.png"), (d, "defect.png")):
        assert result["filename"] == name
        assert (result["width"], result["height"]) == (SIZE, SIZE)
        assert result["model"] == "pixelstats" and result["backend"] == "torch"
        assert result["elapsed_ms"] >= 0
        assert "heatmap_png" not in result and "overlay_png" not in result
        mask = decode_png(result["mask_png"])
        assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        assert (mask > 0).mean() == pytest.approx(result["defect_area_fraction"])
    blob = np.zeros((SIZE, SIZE), np.uint8)
    cv2.circle(blob, (30, 20), 7, 1, -1)
    assert (decode_png(d["mask_png"])[blob > 0] > 0).any()  # the mask finds the blob


def test_heatmap_and_overlay_on_request(client: TestClient, images: dict[str, np.ndarray]) -> None:
    data = png(images["defect"])
    only_heat = client.post("/inspect", params={"heatmap": True}, files=upload("d.png", data))
    assert only_heat.status_code == 200
    assert "heatmap_png" in only_heat.json() and "overlay_png" not in only_heat.json()
    both = client.post(
        "/inspect", params={"heatmap": "true", "overlay": "1"}, files=upload("d.png", data)
    ).json()
    heat, overlay = decode_png(both["heatmap_png"]), decode_png(both["overlay_png"])
    assert heat.shape == (SIZE, SIZE) and heat.dtype == np.uint8 and heat.max() > heat.min()
    assert overlay.shape == (SIZE, SIZE, 3) and overlay.dtype == np.uint8


def test_16bit_png_and_rgb_jpeg_are_accepted(
    client: TestClient, images: dict[str, np.ndarray]
) -> None:
    eight = client.post("/inspect", files=upload("n.png", png(images["normal"]))).json()
    deep = client.post(
        "/inspect", files=upload("n16.png", png(images["normal"].astype(np.uint16) * 257))
    )
    assert deep.status_code == 200
    assert deep.json()["score"] == pytest.approx(eight["score"], rel=1e-5)
    rgb = np.dstack([images["defect"]] * 3)
    ok, jpeg = cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_QUALITY, 95])
    colour = client.post("/inspect", files=upload("c.jpg", jpeg.tobytes(), "image/jpeg"))
    assert ok and colour.status_code == 200
    assert (colour.json()["width"], colour.json()["height"]) == (SIZE, SIZE)


def test_bad_uploads_get_4xx_with_a_reason(client: TestClient) -> None:
    empty = client.post("/inspect", files=upload("empty.png", b""))
    assert empty.status_code == 400 and empty.json()["detail"] == "empty.png: empty file (0 bytes)"
    text = client.post("/inspect", files=upload("notes.txt", b"not an image", "text/plain"))
    assert text.status_code == 415
    assert text.json()["detail"].startswith("notes.txt: not a decodable image")
    missing = client.post("/inspect", data={"picture": "x"})
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "image"]
    assert client.get("/health").status_code == 200


def test_too_large_uploads_get_413(inspector: Inspector) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    data = png(noise)
    assert len(data) > 2000
    with TestClient(create_app(inspector, max_upload_bytes=1000)) as small:
        declared = small.post("/inspect", files=upload("big.png", data))
        assert declared.status_code == 413
        assert declared.json()["detail"].startswith("upload too large (")
        assert declared.headers["connection"] == "close"  # not drained: the body may be huge
        # no Content-Length (chunked): the limit is enforced while the body streams in
        boundary = "b0undary"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"'
                f"\r\nContent-Type: image/png\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        streamed = small.post(
            "/inspect",
            content=(body[i : i + 256] for i in range(0, len(body), 256)),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
        assert streamed.status_code == 413
        assert streamed.json()["detail"] == "upload too large: the limit is 1000 bytes"
        fits = small.post("/inspect", files=upload("small.png", png(np.zeros((4, 4), np.uint8))))
        assert fits.status_code == 200
        assert small.get("/model").json()["requests"] == {
            "served": 1,
            "rejected": 0,
            "invalid": 2,
            "failed": 0,
            "in_flight": 0,
        }


def test_model_failure_is_500_logged_and_the_service_survives(
    inspector: Inspector, images: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    broken = gated(inspector)
    broken.gate.set()
    with TestClient(create_app(broken)) as test_client, caplog.at_level(logging.ERROR):
        failed = test_client.post("/inspect", files=upload("white.png", png(images["white"])))
        assert failed.status_code == 500
        assert failed.json()["detail"] == "white.png: the model failed: white breaks the model"
        assert "inspection of white.png failed" in caplog.text
        after = test_client.post("/inspect", files=upload("n.png", png(images["normal"])))
        assert after.status_code == 200


def test_limits_are_validated(inspector: Inspector) -> None:
    from defectlab.errors import ConfigError

    with pytest.raises(ConfigError, match="max_concurrency must be >= 1"):
        create_app(inspector, max_concurrency=0)


def test_cli_parses_serve() -> None:
    args = build_parser().parse_args(
        ["serve", "--run", "r", "--port", "9000", "--max-upload-mb", "0.5", "--tile"]
    )
    assert args.func.__name__ == "cmd_serve"
    assert (args.host, args.port, args.backend, args.tile) == ("127.0.0.1", 9000, "torch", True)
    assert (args.max_upload_mb, args.max_concurrency, args.max_queue) == (0.5, 2, 64)


# --- concurrency on a real server ------------------------------------------------------------


@dataclass
class GatedInspector(Inspector):
    """The real model behind a gate: ``score`` blocks until the test opens it, records batch
    sizes, and fails any batch holding an all-white image (a model error on one input)."""

    inner: Inspector | None = None
    entered: threading.Event = field(default_factory=threading.Event)
    gate: threading.Event = field(default_factory=threading.Event)
    batches: list[int] = field(default_factory=list)

    def score(self, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        assert self.inner is not None
        self.batches.append(len(images))
        self.entered.set()
        if not self.gate.wait(60):
            raise TimeoutError("the test never opened the gate")
        if (images.reshape(len(images), -1).min(axis=1) > 0.99).any():
            raise RuntimeError("white breaks the model")
        return self.inner.score(images, batch_size)


def gated(inner: Inspector) -> GatedInspector:
    return GatedInspector(
        **{f.name: getattr(inner, f.name) for f in fields(Inspector)}, inner=inner
    )


@contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """uvicorn on a free loopback port in a background thread; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


async def post(client: httpx.AsyncClient, name: str, data: bytes) -> httpx.Response:
    return await client.post("/inspect", files=upload(name, data))


def test_saturated_service_answers_503_then_recovers(
    inspector: Inspector, images: dict[str, np.ndarray]
) -> None:
    slow = gated(inspector)
    app = create_app(slow, max_concurrency=1, max_queue=0)
    data = png(images["normal"])

    async def scenario() -> tuple[httpx.Response, ...]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            first = asyncio.create_task(post(client, "first.png", data))
            assert await asyncio.to_thread(slow.entered.wait, 60)
            busy = await post(client, "second.png", data)
            health = await client.get("/health")
            slow.gate.set()
            done = await first
            after = await post(client, "third.png", data)
            info = await client.get("/model")
            return busy, health, done, after, info

    with live_server(app) as url:
        busy, health, done, after, info = asyncio.run(scenario())
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert busy.json()["detail"].startswith(
        "busy: all 1 places taken (max_concurrency 1 + max_queue 0)"
    )
    assert health.status_code == 200
    assert done.status_code == 200 and done.json()["filename"] == "first.png"
    assert after.status_code == 200
    assert info.json()["requests"] == {
        "served": 2,
        "rejected": 1,
        "invalid": 0,
        "failed": 0,
        "in_flight": 0,
    }


def burst(
    inspector: Inspector, uploads: dict[str, bytes]
) -> tuple[list[int], dict[str, httpx.Response]]:
    """Hold one request in the model, queue ``uploads`` behind it, then let all go: the
    batch sizes the model saw and each upload's response."""
    slow = gated(inspector)
    app = create_app(slow, max_concurrency=1, max_queue=len(uploads), max_batch=8)
    pending = app.state.service.batcher.pending

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            first = asyncio.create_task(post(client, "first.png", uploads["normal.png"]))
            assert await asyncio.to_thread(slow.entered.wait, 60)
            waiting = [asyncio.create_task(post(client, n, d)) for n, d in uploads.items()]
            deadline = time.monotonic() + 60
            while len(pending) < len(uploads):
                assert time.monotonic() < deadline, "requests never queued"
                await asyncio.sleep(0.01)
            slow.gate.set()
            assert (await first).status_code == 200
            return list(await asyncio.gather(*waiting))

    with live_server(app) as url:
        responses = asyncio.run(scenario())
    return slow.batches, dict(zip(uploads, responses, strict=True))


def test_waiting_requests_are_scored_as_one_batch(
    client: TestClient, inspector: Inspector, images: dict[str, np.ndarray]
) -> None:
    uploads = {
        "normal.png": png(images["normal"]),
        "defect.png": png(images["defect"]),
        "notes.txt": b"not an image",
        "deep.png": png(images["defect"].astype(np.uint16) * 257),
    }
    batches, responses = burst(inspector, uploads)
    assert batches == [1, 3]  # the held request alone, then every decodable waiting upload
    assert responses["notes.txt"].status_code == 415
    for name in ("normal.png", "defect.png", "deep.png"):
        batched = responses[name]
        alone = client.post("/inspect", files=upload(name, uploads[name]))
        assert batched.status_code == alone.status_code == 200
        assert batched.json()["score"] == pytest.approx(alone.json()["score"], rel=1e-5)
        assert batched.json()["mask_png"] == alone.json()["mask_png"]


def test_an_image_that_breaks_the_model_fails_only_its_own_request(
    inspector: Inspector, images: dict[str, np.ndarray]
) -> None:
    uploads = {
        "normal.png": png(images["normal"]),
        "white.png": png(images["white"]),
        "defect.png": png(images["defect"]),
    }
    batches, responses = burst(inspector, uploads)
    assert batches == [1, 3, 1, 1, 1]  # the batch fails, then each image is scored alone
    assert responses["white.png"].status_code == 500
    assert "white breaks the model" in responses["white.png"].json()["detail"]
    assert responses["normal.png"].status_code == responses["defect.png"].status_code == 200


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.slow
def test_load_2000_requests_on_loopback(
    inspector: Inspector, images: dict[str, np.ndarray]
) -> None:
    """2,000 uploads at concurrency 16 against real uvicorn: all answered 200, and memory
    does not grow with the number of requests served.

    Server and client share this process, so RSS covers both. Each request holds a few KB
    (a 48 px PNG, its 32 px batch slot, base64 mask) only while in flight, and at most 16
    are in flight; what legitimately grows is one-off (allocator arenas of new threads,
    lazily built code paths) and is some tens of MB. 300 MB is far above that and far below
    what keeping every request's data, or a thread per request, would cost (the decoded
    and encoded buffers of 2,000 requests plus per-request futures and responses).
    """
    total, concurrency = 2000, 16
    data = png(images["normal"])
    app = create_app(inspector, max_concurrency=2, max_queue=64)

    async def load(url: str) -> tuple[Counter[int], list[float], float, int, int]:
        async with httpx.AsyncClient(
            base_url=url, timeout=120, limits=httpx.Limits(max_connections=concurrency)
        ) as client:
            for _ in range(20):  # warm-up: connections, threads, allocator
                assert (await post(client, "warm.png", data)).status_code == 200
            statuses: Counter[int] = Counter()
            latencies: list[float] = []
            remaining = iter(range(total))
            before, peak = rss_bytes(), rss_bytes()

            async def worker() -> None:
                nonlocal peak
                for _ in remaining:
                    started = time.perf_counter()
                    response = await post(client, "load.png", data)
                    latencies.append(time.perf_counter() - started)
                    statuses[response.status_code] += 1
                    peak = max(peak, rss_bytes()) if len(latencies) % 100 == 0 else peak

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
            return statuses, latencies, elapsed, before, max(peak, rss_bytes())

    with live_server(app) as url:
        statuses, latencies, elapsed, before, peak = asyncio.run(load(url))
    counts = app.state.service.counts
    quantiles = statistics.quantiles(latencies, n=100)
    print(
        f"\nload: {total} requests at concurrency {concurrency}: "
        f"{total / elapsed:.0f} req/s, p50 {quantiles[49] * 1000:.1f} ms, "
        f"p99 {quantiles[98] * 1000:.1f} ms; RSS {before / 2**20:.0f} MB → peak "
        f"{peak / 2**20:.0f} MB (+{(peak - before) / 2**20:.1f} MB); "
        f"batch sizes {dict(sorted(app.state.service.batcher.batch_sizes.items()))}"
    )
    assert statuses == Counter({200: total})
    assert (counts.served, counts.failed, counts.rejected, counts.in_flight) == (
        total + 20,
        0,
        0,
        0,
    )
    assert peak - before < 300 * 2**20


# --- the OpenAPI contract ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_schema(inspector: Inspector) -> schemathesis.BaseSchema:
    # The schema can say "a binary file" but not "bytes that decode as an image": a
    # schema-valid upload of random bytes is rightly refused with 400 (empty) or 415.
    config = schemathesis.config.SchemathesisConfig.from_dict(
        {"checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "400", "415"]}}}
    )
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(inspector), config=config)


@pytest.mark.parametrize(
    ("mode", "real_image"),
    [
        (GenerationMode.POSITIVE, True),
        (GenerationMode.POSITIVE, False),
        (GenerationMode.NEGATIVE, False),
    ],
    ids=["real-image", "generated-upload", "invalid-requests"],
)
def test_openapi_contract(
    api_schema: schemathesis.BaseSchema,
    images: dict[str, np.ndarray],
    mode: GenerationMode,
    real_image: bool,
) -> None:
    """Generated requests, valid and invalid, never get a 5xx and every response matches the
    documented status codes and schemas; with a real image (query flags generated) the
    answer is a schema-valid 200.

    ``as_strategy`` with ``@given`` rather than ``schema.parametrize``: the lazy
    (fixture-based) parametrization of schemathesis 4.32 breaks on pytest 9 (it sets
    ``node._nodeid``), and the schema needs the trained model of a fixture.
    """
    body = {"image": png(images["defect"])} if real_image else NOT_SET
    strategy = (
        api_schema["/inspect"]["POST"].as_strategy(mode, body=body)
        if real_image
        else (api_schema.as_strategy(mode))
    )

    @given(case=strategy)
    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        response = case.call_and_validate()
        if real_image:
            assert response.status_code == 200, response.text

    check()
