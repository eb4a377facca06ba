"""The download stage against a real loopback server that misbehaves in every way.

Each case asserts the outcome and reason a naive requests.get(url).content would
not give: it would follow redirects into internal addresses, wait forever on a
dripping server, decode a gzip bomb into memory, retry nothing, or reuse a
half-read connection.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from pathlib import Path

import pytest

from pipeline.records import Item, JobContext, Record, SourceItem
from pipeline.stages.download import Download, DownloadOptions
from pipeline.stages.download.policy import AllowEntry, parse_retry_after
from pipeline.testing import server as misbehave
from pipeline.testing.server import TestServer, send_bytes
from tests.conftest import REPO
from tests.hostile_cases import IMAGE, add_hostile_routes, hostile_images

FAST = {"timeout": 1.0, "connect_timeout": 1.0, "read_timeout": 1.0, "backoff": 0.01}


@pytest.fixture(scope="module")
def internal():
    """A second loopback server standing in for an internal service (not allow-listed)."""
    with TestServer() as server:
        server.add_bytes("/secret.jpg", IMAGE)
        yield server


@pytest.fixture(scope="module")
def hostile(internal):
    with TestServer() as server:
        add_hostile_routes(server, internal)
        yield server


def download(url: str, server: TestServer | None = None, **options) -> tuple[Record, Item | None]:
    """Run one URL through a download stage; the loopback `server` is allow-listed."""
    allow = [f"127.0.0.1:{server.port}"] if server else []
    settings = {**FAST, "retries": 0, "allow_hosts": allow, **options}
    stage = Download("download", DownloadOptions(**settings), JobContext("hostile", "."))
    record = SourceItem(0, url).new_record()
    return record, stage.run_one(Item(record, None))


def failed(record: Record) -> str:
    assert record["status"] == "failed", record
    return record["reason"]


def test_ok_with_allow_listed_loopback(hostile):
    record, item = download(hostile.url("/ok.jpg"), hostile)
    assert record["status"] == "ok" and item is not None and item.data == IMAGE
    assert record["attempts"] == 1


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "2130706433",  # decimal
        "0x7f000001",  # hex
        "0177.0.0.1",  # octal
        "127.1",
        "localhost",
        "[::1]",
        "[::ffff:127.0.0.1]",  # IPv4-mapped IPv6
        "0.0.0.0",
        "10.0.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata, link-local
        "224.0.0.1",  # multicast
        "240.0.0.1",  # reserved
    ],
)
def test_non_public_addresses_refused_in_every_spelling(internal, host):
    hits = dict(internal.hits)
    record, _ = download(f"http://{host}:{internal.port}/secret.jpg")
    assert failed(record) == "blocked_address"
    assert internal.hits == hits  # never connected


@pytest.mark.parametrize("path", ["/to-internal", "/to-metadata", "/to-decimal"])
def test_redirect_to_a_blocked_address_is_refused_on_that_hop(hostile, internal, path):
    hits = dict(internal.hits)
    record, _ = download(hostile.url(path), hostile)
    assert failed(record) == "blocked_address"
    assert internal.hits == hits


def test_allow_hosts_entries():
    assert AllowEntry.parse("127.0.0.1:8080").port == 8080
    assert AllowEntry.parse("[::1]:80").network is not None
    assert str(AllowEntry.parse("10.0.0.0/8").network) == "10.0.0.0/8"
    assert AllowEntry.parse("localhost").host == "localhost"
    with pytest.raises(ValueError):
        DownloadOptions(allow_hosts=["::1:80:x"])


def test_redirect_to_a_blocked_scheme(hostile):
    record, _ = download(hostile.url("/to-file"), hostile, allow_schemes=["http", "file"])
    assert failed(record) == "blocked_scheme"


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/a.jpg",
        "gopher://example.com/",
        "data:image/png;base64,AAAA",
        "/etc/passwd",
    ],
)
def test_schemes_outside_allow_schemes(url):
    record, _ = download(url)
    assert failed(record) == "blocked_scheme"


@pytest.mark.parametrize(
    "url", ["http://", "http://[::1/a.jpg", "http://a.com:99999/", "http://a/\n"]
)
def test_invalid_urls(url):
    record, _ = download(url)
    assert failed(record) == "invalid_url"


@pytest.mark.parametrize("path", ["/loop", "/ping", "/chain5"])
def test_redirect_loops_and_long_chains(hostile, path):
    record, _ = download(hostile.url(path), hostile, max_redirects=3)
    assert failed(record) == "too_many_redirects"


def test_redirects_within_the_limit_are_followed(hostile):
    record, item = download(hostile.url("/chain3"), hostile, max_redirects=3)
    assert record["status"] == "ok" and item.data == IMAGE


def test_404_is_not_retried(hostile):
    before = hostile.hits.get("/404", 0)
    record, _ = download(hostile.url("/404"), hostile, retries=3)
    assert failed(record) == "http_4xx" and record["attempts"] == 1
    assert hostile.hits["/404"] == before + 1


@pytest.mark.parametrize(("path", "reason"), [("/500", "http_5xx"), ("/408", "http_4xx")])
def test_transient_statuses_are_retried_then_recorded(hostile, path, reason):
    before = hostile.hits.get(path, 0)
    record, _ = download(hostile.url(path), hostile, retries=2)
    assert failed(record) == reason and record["attempts"] == 3
    assert hostile.hits[path] == before + 3


def test_flaky_server_then_ok(hostile):
    record, item = download(hostile.url("/flaky"), hostile, retries=2)
    assert record["status"] == "ok" and item.data == IMAGE and record["attempts"] == 3


def test_429_retry_after_is_capped(hostile):
    started = time.monotonic()
    record, _ = download(hostile.url("/429"), hostile, retries=1, retry_after_max=0.2)
    assert failed(record) == "rate_limited" and record["attempts"] == 2
    assert time.monotonic() - started < 3  # not the 3600 s the server asked for


def test_retry_after_is_honoured(hostile):
    wait = {"Retry-After": "1"}
    hostile.add(
        "/429-once", misbehave.flaky(1, misbehave.status(429, wait), hostile.routes["/ok.jpg"])
    )
    started = time.monotonic()
    record, _ = download(hostile.url("/429-once"), hostile, retries=1)
    assert record["status"] == "ok" and record["attempts"] == 2
    assert time.monotonic() - started >= 0.9  # a sleep never returns early


def test_retry_after_forms():
    assert parse_retry_after("7") == 7.0
    assert 25 < parse_retry_after(formatdate(time.time() + 30, usegmt=True)) <= 30
    assert parse_retry_after("soon") is None


@pytest.mark.parametrize("path", ["/slow-headers", "/slow-body"])
def test_dripping_server_hits_the_total_deadline(hostile, path):
    started = time.monotonic()
    record, _ = download(hostile.url(path), hostile, timeout=1.0, read_timeout=0.5, retries=1)
    assert failed(record) == "timeout" and record["attempts"] == 2
    assert time.monotonic() - started < 6  # 2 attempts of 1 s, not the minutes a drip takes


def test_short_body_is_incomplete(hostile):
    record, _ = download(hostile.url("/short"), hostile)
    assert failed(record) == "incomplete_body"


def test_declared_length_over_cap_refused_before_reading(hostile):
    record, _ = download(hostile.url("/liar"), hostile, max_bytes=1_000_000)
    assert failed(record) == "too_large" and "Content-Length" in record["message"]


def test_chunked_body_with_a_small_content_length_is_still_capped(hostile):
    record, _ = download(hostile.url("/chunked-liar"), hostile, max_bytes=1_000_000)
    assert failed(record) == "too_large"


def test_endless_body_stops_at_the_cap(hostile):
    started = time.monotonic()
    record, _ = download(hostile.url("/endless"), hostile, max_bytes=2_000_000, timeout=5)
    assert failed(record) == "too_large"
    assert time.monotonic() - started < 4


def test_gzip_bomb_counts_decoded_bytes_with_bounded_memory(hostile):
    tracemalloc.start()
    try:
        record, _ = download(hostile.url("/gzip-bomb"), hostile, max_bytes=4_000_000, timeout=5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert failed(record) == "too_large" and "decoded" in record["message"]
    assert peak < 16_000_000  # the bomb inflates to 64 MB


@pytest.mark.parametrize("path", ["/not-http", "/many-headers"])
def test_protocol_errors(hostile, path):
    record, _ = download(hostile.url(path), hostile, retries=2)
    assert failed(record) == "protocol_error" and record["attempts"] == 1


def test_connection_reset(hostile):
    record, _ = download(hostile.url("/reset"), hostile, retries=1)
    assert failed(record) == "connection_error" and record["attempts"] == 2


def test_refused_connection(hostile):
    with TestServer() as gone:
        port = gone.port
    record, _ = download(f"http://127.0.0.1:{port}/a.jpg", allow_hosts=[f"127.0.0.1:{port}"])
    assert failed(record) == "connection_error"


def test_connect_timeout():
    with socket.create_server(("127.0.0.1", 0), backlog=0) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):  # fills the backlog: SYNs are dropped
            started = time.monotonic()
            record, _ = download(
                f"http://127.0.0.1:{port}/a.jpg",
                allow_hosts=[f"127.0.0.1:{port}"],
                connect_timeout=0.3,
            )
    assert failed(record) == "timeout" and "connect" in record["message"]
    assert time.monotonic() - started < 2


@pytest.fixture(scope="module")
def tls(tmp_path_factory, internal):
    """An https server with a self-signed certificate for 127.0.0.1, and that certificate."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    request = "req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1"
    san = ["-addext", "subjectAltName=IP:127.0.0.1"]
    files = ["-keyout", str(key), "-out", str(cert)]
    subprocess.run(["openssl", *request.split(), *san, *files], check=True, capture_output=True)
    with TestServer(certificate=(str(cert), str(key))) as server:
        server.add_bytes("/ok.jpg", IMAGE)
        server.add("/slow-body", misbehave.drip_body(IMAGE, 0.01))
        server.add("/to-internal", misbehave.redirect(internal.url("/secret.jpg")))
        yield server, cert


