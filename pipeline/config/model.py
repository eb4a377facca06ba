"""The job config as typed value objects, and validation that names file, line and key.

Job-level keys are checked here. Each stage's own options are checked by the
plan against the model its kind registers (see `pipeline.stages.registry`),
with the same `validate_model` helper, so every error reads the same way.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal, TypeVar, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

from pipeline.config.document import ConfigDocument, Loc

M = TypeVar("M", bound=BaseModel)


class Options(BaseModel):
    """Base for every config section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# The backend names a config accepts (and the schema lists): the source of truth for
# them. `pipeline.execution.backends` maps the same names to classes (`BACKENDS`,
# `BACKEND_ALIASES`); the config may not import it, so tests/test_config.py keeps the
# two equal.
BackendName = Literal["sync", "threads", "processes", "distributed"]
BackendAlias = Literal[
    "synchronous", "single-threaded", "threading", "multiprocessing", "dask.distributed", "cluster"
]
BackendKind = Literal[BackendName, BackendAlias]
BACKEND_NAMES: tuple[str, ...] = get_args(BackendName)
BACKEND_ALIAS_NAMES: tuple[str, ...] = get_args(BackendAlias)


def unknown_backend(name: str) -> str:
    """The problem with a backend `name` that is neither a backend nor an alias."""
    return (
        f"unknown backend '{name}'{suggest(name, [*BACKEND_NAMES, *BACKEND_ALIAS_NAMES])} "
        f"(valid: {', '.join(BACKEND_NAMES)}; aliases: {', '.join(BACKEND_ALIAS_NAMES)})"
    )


class BackendConfig(Options):
    """Where and how partitions run."""

    kind: BackendKind = Field("threads", description="sync | threads | processes | distributed")
    workers: PositiveInt | None = Field(
        None,
        description="Worker threads/processes; default: 2 x cores (distributed: cores)",
    )
    threads_per_worker: PositiveInt | None = Field(
        None, description="distributed only: threads in each worker process; default: 2"
    )
    address: str | None = Field(
        None, description="distributed only: scheduler address; none starts a LocalCluster"
    )
    max_in_flight: PositiveInt | None = Field(
        None, description="Partitions submitted but not finished; default: 2 x workers"
    )

    @field_validator("kind", mode="before")
    @classmethod
    def _known_kind(cls, value: Any) -> Any:
        """An unknown name says which it may have meant, and lists the valid ones."""
        if isinstance(value, str) and value not in get_args(BackendKind):
            raise PydanticCustomError(
                "unknown_name", "{problem}", {"problem": unknown_backend(value)}
            )
        return value


class StageConfig(Options):
    """One named stage: its kind, its input stages, and its kind-specific options."""

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: str
    input: str | None = None
    inputs: list[str] | None = None

    @property
    def input_names(self) -> tuple[str, ...]:
        if self.inputs is not None:
            return tuple(self.inputs)
        return (self.input,) if self.input else ()

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class JobConfig(Options):
    """A whole job: the stage DAG, the backend, partitioning and the run directory."""

    name: str = Field(description="Job name, shown in reports")
    output: str = Field(description="Run directory: results, report, manifest, lock")
    backend: BackendConfig = BackendConfig()
    partition_size: PositiveInt = Field(64, description="Items per Dask task")
    stages: dict[str, StageConfig] = Field(description="Named stages; input/inputs make the edges")
    log_file: bool = Field(False, description="Also append log lines to RUN_DIR/pipeline.log")
    max_failed: NonNegativeInt | None = Field(
        None, description="Exit 0 if at most this many items failed in a run; default: none"
    )
    max_failed_fraction: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Exit 0 if at most this fraction of the items processed in a run failed",
    )


def validate_model(
    doc: ConfigDocument, model: type[M], data: Any, loc: Loc = ()
) -> tuple[M | None, list[str]]:
    """Validate `data` (found at `loc` in `doc`) into `model`; problems as text."""
    try:
        return model.model_validate(data), []
    except ValidationError as exc:
        return None, [_describe(doc, model, loc, error) for error in exc.errors()]


def _describe(doc: ConfigDocument, model: type[BaseModel], loc: Loc, error: Any) -> str:
    where = (*loc, *error["loc"])
    if error["type"] == "extra_forbidden":
        key = str(error["loc"][-1])
        allowed = _fields_at(model, error["loc"][:-1])
        return doc.problem(where, f"unknown key '{key}'{suggest(key, allowed)}")
    if error["type"] == "missing":
        return doc.problem(where, "missing required key")
    if error["type"] == "unknown_name":  # the message names the value and suggests
        return doc.problem(where, error["msg"])
    return doc.problem(where, f"{error['msg']} (got {error.get('input')!r})")


def _fields_at(model: type[BaseModel], path: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) model found along `path`, for suggestions."""
    for part in path:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return list(model.model_fields)


def suggest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """'; did you mean 'x'?' for the closest choice, else a list of valid ones."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; valid: {', '.join(sorted(choices))}" if choices else ""
