"""The plan: validated stages in topological order, and the edges between them.

`build_plan` checks what the config layer cannot: stage kinds and their
options, inputs that exist, roles that fit (a source has no input, a sink no
consumer), and cycles. Every problem names the file, line and key. A `Plan`
is small and picklable: it is what every task receives, and each worker
compiles it once into live stage objects (`Plan.compile`).

The plan also answers the graph's questions: which stages are outputs (`is_output`),
which outputs a stage feeds (`sinks_below`), the plan cut to some stages and what they
read from (`upstream`), and the local folders its sinks write (`sink_folders`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from pydantic import ValidationError

from pipeline.config import ConfigDocument, JobConfig, Options, StageConfig
from pipeline.config.model import suggest, validate_model
from pipeline.errors import ConfigError
from pipeline.records import JobContext, Partition
from pipeline.stages.base import Source, Stage
from pipeline.stages.registry import stage_kind, stage_kinds
from pipeline.stages.shared.reducing import Conclusion, Reducer
from pipeline.storage import output_folder


@dataclass(frozen=True)
class StageNode:
    """One stage of the plan: what it is, what it reads, its validated options."""

    name: str
    kind: str
    role: str
    inputs: tuple[str, ...]
    options: Options


@dataclass(frozen=True)
class Plan:
    """The validated job: stages in topological order plus run settings.

    `conclusions` holds, for each reducer that needs a first pass, what the first pass
    concluded (see `pipeline.stages.shared.reducing`): it travels with the plan into every
    task of the main pass. It is data for the tasks, not part of what a worker compiles,
    so it does not count in the fingerprint.
    """

    job: JobContext
    config: JobConfig
    nodes: tuple[StageNode, ...]
    conclusions: Mapping[str, Conclusion] = field(default_factory=dict, compare=False)

    @cached_property
    def by_name(self) -> dict[str, StageNode]:
        return {node.name: node for node in self.nodes}

    @cached_property
    def fingerprint(self) -> str:
        """A hash of the effective config and of every node (name, kind, inputs, options):
        same hash, same stages. The nodes count too, because a derived plan may change
        them and not the config (the first pass of a reducer, e.g. `dedupe` without
        `drop`), and a worker keeps one compiled plan per fingerprint."""
        nodes = [
            [node.name, node.kind, list(node.inputs), node.options.model_dump(mode="json")]
            for node in self.nodes
        ]
        document = {"config": self.config.model_dump(mode="json"), "nodes": nodes}
        canonical = json.dumps(document, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def consumers(self, name: str) -> tuple[str, ...]:
        return tuple(node.name for node in self.nodes if name in node.inputs)

    def upstream(self, names: Iterable[str]) -> Plan:
        """The plan cut down to `names` and every stage they read from, directly or not:
        its nodes and its config's stages (no first-pass conclusions)."""
        wanted = set(names)
        keep = wanted | _read_from(wanted, {node.name: node.inputs for node in self.nodes})
        stages = {name: spec for name, spec in self.config.stages.items() if name in keep}
        config = self.config.model_copy(update={"stages": stages})
        return Plan(self.job, config, tuple(node for node in self.nodes if node.name in keep))

    def sink_folders(self) -> list[Path]:
        """The local folders sinks write into (their `path` option, relative to the run
        directory); a sink writing to a URL has none."""
        folders = []
        for node in self.nodes:
            path = getattr(node.options, "path", None)
            if node.role == "sink" and isinstance(path, str) and "://" not in path:
                folders.append(Path(output_folder(self.config.output, path)))
        return folders

    def with_conclusions(self, conclusions: Mapping[str, Conclusion]) -> Plan:
        """This plan for the main pass: with the first pass's `conclusions` (reducer name ->
        conclusion), which each of its tasks then receives. The stages, and so the
        fingerprint and every worker's compiled copy, are the same."""
        concluded = replace(self, conclusions=dict(conclusions))
        for cached in ("fingerprint", "by_name"):
            if cached in self.__dict__:
                concluded.__dict__[cached] = self.__dict__[cached]
        return concluded

    def for_partition(self, partition: Partition) -> Plan:
        """The plan as one partition's task needs it: each conclusion cut to the part about
        the partition's items (`Conclusion.for_partition`), so a task carries a few bytes
        per item instead of the whole batch's conclusion. The same plan if it has none."""
        if not self.conclusions:
            return self
        return self.with_conclusions(
            {name: c.for_partition(partition) for name, c in self.conclusions.items()}
        )

    @cached_property
    def reducers(self) -> tuple[str, ...]:
        """The reducing stages (see `pipeline.stages.shared.reducing`), in plan order."""
        return tuple(node.name for node in self.nodes if issubclass(stage_kind(node.kind), Reducer))

    def is_output(self, name: str) -> bool:
        """A stage whose result a run keeps: a sink, or a reducer (its result is the
        report's). Items are routed to outputs, and the manifest tracks each one."""
        return self.by_name[name].role == "sink" or name in self.reducers

    def sinks_below(self, name: str) -> frozenset[str]:
        """The outputs (sinks and reducers) that stage `name`'s output reaches; an output
        reaches itself. A stage that reaches none never needs to run."""
        return self._outputs_below[name]

    @cached_property
    def _outputs_below(self) -> dict[str, frozenset[str]]:
        below: dict[str, frozenset[str]] = {}
        for node in reversed(self.nodes):  # consumers first
            own = {node.name} if self.is_output(node.name) else set()
            below[node.name] = frozenset(own.union(*(below[c] for c in self.consumers(node.name))))
        return below

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(node.name for node in self.nodes if node.role == "source")

    def instantiate(self, node: StageNode) -> Stage:
        """A live stage object for `node`."""
        return stage_kind(node.kind)(node.name, node.options, self.job)

    def compile(self) -> dict[str, Stage]:
        """Instantiate every stage and tell each about its neighbours, consumers first: a
        stage may ask its consumers what they need (a decoder their sizes), and a consumer
        that passes items on (a filter) knows its own by then."""
        stages = {node.name: self.instantiate(node) for node in self.nodes}
        for node in reversed(self.nodes):
            stage = stages[node.name]
            stage.connect([stages[name] for name in self.consumers(node.name)])
            stage.connect_inputs([stages[name] for name in node.inputs])
        return stages

    def count_items(self) -> int | None:
        """Items in all sources, if every source can count them cheaply; else None."""
        counts = [source.count_items() for source in self.source_stages().values()]
        known = [count for count in counts if count is not None]
        return sum(known) if len(known) == len(counts) else None

    def source_stages(self) -> dict[str, Source]:
        """Only the sources, for the client to read items from."""
        stages = {name: self.instantiate(self.by_name[name]) for name in self.sources}
        return {name: stage for name, stage in stages.items() if isinstance(stage, Source)}


