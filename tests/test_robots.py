"""`respect_robots_txt`: the rules, and robots.txt read once per host through the guard."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.config import load_config
from pipeline.errors import ItemError
from pipeline.execution.runner import RunRequest, run
from pipeline.plan.dag import build_plan
from pipeline.records import Item, JobContext, Record, SourceItem
from pipeline.stages.download import Download, DownloadOptions
from pipeline.stages.download.robots import ROBOTS_MAX_BYTES, Robots, product_token
from pipeline.testing import server as misbehave
from pipeline.testing.server import TestServer, send_bytes
from tests.conftest import REPO
from tests.hostile_cases import IMAGE

FAST = {"timeout": 1.0, "connect_timeout": 1.0, "read_timeout": 1.0, "backoff": 0.01}
AGENT = "pipeline-images/0.1 (+https://example.invalid/bot)"
RULES = """\
# several agents; ours may not have /private
User-agent: OtherBot
Disallow: /

User-agent: pipeline-images
Disallow: /private
Allow: /private/public

User-agent: *
Allow: /
"""


def robots_server(robots: misbehave.Handler | None = None) -> TestServer:
    """A started server with images at /a.jpg, /private/a.jpg, /private/public/a.jpg."""
    server = TestServer().start()
    for path in ("/a.jpg", "/private/a.jpg", "/private/public/a.jpg", "/b.jpg"):
        server.add_bytes(path, IMAGE)
    if robots is not None:
        server.add("/robots.txt", robots)
    return server


def text(body: str, status: int = 200) -> misbehave.Handler:
    return lambda request: send_bytes(request, body.encode(), "text/plain", status)


@pytest.fixture
def rules_server():
    server = robots_server(text(RULES))
    yield server
    server.stop()


def stage(*ports: int, **options) -> Download:
    allow = [f"127.0.0.1:{port}" for port in ports]
    settings = {**FAST, "retries": 0, "allow_hosts": allow, "respect_robots_txt": True}
    return Download("download", DownloadOptions(**{**settings, **options}), JobContext("r", "."))


def download(url: str, *ports: int, **options) -> Record:
    record = SourceItem(0, url).new_record()
    stage(*ports, **options).run_one(Item(record, None))
    return record


def outcome(record: Record) -> str:
    return record["reason"] if record["status"] == "failed" else "ok"


# The rules themselves.


def allowed(robots: Robots, path: str) -> bool:
    try:
        robots.check(f"http://example.com{path}")
    except ItemError as error:
        assert error.reason == "disallowed"
        return False
    return True


def test_product_token():
    assert product_token(AGENT) == "pipeline-images"
    assert product_token("Googlebot/2.1") == "googlebot"
    assert product_token("  my_bot ") == "my_bot"


def test_groups_for_our_token_else_star():
    ours = Robots.parse(RULES, "pipeline-images")
    assert allowed(ours, "/a.jpg") and not allowed(ours, "/private/a.jpg")
    assert allowed(ours, "/private/public/a.jpg")  # the longer rule wins
    other = Robots.parse(RULES, "otherbot")  # case-insensitive
    assert not allowed(other, "/a.jpg") and allowed(other, "/robots.txt")
    anyone = Robots.parse(RULES, "somebot")
    assert allowed(anyone, "/private/a.jpg")
    # robotparser's substring match would pick our group for "images": we do not
    assert allowed(Robots.parse(RULES, "images"), "/private/a.jpg")
    assert allowed(Robots.parse("", "pipeline-images"), "/private")


def test_rules_wildcards_ties_and_merged_groups():
    robots = Robots.parse(
        "\ufeffUser-agent: *\nDisallow: /\n\n"
        "User-agent: pipeline-images/2.0\nSitemap: http://x/s.xml\nDisallow: /*.gif$\n"
        "Disallow: /tmp  # a comment\n\nuser-agent: PIPELINE-IMAGES\nAllow: /tmp\n"
        "Disallow: /%7Euser/\nDisallow: /q?*secret\nAllow: /a$\nDisallow: /a\n",
        "pipeline-images",
    )
    assert not allowed(robots, "/x.gif") and allowed(robots, "/x.gif?size=2")
    assert allowed(robots, "/x.jpg")  # our groups replace `*`'s Disallow: /
    assert allowed(robots, "/tmp/a.jpg")  # Allow and Disallow equally long: Allow wins
    assert not allowed(robots, "/~user/a.jpg") and not allowed(robots, "/%7euser/a.jpg")
    assert not allowed(robots, "/q?a=1&secret=2") and allowed(robots, "/q?a=1")
    assert allowed(robots, "/a") and not allowed(robots, "/ab")


def test_a_hostile_pattern_is_matched_in_linear_time():
    robots = Robots.parse("User-agent: *\n" + "Disallow: /" + "*a" * 2000 + "*b$\n", "x")
    started = time.perf_counter()
    assert allowed(robots, "/" + "a" * 8000)
    assert time.perf_counter() - started < 0.5


# Through the guarded client, against a loopback server.


def test_rules_for_several_agents_over_http(rules_server):
    port = rules_server.port
    got = {
        path: outcome(download(rules_server.url(path), port, user_agent=AGENT))
        for path in ("/a.jpg", "/private/a.jpg", "/private/public/a.jpg")
    }
    assert got == {"/a.jpg": "ok", "/private/a.jpg": "disallowed", "/private/public/a.jpg": "ok"}
    assert outcome(download(rules_server.url("/a.jpg"), port, user_agent="OtherBot/1")) == (
        "disallowed"
    )
    record = download(rules_server.url("/private/a.jpg"), port, user_agent="SomeBot/3.0")
    assert outcome(record) == "ok"
    assert download(rules_server.url("/private/a.jpg"), port, robots_agent="otherbot")[
        "message"
    ].startswith("robots.txt disallows /private/a.jpg")
    assert rules_server.hits["/robots.txt"] == 4  # once per option set (one fetcher each)
    assert rules_server.hits.get("/private/a.jpg", 0) == 1  # SomeBot's; never ours


def test_robots_txt_off_by_default(rules_server):
    record = download(
        rules_server.url("/private/a.jpg"), rules_server.port, respect_robots_txt=False
    )
    assert outcome(record) == "ok" and "/robots.txt" not in rules_server.hits


@pytest.mark.parametrize("status", [404, 403, 410])
def test_a_missing_robots_txt_allows_everything(status):
    server = robots_server(None if status == 404 else misbehave.status(status))
    try:
        assert outcome(download(server.url("/private/a.jpg"), server.port)) == "ok"
        assert server.hits["/robots.txt"] == 1
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("handler", "why", "requests"),
    [
        (misbehave.status(500), "(http_5xx: HTTP 500)", 2),
        (misbehave.status(503, {"Retry-After": "0"}), "(http_5xx: HTTP 503)", 2),
        (misbehave.status(429), "(rate_limited: HTTP 429)", 2),
        (misbehave.status(408), "(http_4xx: HTTP 408)", 2),
        (misbehave.drip_body(b"User-agent: *\nAllow: /\n", 0.2), "(timeout: ", 2),
        (misbehave.reset(), "(connection_error: ", 2),
        (text("#" * (ROBOTS_MAX_BYTES + 1)), "(too_large: ", 1),  # not worth a retry
    ],
    ids=["500", "503", "429", "408", "slow", "reset", "huge"],
)
def test_a_failing_robots_txt_disallows_the_host_for_the_run(handler, why, requests):
    server = robots_server(handler)
    try:
        options = {"timeout": 0.5, "retries": 1}
        records = [
            download(server.url(path), server.port, **options) for path in ("/a.jpg", "/b.jpg")
        ]
        reason = "disallowed" if why == "(too_large: " else "robots_unavailable"  # retryable
        for record in records:
            assert outcome(record) == reason, record
            assert why in record["message"] and "the host is disallowed" in record["message"]
        assert server.hits["/robots.txt"] == requests  # for both items: one fetch (+ retry)
        assert "/a.jpg" not in server.hits and "/b.jpg" not in server.hits
    finally:
        server.stop()


def test_robots_txt_goes_through_the_address_policy(rules_server):
    """Not allow-listed, the host's robots.txt is refused like its images would be."""
    record = download(rules_server.url("/a.jpg"))
    assert outcome(record) == "blocked_address"
    assert record["message"].endswith("which is not a public address")
    assert "/robots.txt" not in rules_server.hits


