"""The example configs of each stage group run offline on the shipped samples."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.execution.runner import RunRequest, run
from tests.conftest import REPO
from tests.stage_jobs import records


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "counts", "outputs"),
    [
        # 24 listed + 10 globbed that are listed too (a key met twice is skipped)
        ("sources", (24, 10), {"thumbnails": 48}),  # image + sidecar each
        ("transforms", (24, 0), {"gray": 24, "padded": 24, "dedupe-near.json": 1}),
        # shards (+ keys) and their summaries
        ("sinks", (24, 0), {"webdataset": 12, "parquet": 6, "arrays": 3, "images": 48}),
    ],
)
def test_example_config_runs(tmp_path, name, counts, outputs):
    out = tmp_path / name
    overrides = [f"output={out}", "backend.kind=threads"]
    report = run(RunRequest(config=REPO / f"configs/{name}.yaml", overrides=overrides))
    assert report["counts"] == {"ok": counts[0], "failed": 0, "skipped": counts[1]}
    for entry, count in outputs.items():
        found = list((out / entry).iterdir()) if (out / entry).is_dir() else [out / entry]
        assert len(found) == count, entry
    if name == "sinks":
        shard = np.load(sorted((out / "arrays").glob("*.npy"))[0])
        assert shard.shape == (24, 3, 64, 64) and shard.dtype == np.float32  # one shard
    if name == "sources":
        listed = [record for record in records(out) if "fields" in record]
        assert (
            len(listed) == 24 and listed[0]["index"] == 2
        )  # line 2: the first row after the header
        assert listed[0]["fields"] == {
            "id": "0",
            "caption": "synthetic photo 0, 640x480",
            "label": "landscape",
        }