def test_https_under_the_same_policy(tls, internal, monkeypatch):
    server, cert = tls
    assert failed(download(server.url("/ok.jpg"))[0]) == "blocked_address"
    assert failed(download(server.url("/ok.jpg"), server)[0]) == "connection_error"  # untrusted
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust it from now on
    record, item = download(server.url("/ok.jpg"), server, user_agent="tls-test")
    assert record["status"] == "ok" and item.data == IMAGE
    assert failed(download(server.url("/slow-body"), server)[0]) == "timeout"  # cut under TLS
    assert failed(download(server.url("/to-internal"), server)[0]) == "blocked_address"


@pytest.mark.parametrize("path", ["/big", "/404", "/500", "/noai.jpg", "/loop"])
def test_failed_responses_never_poison_the_pool(hostile, path):
    options = {"max_bytes": 1_000_000, "respect_robots_tag": True}  # same options, same pool
    assert failed(download(hostile.url(path), hostile, **options)[0])
    for _ in range(3):
        record, item = download(hostile.url("/ok.jpg"), hostile, **options)
        assert record["status"] == "ok" and item.data == IMAGE


def test_x_robots_tag_noimageai(hostile):
    record, _ = download(hostile.url("/noai.jpg"), hostile, respect_robots_tag=True)
    assert failed(record) == "disallowed"
    record, _ = download(hostile.url("/noai.jpg"), hostile)
    assert record["status"] == "ok"


