"""A JSON Schema of the whole config, for editors (yaml-language-server) and docs.

It is made from the same pydantic models that validate configs: the job-level
`JobConfig`, and for `stages` one variant per registered kind (its `Options`
plus `kind`, `input`, `inputs`), told apart by `kind`. The committed copy is
`configs/schema.json`; `python -m pipeline schema` prints it and a test keeps
the two equal.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, create_model

from pipeline.config import BackendConfig, JobConfig
from pipeline.config.model import BackendKind
from pipeline.stages.registry import stage_kinds


def _stage_model(kind: str) -> type[BaseModel]:
    """One stage kind's entry: `kind: <name>`, its inputs and its own options."""
    cls = stage_kinds()[kind]
    title = "".join(part.capitalize() for part in kind.split("_")) + "Stage"
    return create_model(
        title,
        __base__=cls.Options,
        __doc__=(cls.description or cls.__doc__ or kind).strip(),
        kind=(Literal[kind], Field(description=f"Stage kind: {kind} ({cls.role})")),
        input=(str | None, Field(None, description="The stage this one reads from")),
        inputs=(list[str] | None, Field(None, description="Several stages to read from")),
    )


def _schema_model() -> type[BaseModel]:
    """JobConfig with typed stages and the short `backend: NAME` form."""
    variants = tuple(_stage_model(kind) for kind in sorted(stage_kinds()))
    stage = Annotated[Union[variants], Field(discriminator="kind")]  # noqa: UP007
    return create_model(
        "PipelineConfig",
        __base__=JobConfig,
        __doc__="A pipeline job: a DAG of named stages, run on a Dask backend.",
        backend=(
            BackendConfig | BackendKind,
            Field(BackendConfig(), description="A backend name, or {kind: NAME, ...}"),
        ),
        stages=(dict[str, stage], Field(description="Named stages; input/inputs make the edges")),
    )


def config_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a config file."""
    schema = _schema_model().model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def schema_text() -> str:
    """The schema as the committed file holds it."""
    return json.dumps(config_schema(), indent=2, sort_keys=True) + "\n"
