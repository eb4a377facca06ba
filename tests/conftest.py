"""Shared fixtures: a real loopback HTTP server with images, and config helpers."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pipeline.testing.images import jpeg_bytes, photo, png_bytes
from pipeline.testing.server import TestServer

REPO = Path(__file__).resolve().parents[1]

# What `image_server` serves under test: 13 good images, then 3 that fail
# (404, corrupt JPEG, HTML posing as a JPEG).
SERVED_PATHS = [f"/img/{i}.jpg" for i in range(12)] + [
    "/img/alpha.png",
    "/missing.jpg",
    "/img/corrupt.jpg",
    "/img/page.jpg",
]


def write_url_list(path: Path, server: TestServer) -> Path:
    """A URL list of every path in SERVED_PATHS on `server`."""
    path.write_text("\n".join(server.url(p) for p in SERVED_PATHS) + "\n")
    return path


@pytest.fixture(scope="session")
def image_server():
    """Serves 12 JPEGs, one PNG with alpha, a 404, a corrupt file and HTML posing as JPEG."""
    with TestServer() as server:
        for index in range(12):
            size = (320 + 40 * index, 240 + 30 * index)
            server.add_bytes(f"/img/{index}.jpg", jpeg_bytes(photo(*size, seed=index)))
        transparent = photo(200, 150, seed=99).convert("RGBA")
        transparent.putalpha(128)
        server.add_bytes("/img/alpha.png", png_bytes(transparent), "image/png")
        server.add_bytes("/img/corrupt.jpg", jpeg_bytes(photo(100, 80, seed=1))[:200] + b"x" * 50)
        server.add_bytes("/img/page.jpg", b"<html><body>hello</body></html>", "image/jpeg")
        yield server


@pytest.fixture
def url_list(tmp_path, image_server):
    """A URL list with good images, a 404, a corrupt JPEG and HTML."""
    return write_url_list(tmp_path / "urls.txt", image_server)


@pytest.fixture
def write_config(tmp_path):
    """Write a YAML config (dedented) into tmp_path and return its path."""

    def write(text: str, name: str = "job.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip())
        return path

    return write


# Hypothesis profiles (issue 17): "ci" (the default) is derandomized with a fixed example
# count, so a run is bounded and repeatable; HYPOTHESIS_PROFILE=dev explores more.
import os  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402

_SLOW_FIXTURES = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    max_examples=25,
    deadline=None,
    print_blob=True,
    suppress_health_check=_SLOW_FIXTURES,
)
settings.register_profile(
    "dev", max_examples=300, deadline=None, print_blob=True, suppress_health_check=_SLOW_FIXTURES
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
