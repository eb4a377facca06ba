"""`filter` on real files: each rule family, the `where` language and its config errors,
missing fields, and incremental re-runs that keep filtered items skipped until a rule
changes."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import jsonschema
import pytest
from pydantic import ValidationError

from pipeline.config import load_document
from pipeline.errors import ConfigError
from pipeline.execution.runner import RunRequest, run
from pipeline.plan.schema import config_schema
from pipeline.stages.filter import FilterOptions, evaluate, parse_where
from pipeline.testing.images import jpeg_bytes, photo, png_bytes
from pipeline.testing.server import TestServer
from tests.conftest import REPO
from tests.stage_jobs import records, run_job, write_photos

# name -> (size, format, license); "d" has no license column at all
CORPUS = {
    "a": ((400, 300), "jpeg", "cc0"),
    "b": ((120, 90), "jpeg", "cc-by"),
    "c": ((300, 600), "png", "gpl"),
    "d": ((1000, 250), "jpeg", None),
    "e": ((256, 256), "png", "cc0"),
}


def image_bytes(name: str) -> bytes:
    (width, height), kind, _ = CORPUS[name]
    image = photo(width, height, seed=ord(name))
    return jpeg_bytes(image) if kind == "jpeg" else png_bytes(image)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The images on disk and `list.jsonl` of them, with a `license` column (not for d)."""
    folder = tmp_path_factory.mktemp("corpus")
    rows = []
    for name, (_, kind, license_) in CORPUS.items():
        path = folder / f"{name}.{'jpg' if kind == 'jpeg' else 'png'}"
        path.write_bytes(image_bytes(name))
        rows.append({"url": str(path), **({"license": license_} if license_ else {})})
    (folder / "list.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def size_of(corpus: Path, name: str) -> int:
    return next(corpus.glob(f"{name}.*")).stat().st_size


CHAINS = {  # the filter right after `after`, then a thumbnail and a sink
    "get": ("get", "keep", "decode"),
    "decode": ("get", "decode", "keep"),
    "stats": ("get", "decode", "stats", "keep"),
}
KINDS = {
    "get": "kind: download, allow_schemes: [file]",
    "decode": "kind: decode",
    "stats": "kind: stats",
}


def filter_job(tmp_path: Path, corpus: Path, after: str = "decode", **options) -> dict:
    """list -> ... -> `keep` (a filter right after `after`) -> ... -> thumb -> write; the
    records by file name."""
    lines = [f"list: {{kind: url_list, path: {corpus / 'list.jsonl'}}}"]
    previous = "list"
    for name in (*CHAINS[after], "thumb"):
        if name == "keep":
            lines.append(f"keep: {json.dumps({'kind': 'filter', 'input': previous, **options})}")
        elif name == "thumb":
            lines.append(f"thumb: {{kind: thumbnail, input: {previous}, size: [64, 64]}}")
        else:
            lines.append(f"{name}: {{{KINDS[name]}, input: {previous}}}")
        previous = name
    lines.append("write: {kind: write_images, input: thumb, path: kept}")
    report = run_job(tmp_path, *lines)
    assert report["counts"]["failed"] == 0, report
    return {Path(r["url"]).stem: r for r in records(tmp_path / "out")}


@pytest.mark.parametrize(
    ("options", "dropped", "message"),
    [
        ({"min_width": 256}, {"b": "width 120 < min_width 256"}, None),
        ({"max_width": 500}, {"d": "width 1000 > max_width 500"}, None),
        ({"min_height": 256}, {"b": "height 90 < min_height 256"}, "d"),
        ({"max_height": 400}, {"c": "height 600 > max_height 400"}, None),
        ({"min_aspect": 1.0}, {"c": "aspect 0.5 < min_aspect 1.0"}, None),
        ({"max_aspect": 2.5}, {"d": "aspect 4 > max_aspect 2.5"}, None),
        ({"min_aspect": 1.0, "max_aspect": 1.0}, {"a": "aspect 1.333 > max_aspect 1.0"}, "bcd"),
        ({"min_pixels": 20_000}, {"b": "pixels 10800 < min_pixels 20000"}, None),
        ({"max_pixels": 200_000}, {"d": "pixels 250000 > max_pixels 200000"}, None),
        ({"formats": ["png"]}, {"a": "format JPEG not in formats [PNG]"}, "bd"),
        ({"formats": ["jpg"]}, {"c": "format PNG not in formats [JPEG]"}, "e"),
    ],
)
def test_each_rule_skips_what_breaks_it_and_passes_the_rest(
    tmp_path, corpus, options, dropped, message
):
    found = filter_job(tmp_path, corpus, **options)
    gone = set(dropped) | set(message or "")
    for name, record in found.items():
        if name in gone:
            assert record["status"] == "skipped", name
            assert (record["stage"], record["reason"]) == ("keep", "filtered")
            assert record["outputs"] == [] and "thumb" not in record["timings"]
            assert "keep" in record["timings"]
        else:
            assert record["status"] == "ok", (name, record["message"])
            assert len(record["outputs"]) == 1 and Path(record["outputs"][0]).is_file()
    for name, text in dropped.items():
        assert found[name]["message"] == text
    assert len(list((tmp_path / "out" / "kept").iterdir())) == len(CORPUS) - len(gone)


@pytest.mark.parametrize("rule", ["min_bytes", "max_bytes"])
def test_a_bytes_rule_right_after_download_never_decodes_what_it_drops(tmp_path, corpus, rule):
    sizes = sorted((size_of(corpus, name), name) for name in CORPUS)
    (small, smallest), (large, largest) = sizes[0], sizes[-1]
    assert small < sizes[1][0] and sizes[-2][0] < large
    limit = {"min_bytes": small + 1, "max_bytes": large - 1}[rule]
    found = filter_job(tmp_path, corpus, after="get", **{rule: limit})
    name = {"min_bytes": smallest, "max_bytes": largest}[rule]
    sign = "<" if rule == "min_bytes" else ">"
    size = small if rule == "min_bytes" else large
    assert found[name]["message"] == f"bytes {size} {sign} {rule} {limit}"
    assert found[name]["status"] == "skipped" and "decode" not in found[name]["timings"]
    assert "width" not in found[name]  # decode never ran on it
    others = [record for key, record in found.items() if key != name]
    assert all(record["status"] == "ok" and "decode" in record["timings"] for record in others)


def test_where_on_fields_and_sizes_with_a_missing_field(tmp_path, corpus):
    found = filter_job(
        tmp_path, corpus, where="fields.license in ['cc0', 'cc-by'] and width >= 256"
    )
    assert {name for name, r in found.items() if r["status"] == "ok"} == {"a", "e"}
    assert found["b"]["message"] == "where width >= 256 is false (width=120)"
    assert found["c"]["message"] == (
        "where fields.license in ['cc0', 'cc-by'] is false (fields.license='gpl')"
    )
    # d has no license: the path is None, which is in no list
    assert found["d"]["message"] == (
        "where fields.license in ['cc0', 'cc-by'] is false (fields.license=None)"
    )


def test_where_on_an_analysis_result_and_a_missing_one(tmp_path, corpus):
    found = filter_job(
        tmp_path,
        corpus,
        after="stats",
        where="results.stats.brightness >= 0 and not results.nope.value > 0 "
        "and results['stats'].contrast is not None",
    )
    assert all(record["status"] == "ok" for record in found.values())
    assert all("brightness" in record["results"]["stats"] for record in found.values())
    # an ordering with a missing value is false, so the same where the other way drops all
    (tmp_path / "again").mkdir()
    found = filter_job(tmp_path / "again", corpus, after="stats", where="results.nope.value <= 0")
    assert {record["status"] for record in found.values()} == {"skipped"}
    assert (
        found["a"]["message"] == "where results.nope.value <= 0 is false (results.nope.value=None)"
    )


RECORD = {
    "width": 300,
    "height": 200,
    "format": "JPEG",
    "fields": {"license": "cc0", "tags": ["cat", "dog"], "my col": 3, "nsfw": False},
    "results": {"stats": {"brightness": 0.5}},
}


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("fields.license in ['cc0', 'cc-by'] and width >= 256", True),
        ("fields.license not in ('cc0',)", False),
        ("'cat' in fields.tags and 'cow' not in fields.tags", True),
        ("fields.tags[0] == 'cat' and fields.tags[-1] == 'dog' and fields.tags[5] is None", True),
        ("fields['my col'] == 3", True),
        ("100 < width <= 300 < 301", True),
        ("width > height > 250", False),
        ("not fields.nsfw", True),
        ("fields.nsfw or format == 'PNG'", False),
        ("results.stats.brightness >= 0.25 and results.stats.brightness != 1", True),
        ("width > -1 and +1.5 < 2", True),
        ("format in {'JPEG', 'PNG'}", True),
        ("fields.tags == ['cat', 'dog']", True),
        ("fields.missing is None and fields.license is not None", True),
        ("fields.missing == None", True),
        ("fields.missing != 'x'", True),
        # ordering with None, or across types, is false; `in` what is no container: false
        ("fields.missing < 1", False),
        ("fields.missing >= 1", False),
        ("not fields.missing < 1", True),
        ("fields.license > 1", False),
        ("'a' in fields.missing", False),
        ("1 in fields.license", False),
        ("'a' not in fields.missing", True),
        ("width.deeper.still == None", True),  # a path through a number ends in None
        ("True and not False and None is None", True),
    ],
)
def test_the_expression_language(expression, value):
    assert FilterOptions(where=expression).where == expression
    assert evaluate(parse_where(expression).body, RECORD) is value


