"""The config's JSON Schema: committed, in sync, and true to the configs it describes."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jsonschema
import pytest
import yaml

from pipeline.config import load_document
from pipeline.plan.schema import config_schema, schema_text
from pipeline.stages.registry import stage_kinds
from tests.conftest import REPO

SCHEMA_FILE = REPO / "configs" / "schema.json"
CONFIGS = sorted(REPO.glob("configs/**/*.yaml")) + sorted(REPO.glob("configs/**/*.yml"))
HEADER = re.compile(r"^# yaml-language-server: \$schema=(\S+)$")


def test_committed_schema_is_in_sync():
    assert SCHEMA_FILE.read_text() == schema_text(), (
        "configs/schema.json is stale: run `python -m pipeline schema -o configs/schema.json`"
    )


def test_schema_command_prints_the_committed_file():
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "schema"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == SCHEMA_FILE.read_text()


def test_every_stage_kind_has_its_options():
    schema = config_schema()
    mapping = schema["properties"]["stages"]["additionalProperties"]["discriminator"]["mapping"]
    assert set(mapping) == set(stage_kinds())
    download = schema["$defs"]["DownloadStage"]
    assert {"kind", "input", "timeout", "allow_hosts"} <= set(download["properties"])
    assert download["additionalProperties"] is False


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_example_config_names_the_schema_and_satisfies_it(config):
    first_line = config.read_text().splitlines()[0]
    header = HEADER.match(first_line)
    assert header, f"{config.name}: start it with '# yaml-language-server: $schema=...'"
    assert (config.parent / header.group(1)).resolve() == SCHEMA_FILE
    effective = load_document(config).data  # after ${VAR:-default} interpolation
    jsonschema.validate(effective, json.loads(SCHEMA_FILE.read_text()))


def test_schema_rejects_what_validation_rejects():
    config = yaml.safe_load((REPO / "configs" / "thumbnails.yaml").read_text())
    config["stages"]["download"]["timout"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, config_schema())
    config["stages"]["download"] = {"kind": "downlaod", "input": "urls"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, config_schema())
