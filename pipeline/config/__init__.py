"""Config layer: parse YAML, interpolate ${VAR}, apply --set, validate job-level keys."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pipeline.config.document import ConfigDocument, load_document
from pipeline.config.model import BackendConfig, JobConfig, Options, StageConfig, validate_model
from pipeline.errors import ConfigError

__all__ = [
    "BackendConfig",
    "ConfigDocument",
    "JobConfig",
    "Options",
    "StageConfig",
    "load_config",
]


def load_config(
    path: str | Path, overrides: Iterable[str] = ()
) -> tuple[JobConfig, ConfigDocument]:
    """Load and validate the job-level structure of a config file."""
    doc = load_document(path, overrides)
    data = dict(doc.data)
    if isinstance(data.get("backend"), str):
        data["backend"] = {"kind": data["backend"]}
    job, problems = validate_model(doc, JobConfig, data)
    if problems or job is None:
        raise ConfigError(problems)
    return job, doc
