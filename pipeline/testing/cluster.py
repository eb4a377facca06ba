"""A real Dask cluster on 127.0.0.1 from the `dask scheduler` / `dask worker` commands,
and an sshd of its own on 127.0.0.1 for distributed.SSHCluster (`LoopbackSSHD`).

Used by `make cluster` / `make cluster-down` and by the cluster tests. Every
process writes `<name>.pid` and `<name>.log` into one folder; `stop` ends
exactly the processes whose pid files are there (and their children, the
nannies' worker processes), nothing found by name.

    python -m pipeline.testing.cluster up --dir .cluster --workers 2 --port 8786
    python -m pipeline.testing.cluster down --dir .cluster
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

SCHEDULER_FILE = "scheduler.json"
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL


def dask_command() -> Path:
    """The `dask` command of this environment (the .venv's, next to its python)."""
    return Path(sys.executable).parent / "dask"


class DaskProcesses:
    """A scheduler and workers started as subprocesses, tracked by pid files in `folder`."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder).resolve()
        self.address: str | None = None
        self.dashboard_port: int | None = None

    def start_scheduler(
        self, port: int = 0, dashboard_port: int = 0, env: Mapping[str, str] | None = None
    ) -> str:
        """Start `dask scheduler` on 127.0.0.1; return its address once it listens."""
        self.folder.mkdir(parents=True, exist_ok=True)
        scheduler_file = self.folder / SCHEDULER_FILE
        scheduler_file.unlink(missing_ok=True)
        command = [str(dask_command()), "scheduler", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--dashboard-address", f"127.0.0.1:{dashboard_port}"]
        command += ["--scheduler-file", str(scheduler_file)]
        self._spawn("scheduler", command, env=env)
        info = self._wait_for(lambda: json.loads(scheduler_file.read_text()))
        self.address = info["address"]
        self.dashboard_port = info["services"].get("dashboard")
        return self.address

    def add_worker(
        self,
        name: str,
        threads: int = 1,
        python_flags: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> int:
        """Start `dask worker` (with its nanny) against the scheduler; return the pid.

        `python_flags` (e.g. `-S`) run the same `dask` script under this python with them.
        """
        assert self.address, "start the scheduler first"
        command = [str(dask_command())]
        if python_flags:
            command = [sys.executable, *python_flags, *command]
        command += ["worker", self.address, "--name", name, "--nthreads", str(threads)]
        command += ["--host", "127.0.0.1", "--no-dashboard", "--death-timeout", "30"]
        command += ["--local-directory", str(self.folder / "work")]
        return self._spawn(name, command, env=env, cwd=cwd)

    def wait_for_workers(self, count: int, timeout: float = 60.0) -> None:
        """Return once `count` workers are connected to the scheduler."""
        from distributed import Client

        with Client(self.address, timeout="10s") as client:
            client.wait_for_workers(count, timeout=timeout)

    def stop(self) -> None:
        """End every process with a pid file here: workers first, then the scheduler."""
        owned = {path.stem: process for path in self._pid_files() if (process := self._own(path))}
        scheduler = owned.pop("scheduler", None)
        _terminate(list(owned.values()))  # workers leave a live scheduler: quick and clean
        _terminate([scheduler] if scheduler else [])
        for pid_file in self._pid_files():
            pid_file.unlink()

    def _spawn(
        self,
        name: str,
        command: list[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> int:
        with open(self.folder / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,  # survives `make`, and Ctrl-C in its terminal
            )
        (self.folder / f"{name}.pid").write_text(f"{process.pid}\n")
        return process.pid

    def _pid_files(self) -> list[Path]:
        return sorted(self.folder.glob("*.pid"))

    def _own(self, pid_file: Path) -> psutil.Process | None:
        """The process of a pid file, if it is still ours (pids get reused)."""
        try:
            process = psutil.Process(int(pid_file.read_text()))
            return process if str(self.folder) in " ".join(process.cmdline()) else None
        except (psutil.Error, ValueError):
            return None

    def _wait_for(self, read, timeout: float = 60.0):
        """Poll `read()` until it stops raising; fail naming the scheduler log."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return read()
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"dask scheduler did not start; see {self.folder / 'scheduler.log'}"
                    ) from None
                time.sleep(0.1)