def test_robots_txt_redirected_to_an_internal_address_is_refused(rules_server):
    internal = robots_server(text("User-agent: *\nAllow: /\n"))
    try:
        server = robots_server(misbehave.redirect(internal.url("/robots.txt")))
        try:
            record = download(server.url("/a.jpg"), server.port)  # internal not allowed
            assert outcome(record) == "blocked_address"
            assert record["message"].startswith(f"http://127.0.0.1:{server.port}/robots.txt:")
            assert "/robots.txt" not in internal.hits and "/a.jpg" not in server.hits
        finally:
            server.stop()
    finally:
        internal.stop()


def test_each_redirect_hop_is_checked_against_its_hosts_robots_txt(rules_server):
    start = robots_server(text("User-agent: *\nDisallow: /private\n"))
    try:
        start.add("/to-private", misbehave.redirect(rules_server.url("/private/a.jpg")))
        start.add("/to-public", misbehave.redirect(rules_server.url("/private/public/a.jpg")))
        start.add("/to-own-private", misbehave.redirect("/private/a.jpg"))
        ports = (start.port, rules_server.port)
        got = {
            path: outcome(download(start.url(path), *ports))
            for path in ("/to-public", "/to-private", "/to-own-private")
        }
        assert got == {
            "/to-private": "disallowed",
            "/to-public": "ok",
            "/to-own-private": "disallowed",
        }
        assert start.hits["/robots.txt"] == 1 and rules_server.hits["/robots.txt"] == 1
        assert "/private/a.jpg" not in rules_server.hits and "/private/a.jpg" not in start.hits
        # the first hop to a new host ends the attempt; once its robots.txt is read, the
        # redirect is walked again from the start; later hops there are checked in passing
        assert start.hits["/to-private"] == 1 and start.hits["/to-public"] == 2
    finally:
        start.stop()


