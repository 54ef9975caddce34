"""A real one-node SLURM cluster in a folder, started by hand (no systemd): munged, slurmctld, slurmd.

Used by ``tests/test_slurm.py``; also runnable by hand to try the ``slurm`` profile on one machine::

    python -m tests.slurm_cluster start /tmp/cluster   # prints the SLURM_CONF and PATH to export
    python -m tests.slurm_cluster stop /tmp/cluster

Everything lives in the folder: munge key, socket and seed, ``slurm.conf``, state, spool, logs and
pid files, so it does not touch ``/etc`` and runs beside a system SLURM/munge. The daemons and the
client commands find the cluster through the ``SLURM_CONF`` environment variable (``env()``); the
munge socket is named in ``slurm.conf`` (``AuthInfo``). Ports are picked free at start.

Inside a job, Snakemake's ``slurm-jobstep`` executor removes every ``SLURM_*`` variable but the job's
identity before it calls ``srun``, ``SLURM_CONF`` included (snakemake-executor-plugin-slurm issue
#164), so ``srun`` there would look for ``/etc/slurm/slurm.conf``. A real cluster has its config
there; this one instead puts small wrappers of the client commands (``bin/``, first on ``PATH`` in
``env()``) that name its ``slurm.conf``.

Settings that matter on a single container-like machine (docs/slurm.md, "Troubleshooting"):
``ProctrackType=proctrack/linuxproc`` and ``TaskPlugin=task/none`` (no cgroups), no accounting
daemon (``AccountingStorageType=accounting_storage/none``, so Snakemake must query job states with
``squeue``, which its SLURM plugin only does when ``MinJobAge`` is at least three times the first
status-check delay), and ``SlurmdParameters=config_overrides`` so that a node declared with more
CPUs than the hardware has does not drain.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged")
CLIENTS = ("sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel", "sacct")
PARTITION = "debug"
MIN_JOB_AGE = 300  # s; Snakemake's plugin uses squeue only if >= 3 x its first status-check delay


def missing_binaries() -> list[str]:
    """The SLURM/munge programs this machine lacks (the daemons are in /usr/sbin)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [b for b in (*DAEMONS, *CLIENTS, "mungekey") if shutil.which(b, path=path) is None]


