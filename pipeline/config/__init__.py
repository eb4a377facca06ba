"""Config layer: parse YAML, interpolate ${VAR}, apply --set, validate job-level keys."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pipeline.config.document import ConfigDocument, load_document, mapping_document
from pipeline.config.model import BackendConfig, JobConfig, Options, StageConfig, validate_model
from pipeline.errors import ConfigError

__all__ = [
    "BackendConfig",
    "ConfigDocument",
    "JobConfig",
    "Options",
    "StageConfig",
    "load_config",
    "load_document",
    "mapping_document",
    "validate_job",
]


def load_config(
    path: str | Path, overrides: Iterable[str] = ()
) -> tuple[JobConfig, ConfigDocument]:
    """Load and validate the job-level structure of a config file."""
    doc = load_document(path, overrides)
    job, problems = validate_job(doc)
    if problems or job is None:
        raise ConfigError(problems)
    return job, doc


def validate_job(doc: ConfigDocument) -> tuple[JobConfig | None, list[str]]:
    """The job-level keys of `doc` as a JobConfig, or every problem found in them."""
    data = dict(doc.data)
    if isinstance(data.get("backend"), str):
        data["backend"] = {"kind": data["backend"]}
    return validate_model(doc, JobConfig, data)