class SlowImage:
    """A handler that takes 0.15 s per answer and records the most requests at once
    and each request's User-Agent."""

    def __init__(self) -> None:
        self.active = self.peak = 0
        self.user_agents: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, request) -> None:
        with self._lock:
            self.user_agents.append(request.headers["User-Agent"])
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(0.15)
        with self._lock:
            self.active -= 1
        send_bytes(request, IMAGE, "image/jpeg")


def test_user_agent_and_per_host_limit(hostile):
    slow_image = SlowImage()
    hostile.add("/slow.jpg", slow_image)
    options = {**FAST, "allow_hosts": [f"127.0.0.1:{hostile.port}"], "concurrency": 8}
    options.update(per_host=2, user_agent="test-bot/1.0 (+mailto:ops@example.invalid)")
    stage = Download("download", DownloadOptions(**options), JobContext("hostile", "."))
    items = [
        Item(SourceItem(i, hostile.url("/slow.jpg") + f"?{i}").new_record(), None) for i in range(8)
    ]
    results = list(stage.stream(items))
    assert len(results) == 8 and all(item.data == IMAGE for item in results)
    assert slow_image.peak <= 2
    assert set(slow_image.user_agents) == {"test-bot/1.0 (+mailto:ops@example.invalid)"}


def test_a_hanging_dns_lookup_is_cut_by_the_deadline(hostile, monkeypatch):
    """The OS resolver may wait many seconds for a DNS server that never answers."""
    real_getaddrinfo = socket.getaddrinfo

    def resolver(host, *args, **kwargs):
        if host == "slow-dns.test":
            time.sleep(5)  # a DNS server that does not answer
            host = "127.0.0.1"
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    started = time.monotonic()
    url = f"http://slow-dns.test:{hostile.port}/ok.jpg"
    allow = [f"slow-dns.test:{hostile.port}", f"127.0.0.1:{hostile.port}"]
    with ThreadPoolExecutor(21) as pool:  # 20 hanging lookups do not hold up a good one
        hanging = [pool.submit(download, url, allow_hosts=allow, timeout=0.5) for _ in range(20)]
        good = pool.submit(download, hostile.url("/ok.jpg"), allow_hosts=allow, timeout=0.5)
        assert good.result()[0]["status"] == "ok"
        for future in hanging:
            record, _ = future.result()
            assert failed(record) == "timeout" and "resolving slow-dns.test" in record["message"]
    assert time.monotonic() - started < 2