def build_plan(job: JobConfig, doc: ConfigDocument) -> Plan:
    """Validate every stage against its kind and the DAG's shape; raise ConfigError."""
    nodes, problems = _stage_nodes(job.stages, doc)
    problems += _check_edges(nodes, doc)
    if not problems:
        order = _topological_order(nodes, doc)
        return Plan(JobContext(job.name, job.output), job, tuple(nodes[name] for name in order))
    raise ConfigError(problems)


def stage_problems(doc: ConfigDocument) -> list[str]:
    """The stage-level problems of a config whose job-level keys may be invalid.

    So that one `validate` reports the job's and the stages' problems together;
    a stage whose `kind`/`input` keys are themselves malformed was already
    reported by the job-level check and is skipped here.
    """
    raw = doc.data.get("stages")
    if not isinstance(raw, dict):
        return []
    stages = {}
    for name, spec in raw.items():
        try:
            stages[str(name)] = StageConfig.model_validate(spec)
        except ValidationError:
            continue
    nodes, problems = _stage_nodes(stages, doc)
    return problems + _check_edges(nodes, doc)


def _stage_nodes(
    stages: Mapping[str, StageConfig], doc: ConfigDocument
) -> tuple[dict[str, StageNode], list[str]]:
    """Each stage validated against its kind: the nodes that are valid, and the problems."""
    nodes: dict[str, StageNode] = {}
    problems: list[str] = []
    for name, spec in stages.items():
        loc = ("stages", name)
        try:
            cls = stage_kind(spec.kind)
        except KeyError:
            known = sorted(stage_kinds())
            problems.append(
                doc.problem(
                    (*loc, "kind"), f"unknown stage kind '{spec.kind}'{suggest(spec.kind, known)}"
                )
            )
            continue
        if spec.input is not None and spec.inputs is not None:
            problems.append(doc.problem(loc, "give either 'input' or 'inputs', not both"))
        options, option_problems = validate_model(doc, cls.Options, spec.options, loc)
        problems += option_problems
        if options is not None:
            nodes[name] = StageNode(name, spec.kind, cls.role, spec.input_names, options)
    return nodes, problems


