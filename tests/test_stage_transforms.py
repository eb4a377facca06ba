"""Transforms on real images: resize modes, crop, rotate/flip, convert, arrays, stats, hashes,
user functions; and a job that chains them on every local backend."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter
from pydantic import ValidationError

from pipeline.errors import ItemError
from pipeline.records import Item, JobContext, SourceItem
from pipeline.stages.registry import stage_kinds
from pipeline.testing.images import photo
from tests.stage_jobs import records, run_job, write_photos

JOB = JobContext("test", "/nonexistent")


def apply(kind: str, image, **options):
    """Run one stage kind on one payload; return (payload, record)."""
    cls = stage_kinds()[kind]
    stage = cls(kind, cls.Options(**options), JOB)
    item = Item(SourceItem(1, "http://h/a.jpg").new_record(), image)
    result = stage.run_one(item)
    if result is None:
        raise ItemError(item.record["reason"], item.record["message"])
    return result.data, result.record


@pytest.fixture(scope="module")
def landscape():
    return photo(300, 200, seed=3)


@pytest.mark.parametrize(
    ("options", "size"),
    [
        ({"size": [100, 100]}, (100, 67)),
        ({"size": [100, 100], "mode": "cover"}, (100, 100)),
        ({"size": [100, 100], "mode": "pad"}, (100, 100)),
        ({"size": [100, 50], "mode": "stretch"}, (100, 50)),
        ({"size": [600, 600]}, (600, 400)),
        ({"size": [600, 600], "only_if_bigger": True}, (300, 200)),
        ({"size": [120, 120], "mode": "cover", "resample": "nearest"}, (120, 120)),
    ],
)
def test_resize_modes(landscape, options, size):
    assert apply("resize", landscape, **options)[0].size == size


def test_resize_pad_uses_the_colour_and_cover_keeps_the_centre(landscape):
    padded = np.asarray(
        apply("resize", landscape, size=[100, 100], mode="pad", pad_color=[255, 0, 0])[0]
    )
    assert padded[0, 50].tolist() == [255, 0, 0] and padded[50, 50].tolist() != [255, 0, 0]
    covered = np.asarray(
        apply("resize", landscape, size=[200, 200], mode="cover", resample="box")[0]
    )
    centre = np.asarray(landscape.crop((50, 0, 250, 200)))
    assert np.abs(covered.astype(int) - centre).mean() < 3


def test_crop_box_and_centre(landscape):
    assert apply("crop", landscape, box=[10, 20, 110, 70])[0].size == (100, 50)
    assert apply("crop", landscape, center=[100, 500])[0].size == (100, 200)
    with pytest.raises(ItemError, match="exceeds the 300x200"):
        apply("crop", landscape, box=[0, 0, 400, 10])
    with pytest.raises(ValidationError, match="exactly one"):
        stage_kinds()["crop"].Options(box=[0, 0, 1, 1], center=[1, 1])


def test_rotate_and_flip_move_pixels_exactly(landscape):
    pixels = np.asarray(landscape)
    assert np.array_equal(np.asarray(apply("rotate", landscape, angle=90)[0]), np.rot90(pixels))
    assert np.array_equal(np.asarray(apply("rotate", landscape, angle=-180)[0]), pixels[::-1, ::-1])
    assert apply("rotate", landscape, angle=30)[0].size == (360, 324)
    assert apply("rotate", landscape, angle=30, expand=False)[0].size == (300, 200)
    assert np.array_equal(
        np.asarray(apply("flip", landscape, direction="horizontal")[0]), pixels[:, ::-1]
    )
    assert np.array_equal(
        np.asarray(apply("flip", landscape, direction="vertical")[0]), pixels[::-1]
    )


def test_convert_flattens_alpha_on_the_background():
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert apply("convert", clear, mode="RGB", background=[0, 128, 255])[0].getpixel((0, 0)) == (
        0,
        128,
        255,
    )
    assert apply("convert", clear, mode="L")[0].getpixel((0, 0)) == 255
    assert apply("convert", Image.new("L", (4, 4), 9), mode="RGBA")[0].getpixel((0, 0)) == (
        9,
        9,
        9,
        255,
    )


def test_to_array_dtype_order_and_normalisation(landscape):
    array, record = apply("to_array", landscape)
    assert array.dtype == np.uint8 and array.shape == (200, 300, 3)
    assert record["array_shape"] == [200, 300, 3]
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    chw, _ = apply("to_array", landscape, dtype="float32", channels="first", mean=mean, std=std)
    assert chw.dtype == np.float32 and chw.shape == (3, 200, 300)
    expected = (np.asarray(landscape, np.float32) / 255 - mean) / std
    assert np.allclose(chw, expected.transpose(2, 0, 1), atol=1e-5)
    with pytest.raises(ValidationError, match="float dtype"):
        stage_kinds()["to_array"].Options(mean=[0.5])


def test_stats_measure_colour_brightness_and_sharpness(landscape):
    stats = apply("stats", Image.new("RGB", (20, 10), (200, 100, 0)))[1]["results"]["stats"]
    assert stats["mean_color"] == [200.0, 100.0, 0.0]
    assert stats["brightness"] == pytest.approx(0.299 * 200 + 0.587 * 100, abs=1)
    assert stats["sharpness"] == 0.0
    sharp = apply("stats", landscape)[1]["results"]["stats"]["sharpness"]
    blurry = landscape.filter(ImageFilter.GaussianBlur(3))
    assert apply("stats", blurry)[1]["results"]["stats"]["sharpness"] < sharp / 5


@pytest.mark.parametrize("algorithm", ["phash", "dhash"])
def test_phash_is_stable_for_near_copies_and_far_for_others(landscape, algorithm):
    def bits(image):
        return int(apply("phash", image, algorithm=algorithm)[1]["results"]["phash"], 16)

    original = bits(landscape)
    assert (original ^ bits(landscape.resize((150, 100)))).bit_count() <= 4
    assert (original ^ bits(photo(300, 200, seed=4))).bit_count() >= 16


def test_python_functions_on_images_and_records(landscape):
    inverted, _ = apply("python", landscape, function="tests.stage_userfuncs:invert")
    assert inverted.getpixel((0, 0)) == tuple(255 - v for v in landscape.getpixel((0, 0)))
    same, record = apply(
        "python",
        landscape,
        function="tests.stage_userfuncs:aspect",
        takes="record",
        kwargs={"digits": 1},
    )
    assert record["aspect"] == 1.5 and same is landscape
    with pytest.raises(ItemError, match="returned str, not an image"):
        apply("python", landscape, function="tests.stage_userfuncs:not_an_image")
    with pytest.raises(ItemError, match="explode: RuntimeError: boom"):
        apply("python", landscape, function="tests.stage_userfuncs:explode")


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("tests.stage_userfuncs:unpicklable", "cannot be pickled"),
        ("tests.no_such_module:f", "cannot import module 'tests.no_such_module'"),
        ("tests.stage_userfuncs:missing", "has no function 'missing'"),
        ("invert", "not a dotted path"),
    ],
)
def test_python_function_problems_are_caught_at_validation(path, problem):
    with pytest.raises(ValidationError, match=problem):
        stage_kinds()["python"].Options(function=path)


def test_a_transform_without_an_image_fails_the_item_only():
    with pytest.raises(ItemError, match="put a decode before it"):
        apply("resize", b"bytes", size=[10, 10])


CHAIN = """
files: {{kind: files, path: {images}}}
get: {{kind: download, input: files, allow_schemes: [file]}}
decode: {{kind: decode, input: get}}
rgba: {{kind: convert, input: decode, mode: RGBA}}
turn: {{kind: rotate, input: rgba, angle: 90}}
mirror: {{kind: flip, input: turn, direction: vertical}}
square: {{kind: resize, input: mirror, size: [40, 40], mode: cover}}
middle: {{kind: crop, input: square, center: [32, 32]}}
gray: {{kind: convert, input: middle, mode: L}}
user: {{kind: python, input: gray, function: "tests.stage_userfuncs:aspect", takes: record}}
stats: {{kind: stats, input: user}}
hash: {{kind: phash, input: stats}}
array: {{kind: to_array, input: hash, dtype: float32, mean: [0.5], std: [0.25]}}
write: {{kind: write_images, input: gray, path: gray, format: png}}
arrays: {{kind: arrays, input: array, path: arrays, shape: [32, 32]}}
"""


@pytest.mark.slow
def test_transform_chain_gives_the_same_records_on_every_backend(tmp_path):
    images = tmp_path / "images"
    write_photos(images, 6)
    results = {}
    for backend in ["sync", "threads", "processes"]:
        report = run_job(
            tmp_path, CHAIN.format(images=images), backend=backend, output=str(tmp_path / backend)
        )
        assert report["counts"]["ok"] == 6, report
        results[backend] = [
            {k: r[k] for k in ("key", "results", "aspect", "array_shape")}
            for r in records(tmp_path / backend)
        ]
        outputs = sorted((tmp_path / backend / "gray").iterdir())
        assert [Image.open(p).size for p in outputs] == [(32, 32)] * 6
    assert results["sync"] == results["threads"] == results["processes"]
    assert results["sync"][0]["array_shape"] == [32, 32] and results["sync"][0]["aspect"] == 1.0
    assert sorted(results["sync"][0]["results"]) == ["hash", "stats"]
    stacked = np.concatenate(
        [np.load(p) for p in sorted((tmp_path / "sync" / "arrays").glob("*.npy"))]
    )
    assert stacked.shape == (6, 32, 32) and stacked.dtype == np.float32  # normalised grey
