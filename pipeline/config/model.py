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
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
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


# Where a cluster class's package comes from, when its module name is not it.
PIP_NAMES = {"dask_cloudprovider": "dask-cloudprovider[all]"}


def pip_name(module: str) -> str:
    """The `pip install` name of a top-level module (dask_jobqueue -> dask-jobqueue)."""
    top = module.split(".")[0]
    return PIP_NAMES.get(top, top.replace("_", "-"))


def import_problem(path: str) -> str | None:
    """Why `module.Name` cannot be imported (with the `pip install` line), or None."""
    import importlib

    module, _, name = path.rpartition(".")
    if not module or not name:
        return f"'{path}' is not an import path like dask_jobqueue.SLURMCluster"
    try:
        found = importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or module
        return (
            f"cannot import {module} ({exc}): the client creates the cluster, so install "
            f"it here: pip install {pip_name(missing)}"
        )
    if not callable(getattr(found, name, None)):
        classes = [attr for attr in dir(found) if attr[:1].isupper()]
        return f"{module} has no class {name}{suggest(name, classes)}"
    return None


class WaitForWorkers(Options):
    """How many workers a created cluster must have before (and while) partitions run."""

    n: NonNegativeInt | None = Field(
        None,
        description="Workers to wait for before the first task; default: scale or adapt.minimum",
    )
    timeout: PositiveFloat = Field(
        300.0, description="Seconds to wait for them, and the longest a run waits with none"
    )


class AdaptConfig(BaseModel):
    """`cluster.adapt(...)`: minimum and maximum workers, and any other keyword it takes
    (interval, wait_count, target_duration)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    minimum: NonNegativeInt = Field(0, description="Fewest workers (0: none when idle)")
    maximum: PositiveInt = Field(description="Most workers; also sizes the in-flight window")

    @property
    def kwargs(self) -> dict[str, Any]:
        return {"minimum": self.minimum, "maximum": self.maximum, **(self.model_extra or {})}


class ClusterConfig(Options):
    """A cluster the run creates and closes: `class(**kwargs)`, then scale or adapt."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    class_: str = Field(
        alias="class",
        description="Import path of a cluster class, e.g. dask_jobqueue.SLURMCluster",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Its keyword arguments")
    scale: NonNegativeInt | None = Field(None, description="cluster.scale(N): a fixed size")
    adapt: AdaptConfig | None = Field(None, description="cluster.adapt(...): scale on demand")
    wait_for_workers: WaitForWorkers = WaitForWorkers()

    @field_validator("class_")
    @classmethod
    def _importable(cls, value: str) -> str:
        problem = import_problem(value)
        if problem:
            raise PydanticCustomError("unknown_name", "{problem}", {"problem": problem})
        return value

    @field_validator("adapt")
    @classmethod
    def _scale_or_adapt(cls, value: AdaptConfig | None, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("scale") is not None:
            raise PydanticCustomError("unknown_name", "give scale or adapt, not both", {})
        if value is not None and value.minimum > value.maximum:
            raise PydanticCustomError("unknown_name", "adapt.minimum is above adapt.maximum", {})
        return value

    @property
    def workers_to_wait_for(self) -> int:
        """Workers to wait for before the first task: none when adapting from 0, which
        scales up only once tasks are queued."""
        if self.wait_for_workers.n is not None:
            return self.wait_for_workers.n
        if self.adapt is not None:
            return self.adapt.minimum
        return self.scale or 0


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
    cluster: ClusterConfig | None = Field(
        None,
        description="distributed only: a cluster to create and close (instead of address)",
    )
    client_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="distributed only: keyword arguments of the Client"
    )
    retries: NonNegativeInt = Field(
        1, description="distributed only: times a task that raised is re-run (not item errors)"
    )
    max_in_flight: PositiveInt | None = Field(
        None,
        description="Partitions submitted but not finished; default: 2 x workers "
        "(distributed: 2 x the cluster's live threads, or its adapt.maximum)",
    )

    @model_validator(mode="before")
    @classmethod
    def _cluster_means_distributed(cls, data: Any) -> Any:
        """A `cluster` with no `kind` runs on it: kind distributed."""
        if isinstance(data, dict) and data.get("cluster") is not None and "kind" not in data:
            return {**data, "kind": "distributed"}
        return data

    @field_validator("kind", mode="before")
    @classmethod
    def _known_kind(cls, value: Any) -> Any:
        """An unknown name says which it may have meant, and lists the valid ones."""
        if isinstance(value, str) and value not in get_args(BackendKind):
            raise PydanticCustomError(
                "unknown_name", "{problem}", {"problem": unknown_backend(value)}
            )
        return value

    @field_validator("cluster")
    @classmethod
    def _address_or_cluster(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("address"):
            raise PydanticCustomError(
                "unknown_name",
                "give one of backend.address and backend.cluster, not both (address: {address})",
                {"address": info.data["address"]},
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
