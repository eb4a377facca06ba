"""The decode lever (issue 16): libjpeg-turbo's M/8 scaling against Pillow's draft.

`python -m bench.decode_lever [--count N]` runs, per corpus image, in this one process
and one thread, alternating their order from image to image:

1. `pillow-draft`: the pipeline today: its `decode` stage (Pillow open, draft to the
   smallest 1/1, 1/2, 1/4 or 1/8 scale that still covers the thumbnail box), its
   `thumbnail` stage, its JPEG encoder at quality 85;
2. `simplejpeg-m8`: the pipeline's header checks (`open_image`), then
   `simplejpeg.decode_jpeg` scaled to the smallest M/8 that covers the same box, EXIF
   orientation, then the same thumbnail and encoder;
3. `turbojpeg-m8`: the same with PyTurboJPEG's `scaling_factor` (skipped when the
   libturbojpeg shared library cannot be found);
4. `full`: the reference: the `decode` stage with draft off, thumbnail, encode.

It reports CPU ms per image (`time.process_time`) for decode and for the whole path,
the PSNR of each thumbnail (RGB, before encoding) against the reference's, and the
scales each variant decoded at. Results go to `bench/results/decode_lever.md`.
"""

from __future__ import annotations

import argparse
import gc
import platform
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, features

from bench.corpus import VERSION, corpus_image
from pipeline.records import Item, JobContext
from pipeline.stages.decode import Decode, DecodeOptions, normalize, open_image, orient
from pipeline.stages.shared.encoding import EncodeOptions, encode
from pipeline.stages.shared.imaging import RESAMPLING, fit_inside
from pipeline.stages.thumbnail import Thumbnail, ThumbnailOptions

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus" / f"v{VERSION}"
RESULTS = HERE / "results" / "decode_lever.md"
BOX = (256, 256)
QUALITY = 85
JOB = JobContext("decode-lever", "/nonexistent")
ENCODE = EncodeOptions(quality=QUALITY)  # the sinks' JPEG encoding, q85
PSNR_CAP = 99.0  # identical pixels: a finite number so means and percentiles stay defined

# A decoder: bytes -> (oriented, normalized image; the scale it decoded at, as M/8).
Decoder = Callable[[bytes], tuple[Image.Image, int]]


@dataclass
class Tally:
    """What one variant measured, image by image."""

    decode_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    psnr: list[float] = field(default_factory=list)
    same_size: list[bool] = field(default_factory=list)  # thumbnail as large as the reference's
    eighths: list[int] = field(default_factory=list)

    def same_size_psnr(self) -> list[float]:
        """PSNR of the images whose thumbnail has the reference's size."""
        return [value for value, same in zip(self.psnr, self.same_size, strict=True) if same]


@dataclass
class Run:
    """One variant's result on one image: thumbnail pixels, scale, CPU seconds."""

    thumbnail: Image.Image
    eighths: int
    decode_s: float
    total_s: float


# -- the pipeline's own stages ------------------------------------------------------------


def thumbnail_stage() -> Thumbnail:
    """The pipeline's thumbnail step, 256x256, its default filter and reducing gap."""
    return Thumbnail("thumbnail", ThumbnailOptions(size=BOX), JOB)


def decode_stage(draft: bool) -> Decode:
    """The pipeline's decode step, connected to a 256 px thumbnail as a plan connects it."""
    stage = Decode("decode", DecodeOptions(draft=draft), JOB)
    stage.connect([thumbnail_stage()])
    return stage


def new_item(data: bytes) -> Item:
    """A bare item: the decode stage only updates its record."""
    return Item({"key": "bench", "status": "ok", "timings": {}}, data)


def eighths_of(full_width: int, decoded_width: int) -> int:
    """The scale a decoder used, as M in M/8."""
    return round(8 * decoded_width / full_width)


def box_for(size: tuple[int, int], stage: Decode) -> tuple[int, int]:
    """The box the decode stage drafts to for an image of `size` (fitted when allowed)."""
    assert stage.draft_size is not None
    return fit_inside(size, stage.draft_size) if stage.draft_fitted else stage.draft_size


def stage_decoder(stage: Decode) -> Decoder:
    """Variants 1 and 4: the decode stage's `process`, as the pipeline calls it."""

    def decode(data: bytes) -> tuple[Image.Image, int]:
        item = new_item(data)
        image = stage.process(item).data
        return image, eighths_of(item.record["width"], image.width)  # both as oriented

    return decode


# -- libjpeg-turbo's M/8 scaling ------------------------------------------------------------


def oriented(pixels: np.ndarray, header: Image.Image) -> Image.Image:
    """The decoded pixels as an image, turned by the header's EXIF orientation."""
    image = Image.fromarray(pixels, "RGB")
    exif = header.info.get("exif")
    if exif:
        image.info["exif"] = exif  # what exif_transpose reads on a non-JPEG image
    return normalize(orient(image))


def simplejpeg_decoder(stage: Decode) -> Decoder:
    """Variant 2: simplejpeg scaled to the smallest M/8 covering the drafted box."""
    import simplejpeg

    def decode(data: bytes) -> tuple[Image.Image, int]:
        header = open_image(data, stage.options)  # the pipeline's guards; header only
        width, height = box_for(header.size, stage)
        pixels = simplejpeg.decode_jpeg(data, "RGB", min_width=width, min_height=height)
        return oriented(pixels, header), eighths_of(header.width, pixels.shape[1])

    return decode


