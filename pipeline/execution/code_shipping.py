"""Make every worker of a cluster run this client's `pipeline` code, or stop before starting.

A worker started elsewhere may lack the package, or have another version of it.
`ShipPackage` is a worker plugin carrying a zip of this client's package: a
worker whose code differs (by content digest) puts the zip first on its
`sys.path` and forgets the modules it had. The scheduler keeps the plugin, so
workers that join or restart later get it too. `probe` then asks every worker
what it runs; what cannot be shipped (a requirement such as Pillow, an old
Python, an output folder the worker cannot see) stops the run with one message
per worker saying what to install or change.

This module is pickled by value (see `register_pickle_by_value` below), so a
worker can run `probe` and `ShipPackage` before it has `pipeline` at all.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import secrets
import sys
import zipfile
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from typing import Any
from urllib.parse import urlsplit

import cloudpickle
from distributed import Client
from distributed.diagnostics.plugin import WorkerPlugin

from pipeline.errors import RunIncompleteError

PACKAGE = "pipeline"
PLUGIN_NAME = "pipeline-code"
MIN_PYTHON = (3, 11)


def package_files(root: Traversable, prefix: str = "") -> list[tuple[str, Traversable]]:
    """(relative path, file) for every file of a package, sorted, without bytecode caches."""
    found: list[tuple[str, Traversable]] = []
    for entry in sorted(root.iterdir(), key=lambda entry: entry.name):
        path = f"{prefix}{entry.name}"
        if entry.is_dir() and entry.name != "__pycache__":
            found += package_files(entry, path + "/")
        elif entry.is_file() and not entry.name.endswith((".pyc", ".pyo")):
            found.append((path, entry))
    return found


def package_digest(root: Traversable) -> str:
    """A hash of the package's file names and contents: same digest, same code."""
    digest = hashlib.sha256()
    for path, entry in package_files(root):
        digest.update(path.encode() + b"\0" + entry.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def installed_digest() -> str | None:
    """The digest of the `pipeline` this process imports, or None if it has none."""
    from importlib.resources import files

    try:
        return package_digest(files(PACKAGE))
    except ImportError:
        return None


class ShipPackage(WorkerPlugin):
    """Carries a zip of the client's package to workers whose code differs."""

    idempotent = False

    def __init__(self, archive: bytes, digest: str):
        self.archive = archive
        self.digest = digest
        self.path: str | None = None

    def setup(self, worker: Any) -> None:
        if installed_digest() == self.digest:
            return
        self.path = os.path.join(worker.local_directory, f"{PACKAGE}-{self.digest}.zip")
        with open(self.path, "wb") as handle:
            handle.write(self.archive)
        sys.path.insert(0, self.path)
        forget_package()

    def teardown(self, worker: Any) -> None:
        if self.path in sys.path:
            sys.path.remove(self.path)


def forget_package() -> None:
    """Drop every loaded `pipeline` module, so the next task imports the shipped code."""
    for name in [name for name in sys.modules if name.split(".")[0] == PACKAGE]:
        del sys.modules[name]
    importlib.invalidate_caches()


def probe(requirements: list[str], run_dir: str | None, marker: str | None) -> dict[str, Any]:
    """Runs on a worker: its host, Python, `pipeline` digest, missing requirements, output view."""
    import importlib.metadata
    import socket

    from packaging.requirements import Requirement

    missing = []
    for text in requirements:
        requirement = Requirement(text)
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            version = None
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            missing.append(f"{text} (has {version or 'none'})")
    sees_output = None
    if run_dir is not None and marker is not None:
        sees_output = os.path.exists(os.path.join(run_dir, marker))
    return {
        "host": socket.gethostname(),
        "python": tuple(sys.version_info[:2]),
        "digest": installed_digest(),
        "missing": missing,
        "cwd": os.getcwd(),
        "sees_output": sees_output,
    }


def package_archive() -> tuple[bytes, str]:
    """A zip of this client's `pipeline` package, and its digest."""
    from importlib.resources import files

    root = files(PACKAGE)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, entry in package_files(root):
            archive.writestr(f"{PACKAGE}/{path}", entry.read_bytes())
    return buffer.getvalue(), package_digest(root)


def requirements() -> list[str]:
    """This package's runtime requirements (no extras), as requirement strings."""
    import importlib.metadata

    from packaging.requirements import Requirement

    try:
        declared = importlib.metadata.requires(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [text for text in declared if Requirement(text).marker is None]


@dataclass(frozen=True)
class WorkerReport:
    """What one worker said about itself, and what is wrong with it for this run."""

    address: str
    facts: dict[str, Any]

    def problems(self, digest: str, run_dir: str | None) -> list[str]:
        facts, problems = self.facts, []
        where = f"worker {self.address} (host {facts['host']})"
        if tuple(facts["python"]) < MIN_PYTHON:
            version = ".".join(map(str, facts["python"]))
            problems.append(f"{where} runs Python {version}; pipeline needs 3.11 or newer")
        if facts["missing"]:
            wanted = " ".join(f"'{text.split(' (has')[0]}'" for text in facts["missing"])
            problems.append(
                f"{where} lacks {', '.join(facts['missing'])}; "
                f"install them in the worker's environment: pip install {wanted}"
            )
        elif facts["digest"] != digest:
            problems.append(
                f"{where} did not load the shipped pipeline code "
                f"(has {facts['digest'] or 'none'}, this client {digest}); "
                f"install this version there (pip install <this checkout>) or restart the worker"
            )
        if facts["sees_output"] is False:
            problems.append(
                f"{where} cannot see the output folder '{run_dir}' (it resolves it from "
                f"{facts['cwd']}): its files would stay on that host. Use a folder every host "
                f"shares at the same absolute path, or an fsspec URL such as s3://bucket/run"
            )
        return problems


def local_folder(output: str) -> str | None:
    """The output as a local folder path, or None for a URL of another filesystem."""
    parts = urlsplit(output)
    if parts.scheme == "file":
        return parts.path
    return output if len(parts.scheme) <= 1 else None  # one letter: a Windows drive


def prepare_workers(client: Client, output: str) -> None:
    """Ship this client's code to every worker, then check each can run and write the job.

    Raises RunIncompleteError listing every worker problem, before any task runs.
    """
    archive, digest = package_archive()
    client.register_plugin(ShipPackage(archive, digest), name=PLUGIN_NAME)
    run_dir = local_folder(output)
    marker = None
    if run_dir is not None:
        os.makedirs(run_dir, exist_ok=True)
        marker = f".pipeline-probe-{secrets.token_hex(8)}"
        open(os.path.join(run_dir, marker), "w").close()
    try:
        facts = client.run(probe, requirements(), run_dir, marker)
    finally:
        if marker is not None:
            os.unlink(os.path.join(run_dir, marker))
    problems = [
        problem
        for address, worker_facts in sorted(facts.items())
        for problem in WorkerReport(address, worker_facts).problems(digest, run_dir)
    ]
    if problems:
        raise RunIncompleteError("the cluster cannot run this job:\n  " + "\n  ".join(problems))


cloudpickle.register_pickle_by_value(sys.modules[__name__])
