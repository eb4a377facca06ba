"""Hostile files: images that lie, break or explode; special files; traversal names.

A naive `Image.open(path).convert("RGB")` would hang on a FIFO, read /dev/zero
forever, decode bombs into gigabytes, load truncated files, show colours hidden
under transparent pixels, clip 16-bit data and ignore EXIF orientation.
"""

from __future__ import annotations

import os
import threading
import unicodedata

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.errors import REASONS
from pipeline.records import Item, JobContext, Record, SourceItem, item_key
from pipeline.stages.decode import Decode, DecodeOptions
from pipeline.stages.download import Download, DownloadOptions
from pipeline.stages.shared.encoding import flatten
from pipeline.stages.thumbnail import Thumbnail, ThumbnailOptions
from pipeline.storage import atomic_write, output_name
from tests.hostile_cases import BLUE, RED, encode, hostile_images

WHITE = (255, 255, 255)
CASES = hostile_images()


def run_stage(stage, url: str, data: object = None) -> tuple[Record, Item | None]:
    record = SourceItem(0, url).new_record()
    return record, stage.run_one(Item(record, data))


def decode(name: str) -> tuple[Record, Item | None]:
    stage = Decode("decode", DecodeOptions(max_pixels=4_000_000), JobContext("hostile", "."))
    return run_stage(stage, f"file:///{name}", CASES[name][0])


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's note on the broken EXIF cases
@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_image_outcome(name):
    record, item = decode(name)
    expected = CASES[name][1]
    if expected is None:
        assert record["status"] == "ok", record
        assert item.data.mode in ("RGB", "RGBA", "L")
    else:
        assert (record["status"], record["reason"]) == ("failed", expected), record
        assert expected in REASONS


def pixels(name: str, background=WHITE) -> np.ndarray:
    """The decoded image as the JPEG writer sees it: RGB, flattened onto `background`."""
    image = flatten(decode(name)[1].data, background).convert("RGB")
    return np.asarray(image).astype(int)


def test_format_comes_from_the_bytes_not_the_name():
    assert decode("png-named.jpg")[0]["format"] == "PNG"


def test_exif_orientation_applied():
    record, item = decode("rotated.jpg")
    assert item.data.size == (30, 60)  # stored 60x30, shown turned a quarter
    assert (record["width"], record["height"]) == (30, 60)  # the record says as shown


def test_animated_gives_the_first_frame():
    assert tuple(pixels("animated.gif")[10, 15]) == BLUE


@pytest.mark.parametrize(
    "name", ["hidden-colour.png", "palette-transparent.gif", "colour-key.png", "la.png"]
)
def test_transparent_pixels_never_show_hidden_colour(name):
    image = pixels(name)
    assert tuple(image[10, 5]) == WHITE  # transparent: the background, not red/black
    if name != "la.png":
        assert tuple(image[10, 35]) == BLUE


def test_16_bit_is_scaled_not_clipped():
    ramp = pixels("gray16.png")[0, :, 0]
    assert ramp[0] == 0 and ramp[-1] == 255
    assert np.all(np.diff(ramp) >= 0) and 120 < ramp.mean() < 135  # clipping gives ~254


def test_cmyk_and_one_bit():
    assert np.allclose(pixels("cmyk.jpg")[10, 15], RED, atol=12)
    assert decode("onebit.png")[1].data.mode == "L" and pixels("onebit.png").min() == 255


def test_extreme_sizes():
    assert decode("wide.png")[1].data.size == (20000, 10)
    assert decode("dot.png")[1].data.size == (1, 1)


def test_jpeg_draft_still_used_for_small_consumers():
    job = JobContext("hostile", ".")
    stage = Decode("decode", DecodeOptions(), job)
    stage.connect([Thumbnail("thumb", ThumbnailOptions(size=(32, 32)), job)])
    record, item = run_stage(
        stage, "file:///big.jpg", encode(Image.new("RGB", (2000, 1000)), "JPEG")
    )
    assert (record["width"], record["height"]) == (2000, 1000)
    assert item.data.size == (250, 125)  # decoded at 1/8 scale, not in full


def test_eps_can_never_be_allowed():
    with pytest.raises(ValueError):
        DecodeOptions(formats=["JPEG", "EPS"])


# Local files and other filesystems.


