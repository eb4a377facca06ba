"""Property-based tests of source lists (issue 17): hostile lists in every format.

Lists in txt, csv, tsv, jsonl and parquet, plain or gzipped, hold arbitrary entries:
random text and bytes, NUL, very long lines, malformed URLs, paths that loop or escape
through symlinks, nulls, missing keys and cells, duplicates, and real photos. Each list
runs as a whole job through the CLI, and every run must give one record per entry, exit
code 0 or 1, no traceback, and nothing written outside the output folder.

What the entries are is worked out by an oracle written here from the list's bytes (never
by the url_list code). Hypothesis profiles are in conftest.py: "ci" (the default) is
derandomized with a fixed example count; HYPOTHESIS_PROFILE=dev explores more.
"""

from __future__ import annotations

import csv
import datetime
import gzip
import hashlib
import io
import json
import os
import stat
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from hypothesis import currently_in_test_context, example, given
from hypothesis import note as hypothesis_note
from hypothesis import strategies as st

from pipeline.cli import main
from pipeline.errors import REASONS
from tests.stage_jobs import write_photos

pytestmark = pytest.mark.slow

MAX_INPUT = 4096  # a record keeps at most this many characters of an entry's text
CAP_SLACK = 64  # room for the "... (N more characters)" the cap adds
MAX_LINE = 1024 * 1024  # a longer txt line is one invalid_input entry
BOM = b"\xef\xbb\xbf"
PHOTOS = 3

# Symlinks in WORK/links: loops, escapes to /etc and to the parent folder, a dangling one,
# and two that stay inside (to the photos, and a folder linking to itself).
LINKS = {
    "loop-a": "loop-b",
    "loop-b": "loop-a",
    "self": "self",
    "etc": "/etc",
    "etc-passwd": "/etc/passwd",
    "up": "../..",  # TMP, outside local_root (WORK)
    "secret.jpg": "../../outside/secret.jpg",
    "dangling": "missing",
    "images": "../images",
    "dirloop": ".",
}

# Entries that name a real photo in WORK/images ({i}: which one): must end ok.
PHOTO_FORMS = [
    "images/photo-0{i}.jpg",
    "./images/photo-0{i}.jpg",
    "images//photo-0{i}.jpg",
    "images/./photo-0{i}.jpg",
    "{work}/images/photo-0{i}.jpg",
    "{work}/links/../images/photo-0{i}.jpg",
    "file://{work}/images/photo-0{i}.jpg",
    "file://localhost{work}/images/photo-0{i}.jpg",
    "FILE://{work}/images/photo%2D0{i}.jpg",
    "links/images/photo-0{i}.jpg",
    "links/up/work/images/photo-0{i}.jpg",
]

PHOTO_FORMS_2 = [form.replace("{i}", "2") for form in PHOTO_FORMS]

# Malformed URLs, other schemes, and paths that loop or escape WORK.
HOSTILE = [
    "http://[::1/broken",
    "http://",
    "https://",
    "://x",
    "%zz",
    "%",
    "http://h/%zz.jpg",
    "http://h:port/x.jpg",
    "https://127.0.0.1:99999/x.jpg",
    "http://user@/x.jpg",
    "https://[fe80::1%eth0]/x.jpg",
    "http://" + "a" * 300 + ".example/x.jpg",
    "http://h/" + "%" * 5000,
    "HTTP://H/X.JPG",
    "http://h/a\x00b.jpg",
    "ftp://h/x.jpg",
    "s3://bucket/x.jpg",
    "memory://x.jpg",
    "data:image/png;base64,iVBORw0KGgo=",
    "javascript:alert(1)",
    "file://",
    "file:",
    "file:///",
    "file:///../../etc/passwd",
    "file:///etc/passwd",
    "FILE:///etc/passwd",
    "file://localhost/etc/passwd",
    "file://otherhost/etc/passwd",
    "file:%2Fetc%2Fpasswd",
    "file:///%2e%2e/%2e%2e/etc/passwd",
    "file:///dev/zero",
    "file://{work}/images/%2e%2e/%2e%2e/outside/secret.jpg",
    "file://{work}/../outside/secret.jpg",
    "file://{tmp}/outside/secret.jpg",
    "file://{work}/images/photo-00.jpg%00.png",
    "file://{work}/fifo",
    "/etc/passwd",
    "/dev/zero",
    "/dev/stdin",
    "/proc/self/environ",
    "/",
    ".",
    "..",
    "~",
    "~/x.jpg",
    "../outside/secret.jpg",
    "../../../../../../../../etc/passwd",
    "images/../../outside/secret.jpg",
    "{tmp}/outside/secret.jpg",
    "{work}/out/results.jsonl",
    "out/report.json",
    "links/loop-a",
    "links/loop-a/x.jpg",
    "links/self",
    "links/etc",
    "links/etc/passwd",
    "links/etc-passwd",
    "links/up/outside/secret.jpg",
    "links/secret.jpg",
    "links/dangling",
    "links/dirloop/dirloop/dirloop",
    "links/dirloop/dirloop/../../images/photo-00.jpg",
    "images",
    "images/",
    "fifo",
    "images/photo-00.jpg\x00.png",
    "C:\\Windows\\win.ini",
    "\\\\server\\share\\x.jpg",
    "a" * 256,
    "\u202egpj.txt",
    "\ufb01le:///etc/passwd",
    "images/photo-00.jpg?x=1#frag",
    "images/photo-00.jpg#",
]

