"""Fingerprints of what each sink's outputs depend on, so a re-run redoes only what changed.

A sink's fingerprint hashes its own kind and output-relevant options and, recursively,
those of every stage upstream of it (each stage says what counts in `fingerprint_data`,
e.g. download leaves out `concurrency`, decode adds the draft size its consumers chose).
Sources do not count: they say *which* items there are, and the item key names the item.
So changing one thumbnail size changes the fingerprint of that branch's sink only.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.plan import Plan


def digest(value: Any) -> str:
    """A short, stable hash of a JSON-able value."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def sink_fingerprints(plan: Plan) -> dict[str, str]:
    """The lineage fingerprint of every sink (and reducer) of `plan`."""
    stages = plan.compile()
    lineage: dict[str, str] = {}
    for node in plan.nodes:  # topological order: inputs first
        if node.role == "source":
            lineage[node.name] = "source"
            continue
        inputs = [[name, lineage[name]] for name in node.inputs]
        lineage[node.name] = digest([node.kind, stages[node.name].fingerprint_data(), inputs])
    return {node.name: lineage[node.name] for node in plan.nodes if plan.is_output(node.name)}