def fetch(url: str, **options) -> Record:
    """Download `url` in a thread; fail the test (not hang) if it blocks."""
    settings = {"allow_schemes": ["file", "memory"], **options}
    stage = Download("download", DownloadOptions(**settings), JobContext("hostile", "."))
    result: list[Record] = []
    worker = threading.Thread(target=lambda: result.append(run_stage(stage, url)[0]), daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert result, f"download of {url} blocked"
    return result[0]


def test_special_files_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    for path in (fifo, "/dev/zero", tmp_path / "folder.jpg", tmp_path / "dangling.jpg"):
        record = fetch(str(path))
        assert (record["status"], record["reason"]) == ("failed", "not_regular_file"), path


def test_size_decided_from_stat_without_reading(tmp_path):
    sparse = tmp_path / "huge.jpg"
    with open(sparse, "wb") as handle:
        handle.truncate(20 * 1024**3)  # 20 GB, no blocks: reading it would take minutes
    assert fetch(sparse.as_uri(), max_bytes=1_000_000)["reason"] == "too_large"


def test_missing_empty_and_encoded_paths(tmp_path):
    assert fetch(str(tmp_path / "nope.jpg"))["reason"] == "not_found"
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert fetch(str(tmp_path / "empty.jpg"))["reason"] == "empty"
    (tmp_path / "a b#c.jpg").write_bytes(b"abc")
    assert fetch((tmp_path / "a b#c.jpg").as_uri())["bytes"] == 3


def test_symlinks_leaving_the_input_root(tmp_path):
    root, outside = tmp_path / "inputs", tmp_path / "secret.jpg"
    root.mkdir()
    outside.write_bytes(b"secret")
    (root / "inside.jpg").write_bytes(b"fine")
    (root / "escape.jpg").symlink_to(outside)
    (root / "alias.jpg").symlink_to(root / "inside.jpg")
    assert fetch(str(root / "escape.jpg"), local_root=str(root))["reason"] == "outside_root"
    assert fetch(f"{root}/../secret.jpg", local_root=str(root))["reason"] == "outside_root"
    assert fetch(str(root / "alias.jpg"), local_root=str(root))["status"] == "ok"
    assert fetch(str(root / "escape.jpg"))["status"] == "ok"  # no root: links are followed


def test_fsspec_schemes_when_allowed():
    fs = fsspec.filesystem("memory")
    fs.pipe("/hostile/a.jpg", b"abc")
    fs.pipe("/hostile/big.jpg", bytes(2000))
    fs.mkdir("/hostile/dir")
    assert fetch("memory://hostile/a.jpg")["bytes"] == 3
    assert fetch("memory://hostile/big.jpg", max_bytes=1000)["reason"] == "too_large"
    assert fetch("memory://hostile/dir")["reason"] == "not_regular_file"
    assert fetch("memory://hostile/missing.jpg")["reason"] == "not_found"
    assert fetch("memory://hostile/a.jpg", allow_schemes=["file"])["reason"] == "blocked_scheme"


# Output names.

TRAVERSAL_URLS = [
    "http://h/../../etc/passwd",
    "http://h/a/%2e%2e%2f%2e%2e%2fescape.jpg",
    "http://h/%2e%2e/%2E%2E/x.jpg",
    "http://h/..%5c..%5cwin.jpg",
    "file:///etc/passwd",
    "/absolute/path/abs.jpg",
    "http://h/nul%00byte.jpg",
    "http://h/new%0aline.jpg",
    "http://h/" + "long" * 300 + ".jpg",
    "http://h/Photo.JPG",
    "http://h/photo.jpg",
    "http://h/caf\u00e9.jpg",  # NFC
    "http://h/cafe\u0301.jpg",  # NFD: the same name to a normalising filesystem
    "http://h/x.jpg?size=1",
    "http://h/x.jpg?size=2",
    "http://h/x.jpg#frag",
    "http://h/",
    "http://h/.jpg",
    "http://h/...",
    "http://h/CON.jpg",
]


def test_output_names_stay_inside_and_never_collide(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    names = []
    for url in TRAVERSAL_URLS:
        name = output_name({"url": url, "key": item_key(url)}, "jpg")
        assert os.path.dirname(name) == "" and not name.startswith(".")
        assert not any(ch in name for ch in "/\\\x00\n\r") and len(name) <= 80
        atomic_write(str(out / name), url.encode())
        names.append(name)
    folded = {unicodedata.normalize("NFKC", name).casefold() for name in names}
    assert len(folded) == len(TRAVERSAL_URLS)  # distinct even on a case-folding filesystem
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["out", *names])
    for url, name in zip(TRAVERSAL_URLS, names, strict=True):
        assert (out / name).read_bytes() == url.encode()  # nothing overwritten
