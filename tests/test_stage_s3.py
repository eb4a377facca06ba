"""fsspec sources and sinks on a real S3-compatible server on loopback (moto's server mode)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.records import JobContext
from pipeline.stages.files import Files, FilesOptions
from tests.stage_jobs import records, run_job


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 and the environment that points boto at it."""
    # imported here, not at collection: pytest's own memory shows in subprocesses' peak RSS
    s3fs = pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    patch = pytest.MonkeyPatch()
    for name, value in {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        patch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("pipeline-test")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
    patch.undo()
    server.stop()


def test_list_from_s3_and_every_sink_to_s3(s3, tmp_path, image_server):
    import pyarrow.parquet as pq
    import webdataset as wds

    lines = ["url,label"] + [f"{image_server.url(f'/img/{n}.jpg')},label-{n}" for n in range(5)]
    s3.pipe("pipeline-test/lists/urls.csv", ("\n".join(lines) + "\n").encode())
    report = run_job(
        tmp_path,
        """
        urls: {kind: url_list, path: "s3://pipeline-test/lists/urls.csv"}
        get: {kind: download, input: urls, allow_hosts: [127.0.0.1]}
        decode: {kind: decode, input: get}
        small: {kind: resize, input: decode, size: [32, 32], mode: pad}
        images: {kind: write_images, input: small, path: s3://pipeline-test/out/images,
                 sidecar: true}
        tar: {kind: webdataset, input: small, path: s3://pipeline-test/out/wds, shard_size: 2}
        table: {kind: parquet, input: small, path: s3://pipeline-test/out/table}
        arrays: {kind: arrays, input: small, path: s3://pipeline-test/out/arrays,
                 shape: [32, 32, 3]}
        """,
        backend="threads",
    )
    assert report["counts"]["ok"] == 5
    found = records(tmp_path / "out")
    assert [r["fields"]["label"] for r in found] == [f"label-{n}" for n in range(5)]

    jpg = next(o for o in found[0]["outputs"] if o.endswith(".jpg"))
    with s3.open(jpg, "rb") as handle:
        assert Image.open(handle).size == (32, 32)
    assert json.loads(s3.cat(jpg.removesuffix(".jpg") + ".json"))["fields"] == {"label": "label-0"}

    local = tmp_path / "wds"
    s3.get("pipeline-test/out/wds/", str(local), recursive=True)
    shards = sorted(str(p) for p in local.glob("*.tar"))
    assert len(shards) == 3  # 2 samples a shard across the partitions of 4 and 1
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
    assert {s["json"]["fields"]["label"] for s in samples} == {f"label-{n}" for n in range(5)}

    table = pq.read_table("pipeline-test/out/table", filesystem=s3)
    assert sorted(table.column("key").to_pylist()) == sorted(r["key"] for r in found)
    shapes = sorted(
        np.load(s3.open(path, "rb")).shape for path in s3.glob("pipeline-test/out/arrays/*.npy")
    )
    assert shapes == [(5, 32, 32, 3)]  # one shard across the partitions of 4 and 1


def test_files_source_lists_an_s3_prefix(s3):
    for name in ["a.jpg", "b[1].png", "sub/c.jpg", "notes.txt"]:
        s3.pipe(f"pipeline-test/tree/{name}", b"x")
    options = FilesOptions(path="s3://pipeline-test/tree", recursive=True)
    urls = [item.url for item in Files("files", options, JobContext("t", "/x")).iter_items()]
    names = ["a.jpg", "b[1].png", "sub/c.jpg"]
    assert urls == [f"s3://pipeline-test/tree/{name}" for name in names]
    literal = FilesOptions(path="s3://pipeline-test/tree/b[1].png")
    assert [i.url for i in Files("f", literal, JobContext("t", "/x")).iter_items()] == [urls[1]]


def test_s3_settings_from_fsspec_config_instead_of_aws_variables(s3, tmp_path, image_server):
    """fsspec's own configuration (FSSPEC_S3 as JSON) sets the endpoint and the keys."""
    import os

    from tests.test_cli import cli

    lines = [image_server.url(f"/img/{n}.jpg") for n in range(3)]
    s3.pipe("pipeline-test/fsspec-conf/urls.txt", ("\n".join(lines) + "\n").encode())
    config = tmp_path / "job.yaml"
    config.write_text(
        f"name: conf\noutput: {tmp_path / 'out'}\nstages:\n"
        "  urls: {kind: url_list, path: 's3://pipeline-test/fsspec-conf/urls.txt'}\n"
        "  get: {kind: download, input: urls, allow_hosts: [127.0.0.1]}\n"
        "  decode: {kind: decode, input: get}\n"
        "  thumbs: {kind: thumbnail, input: decode, size: [32, 32]}\n"
        "  write: {kind: write_images, input: thumbs, path: 's3://pipeline-test/fsspec-conf/out'}\n"
    )
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env["FSSPEC_S3"] = json.dumps(
        {
            "endpoint_url": os.environ["AWS_ENDPOINT_URL"],
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"},
        }
    )
    result = cli("run", str(config), "-q", env=env)
    assert result.returncode == 0, result.stderr
    assert len(s3.ls("pipeline-test/fsspec-conf/out")) == 3
