"""The two reference points, on the same corpus as the pipeline.

* `ceiling`: the CPU ceiling. The JPEG bytes are already in memory; each core
  runs decode -> thumbnail -> encode in a tight loop, with Pillow's JPEG draft
  mode scaling the decode to the final size (the smallest DCT scale that still
  covers the fitted thumbnail). No network, no disk, no IPC.
* `tutorial`: the classic approach: a ThreadPoolExecutor downloads (urllib,
  a new connection per request) and feeds a ProcessPoolExecutor that calls
  `Image.thumbnail` and saves the file.
* `download`: only the downloads (urllib3 pool, connections reused): how fast
  the loopback server can serve, so it is known not to be the bottleneck; and
  the same with a new connection per request (the connection-reuse lever).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import urllib.request
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import urllib3
from PIL import Image

from pipeline.stages.shared.imaging import fit_inside

BOX = (256, 256)
QUALITY = 85

_corpus: list[bytes] = []


def thumbnail_bytes(data: bytes) -> bytes:
    """The ceiling's unit of work: decode scaled by DCT (draft) to the final size, fit
    inside the box, encode."""
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", fit_inside(image.size, BOX))
    image.thumbnail(BOX, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=QUALITY)
    return buffer.getvalue()


def _ceiling_share(worker: int, workers: int) -> int:
    for data in _corpus[worker::workers]:
        thumbnail_bytes(data)
    return len(_corpus[worker::workers])


def ceiling(corpus: list[bytes], workers: int) -> int:
    """Thumbnail every image in memory on `workers` forked processes; the count done."""
    global _corpus
    _corpus = corpus
    context = multiprocessing.get_context("fork")  # children share the bytes, no copy
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        return sum(pool.map(_ceiling_share, range(workers), [workers] * workers))


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def _tutorial_thumbnail(data: bytes, path: str) -> None:
    image = Image.open(io.BytesIO(data))
    image.thumbnail(BOX)
    image.convert("RGB").save(path, "JPEG", quality=QUALITY)


def tutorial(urls: list[str], out: Path, workers: int, downloads: int = 16) -> int:
    """Threads download, processes make thumbnails; the count written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [str(out / f"{index:07d}.jpg") for index in range(len(urls))]
    with (
        ThreadPoolExecutor(downloads) as fetchers,
        ProcessPoolExecutor(workers) as thumbnailers,
    ):
        futures = [
            thumbnailers.submit(_tutorial_thumbnail, data, path)
            for data, path in zip(fetchers.map(_fetch, urls), paths, strict=True)
        ]
        for future in futures:
            future.result()
    return sum(1 for path in paths if os.path.exists(path))


def download_only(urls: list[str], reuse: bool = True, concurrency: int = 16) -> int:
    """Fetch every URL, through one reused connection pool or with a new connection
    per request (urllib); the bytes received."""
    pool = urllib3.PoolManager(maxsize=concurrency)

    def fetch(url: str) -> int:
        return len(pool.request("GET", url).data if reuse else _fetch(url))

    with ThreadPoolExecutor(concurrency) as fetchers:
        return sum(fetchers.map(fetch, urls))
