"""Hostile inputs shared by the hostile tests: image files and misbehaving endpoints."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from pipeline.testing import server as misbehave
from pipeline.testing.images import jpeg_bytes, photo, png_bytes
from pipeline.testing.server import TestServer, send_bytes

IMAGE = jpeg_bytes(photo(64, 48, seed=5))
RED, BLUE = (255, 0, 0), (0, 0, 255)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int, height: int, real_data: bool) -> bytes:
    """A grey PNG declaring `width`x`height`; with `real_data`, all its (zero) rows."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    packer = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte + pixels
    rows = height if real_data else 1
    idat = b"".join(packer.compress(row) for _ in range(rows)) + packer.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims another size."""
    data = bytearray(IMAGE)
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_screen_bomb() -> bytes:
    """A 1x1 GIF frame on a 65535x65535 logical screen."""
    data = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", 65535, 65535)
    return bytes(data)


def hidden_colour_rgba() -> Image.Image:
    """Left half fully transparent red (hidden colour), right half opaque blue."""
    image = Image.new("RGBA", (40, 20), (*BLUE, 255))
    image.paste((*RED, 0), (0, 0, 20, 20))
    return image


def colour_key() -> bytes:
    """An RGB PNG whose tRNS chunk makes red transparent (left half red, right blue)."""
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 20, 20))
    return encode(image, "PNG", transparency=RED)


def palette_with_transparency() -> bytes:
    """A GIF whose transparent palette index is red, the rest blue."""
    image = Image.new("P", (40, 20), 1)
    image.putpalette([*RED, *BLUE] + [0] * 762)
    image.paste(0, (0, 0, 20, 20))
    return encode(image, "GIF", transparency=0)


def animated_gif() -> bytes:
    """Three frames: blue, then red, then green. The first one counts."""
    frames = [Image.new("RGB", (30, 20), colour) for colour in (BLUE, RED, (0, 255, 0))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def gray16() -> bytes:
    """A 16-bit grey ramp 0..65535 (clipping would turn almost all of it white)."""
    ramp = np.linspace(0, 65535, 256, dtype=np.uint16)
    return encode(Image.fromarray(np.tile(ramp, (8, 1))), "PNG")


def exif_jpeg(exif: bytes) -> bytes:
    """A 60x30 JPEG with a raw EXIF block (valid or not)."""
    return encode(photo(60, 30, seed=3), "JPEG", exif=exif)


def rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: 60x30 pixels are shown as 30x60
    return exif_jpeg(exif.tobytes())


def broken_exif_jpegs() -> dict[str, bytes]:
    exif = Image.Exif()
    exif[0x0112] = 9  # no such orientation
    return {
        "exif-garbage.jpg": exif_jpeg(b"Exif\x00\x00" + b"\xde\xad\xbe\xef" * 20),
        "exif-bad-orientation.jpg": exif_jpeg(exif.tobytes()),
        "exif-truncated-ifd.jpg": exif_jpeg(b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01"),
    }


def corrupt_png() -> bytes:
    data = bytearray(png_bytes(photo(100, 80, seed=1)))
    start = data.find(b"IDAT") + 60
    data[start : start + 300] = bytes(byte ^ 0x5A for byte in data[start : start + 300])
    return bytes(data)


def hostile_images() -> dict[str, tuple[bytes, str | None]]:
    """File name -> (bytes, expected reason; None when it must decode fine)."""
    jpeg, png = jpeg_bytes(photo(300, 200, seed=2)), png_bytes(photo(300, 200, seed=2))
    gif, webp = encode(photo(300, 200, seed=2), "GIF"), encode(photo(300, 200, seed=2), "WEBP")
    cases: dict[str, tuple[bytes, str | None]] = {
        "empty.jpg": (b"", "empty"),
        "page.jpg": (b"<!doctype html><html><body>gotcha</body></html>", "not_an_image"),
        "vector.svg": (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "not_an_image"),
        "doc.eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "unsupported_format"),
        "doc.pdf": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "unsupported_format"),
        "half.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "half.png": (png[: len(png) // 2], "truncated"),
        "no-iend.png": (png[:-12], "truncated"),
        "half.gif": (gif[: len(gif) // 2], "truncated"),
        "half.webp": (webp[: len(webp) // 2], "truncated"),
        "header-only.jpg": (jpeg[:30], "truncated"),
        "corrupt.png": (corrupt_png(), "corrupt"),
        "bomb-zeros.png": (png_bomb(3000, 3000, real_data=True), "decompression_bomb"),
        "bomb-header.png": (png_bomb(30000, 30000, real_data=False), "decompression_bomb"),
        "bomb-claims.jpg": (jpeg_claiming(60000, 60000), "decompression_bomb"),
        "bomb-screen.gif": (gif_screen_bomb(), "decompression_bomb"),
        "png-named.jpg": (png, None),
        "trailing-payload.jpg": (jpeg + b"PK\x03\x04<script>payload</script>", None),
        "animated.gif": (animated_gif(), None),
        "rotated.jpg": (rotated_jpeg(), None),
        "cmyk.jpg": (encode(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG"), None),
        "gray16.png": (gray16(), None),
        "onebit.png": (encode(Image.new("1", (30, 20), 1), "PNG"), None),
        "la.png": (encode(Image.new("LA", (30, 20), (0, 0)), "PNG"), None),
        "palette-transparent.gif": (palette_with_transparency(), None),
        "colour-key.png": (colour_key(), None),
        "hidden-colour.png": (png_bytes(hidden_colour_rgba()), None),
        "wide.png": (png_bytes(Image.new("RGB", (20000, 10), BLUE)), None),
        "dot.png": (png_bytes(Image.new("RGB", (1, 1), RED)), None),
        **{name: (data, None) for name, data in broken_exif_jpegs().items()},
    }
    return cases


def add_hostile_routes(server: TestServer, internal: TestServer) -> None:
    """Misbehaving endpoints on `server`; `internal` stands for a service not to reach."""
    add = server.add
    server.add_bytes("/ok.jpg", IMAGE)
    ok = server.routes["/ok.jpg"]
    add("/404", misbehave.status(404))
    add("/500", misbehave.status(500))
    add("/408", misbehave.status(408))
    add("/429", misbehave.status(429, {"Retry-After": "3600"}))
    add("/flaky", misbehave.flaky(2, misbehave.status(503), ok))
    add("/loop", misbehave.redirect("/loop"))
    add("/ping", misbehave.redirect("/pong"))
    add("/pong", misbehave.redirect("/ping"))
    for hop in range(1, 6):
        add(f"/chain{hop}", misbehave.redirect(f"/chain{hop - 1}" if hop > 1 else "/ok.jpg"))
    add("/to-internal", misbehave.redirect(internal.url("/secret.jpg")))
    add("/to-metadata", misbehave.redirect("http://169.254.169.254/latest/meta-data/"))
    add("/to-decimal", misbehave.redirect(f"http://2130706433:{internal.port}/secret.jpg"))
    add("/to-file", misbehave.redirect("file:///etc/passwd"))
    add("/slow-headers", misbehave.drip_headers(IMAGE, 0.05))
    add("/slow-body", misbehave.drip_body(IMAGE, 0.01))
    add("/short", misbehave.short_body(IMAGE[:500], missing=1000))
    add("/endless", misbehave.endless_body())
    add("/gzip-bomb", misbehave.gzip_bomb(64_000_000))
    add("/reset", misbehave.reset())
    add("/not-http", misbehave.raw(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"))
    many = b"".join(b"X-Junk-%d: %d\r\n" % (n, n) for n in range(1000))
    add("/many-headers", misbehave.raw(b"HTTP/1.1 200 OK\r\n" + many + b"\r\n"))
    add("/liar", misbehave.short_body(b"x", missing=10**12))
    # A small Content-Length beside chunked framing, which takes precedence: 3 MB follow.
    chunks = b"".join(b"%x\r\n%s\r\n" % (65536, bytes(65536)) for _ in range(46)) + b"0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n"
    add("/chunked-liar", misbehave.raw(head + chunks))
    add("/big", lambda request: send_bytes(request, bytes(3_000_000), "image/jpeg"))
    robots = {"X-Robots-Tag": "otherbot: noindex, googlebot: noimageai"}
    add("/noai.jpg", lambda request: send_bytes(request, IMAGE, "image/jpeg", 200, robots))
    png = png_bytes(photo(50, 40, seed=8))
    add("/png-as-html.jpg", lambda request: send_bytes(request, png, "text/html"))
    html = b"<html>not an image</html>"
    add("/html-as-jpeg.jpg", lambda request: send_bytes(request, html, "image/jpeg"))
    for traversal in ("/x/%2E%2E%2F%2E%2E%2Fescape.jpg", "/x/..%5C..%5Cwin.jpg"):
        server.add_bytes(traversal, IMAGE)
    evil = {"Content-Disposition": 'attachment; filename="../../evil.jpg"'}
    add("/disposition.jpg", lambda request: send_bytes(request, IMAGE, "image/jpeg", 200, evil))