def test_per_host_limits_the_whole_process_not_each_partition(hostile):
    """Two partitions on two task threads of one process share per_host 2 (issue 14)."""
    slow_image = SlowImage()
    hostile.add("/slow-shared.jpg", slow_image)
    options = {**FAST, "allow_hosts": [f"127.0.0.1:{hostile.port}"], "concurrency": 8}
    stage = Download("download", DownloadOptions(**options, per_host=2), JobContext("h", "."))

    def partition(first: int) -> list[Item]:
        urls = [hostile.url("/slow-shared.jpg") + f"?{i}" for i in range(first, first + 6)]
        items = [Item(SourceItem(i, url).new_record(), None) for i, url in enumerate(urls)]
        return list(stage.stream(items))

    with ThreadPoolExecutor(2) as workers:
        results = [item for part in workers.map(partition, (0, 6)) for item in part]
    assert len(results) == 12 and all(item.data == IMAGE for item in results)
    assert slow_image.peak == 2  # both partitions at once, within the one limit


# The whole pipeline on a hostile URL list, in a subprocess that reports its peak memory.

# VmHWM, not ru_maxrss: ru_maxrss survives fork and exec, so it would count the RSS
# of the pytest process that started this one; VmHWM belongs to this address space.
PEAK_RSS = """
import re, sys
from pathlib import Path
from pipeline.cli import main
code = main(sys.argv[1:])
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))
print("peak_rss_mb", peak_kb // 1024, file=sys.stderr)
sys.exit(code)
"""

NETWORK_OUTCOMES = {
    "/ok.jpg": None,
    "/png-as-html.jpg": None,
    "/disposition.jpg": None,
    "/x/%2E%2E%2F%2E%2E%2Fescape.jpg": None,
    "/x/..%5C..%5Cwin.jpg": None,
    "/html-as-jpeg.jpg": "not_an_image",
    "/404": "http_4xx",
    "/500": "http_5xx",
    "/429": "rate_limited",
    "/loop": "too_many_redirects",
    "/ping": "too_many_redirects",
    "/to-internal": "blocked_address",
    "/to-metadata": "blocked_address",
    "/to-decimal": "blocked_address",
    "/to-file": "blocked_scheme",
    "/slow-headers": "timeout",
    "/slow-body": "timeout",
    "/short": "incomplete_body",
    "/endless": "too_large",
    "/gzip-bomb": "too_large",
    "/liar": "too_large",
    "/reset": "connection_error",
    "/not-http": "protocol_error",
    "/noai.jpg": "disallowed",
}

HOSTILE_JOB = """
name: hostile
backend: {{kind: threads, workers: 2}}
partition_size: 8
output: {out}
stages:
  urls: {{kind: url_list, path: {urls}}}
  download:
    kind: download
    input: urls
    concurrency: 8
    timeout: 1
    connect_timeout: 1
    read_timeout: 0.5
    retries: 1
    backoff: 0.01
    retry_after_max: 0.2
    max_bytes: 4000000
    respect_robots_tag: true
    allow_schemes: [http, file]
    allow_hosts: ["127.0.0.1:{port}"]
  decode: {{kind: decode, input: download, max_pixels: 4000000}}
  thumb: {{kind: thumbnail, input: decode, size: [64, 64]}}
  write: {{kind: write_images, input: thumb, path: images, format: jpeg}}
"""


def hostile_inputs(
    folder: Path, hostile: TestServer, internal: TestServer
) -> dict[str, str | None]:
    """URL or path -> expected reason (None: ok), with the files written under `folder`."""
    expected = {hostile.url(path): reason for path, reason in NETWORK_OUTCOMES.items()}
    expected[f"http://2130706433:{internal.port}/secret.jpg"] = "blocked_address"
    expected["ftp://127.0.0.1/a.jpg"] = "blocked_scheme"
    for name, (data, reason) in hostile_images().items():
        (folder / name).write_bytes(data)
        expected[str(folder / name)] = reason
    os.mkfifo(folder / "fifo.jpg")
    (folder / "dir.jpg").mkdir()
    with open(folder / "sparse.jpg", "wb") as handle:
        handle.truncate(10 * 1024**3)
    expected.update({str(folder / "fifo.jpg"): "not_regular_file", "/dev/zero": "not_regular_file"})
    expected.update(
        {str(folder / "dir.jpg"): "not_regular_file", str(folder / "sparse.jpg"): "too_large"}
    )
    return expected


def tree(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


@pytest.mark.slow
def test_hostile_run_is_bounded_and_truthful(tmp_path, hostile, internal):
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    expected = hostile_inputs(inputs, hostile, internal)
    urls = tmp_path / "urls.txt"
    urls.write_text("\n".join(expected) + "\n")
    config = tmp_path / "hostile.yaml"
    config.write_text(HOSTILE_JOB.format(out=out, urls=urls, port=hostile.port))
    before = tree(tmp_path)

    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, "run", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    wall = time.monotonic() - started
    assert result.returncode == 1, result.stderr  # finished, with failed items

    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_input = {record["url"]: record for record in records}
    assert len(records) == len(expected) == len(by_input)
    for url, reason in expected.items():
        record = by_input[url if "://" in url else Path(url).as_uri()]
        assert record["reason"] == reason, (url, record)
    assert by_input[hostile.url("/short")]["stage"] == "download"  # never decoded

    written = tree(tmp_path) - before
    assert all(path == "out" or path.startswith("out/") for path in written), written
    images = list((out / "images").iterdir())
    assert len(images) == sum(reason is None for reason in expected.values())
    assert all(p.suffix == ".jpg" and b"payload" not in p.read_bytes() for p in images)

    peak_mb = int(result.stderr.rsplit("peak_rss_mb", 1)[1])
    worst_item = max(sum(record["timings"].values()) for record in records)
    print(
        f"\nhostile run: {len(records)} items, wall {wall:.1f}s, "
        f"worst item {worst_item:.2f}s, peak RSS {peak_mb} MB"
    )
    assert worst_item < 5  # two attempts of a 1 s deadline, plus backoff
    assert wall < 60
    assert peak_mb < 200  # a naive run holds a 64 MB gzip bomb, /dev/zero, a 10 GB file...
