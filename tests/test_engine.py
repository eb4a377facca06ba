"""The engine keeps the graph and the client's memory bounded, whatever the input size."""

from __future__ import annotations

from pipeline.config import BackendConfig
from pipeline.execution.backends import ThreadsBackend
from pipeline.execution.engine import execute
from pipeline.execution.runner import RunRequest, prepare
from pipeline.stages.base import Partition, SourceItem


def test_partitions_are_pulled_lazily_and_bounded(write_config, tmp_path):
    config = write_config(
        f"""
        name: lazy
        output: {tmp_path / "out"}
        partition_size: 10
        stages:
          urls: {{kind: url_list, path: {tmp_path / "urls.txt"}}}
          download: {{kind: download, input: urls, allow_schemes: [file]}}
        """
    )
    (tmp_path / "urls.txt").write_text("")
    plan, _ = prepare(RunRequest(config=config))
    pulled = 0
    pulled_at_first_result: list[int] = []

    def endless_partitions():  # a million-line list would look like this: never materialised
        nonlocal pulled
        for index in range(100_000):
            pulled += 1
            items = tuple(SourceItem(i, f"/nonexistent/{index}/{i}") for i in range(10))
            yield Partition(index, "urls", items)
            if index == 49:
                return

    def on_records(records):
        if not pulled_at_first_result:
            pulled_at_first_result.append(pulled)
        assert len(records) == 10

    backend = ThreadsBackend(BackendConfig(workers=2, max_in_flight=3))
    execute(plan, backend, endless_partitions(), on_records)
    assert pulled == 50
    # At most max_in_flight partitions were submitted before the first result came back,
    # plus the one the engine holds while it waits for room.
    assert pulled_at_first_result[0] <= 4
