"""`http_json` and configs/imgur.yaml against a loopback server that answers like Imgur's API."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from pipeline.errors import ConfigError, ItemError, RunIncompleteError
from pipeline.execution.runner import RunRequest, run
from pipeline.records import JobContext
from pipeline.stages.http_json import HttpJson, HttpJsonOptions, origin
from pipeline.testing import server as misbehave
from pipeline.testing.images import jpeg_bytes, photo, png_bytes
from pipeline.testing.server import TestServer, send_bytes
from tests.conftest import REPO
from tests.stage_jobs import records, run_job

CLIENT_ID = "loopback-client-123"


def post(server: TestServer, number: int, kind: str) -> dict:
    """One gallery post as Imgur lists it: images have a type and a link; albums do not."""
    if kind == "album":
        return {
            "id": f"al{number}",
            "title": f"album {number}",
            "is_album": True,
            "link": server.url(f"/a/al{number}"),
            "images_count": 3,
        }
    extension = {"image/jpeg": "jpg", "image/png": "png", "image/gif": "gif", "video/mp4": "mp4"}[
        kind
    ]
    return {
        "id": f"im{number}",
        "title": f"post {number}",
        "is_album": False,
        "type": kind,
        "link": server.url(f"/i/im{number}.{extension}"),
        "width": 640,
        "height": 480,
    }


def gallery_handler(pages: list[list[dict]]):
    def handle(request) -> None:
        if request.headers.get("Authorization") != f"Client-ID {CLIENT_ID}":
            body = {
                "data": {"error": "Authentication required", "method": "GET"},
                "success": False,
                "status": 401,
            }
            send_bytes(request, json.dumps(body).encode(), "application/json", status=401)
            return
        page = int(urlsplit(request.path).path.rsplit("/", 1)[1].removesuffix(".json"))
        data = pages[page] if page < len(pages) else []
        body = {"data": data, "success": True, "status": 200}
        send_bytes(request, json.dumps(body).encode(), "application/json")

    return handle


@pytest.fixture(scope="module")
def imgur():
    with TestServer() as server:
        kinds = ["image/jpeg", "album", "image/png", "video/mp4", "image/gif", "image/jpeg"]
        posts = [post(server, n, kind) for n, kind in enumerate(kinds)]
        more = [post(server, 10, "image/png")]
        for item in posts + more:
            if item.get("type", "").startswith("image/"):
                picture = photo(300 + 10 * len(item["id"]), 200, seed=len(server.routes))
                if item["type"] == "image/jpeg":
                    server.add_bytes(urlsplit(item["link"]).path, jpeg_bytes(picture))
                else:
                    fmt = "PNG" if item["type"] == "image/png" else "GIF"
                    data = png_bytes(picture) if fmt == "PNG" else gif_bytes(picture)
                    server.add_bytes(urlsplit(item["link"]).path, data, item["type"])
        for page in range(3):
            server.add(f"/3/gallery/hot/viral/{page}.json", gallery_handler([posts, more]))
        yield server


def gif_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("P").save(buffer, "GIF")
    return buffer.getvalue()


def test_imgur_config_reproduces_the_lesson_on_a_loopback_gallery(imgur, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGUR_CLIENT_ID", CLIENT_ID)
    out = tmp_path / "imgur"
    overrides = [
        f"output={out}",
        f"stages.gallery.url={imgur.url('/3/gallery/hot/viral/{page}.json')}",
        "stages.gallery.pages=3",
        "stages.download.allow_hosts=[127.0.0.1]",
    ]
    report = run(RunRequest(config=REPO / "configs/imgur.yaml", overrides=overrides))
    assert report["counts"] == {"ok": 5, "failed": 0, "skipped": 0}
    found = records(out)
    assert [r["fields"]["id"] for r in found] == ["im0", "im2", "im4", "im5", "im10"]
    assert imgur.hits["/3/gallery/hot/viral/2.json"] == 1  # the empty page ends the listing
    for record in found:
        (path,) = record["outputs"]
        assert max(Image.open(path).size) == 128
        assert json.loads(Path(path).with_suffix(".json").read_text())["fields"][
            "title"
        ].startswith("post")


def test_wrong_client_id_stops_the_run_without_leaking_it(imgur):
    options = HttpJsonOptions(
        url=imgur.url("/3/gallery/hot/viral/0.json"),
        headers={"Authorization": "Client-ID wrong-secret"},
        params={"secret": "s3cr3t"},
    )
    with pytest.raises(RunIncompleteError, match=r"HTTP 401.*Authentication required") as caught:
        list(HttpJson("gallery", options, JobContext("t", "/x")).iter_items())
    assert "s3cr3t" not in str(caught.value) and "wrong-secret" not in str(caught.value)


def test_params_paths_and_page_parameter(tmp_path):
    def handle(request) -> None:
        query = parse_qs(urlsplit(request.path).query)
        page = int(query["p"][0])
        albums = [
            {"images": [{"src": f"http://h/{page}-{n}.jpg", "kind": query["kind"][0]}]}
            for n in range(2)
        ]
        send_bytes(
            request,
            json.dumps({"result": {"albums": albums if page < 2 else []}}).encode(),
            "application/json",
        )

    with TestServer() as server:
        server.add("/search", handle)
        options = HttpJsonOptions(
            url=server.url("/search"),
            params={"kind": "photo"},
            items="result.albums.*.images",
            link="src",
            where={"kind": ["photo"]},
            page_param="p",
            pages=5,
            fields=["kind"],
        )
        found = list(HttpJson("s", options, JobContext("t", "/x")).iter_items())
    assert [item.url for item in found] == [f"http://h/{p}-{n}.jpg" for p in (0, 1) for n in (0, 1)]
    assert [item.index for item in found] == [1, 2, 3, 4] and found[0].fields == {"kind": "photo"}
    assert server.hits["/search"] == 3


def feed_handler(pages: int):
    """`/feed` answers page by page, naming the next by cursor and by URL, both opaque."""

    def handle(request) -> None:
        query = parse_qs(urlsplit(request.path).query)
        page = int(query.get("after", ["c0"])[0].removeprefix("c"))
        assert query.get("key") == ["k"] or page > 0  # the params go with the first request
        last = page == pages - 1
        body = {
            "items": [{"url": f"http://h/{page}-{n}.jpg"} for n in range(2)],
            "meta": {
                "cursor": None if last else f"c{page + 1}",
                "next": None if last else f"/feed?after=c{page + 1}",
            },
        }
        send_bytes(request, json.dumps(body).encode(), "application/json")

    return handle


@pytest.mark.parametrize(
    "paging",
    [{"next_cursor": "meta.cursor", "cursor_param": "after"}, {"next_url": "meta.next"}],
    ids=["cursor", "next_url"],
)
def test_pages_named_by_each_answer_until_there_is_none(paging):
    with TestServer() as server:
        server.add("/feed", feed_handler(pages=3))
        options = HttpJsonOptions(
            url=server.url("/feed"),
            params={"key": "k"},
            items="items",
            link="url",
            pages=10,
            **paging,
        )
        links = [item.url for item in HttpJson("feed", options, JobContext("t", "/x")).iter_items()]
        assert links == [f"http://h/{page}-{n}.jpg" for page in range(3) for n in range(2)]
        assert server.hits["/feed"] == 3  # the last page names no next one


def test_a_next_url_on_another_host_is_not_followed_and_is_a_failed_page(tmp_path):
    def handle(request) -> None:
        page = "2" if "p=2" in request.path else "1"
        following = server.url("/feed?p=2") if page == "1" else "http://elsewhere.test/feed?p=3"
        body = {"items": [{"url": server.url(f"/img/0-{int(page) - 1}.jpg")}], "next": following}
        send_bytes(request, json.dumps(body).encode(), "application/json")

    with TestServer() as server:
        serve_images(server, 1)
        server.add("/feed", handle)
        report = feed_job(tmp_path, server, page_param=None, pages=5, next_url="next")
    found = summary(tmp_path)
    assert [row[:4] for row in found] == [
        (1, "ok", None, None),
        (2, "ok", None, None),
        (3, "failed", "feed", "blocked_address"),
    ]
    assert found[2][4] == server.url("/feed")  # the page that named it, without its query
    assert "elsewhere.test/feed, not on" in records(tmp_path / "out")[2]["message"]
    assert report["exit_code"] == 1
    assert_no_secret(tmp_path)


def test_origins_compare_as_browsers_do():
    assert origin("HTTP://Host:80/a") == origin("http://host/b")
    assert origin("https://h:443/") == origin("https://h/") != origin("http://h/")


def test_a_redirect_to_another_host_carries_none_of_the_configured_headers():
    seen: dict[str, str | None] = {}

    def elsewhere(request) -> None:
        seen["key"] = request.headers.get("X-Api-Key")
        body = {"items": [{"url": "http://h/a.jpg"}]}
        send_bytes(request, json.dumps(body).encode(), "application/json")

    with TestServer() as api, TestServer() as other:
        other.add("/feed", elsewhere)
        api.add("/feed", misbehave.redirect(other.url("/feed")))
        options = HttpJsonOptions(
            url=api.url("/feed"), headers={"X-Api-Key": "k-123"}, items="items", link="url"
        )
        links = [item.url for item in HttpJson("f", options, JobContext("t", "/x")).iter_items()]
    assert links == ["http://h/a.jpg"] and seen == {"key": None}


def test_two_ways_to_page_is_a_config_error(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(
        "name: j\nstages:\n"
        "  feed: {kind: http_json, url: 'http://h/f', next_url: a.next, next_cursor: a.c}\n"
        "  get: {kind: download, input: feed}\n"
        "  write: {kind: write_images, input: get, path: out}\n"
    )
    with pytest.raises(ConfigError, match=r"job\.yaml:3.*next_url and next_cursor"):
        run(RunRequest(config=config))


def test_messages_show_no_credentials_of_the_url():
    from pipeline.stages.http_json import _where

    assert _where("https://user:pw@h.example:8443/a/b?k=1") == "https://h.example:8443/a/b"


# Issue 17: every element is one record, and a later page that fails is one record.

SECRET = "s3cr3t-param"
TOKEN = "tok-9c1e"


def page_json(server: TestServer, page: int, extra: dict | None = None) -> bytes:
    """Page `page` of `/feed`: two image elements, served by the same server."""
    links = [{"url": server.url(f"/img/{page}-{n}.jpg")} for n in range(2)]
    return json.dumps({"items": links, **(extra or {})}).encode()


def serve_images(server: TestServer, pages: int) -> None:
    for page in range(pages):
        for n in range(2):
            server.add_bytes(f"/img/{page}-{n}.jpg", jpeg_bytes(photo(40, 30, seed=10 * page + n)))


def paged_feed(server: TestServer, later: misbehave.Handler) -> list[int]:
    """`/feed?page=N`: pages 0 and 2 answer two images each, page 1 with `later`.
    Returns the page numbers asked for, in order, as the server sees them."""
    asked: list[int] = []

    def handle(request) -> None:
        page = int(parse_qs(urlsplit(request.path).query)["page"][0])
        asked.append(page)
        if page == 1:
            later(request)
        else:
            send_bytes(request, page_json(server, page), "application/json")

    server.add("/feed", handle)
    serve_images(server, 3)
    return asked


def feed_job(tmp_path: Path, server: TestServer, **options) -> dict:
    """Run `feed` (http_json over /feed, 3 pages) -> download -> decode -> write_images."""
    settings = {
        "url": server.url("/feed"),
        "headers": {"Authorization": f"Bearer {TOKEN}"},
        "params": {"key": SECRET},
        "items": "items",
        "link": "url",
        "page_param": "page",
        "pages": 3,
        "retries": 0,
        **options,
    }
    return run_job(
        tmp_path,
        f"feed: {json.dumps({'kind': 'http_json', **settings})}",
        "get: {kind: download, input: feed, allow_hosts: [127.0.0.1]}",
        "decode: {kind: decode, input: get}",
        "write: {kind: write_images, input: decode, path: images}",
    )


def summary(tmp_path: Path) -> list[tuple]:
    """(index, status, stage, reason, input) of every record, in index order."""
    found = records(tmp_path / "out")
    return [(r["index"], r["status"], r["stage"], r["reason"], r["input"]) for r in found]


def assert_no_secret(tmp_path: Path) -> None:
    text = (tmp_path / "out" / "results.jsonl").read_text()
    assert SECRET not in text and TOKEN not in text


def slow(seconds: float) -> misbehave.Handler:
    def handle(request) -> None:
        time.sleep(seconds)
        send_bytes(request, b'{"items": []}', "application/json")

    return handle


LATER_PAGE_FAILURES = {
    "not_json": (misbehave.raw(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n<html>"), {}),
    "slow": (slow(5.0), {"timeout": 0.5}),
    "drip": (misbehave.drip_body(b'{"items": []}' + b" " * 200, 0.05), {"timeout": 0.5}),
    "drip_headers": (misbehave.drip_headers(b'{"items": []}', 0.2), {"timeout": 0.5}),
    "http_500": (misbehave.status(500), {}),
    "http_404": (misbehave.status(404), {}),
    "reset": (misbehave.reset(), {}),
    "declared_too_large": (
        misbehave.raw(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"),
        {"max_page_bytes": 1000},
    ),
    "endless": (misbehave.endless_body(b" " * 65536), {"max_page_bytes": 1000}),
}
REASON = {"not_json": "invalid_input", "slow": "timeout", "drip": "timeout"}
REASON |= {"drip_headers": "timeout"}
REASON |= {"http_500": "http_5xx", "http_404": "http_4xx", "reset": "connection_error"}
REASON |= {"declared_too_large": "too_large", "endless": "too_large"}


@pytest.mark.parametrize("failure", list(LATER_PAGE_FAILURES))
def test_a_later_page_that_fails_is_one_failed_record_and_ends_the_paging(tmp_path, failure):
    handler, options = LATER_PAGE_FAILURES[failure]
    with TestServer() as server:
        asked = paged_feed(server, handler)
        started = time.monotonic()
        report = feed_job(tmp_path, server, **options)
        elapsed = time.monotonic() - started
    feed = server.url("/feed")
    assert summary(tmp_path) == [
        (1, "ok", None, None, server.url("/img/0-0.jpg")),
        (2, "ok", None, None, server.url("/img/0-1.jpg")),
        (3, "failed", "feed", REASON[failure], feed),
    ]
    assert records(tmp_path / "out")[2]["message"].startswith(f"GET {feed}: ")
    assert report["exit_code"] == 1 and asked == [0, 1]  # page 2 is not asked for
    assert elapsed < 4  # a slow, dripping or endless page is cut off, not waited for
    assert_no_secret(tmp_path)


def test_the_first_page_failing_stops_the_run_naming_the_source_and_url(tmp_path):
    with TestServer() as server:
        server.add("/feed", misbehave.endless_body(b" " * 65536))
        with pytest.raises(RunIncompleteError) as caught:
            feed_job(tmp_path, server, max_page_bytes=1000)
    message = str(caught.value)
    assert caught.value.exit_code == 4
    assert f"feed: GET {server.url('/feed')}: the page is over max_page_bytes" in message
    assert SECRET not in message and TOKEN not in message


def test_a_10_mb_page_is_read_by_default(tmp_path):
    with TestServer() as server:
        padding = {"padding": "x" * 10_000_000}
        server.add_bytes("/feed", page_json(server, 0, padding), "application/json")
        serve_images(server, 1)
        report = feed_job(tmp_path, server, page_param=None, pages=1)
    assert report["exit_code"] == 0
    assert [r[:2] for r in summary(tmp_path)] == [(1, "ok"), (2, "ok")]
    assert len(list((tmp_path / "out" / "images").iterdir())) == 2


def test_an_unparsable_next_url_is_a_failed_record_of_the_page_naming_it(tmp_path):
    with TestServer() as server:
        body = page_json(server, 0, {"next": "http://[::1/broken?key=x"})
        server.add_bytes("/feed", body, "application/json")
        serve_images(server, 1)
        report = feed_job(tmp_path, server, page_param=None, next_url="next")
    assert summary(tmp_path)[2] == (3, "failed", "feed", "invalid_url", server.url("/feed"))
    assert report["exit_code"] == 1 and report["counts"] == {"ok": 2, "failed": 1, "skipped": 0}


def test_every_element_kept_by_where_is_one_record_whatever_it_holds(tmp_path):
    with TestServer() as server:
        serve_images(server, 1)
        good = server.url("/img/0-0.jpg")
        found = [
            {"url": good, "kind": "photo"},
            {"url": server.url("/img/0-1.jpg"), "kind": "video"},  # filtered: no record
            "a string",
            42,
            ["a", "list"],
            {"kind": "photo"},
            {"url": None, "kind": "photo"},
            {"url": "", "kind": "photo"},
            {"url": "  ", "kind": "photo"},
            {"url": 7, "kind": "photo"},
            {"url": {"href": good}, "kind": "photo"},
            {"url": "http://[::1/broken", "kind": "photo"},
            {"url": "http://h:99999/a.jpg", "kind": "photo"},
            {"url": "http://h/\ud800.jpg", "kind": "photo"},  # a lone surrogate, escaped
        ]
        server.add_bytes("/feed", json.dumps({"items": found}).encode(), "application/json")
        report = feed_job(tmp_path, server, page_param=None, pages=1, where={"kind": ["photo"]})
    reasons = ("invalid_input", "empty", "invalid_url")
    bad_input, empty, bad_url = (("failed", "feed", reason) for reason in reasons)
    expected = [
        ((1, "ok", None, None), good),
        ((2, *bad_input), '"a string"'),
        ((3, *bad_input), "42"),
        ((4, *bad_input), '["a","list"]'),
        ((5, *empty), '{"kind":"photo"}'),
        ((6, *empty), '{"url":null,"kind":"photo"}'),
        ((7, *empty), '{"url":"","kind":"photo"}'),
        ((8, *empty), '{"url":"  ","kind":"photo"}'),
        ((9, *bad_input), '{"url":7,"kind":"photo"}'),
        ((10, *bad_input), f'{{"url":{{"href":"{good}"}},"kind":"photo"}}'),
        ((11, *bad_url), '{"url":"http://[::1/broken","kind":"photo"}'),
        ((12, *bad_url), '{"url":"http://h:99999/a.jpg","kind":"photo"}'),
        ((13, *bad_input), '{"url":"http://h/\\ud800.jpg","kind":"photo"}'),
    ]
    assert summary(tmp_path) == [(*head, text) for head, text in expected]
    assert report["exit_code"] == 1 and report["counts"]["failed"] == 12


def test_a_relative_link_is_relative_to_its_page_never_a_local_path(tmp_path):
    with TestServer() as server:
        serve_images(server, 1)
        found = [{"url": "/img/0-0.jpg"}, {"url": "0-1.jpg"}, {"url": "../etc/passwd"}]
        server.add_bytes("/img/feed", json.dumps({"items": found}).encode(), "application/json")
        feed_job(tmp_path, server, url=server.url("/img/feed"), page_param=None, pages=1)
        found = records(tmp_path / "out")
    assert [(r["status"], r["url"], r["input"]) for r in found[:2]] == [
        ("ok", server.url("/img/0-0.jpg"), "/img/0-0.jpg"),
        ("ok", server.url("/img/0-1.jpg"), "0-1.jpg"),
    ]
    assert (found[2]["url"], found[2]["reason"]) == (server.url("/etc/passwd"), "http_4xx")
    assert_no_secret(tmp_path)


def test_a_retry_waits_the_backoff_or_the_servers_retry_after_up_to_a_cap():
    """A hostile API's `Retry-After: 100000` does not put the batch to sleep for a day."""
    from pipeline.stages.http_json import BACKOFF, BACKOFF_MAX, RETRY_AFTER_MAX, _Retryable

    error = ItemError("http_4xx", "HTTP 429")
    assert _Retryable(error).delay(0) == 0.0
    assert _Retryable(error).delay(2) == BACKOFF * 4
    assert _Retryable(error, "3").delay(0) == 3.0
    assert _Retryable(error, "100000").delay(0) == RETRY_AFTER_MAX
    assert _Retryable(error, "not a time").delay(1) == BACKOFF * 2
    assert _Retryable(error, "Mon, 01 Jan 99999 00:00:00 GMT").delay(0) == 0.0  # ignored
    assert _Retryable(error).delay(40) == BACKOFF_MAX  # retries: 40 waits no days
