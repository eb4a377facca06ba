"""Config errors name the file, line and key, suggest a fix, and are all reported at once."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from pipeline.execution.runner import RunRequest, prepare

GOOD = """
name: job
output: {out}
stages:
  urls: {{kind: url_list, path: {urls}}}
  download: {{kind: download, input: urls, allow_hosts: [127.0.0.1]}}
  decode: {{kind: decode, input: download}}
  thumb: {{kind: thumbnail, input: decode, size: [256, 256]}}
  write: {{kind: write_images, input: thumb, path: images}}
"""


def problems_of(config) -> str:
    with pytest.raises(ConfigError) as error:
        prepare(RunRequest(config=config))
    return str(error.value)


@pytest.fixture
def good(tmp_path):
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:1/a.jpg\n")
    return GOOD.format(out=tmp_path / "out", urls=urls)


def test_valid_config_plans_stages_in_order(write_config, good):
    plan, backend = prepare(RunRequest(config=write_config(good)))
    assert [node.name for node in plan.nodes] == ["urls", "download", "decode", "thumb", "write"]
    assert plan.consumers("decode") == ("thumb",)
    assert backend.name == "threads"


def test_unknown_key_names_file_line_and_suggests(write_config, good):
    config = write_config(good.replace("size: [256, 256]", "sise: [256, 256]"))
    message = problems_of(config)
    assert f"{config}:7: stages.thumb.sise: unknown key 'sise'; did you mean 'size'?" in message
    assert "thumb: {kind: thumbnail" in message  # the offending line is quoted
    assert "stages.thumb.size: missing required key" in message  # reported together


def test_unknown_kind_suggests(write_config, good):
    config = write_config(good.replace("kind: thumbnail", "kind: thumbnial"))
    message = problems_of(config)
    assert f"{config}:7: stages.thumb.kind: unknown stage kind 'thumbnial'" in message
    assert "did you mean 'thumbnail'?" in message


def test_wrong_type_is_reported_with_value(write_config, good):
    config = write_config(good.replace("size: [256, 256]", "size: big"))
    assert f"{config}:7: stages.thumb.size" in problems_of(config)


def test_missing_input_and_cycle(write_config, good):
    missing = write_config(good.replace("input: decode", "input: decoder"), "missing.yaml")
    assert "input 'decoder' is not a stage; did you mean 'decode'?" in problems_of(missing)
    cycle = write_config(good.replace("input: download", "input: thumb"), "cycle.yaml")
    assert "cycle" in problems_of(cycle)


def test_top_level_keys_and_duplicates(write_config, good):
    config = write_config(good.replace("name: job", "nmae: job\nname: job\nname: again"))
    message = problems_of(config)
    assert f"{config}:3: name: duplicate key" in message


def test_unknown_top_level_key(write_config, good):
    config = write_config(good.replace("name: job", "name: job\npartition_sise: 5"))
    assert "partition_sise: unknown key 'partition_sise'; did you mean 'partition_size'?" in (
        problems_of(config)
    )


def test_set_override_types_and_location(write_config, good):
    config = write_config(good)
    plan, _ = prepare(RunRequest(config=config, overrides=["stages.thumb.size=[128,96]"]))
    assert plan.by_name["thumb"].options.size == (128, 96)
    with pytest.raises(ConfigError) as error:
        prepare(RunRequest(config=config, overrides=["stages.thumb.size=huge"]))
    assert "--set stages.thumb.size: stages.thumb.size" in str(error.value)


def test_env_interpolation(write_config, good, monkeypatch):
    monkeypatch.setenv("THUMB_WIDTH", "100")
    text = good.replace("size: [256, 256]", "size: ['${THUMB_WIDTH}', '${THUMB_H:-50}']")
    plan, _ = prepare(RunRequest(config=write_config(text)))
    assert plan.by_name["thumb"].options.size == (100, 50)
    missing = write_config(good.replace("name: job", "name: ${NO_SUCH_VAR}"), "env.yaml")
    assert "environment variable NO_SUCH_VAR is not set" in problems_of(missing)


def test_invalid_yaml_names_line(write_config):
    config = write_config("name: job\nstages: {urls: [unclosed\n")
    assert f"{config}:3: invalid YAML" in problems_of(config)


def test_source_file_must_exist(write_config, good, tmp_path):
    config = write_config(good.replace(str(tmp_path / "urls.txt"), "nowhere.txt"))
    assert "stages.urls.path" in problems_of(config)
    assert "no such file: nowhere.txt" in problems_of(config)


def test_backend_kinds_are_the_backends_and_their_aliases():
    """The config's Literal (what it accepts) and the backends (what runs) name the same."""
    from typing import get_args

    from pipeline.config.model import BACKEND_ALIAS_NAMES, BACKEND_NAMES, BackendKind
    from pipeline.execution.backends import BACKEND_ALIASES, BACKENDS

    assert tuple(BACKENDS) == BACKEND_NAMES
    assert tuple(BACKEND_ALIASES) == BACKEND_ALIAS_NAMES
    assert get_args(BackendKind) == (*BACKENDS, *BACKEND_ALIASES)


@pytest.mark.parametrize(
    ("backend", "name", "meant"),
    [("{kind: thread, workers: 2}", "thread", "threads"), ("proceses", "proceses", "processes")],
)
def test_unknown_backend_names_file_line_key_and_suggests(write_config, good, backend, name, meant):
    config = write_config(good.replace("name: job", f"name: job\nbackend: {backend}"))
    message = problems_of(config)
    assert f"{config}:2: backend.kind: unknown backend '{name}'; did you mean '{meant}'?" in message
    assert "(valid: sync, threads, processes, distributed; aliases: synchronous," in message
    assert "stages.thumb" not in message  # the stages are fine: only the backend is reported