@pytest.mark.parametrize(
    ("expression", "problem"),
    [
        ("__import__('os')", "does not allow function calls: __import__('os')"),
        (
            "fields.license.lower() == 'cc0'",
            "does not allow function calls: fields.license.lower()",
        ),
        ("(lambda: 1)", "does not allow lambdas: lambda: 1"),
        ("[1, 2][0] == 1", "attributes or subscripts of anything but a record path: [1, 2][0]"),
        ("'abc'[0] == 'a'", "anything but a record path: 'abc'[0]"),
        ("().__class__", "anything but a record path: ().__class__"),
        ("fields[width] == 1", "subscripts but of a record path by a string or integer"),
        ("fields[0:2] == 1", "subscripts but of a record path"),
        ("fields.__class__ == 1", "names starting with '__': __class__"),
        ("__builtins__", "names starting with '__': __builtins__"),
        ("width * 2 > 10", "does not allow arithmetic: width * 2"),
        ("-width < 0", "unary operators but 'not' and a number's sign: -width"),
        ("width if width else 0", "conditional expressions"),
        ("[x for x in fields]", "comprehensions"),
        ("{'a': 1} == fields", "dict literals"),
        ("f'{width}' == '1'", "f-strings"),
        ("b'x' == fields.license", "bytes literals: b'x'"),
        ("width is 3", "'is' / 'is not' with anything but None"),
        ("(y := 1)", "assignments"),
        ("width >=", "invalid expression"),
        ("import os", "invalid expression"),
    ],
)
def test_anything_else_in_where_is_a_config_error(expression, problem):
    with pytest.raises(ValidationError, match=_escaped(problem)):
        FilterOptions(where=expression)