SSHD_PATHS = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {folder}/host_key
PidFile {folder}/sshd.pid
AuthorizedKeysFile {folder}/authorized_keys
AllowUsers {user}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
LogLevel VERBOSE
"""


class SSHDUnavailable(RuntimeError):
    """No sshd can be started here; the message says why."""


def sshd_command() -> str | None:
    """The sshd binary: on PATH, or where openssh-server puts it."""
    found = shutil.which("sshd")
    return found or next((path for path in SSHD_PATHS if Path(path).exists()), None)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LoopbackSSHD:
    """An sshd on 127.0.0.1 and a free port, with its own config, host key and
    authorized_keys in `folder`, letting in only this user with a key made here
    (`client_key`). Nothing of the system's ssh setup is read or changed, except
    that sshd needs its privilege separation folder (/run/sshd), made if missing."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder).resolve()
        self.user = getpass.getuser()
        self.port = 0
        self.client_key = self.folder / "id_ed25519"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> LoopbackSSHD:
        sshd = sshd_command()
        keygen = shutil.which("ssh-keygen")
        if sshd is None or keygen is None:
            raise SSHDUnavailable("no sshd or ssh-keygen here (apt-get install openssh-server)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o700)
        for key in (self.folder / "host_key", self.client_key):
            key.unlink(missing_ok=True)
            subprocess.run(
                [keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                check=True,
                capture_output=True,
            )
        (self.folder / "authorized_keys").write_text(
            self.client_key.with_suffix(".pub").read_text()
        )
        (self.folder / "authorized_keys").chmod(0o600)
        self.port = free_port()
        config = self.folder / "sshd_config"
        config.write_text(SSHD_CONFIG.format(port=self.port, folder=self.folder, user=self.user))
        privsep = Path("/run/sshd")
        if not privsep.exists():
            try:
                privsep.mkdir(mode=0o755, parents=True)
            except OSError as exc:
                raise SSHDUnavailable(f"sshd needs {privsep}: {exc}") from None
        check = subprocess.run([sshd, "-t", "-f", str(config)], capture_output=True, text=True)
        if check.returncode:
            raise SSHDUnavailable(f"sshd rejects its config: {check.stderr.strip()}")
        log = open(self.folder / "sshd.log", "ab")  # noqa: SIM115 (the process keeps it)
        self.process = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SSHDUnavailable(f"sshd exited: {self.log_text()[-500:]}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 1),
            ):
                return self
            time.sleep(0.1)
        self.stop()
        raise SSHDUnavailable(f"sshd did not listen on 127.0.0.1:{self.port} in {timeout:g}s")

    def connect_options(self) -> dict[str, object]:
        """asyncssh.connect's options for this server: its port, this user, the key."""
        return {
            "port": self.port,
            "username": self.user,
            "client_keys": [str(self.client_key)],
            "known_hosts": None,
        }

    def log_text(self) -> str:
        path = self.folder / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """End this sshd and the sessions it started (their processes: workers, scheduler)."""
        if self.process is None:
            return
        with contextlib.suppress(psutil.Error):
            _terminate([psutil.Process(self.process.pid)])
        self.process.wait(timeout=STOP_GRACE)
        self.process = None


def _terminate(processes: list[psutil.Process]) -> None:
    """SIGTERM, and SIGKILL what is left of them and their children after a grace."""
    family = processes + [child for process in processes for child in _children(process)]
    for process in processes:
        _signal(process, signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=STOP_GRACE)
    for process in alive:
        _signal(process, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=STOP_GRACE)


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


def _signal(process: psutil.Process, signum: int) -> None:
    with contextlib.suppress(psutil.Error):
        process.send_signal(signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--dir", type=Path, default=Path(".cluster"), help="pids and logs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per worker")
    parser.add_argument("--port", type=int, default=8786, help="scheduler port; 0: any free")
    parser.add_argument("--dashboard-port", type=int, default=8787)
    args = parser.parse_args(argv)
    cluster = DaskProcesses(args.dir)
    if args.action == "down":
        cluster.stop()
        print(f"stopped the cluster in {cluster.folder}")
        return 0
    if list(cluster.folder.glob("*.pid")):
        sys.exit(f"a cluster is already running from {cluster.folder}: make cluster-down first")
    try:
        address = cluster.start_scheduler(args.port, args.dashboard_port)
        for index in range(1, args.workers + 1):
            cluster.add_worker(f"worker-{index}", threads=args.threads)
        cluster.wait_for_workers(args.workers)
    except BaseException:
        cluster.stop()
        raise
    print(f"dask scheduler {address} with {args.workers} workers; pids, logs: {cluster.folder}")
    if cluster.dashboard_port:
        print(f"dashboard http://127.0.0.1:{cluster.dashboard_port}/status")
    print(f"submit: make run CONFIG=... SCHEDULER={address}; stop: make cluster-down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
