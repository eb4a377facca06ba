"""Regenerate the demo's sample images and URL list: `python configs/samples/make_samples.py`.

The images are committed, so the demo runs offline on a fresh clone; this
script documents (and reproduces, byte for byte) where they came from.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.testing.images import jpeg_bytes, photo

HERE = Path(__file__).resolve().parent
SIZES = [(640, 480), (800, 600), (1024, 768), (1200, 800), (480, 640), (1280, 720)]
COUNT = 24


def main() -> None:
    images = HERE / "images"
    images.mkdir(exist_ok=True)
    lines = ["# Demo inputs: paths relative to this file. Lines starting with # are comments."]
    for index in range(COUNT):
        width, height = SIZES[index % len(SIZES)]
        orientation = 6 if index % 8 == 3 else None
        data = jpeg_bytes(
            photo(width, height, seed=index), progressive=index % 5 == 0, orientation=orientation
        )
        name = f"photo-{index:02d}.jpg"
        (images / name).write_bytes(data)
        lines.append(f"images/{name}")
    (HERE / "urls.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
