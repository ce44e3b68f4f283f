"""The inspection service against hostile clients: pixel bombs of every format, random
bytes and headers, a bounded mixed load, API keys, an occupied port, a non-loopback host,
and kill -9. A real ``defectlab serve`` process is measured through ``/proc``."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from defectlab import api
from defectlab.cli import main
from defectlab.deploy.backends import open_inspector
from defectlab.deploy.serve import create_app
from tests.conftest import textured, write_folder_dataset
from tests.robustness.corpus import Case
from tests.robustness.service import Service, start

BOMBS = ["bomb.png", "huge-tiny.png", "huge-tiny.jpg", "bomb-rle.bmp", "bomb-strip.tif"]
BOMBS += ["bomb-page1.tif"]
#: what a service may grow by while answering hostile input: allocator arenas, lazily built
#: code paths; far below a single decoded bomb (from 0.5 to 10 GB)
FLAT_MB = 150


def good_png(seed: int = 0) -> bytes:
    return cv2.imencode(".png", textured(np.random.default_rng(seed)))[1].tobytes()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_folder_dataset(tmp_path_factory.mktemp("data"), np.random.default_rng(7), 12, 0)
    out = tmp_path_factory.mktemp("run") / "run"
    api.train("pixelstats", root, out, image_size=32, device="cpu", progress=False)
    return out


@pytest.fixture(scope="module")
def service(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    log = tmp_path_factory.mktemp("log") / "serve.log"
    live = start(run, log, "--max-upload-mb", "2", "--max-concurrency", "2")
    try:
        yield live
    finally:
        live.stop()


def no_traceback_in(service: Service) -> None:
    text = service.log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]


# --- gap 1: pixel bombs ------------------------------------------------------------------------


def test_bombs_of_every_format_get_413_and_memory_does_not_move(
    service: Service, corpus: tuple[Path, dict[str, Case]]
) -> None:
    folder, _ = corpus

    async def post_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=service.url, timeout=120) as client:
            requests = [
                client.post("/inspect", files={"image": (name, (folder / name).read_bytes())})
                for name in BOMBS * 2  # every bomb twice, all at once
            ]
            return await asyncio.gather(*requests)

    with httpx.Client(base_url=service.url, timeout=120) as client:
        assert client.post("/inspect", files={"image": ("ok.png", good_png())}).status_code == 200
    before = service.peak_mb()
    responses = asyncio.run(post_all())
    assert [r.status_code for r in responses] == [413] * len(responses)
    for response in responses:
        detail = response.json()["detail"]
        assert "image too large" in detail and "the limit is 100000000" in detail
    grown = service.peak_mb() - before
    assert grown < FLAT_MB, f"peak memory grew by {grown:.0f} MB"
    no_traceback_in(service)


# --- random bytes and headers -------------------------------------------------------------------

#: printable header values, as an HTTP client can send them (no surrounding spaces)
_header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(
    str.strip
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=st.one_of(st.binary(max_size=2048), st.sampled_from([good_png(1), good_png(2)[:300]])),
    filename=_header_text,
    content_type=_header_text,
    extra=st.dictionaries(
        st.sampled_from(["x-api-key", "authorization", "accept", "x-forwarded-for", "range"]),
        _header_text,
        max_size=3,
    ),
    query=st.sampled_from(["", "?heatmap=true", "?overlay=1", "?heatmap=maybe", "?x=%ff"]),
)
def test_random_uploads_and_headers_never_get_a_5xx(
    service: Service, body: bytes, filename: str, content_type: str, extra: dict, query: str
) -> None:
    with httpx.Client(base_url=service.url, timeout=120) as client:
        response = client.post(
            f"/inspect{query}",
            files={"image": (filename or "x", body, content_type or "application/octet-stream")},
            headers=extra,
        )
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text
    if response.status_code != 200:
        assert response.json()["detail"]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=st.binary(max_size=4096),
    content_type=_header_text,
    declared=st.none() | st.integers(3 * 2**20, 10**15),
)
def test_raw_bodies_with_any_content_type_never_get_a_5xx(
    service: Service, body: bytes, content_type: str, declared: int | None
) -> None:
    """Bodies that are not multipart at all, with any Content-Type, sent raw so that the
    Content-Length can also lie (promising more than the upload limit)."""
    host, port = service.url.removeprefix("http://").split(":")
    length = len(body) if declared is None else declared
    head = (
        f"POST /inspect HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=120) as conn:
        conn.sendall(head.encode() + body)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    assert status < 500, answer[:500]
    assert status != 200 or declared is None
    assert b"Traceback" not in answer


def test_the_service_stayed_clean_and_small(service: Service) -> None:
    """After the random requests: nothing logged a traceback, the service still answers."""
    no_traceback_in(service)
    with httpx.Client(base_url=service.url, timeout=120) as client:
        assert client.get("/health").status_code == 200
        counts = client.get("/model").json()["requests"]
    assert counts["failed"] == 0 and counts["in_flight"] == 0


# --- a bounded mixed load ----------------------------------------------------------------------


def test_mixed_load_has_no_5xx_and_flat_memory(
    service: Service, corpus: tuple[Path, dict[str, Case]]
) -> None:
    """300 requests at concurrency 12: good images, undecodable bytes, uploads over the
    byte limit and pixel bombs interleaved."""
    folder, _ = corpus
    kinds = {
        "good": (good_png(3), {200}),
        "tiny": ((folder / "1x1.png").read_bytes(), {200}),
        "garbage": (b"\x89PNG\r\n\x1a\n" + bytes(500), {415}),
        "bomb": ((folder / "bomb-rle.bmp").read_bytes(), {413}),
        "oversized": (bytes(3 * 2**20), {413}),
    }
    plan = [list(kinds)[i % len(kinds)] for i in range(300)]

    async def load() -> Counter[tuple[str, int]]:
        seen: Counter[tuple[str, int]] = Counter()
        queue = iter(plan)
        limits = httpx.Limits(max_connections=12)
        async with httpx.AsyncClient(base_url=service.url, timeout=120, limits=limits) as client:

            async def worker() -> None:
                for kind in queue:
                    data = kinds[kind][0]
                    try:
                        response = await client.post(
                            "/inspect", files={"image": (f"{kind}.png", data)}
                        )
                        seen[kind, response.status_code] += 1
                    except httpx.TransportError:  # 413 may close before the body is sent
                        assert kind == "oversized"
                        seen[kind, 413] += 1

            await asyncio.gather(*(worker() for _ in range(12)))
        return seen

    asyncio.run(load())  # warm-up: threads, allocator arenas, code paths
    before = service.rss_mb()
    seen = asyncio.run(load())
    grown = service.rss_mb() - before
    for (kind, status), count in seen.items():
        assert status in kinds[kind][1], (kind, status, count)  # 12 < the 66 places: no 503
    assert sum(seen.values()) == len(plan)
    assert sum(n for (kind, s), n in seen.items() if kind == "good" and s == 200) > 0
    assert grown < FLAT_MB, f"resident memory grew by {grown:.0f} MB under load"
    no_traceback_in(service)


# --- gap 4: API keys ---------------------------------------------------------------------------


def test_api_keys_guard_everything_but_health(run: Path) -> None:
    app = create_app(open_inspector(run, "torch", "cpu"), api_keys=["first-key", "second-key"])
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        upload = {"image": ("ok.png", good_png())}
        for headers in ({}, {"x-api-key": "wrong"}, {"authorization": "Bearer first"}):
            refused = client.post("/inspect", files=upload, headers=headers)
            assert refused.status_code == 401 and "API key" in refused.json()["detail"]
            assert refused.headers["www-authenticate"] == "Bearer"
            assert client.get("/model", headers=headers).status_code == 401
            assert client.get("/openapi.json", headers=headers).status_code == 401
        ok = client.post("/inspect", files=upload, headers={"x-api-key": "second-key"})
        assert ok.status_code == 200
        ok = client.get("/model", headers={"authorization": "Bearer first-key"})
        assert ok.status_code == 200 and ok.json()["requests"]["served"] == 1


def test_keys_come_from_the_environment_and_files(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from defectlab.deploy import serve as serve_module

    given: dict = {}
    monkeypatch.setattr(serve_module, "serve", lambda path, **kw: given.update(kw))
    keys = tmp_path / "keys.txt"
    keys.write_text("# service keys\nfrom-file\n\n")
    monkeypatch.setenv("DEFECTLAB_API_KEY", "env-one, env-two")
    code = main(["serve", "--run", str(run), "--api-key", "arg", "--api-key-file", str(keys)])
    assert code == 0
    assert given["api_keys"] == ["arg", "from-file", "env-one", "env-two"]


def test_a_non_loopback_host_needs_a_key_or_insecure(
    capsys: pytest.CaptureFixture[str], run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    code = main(["serve", "--run", str(run), "--host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "refusing to serve on 0.0.0.0 without an API key" in err and "--insecure" in err
    # --insecure goes on, with a warning (here into a port it cannot have)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="defectlab"):
            code = main(
                ["serve", "--run", str(run), "--host", "0.0.0.0", "--port", str(port), "--insecure"]
            )
    assert "WITHOUT an API key" in caplog.text
    assert code == 2 and f"0.0.0.0:{port} is already in use" in capsys.readouterr().err


def test_an_occupied_port_is_one_line(capsys: pytest.CaptureFixture[str], run: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--run", str(run), "--port", str(port)])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err == (
        f"defectlab serve: error: 127.0.0.1:{port} is already in use "
        "(is another service running? choose --port)\n"
    )


# --- kill -9 ---------------------------------------------------------------------------------


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "log.txt"
    }


def test_kill_9_under_load_then_restart_serves_the_same_answers(run: Path, tmp_path: Path) -> None:
    files_before = _digest(run)
    first = start(run, tmp_path / "first.log")
    data = good_png(9)
    with httpx.Client(base_url=first.url, timeout=120) as client:
        before = client.post("/inspect", files={"image": ("a.png", data)}).json()

    async def flood() -> None:
        async with httpx.AsyncClient(base_url=first.url, timeout=120) as client:
            posts = [client.post("/inspect", files={"image": ("a.png", data)}) for _ in range(40)]
            results = asyncio.gather(*posts, return_exceptions=True)
            await asyncio.sleep(0)
            first.kill()  # SIGKILL with requests in flight
            await results

    asyncio.run(flood())
    port = int(first.url.rsplit(":", 1)[1])
    second = start(run, tmp_path / "second.log", port=port)  # the same port, at once
    try:
        with httpx.Client(base_url=second.url, timeout=120) as client:
            after = client.post("/inspect", files={"image": ("a.png", data)}).json()
    finally:
        second.stop()
    assert {k: after[k] for k in ("score", "is_defect", "mask_png")} == {
        k: before[k] for k in ("score", "is_defect", "mask_png")
    }
    assert _digest(run) == files_before  # serving never writes into the run
