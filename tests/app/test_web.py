"""The workbench's HTTP surface: pages render, every write needs the token (and, from a
browser session, the CSRF token), every bad request gets a clear 4xx, reviews never lose
an update, uploads are limited and deduplicated."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from defectlab.app.db import Image, Inspection, Review, Token
from defectlab.app.ingest import ingest_folder, register_version
from defectlab.app.security import hash_token
from defectlab.app.web import create_app


def png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    assert ok
    return buf.tobytes()


@pytest.fixture
def station(db_url: str, trained_run: Path, parts: tuple[Path, dict], tmp_path: Path):
    app = create_app(db_url, run=trained_run, files=tmp_path / "files", max_upload_bytes=200_000)
    wb = app.state.workbench
    version = register_version(wb.db, trained_run)
    ingest_folder(wb.db, version, parts[0], wb.files, progress=False)
    client = TestClient(app)
    yield app, client, wb.first_token
    client.close()
    wb.db.close()


def auth(token: str, reviewer: str = "ana") -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "X-Reviewer": reviewer}


def first_ids(client: TestClient) -> tuple[int, int]:
    item = client.get("/api/queue?view=all&reviewed=any").json()["items"][0]
    return item["inspection_id"], item["image_id"]


def test_token_is_created_once_and_stored_hashed(station, capsys) -> None:
    app, _, token = station
    assert token and len(token) >= 24
    db = app.state.workbench.db
    with db.sessions() as session:
        stored = session.scalars(select(Token.token_hash)).all()
    assert stored == [hash_token(token)]
    again = create_app(db, files=app.state.workbench.files)
    assert again.state.workbench.first_token is None  # not created, not printed again


def test_pages_render(station) -> None:
    _, client, _ = station
    inspection_id, image_id = first_ids(client)
    for url in (
        "/queue",
        "/queue?view=near&sort=uncertainty",
        "/queue?view=audit",
        "/dashboard",
        "/versions",
        "/login",
        f"/review/{inspection_id}?view=all",
    ):
        response = client.get(url)
        assert response.status_code == 200, url
        assert "<html" in response.text
    for url in (
        f"/files/image/{image_id}.png",
        f"/files/heat/{inspection_id}.png",
        f"/files/outline/{inspection_id}.png",
        f"/files/mask/{inspection_id}.png",
    ):
        response = client.get(url)
        assert response.status_code == 200 and response.content.startswith(b"\x89PNG"), url


@pytest.mark.parametrize(
    ("url", "status", "words"),
    [
        ("/queue?view=nope", 422, "view must be one of"),
        ("/queue?sort=x", 422, "sort must be one of"),
        ("/queue?since=yesterday", 422, "not a date"),
        ("/queue?version=abc", 422, "version must be a number"),
        ("/queue?version=99", 404, "model version 99 does not exist"),
        ("/review/9999", 404, "inspection 9999 does not exist"),
        ("/files/image/9999.png", 404, "image 9999 does not exist"),
        ("/files/review-mask/1.png", 404, "no corrected mask"),
        ("/api/jobs/nope", 404, "job nope does not exist"),
    ],
)
def test_bad_reads_are_clear_4xx(station, url: str, status: int, words: str) -> None:
    _, client, _ = station
    response = client.get(url)
    assert response.status_code == status
    assert words in response.json()["detail"]


def test_writes_need_the_token_and_csrf(station) -> None:
    _, client, token = station
    _, image_id = first_ids(client)
    body = {"verdict": "defect", "revision": 0}
    assert client.post(f"/api/reviews/{image_id}", json=body).status_code == 401
    bad = client.post(f"/api/reviews/{image_id}", json=body, headers=auth("wrong"))
    assert bad.status_code == 401 and bad.json()["detail"] == "invalid token"
    # a browser session: log in through the form, which itself needs its CSRF token
    page = client.get("/login")
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    refused = client.post("/login", data={"reviewer": "ana", "token": token, "csrf": "x"})
    assert refused.status_code == 403
    wrong = client.post(
        "/login", data={"reviewer": "ana", "token": "nope", "csrf": csrf}, follow_redirects=False
    )
    assert wrong.headers["location"] == "/login?error=wrong%20token"
    ok = client.post(
        "/login", data={"reviewer": "ana", "token": token, "csrf": csrf}, follow_redirects=False
    )
    assert ok.status_code == 303 and "dl_session" in ok.cookies
    no_csrf = client.post(f"/api/reviews/{image_id}", json=body)
    assert no_csrf.status_code == 403 and "CSRF" in no_csrf.json()["detail"]
    queue = client.get("/queue").text
    session_csrf = queue.split('name="csrf-token" content="')[1].split('"')[0]
    saved = client.post(
        f"/api/reviews/{image_id}", json=body, headers={"X-CSRF-Token": session_csrf}
    )
    assert saved.status_code == 200 and saved.json()["reviewer"] == "ana"


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"verdict": "maybe", "revision": 0}, 422, "verdict must be one of"),
        ({"verdict": "defect", "defect_class": "<script>", "revision": 0}, 422, "defect_class"),
        ({"verdict": "defect", "revision": -1}, 422, "revision"),
        ([1, 2], 422, "JSON object"),
    ],
)
def test_bad_reviews_are_refused(station, body, status: int, words: str) -> None:
    _, client, token = station
    _, image_id = first_ids(client)
    response = client.post(f"/api/reviews/{image_id}", json=body, headers=auth(token))
    assert response.status_code == status and words in response.json()["detail"]
    not_json = client.post(f"/api/reviews/{image_id}", content=b"{", headers=auth(token))
    assert not_json.status_code == 400
    missing = client.post("/api/reviews/9999", json={"verdict": "normal"}, headers=auth(token))
    assert missing.status_code == 404


def test_stale_revision_is_a_conflict_not_a_lost_update(station) -> None:
    app, client, token = station
    _, image_id = first_ids(client)
    first = client.post(
        f"/api/reviews/{image_id}", json={"verdict": "defect", "revision": 0}, headers=auth(token)
    )
    assert first.json()["revision"] == 1
    # ben saw revision 1 and changes it; ana, still at revision 1, then saves: 409
    ben = client.post(
        f"/api/reviews/{image_id}",
        json={"verdict": "normal", "revision": 1},
        headers=auth(token, "ben"),
    )
    assert ben.status_code == 200 and ben.json()["revision"] == 2
    ana = client.post(
        f"/api/reviews/{image_id}",
        json={"verdict": "unsure", "revision": 1},
        headers=auth(token, "ana"),
    )
    assert ana.status_code == 409 and "ben changed this review" in ana.json()["detail"]
    with app.state.workbench.db.sessions() as session:
        review = session.scalars(select(Review).where(Review.image_id == image_id)).one()
    assert (review.verdict, review.reviewer, review.revision) == ("normal", "ben", 2)


def test_two_reviewers_at_once(station) -> None:
    """Two sessions save the same image at the same moment from the same revision, 20
    times over: each time exactly one wins and the other is told (409); nothing is lost."""
    app, client, token = station
    items = client.get("/api/queue?view=all&reviewed=any").json()["items"]
    barrier = threading.Barrier(2)
    outcomes: list[tuple[str, int]] = []
    lock = threading.Lock()

    def reviewer(name: str, verdict: str, image_id: int, revision: int) -> None:
        with TestClient(app) as own:
            barrier.wait()
            response = own.post(
                f"/api/reviews/{image_id}",
                json={"verdict": verdict, "revision": revision},
                headers=auth(token, name),
            )
        with lock:
            outcomes.append((name, response.status_code))

    for item in items[:10]:
        for revision in (0, 1):
            outcomes.clear()
            threads = [
                threading.Thread(
                    target=reviewer, args=("ana", "defect", item["image_id"], revision)
                ),
                threading.Thread(
                    target=reviewer, args=("ben", "normal", item["image_id"], revision)
                ),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            codes = sorted(code for _, code in outcomes)
            assert codes == [200, 409], outcomes
            winner = next(name for name, code in outcomes if code == 200)
            with app.state.workbench.db.sessions() as session:
                review = session.scalars(
                    select(Review).where(Review.image_id == item["image_id"])
                ).one()
            assert review.reviewer == winner and review.revision == revision + 1


def test_mask_upload(station) -> None:
    app, client, token = station
    _, image_id = first_ids(client)
    wb = app.state.workbench
    with wb.db.sessions() as session:
        image = session.get(Image, image_id)
    mask = np.zeros((image.height, image.width), np.uint8)
    mask[4:12, 6:20] = 255
    saved = client.post(
        f"/api/reviews/{image_id}/mask",
        files={"mask": ("m.png", png(mask), "image/png")},
        data={"revision": "0"},
        headers=auth(token),
    )
    assert saved.status_code == 200, saved.text
    assert saved.json()["mask_pixels"] == 8 * 14 and saved.json()["verdict"] == "defect"
    back = client.get(f"/files/review-mask/{image_id}.png")
    decoded = cv2.imdecode(np.frombuffer(back.content, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(decoded > 127, mask > 127)
    wrong_size = client.post(
        f"/api/reviews/{image_id}/mask",
        files={"mask": ("m.png", png(np.zeros((5, 5), np.uint8)), "image/png")},
        data={"revision": "1"},
        headers=auth(token),
    )
    assert wrong_size.status_code == 422 and "the image is" in wrong_size.json()["detail"]
    not_image = client.post(
        f"/api/reviews/{image_id}/mask",
        files={"mask": ("m.png", b"hello", "image/png")},
        data={"revision": "1"},
        headers=auth(token),
    )
    assert not_image.status_code == 415
    no_field = client.post(f"/api/reviews/{image_id}/mask", data={"x": "1"}, headers=auth(token))
    assert no_field.status_code == 422 and "'mask'" in no_field.json()["detail"]


def test_upload_is_scored_once_and_limited(station, parts) -> None:
    app, client, token = station
    rng = np.random.default_rng(42)
    fresh = png(np.clip(rng.normal(128, 30, (32, 32)), 0, 255).astype(np.uint8))
    first = client.post(
        "/api/upload", files={"image": ("p.png", fresh, "image/png")}, headers=auth(token)
    )
    assert first.status_code == 200 and first.json()["new"] is True
    again = client.post(
        "/api/upload", files={"image": ("q.png", fresh, "image/png")}, headers=auth(token)
    )
    assert again.json() == first.json() | {"new": False}
    known = (parts[0] / "bad00.png").read_bytes()  # ingested from the folder already
    assert (
        client.post(
            "/api/upload", files={"image": ("b.png", known, "image/png")}, headers=auth(token)
        ).json()["new"]
        is False
    )
    cases = [
        (b"", 400, "empty"),
        (b"GIF89a....", 415, "not a PNG"),
        (b"\x89PNG\r\n\x1a\nbroken", 415, "upload"),
        (b"\x89PNG" + bytes(300_000), 413, "too large"),
    ]
    for data, status, words in cases:
        response = client.post(
            "/api/upload", files={"image": ("x.png", data, "image/png")}, headers=auth(token)
        )
        assert response.status_code == status and words in response.json()["detail"], data[:8]
    with app.state.workbench.db.sessions() as session:
        assert session.scalar(select(func.count(Image.id))) == len(parts[1]) + 1
        assert session.scalar(select(func.count(Inspection.id))) == len(parts[1]) + 1
    nobody = client.post("/api/upload", files={"image": ("p.png", fresh, "image/png")})
    assert nobody.status_code == 401


def test_no_path_comes_from_the_client(station) -> None:
    _, client, token = station
    response = client.post("/api/scan", json={"folder": "/etc"}, headers=auth(token))
    assert response.status_code == 409 and "--scan" in response.json()["detail"]
    assert client.get("/files/image/..%2F..%2Fetc%2Fpasswd.png").status_code in (404, 422)


def test_promote_by_form_needs_csrf(station) -> None:
    _, client, token = station
    response = client.post("/api/versions/1/promote", data={"csrf": "nope"})
    assert response.status_code == 401  # no session at all
    ok = client.post("/api/versions/1/promote", headers=auth(token))
    assert ok.status_code == 200 and ok.json()["status"] == "active"
    assert client.post("/api/versions/77/promote", headers=auth(token)).status_code == 404


def test_review_page_neighbours_follow_the_queue(station) -> None:
    _, client, _ = station
    items = client.get("/api/queue?view=all&reviewed=any&sort=score").json()["items"]
    middle = items[1]["inspection_id"]
    page = client.get(f"/review/{middle}?view=all&reviewed=any&sort=score").text
    assert f'data-prev="/review/{items[0]["inspection_id"]}?' in page
    assert f'data-next="/review/{items[2]["inspection_id"]}?' in page
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True)


def _follow(client: TestClient, job: dict, timeout: float = 300) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
        job = client.get(f"/api/jobs/{job['id']}").json()
    return job


def test_scan_and_retrain_run_as_jobs_with_progress(
    db_url: str, trained_run: Path, parts: tuple[Path, dict], tmp_path: Path
) -> None:
    folder, truth = parts
    app = create_app(db_url, run=trained_run, files=tmp_path / "files", scan=[folder])
    wb = app.state.workbench
    token = wb.first_token
    with TestClient(app) as client:
        job = client.post("/api/scan", headers=auth(token)).json()
        assert job["kind"] == "scan"
        job = _follow(client, job)
        assert job["state"] == "done" and job["done"] == job["total"] == len(truth)
        assert f"{len(truth)} new" in job["message"]
        failed = _follow(client, client.post("/api/retrain", headers=auth(token)).json())
        assert failed["state"] == "failed" and "review more parts" in failed["message"]
        for item in client.get("/api/queue?view=all&reviewed=any").json()["items"]:
            name = Path(
                client.app.state.workbench.db.sessions().get(Image, item["image_id"]).path
            ).name
            verdict = "normal" if truth[name] is None else "defect"
            client.post(
                f"/api/reviews/{item['image_id']}",
                json={"verdict": verdict, "revision": 0},
                headers=auth(token),
            )
        done = _follow(client, client.post("/api/retrain", headers=auth(token)).json())
        assert done["state"] == "done", done
        assert "recalibrated" in done["message"], done["message"]
        versions = client.get("/versions").text
        assert "v2 ← v1" in versions and "candidate" in versions
    wb.db.close()