def _check_edges(nodes: dict[str, StageNode], doc: ConfigDocument) -> list[str]:
    problems = []
    for node in nodes.values():
        loc = ("stages", node.name, "inputs" if len(node.inputs) > 1 else "input")
        if node.role == "source" and node.inputs:
            problems.append(doc.problem(loc, f"a {node.kind} source takes no input; remove it"))
        if node.role != "source" and not node.inputs:
            problems.append(
                doc.problem(("stages", node.name), "missing 'input': name the stage to read from")
            )
        for name in node.inputs:
            if name not in doc.data.get("stages", {}):
                problems.append(
                    doc.problem(loc, f"input '{name}' is not a stage{suggest(name, list(nodes))}")
                )
            elif name in nodes and nodes[name].role == "sink":
                problems.append(doc.problem(loc, f"'{name}' is a sink and has no output to read"))
    if nodes and not any(node.role == "source" for node in nodes.values()):
        problems.append(doc.problem(("stages",), "no source stage (e.g. kind: url_list)"))
    return problems + _upstream_problems(nodes, doc)


def _upstream_problems(nodes: dict[str, StageNode], doc: ConfigDocument) -> list[str]:
    """What each stage's kind needs from the stages above it and lacks (`upstream_problems`)."""
    problems = []
    inputs_of = {name: node.inputs for name, node in nodes.items()}
    for node in nodes.values():
        above = [
            (nodes[name].kind, nodes[name].options) for name in _read_from([node.name], inputs_of)
        ]
        for key, message in stage_kind(node.kind).upstream_problems(node.options, above):
            problems.append(doc.problem(("stages", node.name, key), message))
    return problems


def _read_from(names: Iterable[str], inputs_of: Mapping[str, tuple[str, ...]]) -> set[str]:
    """Every stage that `names` read from, directly or not, among those in `inputs_of`
    (a cycle ends the walk)."""
    found: set[str] = set()
    todo = [above for name in names for above in inputs_of.get(name, ())]
    while todo:
        name = todo.pop()
        if name in inputs_of and name not in found:
            found.add(name)
            todo.extend(inputs_of[name])
    return found


def _topological_order(nodes: dict[str, StageNode], doc: ConfigDocument) -> list[str]:
    """Kahn's algorithm, keeping config order among ready stages; reject cycles."""
    remaining = {name: set(node.inputs) for name, node in nodes.items()}
    order: list[str] = []
    while remaining:
        ready = [name for name, inputs in remaining.items() if not inputs - set(order)]
        if not ready:
            first = min(remaining)
            message = f"stages {', '.join(sorted(remaining))} form a cycle; break one input"
            raise ConfigError(doc.problem(("stages", first, "input"), message))
        for name in ready:
            order.append(name)
            del remaining[name]
    return order
