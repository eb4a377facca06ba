"""The plan answers the graph's questions: outputs, the outputs below a stage, the plan cut
to what some stages read from, the sinks' local folders; and it carries a first pass's
conclusions to each task, cut to the task's partition."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.plan import Plan, build_plan
from pipeline.records import Partition, SourceItem
from pipeline.stages.dedupe import Duplicates

# Two branches from `decode`: thumbnails to a local folder, and hashes through a reducer
# to a sink that writes to a URL; `orphan` feeds no output.
DAG = """
name: two-branches
output: {out}
stages:
  urls: {{kind: url_list, path: {urls}}}
  get: {{kind: download, input: urls}}
  decode: {{kind: decode, input: get}}
  thumb: {{kind: thumbnail, input: decode, size: [64, 64]}}
  small: {{kind: write_images, input: thumb, path: small}}
  hash: {{kind: phash, input: decode}}
  near: {{kind: dedupe, input: hash, drop: true}}
  remote: {{kind: write_images, input: near, path: "memory://plan-test/remote"}}
  orphan: {{kind: resize, input: decode, size: [32, 32]}}
"""


@pytest.fixture
def plan(write_config, tmp_path) -> Plan:
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:1/a.jpg\n")
    job, doc = load_config(write_config(DAG.format(out=tmp_path / "out", urls=urls)))
    return build_plan(job, doc)


def test_outputs_are_the_sinks_and_the_reducers(plan):
    assert plan.reducers == ("near",)
    outputs = [node.name for node in plan.nodes if plan.is_output(node.name)]
    assert outputs == ["small", "near", "remote"]


def test_sinks_below_each_stage(plan):
    below = {node.name: plan.sinks_below(node.name) for node in plan.nodes}
    assert below == {
        "urls": {"small", "near", "remote"},
        "get": {"small", "near", "remote"},
        "decode": {"small", "near", "remote"},
        "thumb": {"small"},
        "small": {"small"},
        "hash": {"near", "remote"},
        "near": {"near", "remote"},  # a reducer is an output, and feeds the sink after it
        "remote": {"remote"},
        "orphan": frozenset(),
    }


def test_upstream_cuts_the_nodes_and_the_configs_stages(plan):
    cut = plan.upstream(["near"])
    assert [node.name for node in cut.nodes] == ["urls", "get", "decode", "hash", "near"]
    assert list(cut.config.stages) == ["urls", "get", "decode", "hash", "near"]
    assert cut.config.model_dump(exclude={"stages"}) == plan.config.model_dump(exclude={"stages"})
    assert cut.by_name["near"] == plan.by_name["near"]  # the nodes themselves are unchanged
    assert cut.fingerprint != plan.fingerprint
    both = plan.upstream(["small", "hash"])
    assert [node.name for node in both.nodes] == ["urls", "get", "decode", "thumb", "hash", "small"]
    assert plan.upstream([n.name for n in plan.nodes]).fingerprint == plan.fingerprint


def test_sink_folders_are_the_local_ones_inside_the_run_dir(plan, tmp_path):
    assert plan.sink_folders() == [tmp_path / "out" / "small"]
    assert plan.upstream(["near"]).sink_folders() == []


def duplicates(*pairs: tuple[str, str]) -> Duplicates:
    keys, kept = zip(*sorted(pairs), strict=True) if pairs else ((), ())
    return Duplicates(np.array(keys, dtype="S20"), np.array(kept, dtype="S20"))


def partition(*urls: str) -> Partition:
    return Partition(0, "urls", tuple(SourceItem(i + 1, url) for i, url in enumerate(urls)))


def test_conclusions_travel_with_the_plan_cut_to_each_partition(plan):
    fingerprint = plan.fingerprint
    a, b, c = (partition(url).items[0].key for url in ("http://x/a", "http://x/b", "http://x/c"))
    built, plan = plan, plan.with_conclusions({"near": duplicates((b, a), (c, a))})
    assert built.conclusions == {}  # a plan, once built, never changes
    assert plan.fingerprint == fingerprint  # task data: the compiled stages are the same
    copied = pickle.loads(pickle.dumps(plan))
    assert copied.conclusions["near"].as_dict() == {b: a, c: a}
    task = plan.for_partition(partition("http://x/c", "http://x/d", "http://x/a"))
    assert task.conclusions["near"].as_dict() == {c: a}  # only this partition's items
    assert task.fingerprint == fingerprint and task.nodes == plan.nodes
    assert plan.for_partition(partition("http://x/d")).conclusions["near"].as_dict() == {}
    assert plan.upstream(["near"]).conclusions == {}


def test_a_plan_without_conclusions_is_its_own_task_plan(plan):
    assert plan.for_partition(partition("http://x/a")) is plan
    empty = duplicates()
    assert empty.for_partition(partition("http://x/a")).as_dict() == {}


def imported(path: Path) -> set[str]:
    """The pipeline packages a module imports from (at any indentation)."""
    found = re.findall(r"^\s*(?:from|import) (pipeline(?:\.\w+)?)", path.read_text(), re.M)
    return set(found)


def test_plan_and_state_import_no_execution_and_state_no_stages():
    package = Path(__file__).parents[1] / "pipeline"
    for path in [*(package / "plan").glob("*.py"), *(package / "state").glob("*.py")]:
        assert "pipeline.execution" not in imported(path), path
    for path in (package / "state").glob("*.py"):
        assert "pipeline.stages" not in imported(path), path


LAZY_PROBE = """
import sys
from pipeline.execution.runner import load_plan

load_plan("configs/thumbnails.yaml", sys.argv[1:]).compile()
loaded = {name.rsplit(".", 1)[-1] for name in sys.modules if name.startswith("pipeline.stages.")}
print(sorted({"orientation", "parquet", "phash", "webdataset"} & loaded), "numpy" in sys.modules)
"""


def loaded_by_plan(*overrides: str) -> str:
    import subprocess
    import sys

    from tests.conftest import REPO

    found = subprocess.run(
        [sys.executable, "-c", LAZY_PROBE, *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return found.stdout.strip() or found.stderr


def test_a_plan_imports_only_the_kinds_its_config_names():
    """A kind in the module named after it is imported alone (and numpy only for kinds
    that need it); `rotate`, which shares `orientation` with `flip`, is found by
    importing every kind module."""
    assert loaded_by_plan() == "[] False"
    turned = loaded_by_plan("stages.turn={kind: rotate, input: thumb, angle: 90}")
    assert turned == "['orientation', 'parquet', 'phash', 'webdataset'] True"
