"""The HTTP client lever (issue 16): the download stage's client against libcurl.

`python -m bench.client_lever [--count N] [--in-flight 16]` serves the bench corpus from
the bench's loopback server in a child process (its CPU is not counted) and fetches every
image, in this process, four ways, one after the other, three rounds:

1. `download stage`: the pipeline's `download` stage (`Download.stream`: its guarded
   urllib3 client, deadline, host slots, retries, sha256 of each body), `--in-flight`
   requests at once, as a partition runs it;
2. `guarded urllib3`: its `HttpFetcher.fetch` alone, from `--in-flight` threads;
3. `pycurl easy`: one reused `pycurl.Curl` per thread, from `--in-flight` threads (the GIL
   is released while libcurl works);
4. `pycurl multi`: one thread drives `--in-flight` transfers with `pycurl.CurlMulti`.

The pycurl rows have none of the stage's guards (address policy, redirect checks, caps):
they show what the client itself costs. They need `pip install pycurl` and are skipped,
saying so, without it. It reports CPU ms per request (`time.process_time`) and wall
seconds, and writes `bench/results/client_lever.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.corpus import ensure_corpus
from bench.run import HERE
from pipeline.records import Item, SourceItem

RESULTS = HERE / "results" / "client_lever.md"
SERVER = """
import sys, time
from pathlib import Path
from bench.server import StaticServer
with StaticServer() as server:
    for path in sys.argv[1:]:
        server.add_bytes("/img/" + Path(path).name, Path(path).read_bytes())
    print(server.url("/img/"), flush=True)
    time.sleep(10**6)
"""
JOB = """
name: client-lever
output: {out}
stages:
  urls: {{kind: url_list, path: {urls}}}
  download: {{kind: download, input: urls, allow_hosts: [127.0.0.1], per_host: 64,
              concurrency: {in_flight}}}
  write: {{kind: write_images, input: download, path: images}}
"""

Fetch = Callable[[list[str], int], int]  # (urls, in flight) -> bytes fetched


@contextlib.contextmanager
def child_server(files: list[Path]) -> Iterator[str]:
    """The bench's loopback server in a child process (its CPU is not this process's),
    serving `files` under the URL it yields (+ a file's name)."""
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, *map(str, files)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=HERE.parent,
    )
    try:
        assert server.stdout is not None
        yield server.stdout.readline().strip()
    finally:
        server.kill()
        server.wait()


def download_stage(folder: Path) -> Fetch:
    from pipeline.execution.runner import load_plan

    def fetch(urls: list[str], in_flight: int) -> int:
        config = folder / "job.yaml"
        listed = folder / "urls.txt"
        listed.write_text("".join(url + "\n" for url in urls))
        config.write_text(JOB.format(out=folder / "out", urls=listed, in_flight=in_flight))
        stage = load_plan(str(config)).compile()["download"]
        records = [SourceItem(index, url).new_record() for index, url in enumerate(urls)]
        items = (Item(record, None, {"from": "urls"}) for record in records)
        return sum(len(item.data) for item in stage.stream(items))

    return fetch


def guarded_urllib3(urls: list[str], in_flight: int) -> int:
    from pipeline.stages.download.http import HttpFetcher
    from pipeline.stages.download.options import DownloadOptions

    fetcher = HttpFetcher(DownloadOptions(allow_hosts=("127.0.0.1",), per_host=64))
    with ThreadPoolExecutor(in_flight) as pool:
        return sum(pool.map(lambda url: len(fetcher.fetch(url, {})), urls))


def pycurl_easy(urls: list[str], in_flight: int) -> int:
    import pycurl

    local = threading.local()

    def fetch(url: str) -> int:
        if not hasattr(local, "curl"):
            local.curl = pycurl.Curl()
        body = io.BytesIO()
        local.curl.setopt(pycurl.URL, url)
        local.curl.setopt(pycurl.WRITEDATA, body)
        local.curl.perform()
        return len(body.getvalue())

    with ThreadPoolExecutor(in_flight) as pool:
        return sum(pool.map(fetch, urls))


def pycurl_multi(urls: list[str], in_flight: int) -> int:
    import pycurl

    multi, idle = pycurl.CurlMulti(), [pycurl.Curl() for _ in range(in_flight)]
    bodies: dict[pycurl.Curl, list[bytes]] = {}
    waiting, fetched = list(reversed(urls)), 0
    while waiting or bodies:
        while waiting and idle:
            curl, chunks = idle.pop(), []
            curl.setopt(pycurl.URL, waiting.pop())
            curl.setopt(pycurl.WRITEFUNCTION, chunks.append)
            bodies[curl] = chunks
            multi.add_handle(curl)
        while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        queued = 1
        while queued:
            queued, done, failed = multi.info_read()
            if failed:
                raise RuntimeError(f"pycurl multi: {failed[0][2]}")
            for curl in done:
                fetched += sum(map(len, bodies.pop(curl)))
                multi.remove_handle(curl)
                idle.append(curl)
        multi.select(1.0)
    return fetched


def has_pycurl() -> bool:
    try:
        import pycurl  # noqa: F401
    except ImportError:
        return False
    return True


def measure(fetch: Fetch, urls: list[str], in_flight: int, expected: int) -> tuple[float, float]:
    """CPU ms per request and wall seconds of one pass, which must fetch every byte."""
    cpu, wall = time.process_time(), time.perf_counter()
    fetched = fetch(urls, in_flight)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if fetched != expected:
        raise SystemExit(f"fetched {fetched} bytes, not the corpus's {expected}")
    return 1000 * cpu / len(urls), wall


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="corpus images to fetch")
    parser.add_argument("--in-flight", type=int, default=16, help="requests at once")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown results file")
    args = parser.parse_args(argv)
    files = ensure_corpus(HERE / "corpus", args.count, 2)
    scratch = HERE / "corpus" / "scratch" / "client-lever"
    scratch.mkdir(parents=True, exist_ok=True)
    ways: dict[str, Fetch] = {
        "download stage": download_stage(scratch),
        "guarded urllib3": guarded_urllib3,
    }
    if has_pycurl():
        ways |= {"pycurl easy": pycurl_easy, "pycurl multi": pycurl_multi}
    else:
        print("pycurl rows skipped: pycurl is not installed (pip install pycurl)")
    with child_server(files) as base:
        urls = [base + path.name for path in files]
        expected = sum(path.stat().st_size for path in files)
        found: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, fetch in ways.items():
                found[name].append(measure(fetch, urls, args.in_flight, expected))
    text = report(found, len(urls), args.in_flight)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


def report(found: dict[str, list[tuple[float, float]]], count: int, in_flight: int) -> str:
    lines = [
        f"{count} requests to the loopback bench server, {in_flight} in flight; "
        "CPU ms per request (each round), best round's wall seconds",
        "",
        "| client | CPU ms/request | best | wall s |",
        "|---|---|---|---|",
    ]
    for name, rounds in found.items():
        cpus = " / ".join(f"{cpu:.3f}" for cpu, _ in rounds)
        best = min(rounds)
        lines.append(f"| {name} | {cpus} | {best[0]:.3f} | {best[1]:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