def smallest_factor(
    size: tuple[int, int], box: tuple[int, int], factors: list[tuple[int, int]]
) -> tuple[int, int]:
    """The smallest scaling factor whose (rounded up) output still covers `box`."""

    def covers(factor: tuple[int, int]) -> bool:
        num, den = factor
        return all(-(-side * num // den) >= need for side, need in zip(size, box, strict=True))

    fitting = [factor for factor in factors if covers(factor) and factor[0] <= factor[1]]
    return min(fitting, key=lambda factor: factor[0] / factor[1], default=(1, 1))


def turbojpeg_decoder(stage: Decode) -> Decoder | None:
    """Variant 3: PyTurboJPEG's `scaling_factor`, or None (with a message) without
    the libturbojpeg shared library."""
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG

        jpeg = TurboJPEG()
    except (ImportError, OSError, RuntimeError) as exc:
        print(f"turbojpeg-m8 skipped: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        return None
    factors = sorted(jpeg.scaling_factors)

    def decode(data: bytes) -> tuple[Image.Image, int]:
        header = open_image(data, stage.options)
        factor = smallest_factor(header.size, box_for(header.size, stage), factors)
        pixels = jpeg.decode(data, pixel_format=TJPF_RGB, scaling_factor=factor)
        return oriented(pixels, header), eighths_of(header.width, pixels.shape[1])

    return decode


# -- one image, every variant -----------------------------------------------------------


def run_path(decoder: Decoder, thumbnail: Thumbnail, data: bytes) -> Run:
    """Decode, thumbnail, encode one image, timing decode and the whole path in CPU."""
    started = time.process_time()
    image, eighths = decoder(data)
    decoded = time.process_time()
    small = thumbnail.process(new_item(b"").derive(image)).data
    encode(small, ENCODE)
    done = time.process_time()
    return Run(small, eighths, decoded - started, done - started)


def psnr(image: Image.Image, reference: Image.Image) -> tuple[float, bool]:
    """PSNR in dB of `image` against `reference` (RGB), and whether the sizes differed
    (then `image` is first resized to the reference's size with Lanczos)."""
    mismatch = image.size != reference.size
    if mismatch:
        image = image.resize(reference.size, RESAMPLING["lanczos"])
    a = np.asarray(image.convert("RGB"), np.float64)
    b = np.asarray(reference.convert("RGB"), np.float64)
    mse = float(np.mean((a - b) ** 2))
    return (PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * np.log10(255**2 / mse))), mismatch


def measure_image(
    data: bytes, index: int, variants: dict[str, Decoder], thumbnail: Thumbnail
) -> dict[str, Run]:
    """Every variant on one image, in an order that rotates with `index`; no GC inside."""
    names = list(variants)
    shift = index % len(names)
    gc.disable()
    try:
        runs = {name: run_path(variants[name], thumbnail, data) for name in names[shift:]}
        runs |= {name: run_path(variants[name], thumbnail, data) for name in names[:shift]}
    finally:
        gc.enable()
    return runs


def record(tallies: dict[str, Tally], runs: dict[str, Run]) -> None:
    """Add one image's runs to the tallies, PSNR against the `full` run."""
    reference = runs["full"].thumbnail
    for name, run in runs.items():
        tally = tallies[name]
        tally.decode_ms.append(run.decode_s * 1000)
        tally.total_ms.append(run.total_s * 1000)
        tally.eighths.append(run.eighths)
        value, mismatch = psnr(run.thumbnail, reference)
        tally.psnr.append(value)
        tally.same_size.append(not mismatch)


def corpus_bytes(count: int) -> list[bytes]:
    """The first `count` corpus images, read from disk (or made in memory, never written)."""
    paths = [CORPUS / f"{index:05d}.jpg" for index in range(count)]
    return [path.read_bytes() if path.exists() else corpus_image(i) for i, path in enumerate(paths)]


def build_variants() -> dict[str, Decoder]:
    """The decoders to compare; `full` is the PSNR reference."""
    draft = decode_stage(draft=True)
    variants = {
        "pillow-draft": stage_decoder(draft),
        "simplejpeg-m8": simplejpeg_decoder(draft),
    }
    turbo = turbojpeg_decoder(draft)
    if turbo is not None:
        variants["turbojpeg-m8"] = turbo
    variants["full"] = stage_decoder(decode_stage(draft=False))
    return variants


def measure(corpus: list[bytes]) -> dict[str, Tally]:
    """Run every variant on every image (after one warm-up image); the tallies."""
    variants, thumbnail = build_variants(), thumbnail_stage()
    measure_image(corpus[0], 0, variants, thumbnail)  # warm-up: imports, caches, first calls
    tallies = {name: Tally() for name in variants}
    for index, data in enumerate(corpus):
        record(tallies, measure_image(data, index, variants, thumbnail))
        if (index + 1) % 250 == 0:
            print(f"  {index + 1}/{len(corpus)} images", flush=True)
    return tallies


# -- the report -------------------------------------------------------------------------


def scale_name(eighths: int) -> str:
    """M/8 in lowest terms: 4 -> 1/2, 3 -> 3/8."""
    divisor = np.gcd(eighths, 8)
    return f"{eighths // divisor}/{8 // divisor}"


def psnr_cells(tally: Tally) -> str:
    """Mean and 5th percentile PSNR over all images, then over same-size ones only."""
    same = tally.same_size_psnr()
    cells = [np.mean(tally.psnr), np.percentile(tally.psnr, 5), np.mean(same)]
    cells.append(np.percentile(same, 5))
    mismatches = len(tally.psnr) - len(same)
    return " | ".join(f"{cell:.2f}" for cell in cells) + f" | {mismatches}"


def summary_table(tallies: dict[str, Tally]) -> list[str]:
    """CPU and PSNR per variant, with the ratio of whole-path CPU to the pipeline's."""
    base = float(np.mean(tallies["pillow-draft"].total_ms))
    lines = [
        "| variant | decode ms | whole path ms | x pillow-draft | PSNR mean dB | PSNR p5 dB "
        "| same-size PSNR mean dB | same-size PSNR p5 dB | size mismatches |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, tally in tallies.items():
        total = float(np.mean(tally.total_ms))
        quality = "reference | - | - | - | -" if name == "full" else psnr_cells(tally)
        lines.append(
            f"| {name} | {np.mean(tally.decode_ms):.3f} | {total:.3f} | {total / base:.3f} "
            f"| {quality} |"
        )
    return lines


def scale_table(tallies: dict[str, Tally]) -> list[str]:
    """How often each variant decoded at each scale."""
    scales = sorted({m for tally in tallies.values() for m in tally.eighths}, reverse=True)
    lines = [
        "| variant | " + " | ".join(scale_name(m) for m in scales) + " |",
        "|---|" + "---|" * len(scales),
    ]
    for name, tally in tallies.items():
        counts = Counter(tally.eighths)
        lines.append(f"| {name} | " + " | ".join(str(counts[m]) for m in scales) + " |")
    return lines


def split_row(pillow: Tally, other: Tally, rows: list[int]) -> str:
    """Mean decode and whole-path ms of both, their ratio, mean and p5 PSNR of both."""

    def mean(values: list[float]) -> float:
        return float(np.mean([values[i] for i in rows]))

    def p5(values: list[float]) -> float:
        return float(np.percentile([values[i] for i in rows], 5))

    cells = [mean(pillow.decode_ms), mean(other.decode_ms)]
    cells += [mean(pillow.total_ms), mean(other.total_ms)]
    cells.append(cells[3] / cells[2])
    cells += [mean(pillow.psnr), mean(other.psnr), p5(pillow.psnr), p5(other.psnr)]
    return " | ".join(f"{cell:.3f}" if i < 5 else f"{cell:.2f}" for i, cell in enumerate(cells))


def split_table(tallies: dict[str, Tally], variant: str) -> list[str]:
    """`variant` against the pipeline, split by the pair of scales the two picked."""
    pillow, other = tallies["pillow-draft"], tallies[variant]
    pairs = list(zip(pillow.eighths, other.eighths, strict=True))
    lines = [
        f"Split by scale, pillow-draft (A) against {variant} (B):",
        "",
        "| scale A -> B | images | decode ms A | decode ms B | whole ms A | whole ms B "
        "| B / A whole | PSNR mean A | PSNR mean B | PSNR p5 A | PSNR p5 B |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pair in sorted(set(pairs), reverse=True):
        rows = [i for i, other_pair in enumerate(pairs) if other_pair == pair]
        name = f"{scale_name(pair[0])} -> {scale_name(pair[1])}"
        lines.append(f"| {name} | {len(rows)} | {split_row(pillow, other, rows)} |")
    return lines


def versions() -> str:
    """The libraries measured."""
    import simplejpeg

    return (
        f"Python {platform.python_version()}, Pillow {PIL.__version__} (libjpeg-turbo "
        f"{features.version('libjpeg_turbo')}), simplejpeg {simplejpeg.__version__}"
    )


def report(tallies: dict[str, Tally], seconds: float) -> str:
    """The markdown report."""
    count = len(tallies["full"].total_ms)
    splits = [
        line
        for name in tallies
        if name.endswith("-m8")
        for line in ["", *split_table(tallies, name)]
    ]
    return "\n".join(
        [
            "# Decode lever: libjpeg-turbo M/8 scaling against Pillow's draft",
            "",
            f"{count} bench corpus images (v{VERSION}), 256x256 thumbnails (Lanczos, reducing "
            f"gap 2), JPEG q{QUALITY}; one process, one thread, variants alternated per image; "
            f"CPU ms per image from `time.process_time` (mean); PSNR of the thumbnail's RGB "
            f"before encoding against `full` (a thumbnail 1 px off the reference's size, from the "
            f"rounded-up drafted size, is resized to it with Lanczos first; same-size columns "
            f"leave those out). {versions()}. Took {seconds:.0f} s.",
            "",
            *summary_table(tallies),
            "",
            "Scales decoded at (images):",
            "",
            *scale_table(tallies),
            *splits,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="corpus images to measure")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown results file")
    args = parser.parse_args(argv)
    corpus = corpus_bytes(args.count)
    started = time.perf_counter()
    tallies = measure(corpus)
    text = report(tallies, time.perf_counter() - started)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
