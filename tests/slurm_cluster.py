"""A throwaway SLURM cluster on this host for the integration tests: one slurmctld plus N slurmd
daemons emulating nodes node1..nodeN (Slurm 22.05, Debian packages; no systemd or cgroups needed).

    python tests/slurm_cluster.py start [--dir DIR]   # install if missing, configure, start, wait idle
    python tests/slurm_cluster.py stop [--dir DIR]    # cancel jobs, stop daemons, undo /etc/hosts

Needs root and apt-get (CI machines start with nothing installed). Everything lives under DIR
(config, state, spools, logs, pid files); the only change outside it is one tagged /etc/hosts line
that makes node1..nodeN resolve (removed by stop). Commands find the cluster through SLURM_CONF:
use `cluster.env` for subprocesses; jobs inherit it (sbatch exports the environment).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "munged")
HOSTS_FILE = Path("/etc/hosts")
HOSTS_TAG = "# modaseg-test-slurm"
MUNGE_PID = Path("/run/munge/munged.pid")
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


class ClusterError(RuntimeError):
    """The local cluster could not be installed, started or queried."""


def unavailable_reason() -> str | None:
    """Why this machine cannot host the cluster (a reason to skip), or None when it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root"
    if not all(shutil.which(b) for b in BINARIES) and shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it"
    return None