def _escaped(text: str) -> str:
    return re.escape(text)


def test_a_where_error_names_file_line_and_key(tmp_path, corpus):
    with pytest.raises(ConfigError) as caught:
        run_job(
            tmp_path,
            f"list: {{kind: url_list, path: {corpus / 'list.jsonl'}}}",
            "get: {kind: download, input: list, allow_schemes: [file]}",
            """keep: {kind: filter, input: get, where: "__import__('os').system('true')"}""",
            "write: {kind: write_images, input: keep, path: kept}",
        )
    text = str(caught.value)
    assert "job.yaml:" in text and "stages.keep.where:" in text
    assert "does not allow function calls" in text


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({}, "give at least one rule"),
        ({"min_width": 300, "max_width": 200}, "min_width (300) is larger than max_width (200)"),
        ({"min_aspect": 2.0, "max_aspect": 1.0}, "min_aspect (2.0) is larger than max_aspect"),
        ({"formats": ["jpeg", "heic"]}, "unknown format 'HEIC'"),
        ({"formats": []}, "give at least one format"),
        ({"min_width": 0}, "greater than 0"),
        ({"min_widht": 10}, "min_widht"),
    ],
)
def test_bad_rules_are_config_errors(options, problem):
    with pytest.raises(ValidationError, match=_escaped(problem)):
        FilterOptions(**options)


def test_a_size_rule_before_decode_fails_the_item_saying_where_to_put_it(tmp_path, corpus):
    report = run_job(
        tmp_path,
        f"list: {{kind: url_list, path: {corpus / 'list.jsonl'}}}",
        "get: {kind: download, input: list, allow_schemes: [file]}",
        "keep: {kind: filter, input: get, min_width: 10}",
        "decode: {kind: decode, input: keep}",
        "write: {kind: write_images, input: decode, path: kept}",
    )
    assert report["counts"]["failed"] == len(CORPUS)
    record = records(tmp_path / "out")[0]
    assert (record["stage"], record["reason"]) == ("keep", "transform_error")
    assert (
        record["message"] == "keep: min_width needs the record's width: put the filter after decode"
    )


INCREMENTAL = """
name: filtered
backend: {{kind: threads, workers: 2}}
partition_size: 2
output: {out}
stages:
  urls:     {{kind: url_list, path: {urls}}}
  download: {{kind: download, input: urls, retries: 0, allow_hosts: [127.0.0.1]}}
  decode:   {{kind: decode, input: download}}
  keep:     {{kind: filter, input: decode, min_width: {min_width}}}
  small:    {{kind: thumbnail, input: keep, size: [32, 32]}}
  write:    {{kind: write_images, input: small, path: small}}
"""


def test_a_rerun_keeps_filtered_items_skipped_until_the_rule_changes(tmp_path):
    with TestServer() as server:
        urls = [server.add_bytes(f"/{name}.img", image_bytes(name)) for name in CORPUS]
        (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
        out = tmp_path / "out"

        def job(min_width: int, **flags: bool) -> dict:
            config = tmp_path / "job.yaml"
            config.write_text(
                INCREMENTAL.format(out=out, urls=tmp_path / "urls.txt", min_width=min_width)
            )
            return run(RunRequest(config=config, **flags))

        def by_name() -> dict[str, dict]:
            return {r["url"].rsplit("/", 1)[1].split(".")[0]: r for r in records(out)}

        first = job(350)  # keeps a (400) and d (1000)
        assert first["counts"] == {"ok": 2, "failed": 0, "skipped": 3}
        assert by_name()["b"]["message"] == "width 120 < min_width 350"
        assert set(server.hits.values()) == {1}

        second = job(350)
        assert second["counts"] == {"ok": 0, "failed": 0, "skipped": 5}
        assert second["skipped_by_reason"] == {"unchanged": 2, "filtered": 3}
        assert set(server.hits.values()) == {1}  # nothing downloaded again
        filtered = by_name()["b"]
        assert (filtered["status"], filtered["reason"]) == ("skipped", "filtered")
        assert filtered["message"].startswith(f"filtered in run {first['run_id']}")

        retried = job(350, retry_failed=True)  # not failures: --retry-failed leaves them
        assert retried["skipped_by_reason"] == {"unchanged": 2, "filtered": 3}
        assert set(server.hits.values()) == {1}

        third = job(200)  # a new rule: every item is evaluated (and written) again
        assert third["counts"] == {"ok": 4, "failed": 0, "skipped": 1}
        assert set(server.hits.values()) == {2}
        assert by_name()["b"]["message"] == "width 120 < min_width 200"
        assert by_name()["c"]["status"] == "ok"

        fourth = job(200, full=True)  # --full redoes the filtered item too
        assert fourth["counts"] == {"ok": 4, "failed": 0, "skipped": 1}
        assert set(server.hits.values()) == {3}
        assert by_name()["b"]["message"] == "width 120 < min_width 200"


def test_the_example_config_runs_offline_and_fits_the_schema(tmp_path):
    config = REPO / "configs" / "filter.yaml"
    # configs/schema.json is regenerated by the lead; the schema the code makes must hold now
    jsonschema.validate(load_document(config).data, config_schema())
    overrides = [f"output={tmp_path / 'filter'}", "backend.kind=threads"]
    report = run(RunRequest(config=config, overrides=overrides))
    # photo-03, -11 and -19 are stored landscape with EXIF orientation 6: portraits as shown
    assert report["counts"] == {"ok": 10, "failed": 0, "skipped": 14}
    assert report["skipped_by_reason"] == {"filtered": 14}
    found = records(tmp_path / "filter")
    messages = {r["message"].split(" ")[0] for r in found if r["status"] == "skipped"}
    assert messages == {"bytes", "aspect", "where"}
    assert len(list((tmp_path / "filter" / "kept").iterdir())) == 10
    assert isinstance(parse_where(yaml_where(config)), ast.Expression)


def yaml_where(config: Path) -> str:
    return load_document(config).data["stages"]["keep"]["where"]


def test_a_verdict_on_list_fields_is_revised_when_the_list_changes(tmp_path):
    """The rule is the same, but the list now says something else about the item."""
    photos = write_photos(tmp_path / "photos", 2)
    listing = tmp_path / "list.csv"

    def run_with(labels: list[str]) -> dict[str, str]:
        rows = "".join(f"{path},{label}\n" for path, label in zip(photos, labels, strict=True))
        listing.write_text("url,label\n" + rows)
        run_job(
            tmp_path,
            f"urls: {{kind: url_list, path: '{listing}'}}",
            "get: {kind: download, input: urls, allow_schemes: [file]}",
            "decode: {kind: decode, input: get}",
            "keep: {kind: filter, input: decode, where: \"fields.label == 'landscape'\"}",
            "write: {kind: write_images, input: keep, path: kept}",
        )
        return {
            r["fields"]["label"] + str(r["index"]): r["reason"] for r in records(tmp_path / "out")
        }

    assert run_with(["portrait", "landscape"]) == {"portrait2": "filtered", "landscape3": None}
    assert run_with(["landscape", "landscape"]) == {"landscape2": None, "landscape3": "unchanged"}
