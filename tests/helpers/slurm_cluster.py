"""A private single-node SLURM cluster for tests: Debian's slurmctld, slurmd and munge
(22.05), everything (config, munge key and socket, state, logs, pids) under one directory
found through SLURM_CONF, on free ports. Two fake GPUs (character devices) so the project's
GPU sbatch script is accepted as written; CPU-only training runs on them.

Short credential lifetime and scheduler intervals make a signal -> save -> requeue -> rerun
cycle take seconds instead of minutes (a requeued job is held for the credential lifetime).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, Optional

from tests.conftest import free_port

# Two partitions: `debug` (the default) and `urgent`, whose jobs preempt debug's (REQUEUE:
# the preempted job gets SIGTERM, GRACE_S seconds, then is requeued by SLURM itself).
GRACE_S = 60
BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "munged", "mungekey")


def missing_binaries() -> list:
    return [b for b in BINARIES if shutil.which(b) is None
            and not Path(f"/usr/sbin/{b}").exists()]


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.is_file() and status.read_text().split(")")[-1].split()[0] == "Z")


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.env: Dict[str, str] = {}
        self.procs: list = []

    def start(self) -> "SlurmCluster":
        r = self.root
        for sub in ("state", "spool", "log"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        for k in range(2):
            gpu = r / f"fakegpu{k}"
            if not gpu.exists():
                os.mknod(gpu, 0o666 | 0o020000, os.makedev(1, 3))  # like /dev/null
        (r / "gres.conf").write_text(
            f"NodeName={self.host} Name=gpu File={r}/fakegpu[0-1]\n")
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={r}/munge.key", "--force"],
                       check=True, capture_output=True)
        os.chmod(r / "munge.key", 0o600)
        subprocess.run([_which("munged"), "--force", f"--socket={r}/munge.socket",
                        f"--key-file={r}/munge.key", f"--pid-file={r}/munged.pid",
                        f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge.seed"],
                       check=True, capture_output=True)
        cpus = os.cpu_count() or 2
        ctld, slurmd = free_port(), free_port()
        (r / "slurm.conf").write_text(f"""ClusterName=danubetest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld}
SlurmdPort={slurmd}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge.socket,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/ctld.pid
SlurmdPidFile={r}/d.pid
SlurmctldLogFile={r}/log/ctld.log
SlurmdLogFile={r}/log/d.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=1
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=10
MinJobAge=600
JobRequeue=1
GresTypes=gpu
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 Gres=gpu:2 State=UNKNOWN
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 \
GraceTime={GRACE_S}
PartitionName=urgent Nodes={self.host} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
""")
        self.env = {**os.environ, "SLURM_CONF": str(r / "slurm.conf")}
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([_which(daemon), "-f", str(r / "slurm.conf")], env=self.env,
                           check=True, capture_output=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, text=True,
                                 capture_output=True).stdout.strip()
            if out in ("idle", "mix", "alloc"):
                return self
            time.sleep(0.3)
        raise RuntimeError(f"the test cluster did not come up: sinfo says {out!r}; "
                           f"logs in {r}/log")

    def job(self, job_id: str) -> Dict[str, str]:
        """`scontrol show job` as a dict (no accounting database here)."""
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env,
                             text=True, capture_output=True).stdout
        fields = {}
        for item in out.split():
            key, _, value = item.partition("=")
            fields[key] = value
        return fields

    def wait(self, job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
             timeout: float = 600) -> Dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')}")

    def stop(self) -> None:
        """SIGTERM to the daemons, SIGKILL to any still there after 10 s."""
        pids = [p for p in (self._pid(n) for n in ("d.pid", "ctld.pid", "munged.pid")) if p]
        for sig in (15, 9):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + 10
            while time.time() < deadline and any(_alive(p) for p in pids):
                time.sleep(0.1)

    def _pid(self, name: str) -> Optional[int]:
        path = self.root / name
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None