def install() -> None:
    """apt-get the daemons and clients when any is missing (~10 s with a fresh package index)."""
    if all(shutil.which(b) for b in BINARIES):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise ClusterError(
                f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
            )
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        raise ClusterError(f"installed {PACKAGES} but {missing} are still not on PATH")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class LocalSlurm:
    """One controller + `nodes` slurmd daemons, all on 127.0.0.1, state under `root`."""

    root: Path
    nodes: int = 2
    cpus: int = 4  # per node; may exceed the real cores (SlurmdParameters=config_overrides)
    requeue_delay: int = 10  # AuthInfo cred_expire: a requeued job waits this long (Slurm default 120)

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def node_names(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.nodes + 1)]

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _pid_files(self) -> list[Path]:
        return [self.root / "slurmctld.pid", *sorted(self.root.glob("slurmd-*.pid"))]

    # ------------------------------------------------------------------------------------ start
    def start(self, timeout: float = 60) -> None:
        """Install if needed, write the config, start munged (unless one runs), slurmctld and the
        slurmds, and wait until every node is idle. On any failure, stop what was started."""
        install()
        try:
            self._write_conf()
            self._start_munge()
            self._daemon("slurmctld", "-f", str(self.conf), "-i")
            for node in self.node_names:
                self._daemon("slurmd", "-f", str(self.conf), "-N", node)
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def _write_conf(self) -> None:
        for sub in ("etc", "state", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for node in self.node_names:  # slurmd needs its spool dir before it can create it
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        ctl_port, *node_ports = _free_ports(1 + self.nodes)
        r = self.root
        lines = [
            "ClusterName=modaseg-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctl_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=cred_expire={self.requeue_delay}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # no cgroups or systemd in containers and microVMs
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "MailProg=/bin/true",
            "SchedulerType=sched/backfill",
            # look at pending jobs (a requeued one whose BeginTime passed) every 2 s, not every 30-60 s
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "KillWait=10",
            "InactiveLimit=0",
            "MinJobAge=600",
        ]
        for node, port in zip(self.node_names, node_ports, strict=True):
            lines.append(
                f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus} RealMemory=4000 State=UNKNOWN"
            )
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        # node names must resolve: the batch script passes the first node as the main process address
        text = self._hosts_without_tag()
        HOSTS_FILE.write_text(text + f"127.0.0.1 {' '.join(self.node_names)} {HOSTS_TAG}\n")

    @staticmethod
    def _hosts_without_tag() -> str:
        kept = [ln for ln in HOSTS_FILE.read_text().splitlines(keepends=True) if HOSTS_TAG not in ln]
        text = "".join(kept)
        return text if not text or text.endswith("\n") else text + "\n"

    @staticmethod
    def _munge_works() -> bool:
        try:
            cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
            if cred.returncode != 0:
                return False
            return (
                subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode
                == 0
            )
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _start_munge(self) -> None:
        if self._munge_works():
            return  # somebody else's munged: reuse it, leave it running
        key = Path("/etc/munge/munge.key")
        if not key.is_file() or key.stat().st_size == 0:
            subprocess.run(["mungekey", "--create", "--force"], check=True, capture_output=True)
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        # no systemd: create the runtime directories it would have made, run as the munge user
        for d, mode in (("/run/munge", "0755"), ("/var/log/munge", "0700"), ("/var/lib/munge", "0700")):
            subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", mode, d], check=True)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, capture_output=True)
        (self.root / "munged.started-by-us").touch()
        deadline = time.time() + 10
        while not self._munge_works():
            if time.time() > deadline:
                raise ClusterError("munged did not start (munge -n | unmunge fails)")
            time.sleep(0.1)

    def _daemon(self, *cmd: str) -> None:
        r = subprocess.run(cmd, capture_output=True, text=True, env=self.env)
        if r.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}\n{self.logs()}")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = subprocess.run(
                ["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], capture_output=True, text=True, env=self.env
            )
            if r.returncode == 0 and len(set(r.stdout.split())) >= self.nodes:
                return
            time.sleep(0.3)
        raise ClusterError(
            f"the {self.nodes} nodes did not become idle within {timeout:.0f} s\n{self.logs()}"
        )

    def logs(self, lines: int = 30) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*.log")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f}\n" + "\n".join(tail))
        return "\n".join(out)

    # ------------------------------------------------------------------------------------- stop
    def stop(self, timeout: float = 60) -> None:
        """Cancel every job and wait for it (slurmstepd and the job's processes outlive a slurmd
        shutdown), shut the daemons down (SIGTERM, then SIGKILL), stop munged if we started it,
        remove the /etc/hosts line. Safe to call twice or after a failed start."""
        pids = [p for f in self._pid_files() if (p := _read_pid(f)) and _alive(p)]
        try:
            if pids and self.conf.is_file():
                self.cancel_all(timeout / 2)
                subprocess.run(["scontrol", "shutdown"], capture_output=True, env=self.env, timeout=30)
                deadline = time.time() + 15
                while any(_alive(p) for p in pids) and time.time() < deadline:
                    time.sleep(0.2)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                left = [p for p in pids if _alive(p)]
                for p in left:
                    os.kill(p, sig)
                deadline = time.time() + 5
                while any(_alive(p) for p in left) and time.time() < deadline:
                    time.sleep(0.1)
        finally:
            for f in self._pid_files():
                f.unlink(missing_ok=True)
            marker = self.root / "munged.started-by-us"
            if marker.exists():
                pid = _read_pid(MUNGE_PID)
                if pid and _alive(pid):
                    os.kill(pid, signal.SIGTERM)
                marker.unlink()
            if HOSTS_TAG in HOSTS_FILE.read_text():
                HOSTS_FILE.write_text(self._hosts_without_tag())

    def cancel_all(self, timeout: float = 30) -> None:
        ids = self.squeue_ids()
        if not ids:
            return
        subprocess.run(["scancel", *ids], capture_output=True, env=self.env, timeout=30)
        deadline = time.time() + timeout
        while self.squeue_ids() and time.time() < deadline:
            time.sleep(0.3)

    def squeue_ids(self) -> list[str]:
        r = subprocess.run(
            ["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=self.env, timeout=30
        )
        return r.stdout.split() if r.returncode == 0 else []

    # ------------------------------------------------------------------------------------- jobs
    def sbatch(self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
        """Submit; the job id (for an array, the array's id)."""
        r = subprocess.run(
            ["sbatch", "--parsable", *args],
            capture_output=True,
            text=True,
            cwd=cwd,
            env={**(env or os.environ), "SLURM_CONF": str(self.conf)},
            timeout=60,
        )
        if r.returncode != 0:
            raise ClusterError(f"sbatch {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job -o` as dicts: one per job, or one per task of an array."""
        r = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=30,
        )
        if r.returncode != 0:
            raise ClusterError(f"scontrol show job {job_id}: {r.stderr.strip()}")
        out = []
        for line in r.stdout.splitlines():
            fields = {}
            for item in line.split():
                key, sep, value = item.partition("=")
                if sep:
                    fields[key] = value
            if fields:
                out.append(fields)
        return out

    def wait(self, job_id: str, timeout: float) -> list[dict[str, str]]:
        """Poll until the job (every task of an array) reaches a final state; the final records."""
        deadline = time.time() + timeout
        while True:
            records = self.jobs(job_id)
            if records and all(rec.get("JobState") in FINAL_STATES for rec in records):
                return records
            if time.time() > deadline:
                states = [(rec.get("JobId"), rec.get("JobState"), rec.get("Reason")) for rec in records]
                raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s: {states}")
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("--dir", type=Path, default=Path("/tmp/modaseg-slurm"), help="state folder")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--cpus", type=int, default=4, help="CPUs each node advertises")
    args = p.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"slurm_cluster: {reason}", file=sys.stderr)
        return 2
    cluster = LocalSlurm(args.dir, nodes=args.nodes, cpus=args.cpus)
    if args.action == "start":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