def test_threads_of_a_process_fetch_robots_txt_once():
    release = threading.Event()

    def slow_robots(request) -> None:
        release.wait(2)
        send_bytes(request, RULES.encode(), "text/plain")

    server = robots_server(slow_robots)
    try:
        shared = stage(server.port, timeout=3.0)
        paths = ["/a.jpg", "/private/a.jpg"] * 8
        with ThreadPoolExecutor(16) as pool:
            records = [SourceItem(n, server.url(path)).new_record() for n, path in enumerate(paths)]
            futures = [pool.submit(shared.run_one, Item(record, None)) for record in records]
            time.sleep(0.2)  # all 16 wait for the one request in flight
            release.set()
            for future in futures:
                future.result()
        assert [outcome(record) for record in records] == ["ok", "disallowed"] * 8
        assert server.hits["/robots.txt"] == 1
    finally:
        server.stop()


JOB = """\
name: polite
backend: {{kind: {backend}}}
partition_size: 4
output: {out}
stages:
  urls: {{kind: url_list, path: {urls}}}
  download:
    kind: download
    input: urls
    concurrency: 4
    respect_robots_txt: true
    allow_hosts: ["127.0.0.1:{port}"]
  decode: {{kind: decode, input: download}}
  write: {{kind: write_images, input: decode, path: images}}
"""


@pytest.mark.parametrize("backend", ["sync", "threads"])
def test_a_run_reads_robots_txt_once_per_host(tmp_path, backend):
    server = robots_server(text(RULES))
    try:
        paths = ["/a.jpg", "/private/a.jpg", "/private/public/a.jpg", "/b.jpg"] * 6
        urls = tmp_path / "urls.txt"
        urls.write_text("".join(f"{server.url(path)}?n={n}\n" for n, path in enumerate(paths)))
        config = tmp_path / "job.yaml"
        out = tmp_path / "out"
        config.write_text(JOB.format(backend=backend, out=out, urls=urls, port=server.port))
        report = run(RunRequest(config=config))
        assert report["counts"] == {"ok": 18, "failed": 6, "skipped": 0}
        assert server.hits["/robots.txt"] == 1
        lines = (out / "results.jsonl").read_text().splitlines()
        failed = [json.loads(line) for line in lines if '"failed"' in line]
        assert {(r["reason"], r["url"].split("?")[0]) for r in failed} == {
            ("disallowed", server.url("/private/a.jpg"))
        }
    finally:
        server.stop()


def test_example_config_validates_plans_and_runs_offline(tmp_path):
    config = REPO / "configs/robots.yaml"
    job, doc = load_config(config, [f"output={tmp_path / 'out'}"])
    plan = build_plan(job, doc)
    download_options = plan.by_name["download"].options
    assert (
        download_options.respect_robots_txt and download_options.robots_token == "pipeline-images"
    )
    report = run(RunRequest(config=config, overrides=[f"output={tmp_path / 'out'}"]))
    assert report["counts"]["failed"] == 0 and report["counts"]["ok"] > 0


def test_example_config_against_a_loopback_host(tmp_path, monkeypatch, rules_server):
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{rules_server.url('/a.jpg')}\n{rules_server.url('/private/a.jpg')}\n")
    monkeypatch.setenv("URLS", str(urls))
    overrides = [f"output={tmp_path / 'out'}", "stages.download.allow_hosts=[127.0.0.1]"]
    report = run(RunRequest(config=REPO / "configs/robots.yaml", overrides=overrides))
    assert report["counts"] == {"ok": 1, "failed": 1, "skipped": 0}
    assert rules_server.hits["/robots.txt"] == 1


def test_a_redirect_into_an_internal_host_stays_blocked_address(rules_server):
    internal = robots_server(text("User-agent: *\nAllow: /\n"))
    try:
        rules_server.add("/to-internal", misbehave.redirect(internal.url("/a.jpg")))
        record = download(rules_server.url("/to-internal"), rules_server.port)
        assert outcome(record) == "blocked_address"
        assert internal.hits == {}  # neither its robots.txt nor the image was requested
    finally:
        internal.stop()


def test_a_process_keeps_the_verdicts_of_at_most_robots_max_hosts_origins(monkeypatch):
    """Millions of hosts do not grow memory without bound: the least recently used
    verdict goes first, and is fetched again if its host comes back."""
    from pipeline.stages.download import robots

    monkeypatch.setattr(robots, "ROBOTS_MAX_HOSTS", 3)
    fetched: list[str] = []
    cache = robots.RobotsCache(lambda url: fetched.append(url) or b"", "bot")
    for host in ["a", "b", "c", "a", "d"]:  # "a" used again: "b" is the oldest when "d" comes
        cache.check(f"http://{host}.test/x.jpg")
    assert len(cache._verdicts) == 3
    cache.check("http://a.test/y.jpg")
    cache.check("http://b.test/y.jpg")
    assert fetched == [f"http://{host}.test:80/robots.txt" for host in "abcdb"]
