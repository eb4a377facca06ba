"""The stage DAG as text a viewer can draw: Mermaid (GitHub renders it) and Graphviz DOT.

Sources are rounded, sinks are cylinders, steps are boxes; each node shows the
stage's name and kind. `render` turns DOT into SVG or PNG with Graphviz's
`dot` program, when it is installed.
"""

from __future__ import annotations

import shutil
import subprocess
from html import escape

from pipeline.errors import PipelineError
from pipeline.plan.dag import Plan

MERMAID_SHAPES = {"source": ('(["', '"])'), "step": ('["', '"]'), "sink": ('[("', '")]')}
DOT_SHAPES = {"source": "box, style=rounded", "step": "box", "sink": "cylinder"}
RENDER_FORMATS = ("svg", "png")


def mermaid(plan: Plan) -> str:
    """`flowchart LR` with one node per stage and one arrow per input."""
    ids = {node.name: f"s{index}" for index, node in enumerate(plan.nodes)}
    lines = ["flowchart LR"]
    for node in plan.nodes:
        opening, closing = MERMAID_SHAPES[node.role]
        label = f"{escape(node.name, quote=False)}<br/><i>{node.kind}</i>".replace('"', "#quot;")
        lines.append(f"    {ids[node.name]}{opening}{label}{closing}")
    lines += [
        f"    {ids[source]} --> {ids[node.name]}" for node in plan.nodes for source in node.inputs
    ]
    return "\n".join(lines) + "\n"


def dot(plan: Plan) -> str:
    """A Graphviz digraph, left to right."""
    lines = [
        f"digraph {_quote(plan.config.name)} {{",
        "    rankdir=LR;",
        '    node [fontname="Helvetica", fontsize=11];',
    ]
    for node in plan.nodes:
        label = f'<{escape(node.name)}<BR/><FONT POINT-SIZE="9" COLOR="gray35">{node.kind}</FONT>>'
        lines.append(f"    {_quote(node.name)} [label={label}, shape={DOT_SHAPES[node.role]}];")
    lines += [
        f"    {_quote(source)} -> {_quote(node.name)};"
        for node in plan.nodes
        for source in node.inputs
    ]
    return "\n".join([*lines, "}"]) + "\n"


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def render(dot_text: str, image_format: str) -> bytes:
    """SVG or PNG bytes drawn by Graphviz; PipelineError when `dot` is not installed."""
    program = shutil.which("dot")
    if program is None:
        raise PipelineError(
            f"drawing {image_format} needs Graphviz's `dot` (e.g. apt-get install graphviz); "
            "--format mermaid and --format dot need nothing"
        )
    result = subprocess.run(
        [program, f"-T{image_format}"], input=dot_text.encode(), capture_output=True, check=False
    )
    if result.returncode != 0:
        raise PipelineError(f"dot failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout
