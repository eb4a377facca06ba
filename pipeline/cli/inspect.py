"""`plan`, `graph` and `schema`: look at a job without running it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.cli.arguments import (
    add_backend_arguments,
    add_config_arguments,
    add_verbosity_flags,
    plan_from,
)
from pipeline.errors import EXIT_OK
from pipeline.execution.backends import Backend, DistributedBackend, describe_cluster, job_script
from pipeline.execution.runner import backend_for, plan_warnings
from pipeline.plan import Plan
from pipeline.plan.graph import RENDER_FORMATS, dot, mermaid, render
from pipeline.plan.schema import schema_text
from pipeline.state.results import REPORT_FILE, RESULTS_FILE
from pipeline.storage import output_folder

GRAPH_FORMATS = ("mermaid", "dot", *RENDER_FORMATS)


def add_commands(commands: argparse._SubParsersAction) -> None:
    plan_parser = commands.add_parser("plan", help="show what `run` would do (= run --dry-run)")
    add_config_arguments(plan_parser)
    add_backend_arguments(plan_parser)
    plan_parser.set_defaults(handler=command_plan)

    graph_parser = commands.add_parser("graph", help="draw the stage DAG (Mermaid, DOT, SVG, PNG)")
    add_config_arguments(graph_parser)
    graph_parser.add_argument(
        "--format", "-f", choices=GRAPH_FORMATS, help="default: from --output's suffix, or mermaid"
    )
    graph_parser.add_argument("--output", "-o", type=Path, help="write here instead of stdout")
    graph_parser.set_defaults(handler=command_graph)

    schema_parser = commands.add_parser("schema", help="print the config's JSON Schema")
    schema_parser.add_argument("--output", "-o", type=Path, help="write here instead of stdout")
    add_verbosity_flags(schema_parser)
    schema_parser.set_defaults(handler=command_schema)


def command_plan(args: argparse.Namespace) -> int:
    plan = plan_from(args)
    print(describe_plan(args.config, plan, backend_for(plan)))
    return EXIT_OK


def command_graph(args: argparse.Namespace) -> int:
    plan = plan_from(args)
    image_format = args.format or _format_of(args.output)
    text = mermaid(plan) if image_format == "mermaid" else dot(plan)
    data = render(text, image_format) if image_format in RENDER_FORMATS else text.encode()
    _write(data, args.output)
    return EXIT_OK


def command_schema(args: argparse.Namespace) -> int:
    _write(schema_text().encode(), args.output)
    return EXIT_OK


def _format_of(output: Path | None) -> str:
    suffix = output.suffix.lstrip(".").lower() if output else ""
    aliases = {"mmd": "mermaid", "gv": "dot"}
    suffix = aliases.get(suffix, suffix)
    return suffix if suffix in GRAPH_FORMATS else "mermaid"


def _write(data: bytes, output: Path | None) -> None:
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        output.write_bytes(data)
        print(f"wrote {output}", file=sys.stderr)


def describe_plan(path: Path, plan: Plan, backend: Backend) -> str:
    """What `run` would do: backend, items and partitions, stages, outputs, warnings."""
    config = plan.config
    total = plan.count_items()
    width = max(len(node.name) for node in plan.nodes)
    kind_width = max(len(node.kind) for node in plan.nodes)
    lines = [
        f"job        {config.name}  ({path}, config hash {plan.fingerprint})",
        f"backend    {backend.describe()}, up to {backend.max_in_flight} partitions in flight",
        *_cluster_lines(backend),
        f"items      {_items(total, config.partition_size)}",
        f"output     {config.output}/  ({RESULTS_FILE}, {REPORT_FILE})",
        "stages",
    ]
    for node in plan.nodes:
        edges = f"<- {', '.join(node.inputs)}" if node.inputs else node.role
        where = _sink_path(config.output, node.options) if node.role == "sink" else None
        lines.append(
            f"  {node.name:<{width}}  {node.kind:<{kind_width}}  {edges}"
            + (f"  -> {where}" if where else "")
        )
    problems = plan_warnings(plan, backend, total)
    lines.append("warnings   " + ("none" if not problems else problems[0]))
    lines += [f"           {problem}" for problem in problems[1:]]
    return "\n".join(lines)


def _cluster_lines(backend: Backend) -> list[str]:
    """What a `backend.cluster` run creates (and closes when it ends): the cluster, its
    scaling, and for dask-jobqueue the batch script of each worker job."""
    spec = backend.cluster_config if isinstance(backend, DistributedBackend) else None
    if spec is None:
        return []
    wait = spec.wait_for_workers
    lines = [
        f"cluster    creates {describe_cluster(spec)}; closed when the run ends",
        f"           waits for {spec.workers_to_wait_for} worker(s) at start, and at most "
        f"{wait.timeout:g}s with none (wait_for_workers)",
    ]
    try:
        script = job_script(spec)
    except Exception as exc:  # its kwargs are the cluster class's to judge
        lines.append(f"           job script: cannot be made: {type(exc).__name__}: {exc}")
        return lines
    if script is not None:
        lines.append("job script (each worker job; the scheduler's address is filled in at run)")
        lines += [f"  {line}" if line else "" for line in script.strip().splitlines()]
    return lines


def _items(total: int | None, size: int) -> str:
    if total is None:
        return f"not known before the run; partitions of {size}"
    partitions = -(-total // size)
    return f"{total} in {partitions} partition{'s' if partitions != 1 else ''} of {size}"


def _sink_path(run_dir: str, options: object) -> str | None:
    """Where a sink writes: its `path` option, inside the run directory unless absolute."""
    path = getattr(options, "path", None)
    return output_folder(run_dir, path) if isinstance(path, str) else None