SPACE = st.sampled_from(["", " ", "\t", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\xa0", "\u3000"])
TEXT = st.text(max_size=30)
PATHISH = st.text(alphabet="/.%:#?\\~ ab\xe9\x00\t", max_size=20)
LONG = st.builds(
    lambda prefix, char, count: prefix + char * count,
    st.sampled_from(["", "http://h/", "images/", "file:///"]),
    st.sampled_from(["x", "\xe9", "/", "%", "\x00", "\U0001f600"]),
    st.integers(MAX_INPUT - 8, 3 * MAX_INPUT),
)
PHOTO = st.builds(
    lambda form, i: form.replace("{i}", str(i)), st.sampled_from(PHOTO_FORMS), st.integers(0, 2)
)
URLISH = st.one_of(PHOTO, st.sampled_from(HOSTILE), TEXT, PATHISH, LONG)
PADDED = st.builds(lambda a, url, b: a + url + b, SPACE, URLISH, SPACE)


def note(text: str) -> None:
    """Hypothesis's note, shown with a failing example; nothing in a plain test."""
    if currently_in_test_context():
        hypothesis_note(text)


def with_repeats(element: st.SearchStrategy, max_size: int = 10) -> st.SearchStrategy:
    """Lists of `element`, some of whose members appear again later (duplicates)."""

    @st.composite
    def build(draw: st.DrawFn) -> list:
        items = draw(st.lists(element, max_size=max_size))
        if items:
            for _ in range(draw(st.integers(0, 3))):
                items.insert(draw(st.integers(0, len(items))), draw(st.sampled_from(items)))
        return items

    return build()


# --- the sandbox each example runs in -------------------------------------------------


@dataclass
class Sandbox:
    tmp: Path  # all of it is snapshotted, except `out`
    work: Path  # the list's folder, and the download stage's local_root
    out: Path

    def render(self, text: str) -> str:
        return text.replace("{work}", str(self.work)).replace("{tmp}", str(self.tmp))

    def photos(self) -> set[str]:
        """Every spelling (stripped) of an entry that names a real photo."""
        forms = [form.replace("{i}", str(i)) for form in PHOTO_FORMS for i in range(PHOTOS)]
        return {self.render(form) for form in forms}


@contextmanager
def sandbox() -> Iterator[Sandbox]:
    """A fresh folder per example (pytest's tmp_path is shared by all of a test's examples):

    TMP/outside/secret.jpg   a real photo outside local_root
    TMP/work/images/         three real photos; TMP/work is local_root and holds the list
    TMP/work/links/          symlinks (LINKS), TMP/work/fifo a FIFO
    TMP/work/out/            the run directory: the only place a run may write
    """
    with tempfile.TemporaryDirectory(prefix="fuzz-lists-") as name:
        tmp = Path(name).resolve()
        work = tmp / "work"
        write_photos(work / "images", PHOTOS)
        (secret,) = write_photos(tmp / "outside", 1)
        secret.rename(tmp / "outside" / "secret.jpg")
        (work / "links").mkdir()
        for link, target in LINKS.items():
            os.symlink(target, work / "links" / link)
        os.mkfifo(work / "fifo")
        yield Sandbox(tmp, work, work / "out")


def snapshot(top: Path, skip: Path) -> dict[str, tuple]:
    """Every path under `top` but `skip`: its type and content (never following links)."""
    found: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(top):
        here = Path(folder)
        dirs[:] = [name for name in dirs if here / name != skip]
        for name in dirs + files:
            path = here / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                entry: tuple = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                entry = ("file", info.st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                entry = ("other", info.st_mode)
            found[str(path.relative_to(top))] = entry
    return found


def run_list(
    capfd: pytest.CaptureFixture, box: Sandbox, name: str, data: bytes, gz: bool, **options: Any
) -> tuple[int, list[dict], dict]:
    """Run a job on the list `data` (gzipped if `gz`): its exit code, records and report."""
    if gz:
        name, data = name + ".gz", gzip.compress(data, mtime=0)
    path = box.work / name
    path.write_bytes(data)
    config = box.work / "job.yaml"
    job = {
        "name": "fuzz",
        "output": str(box.out),
        "partition_size": 4,
        "backend": {"kind": "sync"},
        "stages": {
            "urls": {"kind": "url_list", "path": str(path), **options},
            "get": {
                "kind": "download",
                "input": "urls",
                "allow_schemes": ["file"],  # http fails as blocked_scheme: no network
                "local_root": str(box.work),
            },
            "decode": {"kind": "decode", "input": "get"},
            "thumb": {"kind": "thumbnail", "input": "decode", "size": [32, 32]},
            "write": {"kind": "write_images", "input": "thumb", "path": "images"},
        },
    }
    config.write_text(yaml.safe_dump(job))
    before = snapshot(box.tmp, box.out)
    capfd.readouterr()
    code = main(["run", str(config), "--quiet"])
    captured = capfd.readouterr()
    note(f"exit {code}; stderr: {captured.err[-3000:]}")
    assert "Traceback" not in captured.err + captured.out
    assert code in (0, 1), captured.err
    assert snapshot(box.tmp, box.out) == before, "the run wrote outside its output folder"
    report = json.loads((box.out / "report.json").read_text(encoding="utf-8"))
    results = box.out / "results.jsonl"  # a run without records writes none
    text = results.read_text(encoding="utf-8") if report["items"] else ""
    records = [json.loads(line) for line in text.split("\n") if line]
    return code, records, report


# --- what the records must say --------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One entry, as the oracle sees it."""

    index: int
    inputs: tuple[str, ...] | None  # texts `input` may hold (before the cap); None: any
    reason: str | None = None  # the reason it must fail with
    fails: bool = False  # it must fail, for some reason
    photo: bool = False  # it names a real photo: ok, unless a duplicate


def short(value: Any, limit: int = 120) -> Any:
    """`value` with long texts cut, for readable failure messages."""
    if isinstance(value, str | bytes) and len(value) > limit:
        return value[:limit] + type(value)(
            f"...({len(value)})", *(["ascii"] * isinstance(value, bytes))
        )
    if isinstance(value, dict):
        return {key: short(item, limit) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(short(item, limit) for item in value)
    if isinstance(value, Entry):
        return Entry(value.index, short(value.inputs), value.reason, value.fails, value.photo)
    return value


def capped(actual: str, text: str) -> bool:
    if len(text) <= MAX_INPUT:
        return actual == text
    return actual.startswith(text[:MAX_INPUT]) and len(actual) <= MAX_INPUT + CAP_SLACK


def inside(path: str, folder: Path) -> bool:
    real = os.path.realpath(path)
    return os.path.commonpath([real, str(folder)]) == str(folder)


def check(
    box: Sandbox, code: int, records: list[dict], report: dict, expected: list[Entry]
) -> None:
    note(f"expected: {short(expected)}")
    note(f"records: {short(sorted(records, key=lambda record: record['index']))}")
    indexes = [record["index"] for record in records]
    assert sorted(indexes) == [entry.index for entry in expected], "one record per entry"
    statuses = Counter(record["status"] for record in records)
    assert set(statuses) <= {"ok", "failed", "skipped"}
    assert report["items"] == len(expected)
    assert report["counts"] == {key: statuses[key] for key in ("ok", "failed", "skipped")}
    assert code == report["exit_code"] == (1 if statuses["failed"] else 0)
    by_index = {record["index"]: record for record in records}
    first_with_key: dict[str, int] = {}
    for entry in expected:
        record = by_index[entry.index]
        status, reason, shown = record["status"], record["reason"], record["input"]
        where = f"entry {entry.index}: {short(record)}; expected {short(entry)}"
        assert isinstance(shown, str) and len(shown) <= 4 * MAX_INPUT + CAP_SLACK, where
        if entry.inputs is not None:
            assert any(capped(shown, text) for text in entry.inputs), where
        if status != "ok":
            assert reason in REASONS, where
        if record["key"] in first_with_key:  # a repeat: skipped, whatever it is
            assert (status, reason) == ("skipped", "duplicate"), where
            continue
        first_with_key[record["key"]] = entry.index
        assert status != "skipped", where
        assert reason != "internal_error", where
        if entry.reason is not None:
            assert (status, reason) == ("failed", entry.reason), where
        if entry.fails:
            assert status == "failed", where
        if entry.photo:
            assert status == "ok", where
        if status == "ok":  # only ever a file inside local_root, written inside OUT
            parts = urlsplit(record["url"])
            local = unquote(parts.path) if parts.scheme else record["url"]
            assert parts.scheme.lower() in ("", "file") and inside(local, box.work), where
            assert record["outputs"], where
            assert all(inside(output, box.out) for output in record["outputs"]), where
        else:
            assert reason is not None and record["outputs"] == [], where


def lines_of(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of a text list: split on b"\\n", a leading BOM dropped."""
    for number, raw in enumerate(data.split(b"\n"), start=1):
        yield number, raw.removeprefix(BOM) if number == 1 else raw


def utf8(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def has_surrogates(text: str) -> bool:
    return any("\ud800" <= char <= "\udfff" for char in text)


def url_entry(index: int, url: Any, photos: set[str], raw: tuple[str, ...] = ()) -> Entry:
    """The entry of a tabular row whose url cell holds `url` (raw: the row's text)."""
    if url is None or url == "" or url == b"":
        return Entry(index, (*raw, ""), reason="empty")
    if not isinstance(url, str) or has_surrogates(url):
        return Entry(index, None, fails=True)
    if not url.strip():
        return Entry(index, (*raw, url, ""), fails=True)
    return Entry(index, (url, url.strip()), photo=url.strip() in photos)


# --- txt ------------------------------------------------------------------------------

BAD_BYTES = st.sampled_from(
    [
        b"\xff",
        b"caf\xe9.jpg",
        b"\xed\xa0\x80",  # an encoded surrogate
        b"\xc0\xaf",  # an overlong '/'
        b"images/photo-00.jpg\xff",
        b"\xff images/photo-01.jpg",
        b"\x00\xff\x00",
        BOM + b"images/photo-02.jpg",  # a BOM that is not at the start of the file
    ]
)
TXT_LINE = st.one_of(
    PADDED,
    PADDED,
    PHOTO,
    st.builds(lambda pad, text: pad + "#" + text, SPACE, TEXT),
    SPACE,
    st.binary(max_size=30),
    BAD_BYTES,
)


def txt_entries(data: bytes, photos: set[str]) -> list[Entry]:
    """Each line that is not blank or a comment (even one that is not UTF-8) is an entry."""
    entries = []
    for number, raw in lines_of(data):
        loose = raw.decode("utf-8", "surrogateescape").strip()
        if not loose or loose.startswith("#"):
            continue
        text = utf8(raw)
        if text is None:
            shown = raw.decode("utf-8", "backslashreplace").strip()
            entries.append(Entry(number, (shown,), reason="invalid_input"))
        elif len(raw) > MAX_LINE:
            entries.append(Entry(number, (text.strip(),), reason="invalid_input"))
        else:
            entries.append(Entry(number, (text.strip(),), photo=text.strip() in photos))
    return entries


@given(
    lines=with_repeats(TXT_LINE, max_size=14),
    endings=st.lists(st.sampled_from([b"\n", b"\r\n"]), min_size=14, max_size=14),
    last_newline=st.booleans(),
    bom=st.booleans(),
    gz=st.booleans(),
)
@example(
    lines=[
        *HOSTILE,
        *(form.replace("{i}", "1") for form in PHOTO_FORMS),
        "images/photo-00.jpg",
        " images/photo-01.jpg\t",
        "# c",
        "",
    ],
    endings=[b"\n"] * 14,
    last_newline=True,
    bom=False,
    gz=True,
)
def test_txt_lists(capfd, lines, endings, last_newline, bom, gz):
    with sandbox() as box:
        pieces = [
            box.render(line).encode("utf-8") if isinstance(line, str) else line for line in lines
        ]
        data = b"".join(
            piece + (endings[n % len(endings)] if n < len(pieces) - 1 or last_newline else b"")
            for n, piece in enumerate(pieces)
        )
        data = BOM + data if bom else data
        note(f"list: {short(data, 5000)!r}")
        code, records, report = run_list(capfd, box, "list.txt", data, gz)
        check(box, code, records, report, txt_entries(data, box.photos()))


def test_very_long_lines_are_one_invalid_record_each(capfd):
    """A 2 MiB line and a 100 KiB line between good ones: one record each, inputs capped."""
    huge = "http://h/" + "b" * (2 * MAX_LINE)
    long = "http://h/" + "l" * (100 * 1024)
    for gz in (False, True):
        with sandbox() as box:
            lines = ["images/photo-00.jpg", huge, "images/photo-01.jpg", long, "# end", ""]
            data = "\n".join(lines).encode()
            code, records, report = run_list(capfd, box, "list.txt", data, gz)
            check(box, code, records, report, txt_entries(data, box.photos()))
            by_index = {record["index"]: record for record in records}
            assert [by_index[n]["status"] for n in (1, 2, 3, 4)] == ["ok", "failed", "ok", "failed"]
            assert by_index[2]["reason"] == "invalid_input"
            assert by_index[4]["reason"] == "blocked_scheme"  # long, not too long: a URL
            for number, line in ((2, huge), (4, long)):
                assert capped(by_index[number]["input"], line)
            assert code == 1


# --- csv and tsv ----------------------------------------------------------------------

CELL = st.one_of(TEXT, URLISH, st.just(""))


@st.composite
def csv_lists(draw: st.DrawFn) -> tuple[list[str], list[list[str]], str, int]:
    """(header, rows, line terminator, quoting): rows may have extra or missing cells."""
    # no "\r" in a name: csv.writer (3.11) leaves it unquoted, and the header unreadable
    name = st.text(st.characters(exclude_characters="\r"), max_size=6)
    others = draw(st.lists(name.filter(lambda name: name != "url"), max_size=3))
    url_at = draw(st.integers(0, len(others)))
    header = [*others[:url_at], "url", *others[url_at:]]

    @st.composite
    def row(draw: st.DrawFn) -> list[str]:
        cells = draw(st.lists(CELL, max_size=len(header) + 2))
        if len(cells) > url_at:
            cells[url_at] = draw(st.one_of(PADDED, PHOTO, SPACE))
        return cells

    rows = draw(with_repeats(row()))
    terminator = draw(st.sampled_from(["\r\n", "\n"]))
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
    return header, rows, terminator, quoting


def csv_entries(text: str, delimiter: str, photos: set[str]) -> list[Entry]:
    """Data rows as the csv module reads lines split on "\\n"; each row is numbered by its
    first line, and a blank line is no row. A row the csv module rejects is one
    invalid_input entry."""
    pieces = text.split("\n")
    taken = 0

    def lines() -> Iterator[str]:
        nonlocal taken
        for piece in pieces:
            taken += 1
            yield piece + "\n"

    reader = csv.reader(lines(), delimiter=delimiter)
    header = next(reader)
    url_at = header.index("url")
    entries = []
    while True:
        first = taken + 1
        try:
            cells = next(reader)
        except StopIteration:
            return entries
        except csv.Error:  # e.g. a lone "\r" in an unquoted cell (csv.writer leaves it so)
            cells = None
        raw = "\n".join(pieces[first - 1 : taken])
        raws = (raw, raw.rstrip("\r"), raw.rstrip("\r\n"))
        if cells is None:
            entries.append(Entry(first, raws, reason="invalid_input"))
        elif cells:
            url = cells[url_at] if len(cells) > url_at else None
            entries.append(url_entry(first, url, photos, raws))


@pytest.mark.parametrize("delimiter", [",", "\t"], ids=["csv", "tsv"])
@given(table=csv_lists(), gz=st.booleans())
@example(
    table=(
        ["id", "url"],
        [["1", url] for url in [*HOSTILE, *PHOTO_FORMS_2, ""]] + [["2"], [], ["3", "", "x", "y"]],
        "\r\n",
        csv.QUOTE_MINIMAL,
    ),
    gz=True,
)
def test_csv_and_tsv_lists(capfd, delimiter, table, gz):
    header, rows, terminator, quoting = table
    with sandbox() as box:
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter=delimiter, lineterminator=terminator, quoting=quoting)
        writer.writerow(header)
        writer.writerows([box.render(cell) for cell in row] for row in rows)
        text = buffer.getvalue()
        note(f"list: {short(text, 5000)!r}")
        name = "list.csv" if delimiter == "," else "list.tsv"
        code, records, report = run_list(capfd, box, name, text.encode("utf-8"), gz)
        check(box, code, records, report, csv_entries(text, delimiter, box.photos()))


@pytest.mark.parametrize("size", [200_000, 2 * MAX_LINE], ids=["200k", "2M"])
@pytest.mark.parametrize("quote", ["", '"'], ids=["bare", "quoted"])
def test_an_overlong_csv_cell_is_one_record(capfd, size, quote):
    """A cell over the csv module's field limit (128 KiB), or a line over 1 MiB: one row."""
    huge = quote + "http://h/" + "c" * size + quote
    with sandbox() as box:
        text = f"url,id\nimages/photo-00.jpg,1\n{huge},2\nimages/photo-01.jpg,3\n"
        code, records, report = run_list(capfd, box, "list.csv", text.encode(), gz=False)
        assert sorted(record["index"] for record in records) == [2, 3, 4]
        by_index = {record["index"]: record for record in records}
        assert [by_index[n]["status"] for n in (2, 3, 4)] == ["ok", "failed", "ok"]
        assert by_index[3]["reason"] in REASONS
        assert len(by_index[3]["input"]) <= MAX_INPUT + CAP_SLACK
        assert code == report["exit_code"] == 1


# --- jsonl ----------------------------------------------------------------------------

SURROGATES = st.text(st.characters(categories=["Cs"]) | st.characters(), max_size=8)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | TEXT
    | st.integers(2**63, 2**80),  # too large for SQLite and int64
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=6,
)
JSON_URLS = st.one_of(PADDED, PHOTO, PHOTO, st.none(), st.just(""), SPACE, SURROGATES, JSON_VALUES)
JSON_OBJECTS = st.fixed_dictionaries(
    {"url": JSON_URLS},
    optional={"id": JSON_VALUES, "caption": SURROGATES, "tags": st.lists(SURROGATES, max_size=2)},
)
NO_URL = st.dictionaries(st.text(max_size=5).filter(lambda key: key != "url"), JSON_VALUES)
JSON_CRAFTED_TEXTS = [
    '{"url": "images/photo-00.jpg", "url": null}',
    '{"url": null, "url": "images/photo-01.jpg"}',
    '{"url": "images/photo-00.jpg"',
    '{"URL": "images/photo-00.jpg"}',
    "{}",
    "[1, 2]",
    '"images/photo-00.jpg"',
    "null",
    "42",
    "NaN",
    '{"url": NaN}',
    '{"url": 1e999}',
    '{"url": "images/photo-02.jpg", "score": NaN, "big": -Infinity}',
    '{"url": "images/photo-00.jpg", "n": 1' + "0" * 5000 + "}",
    "[" * 50_000,
    '{"a":' * 50_000,
    '{"url": "\\ud800"}',
    '{"url": "images/photo-01.jpg\\udc80"}',
    '{"url": "\\u0000"}',
    '{"url": "images/photo-01.jpg", "caption": "\\udc80", "\\ud800": 1}',
    '{"url": {"nested": "images/photo-00.jpg"}}',
    '{"url": ["images/photo-00.jpg"]}',
    '{"url": "{work}/images/photo-02.jpg"} trailing',
    '{"url": "images/photo-00.jpg"}\r',
    "\x1c",
    "\xa0",
    "\u2028",
    "// a comment",
    "# a comment",
]
JSON_CRAFTED = st.sampled_from(JSON_CRAFTED_TEXTS)
JSON_LINE = st.one_of(
    st.tuples(st.just("object"), JSON_OBJECTS, st.booleans()),
    st.tuples(st.just("object"), JSON_OBJECTS, st.booleans()),
    st.tuples(st.just("object"), NO_URL, st.booleans()),
    st.tuples(st.just("text"), st.one_of(JSON_CRAFTED, TEXT, SPACE)),
    st.tuples(st.just("bytes"), st.one_of(st.binary(max_size=20), BAD_BYTES)),
)


def json_line(box: Sandbox, line: tuple) -> bytes:
    if line[0] == "bytes":
        return line[1]
    if line[0] == "text":
        return box.render(line[1]).encode("utf-8")
    _, value, ascii_only = line
    if isinstance(value.get("url"), str):
        value = {**value, "url": box.render(value["url"])}
    try:
        return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: only as \\u escapes
        return json.dumps(value).encode("utf-8")


def jsonl_entries(data: bytes, photos: set[str]) -> list[Entry]:
    """Every line that is not blank is an entry; only an object with a url key is a row."""
    entries = []
    for number, raw in lines_of(data):
        if not raw.decode("utf-8", "surrogateescape").strip():
            continue
        text = utf8(raw)
        if text is None:
            entries.append(Entry(number, None, reason="invalid_input"))
            continue
        raws = (text, text.strip(), text.rstrip("\r"))
        try:
            value = json.loads(text.strip())
        except (ValueError, RecursionError):
            value = None
        if not isinstance(value, dict) or "url" not in value:
            entries.append(Entry(number, raws, reason="invalid_input"))
        else:
            entries.append(url_entry(number, value["url"], photos, raws))
    return entries


@given(lines=with_repeats(JSON_LINE, max_size=12), gz=st.booleans())
@example(
    lines=[("text", text) for text in JSON_CRAFTED_TEXTS]
    + [("object", {"url": url}, True) for url in [*HOSTILE, *PHOTO_FORMS_2]],
    gz=True,
)
def test_jsonl_lists(capfd, lines, gz):
    with sandbox() as box:
        data = b"\n".join(json_line(box, line) for line in lines)
        note(f"list: {short(data, 5000)!r}")
        code, records, report = run_list(capfd, box, "list.jsonl", data, gz)
        check(box, code, records, report, jsonl_entries(data, box.photos()))


# --- parquet --------------------------------------------------------------------------

URL_TYPES = ["string", "string", "string", "large_string", "dictionary", "binary", "int", "null"]
INT64 = st.integers(-(2**63), 2**63 - 1)
DAYS = datetime.timedelta(days=10**6)  # a duration in microseconds fits int64
# Extra parquet columns (their values become the record's fields): name -> values, type.
EXTRA_COLUMNS = {
    "id": (INT64, "int64"),
    "big": (st.integers(0, 2**64 - 1), "uint64"),
    "caption": (TEXT, "string"),
    "blob": (st.binary(max_size=10), "binary"),
    "score": (st.floats(), "float64"),
    "price": (st.decimals(-(10**10), 10**10, allow_nan=False, places=2), "decimal"),
    "tags": (st.lists(st.none() | TEXT, max_size=3), "tags"),
    "when": (st.datetimes(timezones=st.just(datetime.UTC)), "timestamp"),
    "naive": (st.datetimes(), "naive"),
    "day": (st.dates(), "date32"),
    "span": (st.timedeltas(-DAYS, DAYS), "duration"),
    "meta": (st.fixed_dictionaries({"a": st.none() | TEXT, "b": st.none() | INT64}), "meta"),
    "kv": (st.lists(st.tuples(TEXT, st.none() | st.integers(-5, 5)), max_size=2), "kv"),
}


def arrow_type(name: str) -> Any:
    import pyarrow as pa

    composite = {
        "decimal": pa.decimal128(14, 2),
        "tags": pa.list_(pa.string()),
        "timestamp": pa.timestamp("us", tz="UTC"),
        "naive": pa.timestamp("us"),
        "duration": pa.duration("us"),
        "meta": pa.struct([("a", pa.string()), ("b", pa.int64())]),
        "kv": pa.map_(pa.string(), pa.int64()),
    }
    return composite[name] if name in composite else getattr(pa, name)()


@st.composite
def parquet_lists(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(URL_TYPES))
    value = {
        "int": st.none() | st.integers(-(2**63), 2**63 - 1),
        "null": st.none(),
        "binary": st.none() | st.just("") | PADDED | PHOTO | st.binary(max_size=10),
    }.get(kind, st.one_of(PADDED, PHOTO, PHOTO, st.none(), st.just(""), SPACE))
    urls = draw(with_repeats(value, max_size=12))
    names = draw(st.lists(st.sampled_from(sorted(EXTRA_COLUMNS)), unique=True, max_size=4))
    values = {name: st.none() | EXTRA_COLUMNS[name][0] for name in names}
    columns = {name: [draw(values[name]) for _ in urls] for name in names}
    row_group = draw(st.integers(1, 5))
    batch_rows = draw(st.integers(1, 5))
    return {
        "kind": kind,
        "urls": urls,
        "columns": columns,
        "row_group": row_group,
        "batch_rows": batch_rows,
    }


def parquet_bytes(box: Sandbox, spec: dict[str, Any]) -> tuple[bytes, list[Any]]:
    """The parquet file of `spec`, and the url cells as a reader sees them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kind = spec["kind"]
    urls = [box.render(url) if isinstance(url, str) else url for url in spec["urls"]]
    if kind == "binary":
        urls = [url.encode("utf-8") if isinstance(url, str) else url for url in urls]
    types = {"string": pa.string(), "large_string": pa.large_string(), "binary": pa.binary()}
    types |= {"dictionary": pa.string(), "int": pa.int64(), "null": pa.null()}
    column = pa.array(urls, type=types[kind])
    if kind == "dictionary":
        column = column.dictionary_encode()
    table = pa.table(
        {
            **{
                name: pa.array(values, type=arrow_type(EXTRA_COLUMNS[name][1]))
                for name, values in spec["columns"].items()
            },
            "url": column,
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=spec["row_group"])
    return buffer.getvalue(), urls


def parquet_entry(index: int, url: Any, photos: set[str]) -> Entry:
    """A row's entry: its url cell as text, or (null, binary) any text for the row."""
    if url is None or url == b"":
        return Entry(index, None, reason="empty")
    if isinstance(url, bytes):
        return Entry(index, None)
    return url_entry(index, url, photos)


@given(spec=parquet_lists(), gz=st.booleans())
def test_parquet_lists(capfd, spec, gz):
    with sandbox() as box:
        data, urls = parquet_bytes(box, spec)
        note(f"urls: {short(urls)!r}")
        options = {"batch_rows": spec["batch_rows"]}
        code, records, report = run_list(capfd, box, "list.parquet", data, gz, **options)
        photos = box.photos()
        expected = [parquet_entry(number, url, photos) for number, url in enumerate(urls, 1)]
        check(box, code, records, report, expected)


# --- a list without the url column ----------------------------------------------------


@pytest.mark.parametrize("suffix", ["csv", "tsv", "parquet", "csv.gz", "parquet.gz"])
def test_a_header_without_the_url_column_is_a_config_error(capfd, suffix):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with sandbox() as box:
        if suffix.startswith("parquet"):
            buffer = io.BytesIO()
            pq.write_table(pa.table({"link": ["images/photo-00.jpg"], "id": [1]}), buffer)
            data = buffer.getvalue()
        else:
            sep = "\t" if suffix.startswith("tsv") else ","
            data = f"link{sep}id\nimages/photo-00.jpg{sep}1\n".encode()
        kind = suffix.removesuffix(".gz")
        if suffix.endswith(".gz"):
            data = gzip.compress(data)
        (box.work / f"list.{suffix}").write_bytes(data)
        config = box.work / "job.yaml"
        job = {
            "name": "fuzz",
            "output": str(box.out),
            "stages": {
                "urls": {"kind": "url_list", "path": str(box.work / f"list.{suffix}")},
                "get": {"kind": "download", "input": "urls", "allow_schemes": ["file"]},
            },
        }
        config.write_text(yaml.safe_dump(job))
        before = snapshot(box.tmp, box.out)
        capfd.readouterr()
        code = main(["run", str(config), "--quiet"])
        err = capfd.readouterr().err
        assert code == 2, err
        assert "Traceback" not in err and "url" in err and "link" in err, (kind, err)
        assert snapshot(box.tmp, box.out) == before
        assert not (box.out / "results.jsonl").exists()