def _which(name: str, skip: Path | None = None) -> str:
    """A SLURM/munge program's path (``skip``: a folder of wrappers not to find)."""
    dirs = [*os.environ.get("PATH", "").split(os.pathsep), "/usr/sbin", "/sbin"]
    path = os.pathsep.join(d for d in dirs if d and (skip is None or Path(d).resolve() != skip))
    found = shutil.which(name, path=path)
    if found is None:
        raise FileNotFoundError(name)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hardware() -> dict[str, str]:
    """``slurmd -C``'s view of this machine (CPUs, RealMemory, ...)."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    first = out.splitlines()[0]
    return dict(kv.split("=", 1) for kv in first.split() if "=" in kv)


class SlurmCluster:
    """One node (this machine, ``hostname -s``) in one default partition, state kept in ``root``."""

    def __init__(self, root: str | os.PathLike[str], cpus: int | None = None) -> None:
        self.root = Path(root).resolve()
        self.host = socket.gethostname().split(".")[0]
        hw = _hardware() if not missing_binaries() else {}
        self.cpus = cpus or int(hw.get("CPUs", os.cpu_count() or 1))
        self.memory_mb = int(hw.get("RealMemory", 1000))
        self.conf = self.root / "slurm.conf"
        self.partition = PARTITION

    # -- paths ---------------------------------------------------------------------------------
    def _p(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def munge_socket(self) -> Path:
        return self._p("munge", "munge.socket")

    def pidfile(self, daemon: str) -> Path:
        return self._p("run", f"{daemon}.pid")

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for client commands and Snakemake: SLURM_CONF points at this cluster."""
        env = dict(os.environ if base is None else base)
        # a job context around the tests (e.g. CI itself running under SLURM) must not leak in
        for var in list(env):
            if var.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")):
                del env[var]
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([str(self._p("bin")), env.get("PATH", "")])
        return env

    # -- configuration ---------------------------------------------------------------------------
    def write_config(self) -> None:
        for sub in ("munge", "state", "spool", "log", "run", "bin"):
            self._p(sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self._p("munge"), 0o700)
        ctld_port, slurmd_port = _free_port(), _free_port()
        lines = [
            "# one-node test cluster written by tests/slurm_cluster.py",
            "ClusterName=landcovertest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={self._p('state')}",
            f"SlurmdSpoolDir={self._p('spool')}",
            f"SlurmctldPidFile={self.pidfile('slurmctld')}",
            f"SlurmdPidFile={self.pidfile('slurmd')}",
            f"SlurmctldLogFile={self._p('log', 'slurmctld.log')}",
            f"SlurmdLogFile={self._p('log', 'slurmd.log')}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            f"MinJobAge={MIN_JOB_AGE}",
            "KillWait=5",
            "InactiveLimit=0",
            "SlurmdTimeout=300",
            (
                f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus}"
                f" RealMemory={self.memory_mb} State=UNKNOWN"
            ),
            f"PartitionName={self.partition} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        for client in CLIENTS:  # see the module docstring: SLURM_CONF does not reach a job's srun
            wrapper = self._p("bin", client)
            wrapper.write_text(
                f'#!/bin/sh\nSLURM_CONF={self.conf} exec {_which(client, self._p("bin"))} "$@"\n'
            )
            wrapper.chmod(0o755)

    def _munge_key(self) -> Path:
        key = self._p("munge", "munge.key")
        if not key.exists():
            subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True)
            os.chmod(key, 0o600)
        return key

    # -- life cycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> SlurmCluster:
        """Write the config, start munged, slurmctld and slurmd; return once the node is idle."""
        self.stop()  # leftovers of an earlier run in the same folder
        self.write_config()
        key = self._munge_key()
        munged = [
            _which("munged"),
            "--force",
            f"--socket={self.munge_socket}",
            f"--key-file={key}",
            f"--pid-file={self.pidfile('munged')}",
            f"--log-file={self._p('log', 'munged.log')}",
            f"--seed-file={self._p('munge', 'munged.seed')}",
        ]
        self._daemon(munged, "munged")
        self._daemon([_which("slurmctld"), "-i"], "slurmctld")  # -i: ignore a stale saved state
        self._daemon([_which("slurmd")], "slurmd")
        self.wait_idle(timeout)
        return self

    def _daemon(self, cmd: list[str], name: str) -> None:
        """Start a self-daemonising program and wait for its pid file."""
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{name} failed to start ({proc.returncode}): {proc.stderr.strip()}\n{self.logs()}"
            )
        deadline = time.monotonic() + 20
        while not self.pidfile(name).exists() or not self.pidfile(name).read_text().strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} wrote no pid file\n{self.logs()}")
            time.sleep(0.05)

    def wait_idle(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            proc = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%T"], env=self.env(), capture_output=True, text=True
            )
            state = proc.stdout.strip() or proc.stderr.strip()
            if proc.returncode == 0 and state == "idle":
                return
            time.sleep(0.2)
        raise RuntimeError(f"node not idle after {timeout:.0f} s (sinfo: {state!r})\n{self.logs()}")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the daemons by their pid files (slurmd, slurmctld, then munged) and remove the files."""
        for name in ("slurmd", "slurmctld", "munged"):
            pidfile = self.pidfile(name)
            try:
                pid = int(pidfile.read_text().strip())
            except (FileNotFoundError, ValueError):
                pidfile.unlink(missing_ok=True)
                continue
            if _is_our_daemon(pid, name):
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + timeout
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
            pidfile.unlink(missing_ok=True)

    def logs(self, tail: int = 30) -> str:
        out = []
        for log in sorted(self._p("log").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (parent has not reaped it yet) is as good as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _is_our_daemon(pid: int, name: str) -> bool:
    """The pid is alive and runs ``name`` (a stale pid file may name a recycled pid)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return False
    return comm == name[:15]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python -m tests.slurm_cluster start|stop FOLDER", file=sys.stderr)
        return 2
    # 16 CPUs declared whatever the machine has (config_overrides): the default config's jobs fit
    cluster = SlurmCluster(argv[1], cpus=max(16, os.cpu_count() or 1))
    if argv[0] == "start":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf} PATH={cluster.root / 'bin'}:$PATH")
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
