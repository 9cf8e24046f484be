"""Warm launches for the test suite: the launchers run in processes forked from one server
that has already imported torch, megatron-core, Hydra and danube.

A launch's own work here is often under a second; importing its stack takes ~6 s per
process (2-core AMD EPYC, AVX2), and torchrun adds its own interpreter. The suite launches a
few hundred runs, so the server imports once and forks a child per process instead: the child
takes the launch's environment, working directory and argv, points its stdout/stderr at files,
and runs the launcher as `__main__` (runpy), exactly the script a user runs. For `nproc > 1`
the client starts one child per rank with the variables torchrun sets (RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and, as torchrun does, kills the
other ranks when one fails.

Not covered by warm launches, so still started cold by their tests: torchrun itself, SLURM
(the sbatch test), signals sent to a run (tests/test_training.py's max_time/stop tests use
their own processes). `DANUBE_TEST_COLD=1` makes every launch cold (subprocess + torchrun).

Protocol (one Unix socket, one connection per process): the client sends one JSON line
{argv, env, cwd, out, err}; the server forks, answers {"pid": N}, and when the child ends
{"rc": exit code (negative: killed by that signal)}. The server is single-threaded (a select
loop), so a fork never happens while another thread holds a lock.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

_server: Optional[subprocess.Popen] = None
_socket_path: Optional[str] = None

PRELOAD = (
    "torch", "megatron.core", "hydra", "omegaconf",
    "danube.config", "danube.config.compose", "danube.runtime",
    "danube.training.pretrain", "danube.training.sft", "danube.training.dpo",
    "transformers", "transformers.models.mistral.modeling_mistral",
    "transformers.models.llama.modeling_llama", "danube.conversion.importer",
    "danube.conversion.exporter",
)


# ---------------------------------------------------------------------------------- server

def _child(request: dict) -> None:
    """In the forked child: become the launch, run it, exit with its code."""
    code = 1
    try:
        os.setsid()  # its own process group: a kill reaches its helpers (writer, loaders)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path in ((1, request["out"]), (2, request["err"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(target, fd)
            os.close(target)
        import torch

        threads = os.environ.get("OMP_NUM_THREADS")
        if threads:  # torch read it at import, in the server
            torch.set_num_threads(int(threads))
        import runpy

        script = request["argv"][0]
        sys.argv = list(request["argv"])
        sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script.py`
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as done:
            if done.code is None or isinstance(done.code, int):
                code = done.code or 0
            else:
                print(done.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - what an uncaught exception does
            import traceback

            traceback.print_exc()
            code = 1
        import atexit
        import threading

        threading._shutdown()  # what interpreter exit does: join threads, then atexit
        atexit._run_exitfuncs()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(path: str) -> None:
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # then a launch that needs it imports (and reports) it itself
            pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    children: Dict[int, socket.socket] = {}
    while True:
        ready, _, _ = select.select([listener], [], [], 0.05)
        if ready:
            conn, _ = listener.accept()
            request = json.loads(conn.makefile("r").readline())
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                _child(request)
            children[pid] = conn
            conn.sendall((json.dumps({"pid": pid}) + "\n").encode())
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall((json.dumps({"rc": os.waitstatus_to_exitcode(status)})
                                  + "\n").encode())
                except OSError:
                    pass
                conn.close()


# ---------------------------------------------------------------------------------- client

def _ensure_server(env: dict) -> str:
    global _server, _socket_path
    if _server is not None and _server.poll() is None:
        return _socket_path
    folder = tempfile.mkdtemp(prefix="danube-warm-")
    _socket_path = os.path.join(folder, "socket")
    _server = subprocess.Popen(
        [sys.executable, "-u", "-m", "tests.helpers.warm", _socket_path],
        cwd=Path(__file__).resolve().parents[2], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True)
    line = _server.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"the warm launch server did not start: {line!r}")
    return _socket_path


def stop_server() -> None:
    global _server
    if _server is not None:
        _server.kill()
        _server.wait()
        _server = None


class _Process:
    def __init__(self, path: str, argv: List[str], env: dict, cwd: str, out: str, err: str):
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn.connect(path)
        self.conn.sendall((json.dumps({"argv": argv, "env": env, "cwd": cwd, "out": out,
                                       "err": err}) + "\n").encode())
        self.reader = self.conn.makefile("r")
        self.pid = json.loads(self.reader.readline())["pid"]
        self.rc: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.rc is None and select.select([self.conn], [], [], 0)[0]:
            line = self.reader.readline()
            self.rc = json.loads(line)["rc"] if line else -signal.SIGKILL
            self.conn.close()
        return self.rc

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def run(script: str, args: List[str], env: dict, cwd: str, nproc: int, master_port: int,
        timeout: float, cmd: List[str]) -> subprocess.CompletedProcess:
    """Run `script args` as `nproc` warm processes; the result of the whole launch (stdout
    and stderr of every rank, in the order written; the first failing rank's code)."""
    path = _ensure_server(dict(os.environ))
    with tempfile.TemporaryDirectory(prefix="danube-launch-") as folder:
        out, err = os.path.join(folder, "out"), os.path.join(folder, "err")
        procs = []
        for rank in range(nproc):
            rank_env = dict(env)
            if nproc > 1:
                rank_env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                                LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0",
                                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port))
            procs.append(_Process(path, [script, *args], rank_env, cwd, out, err))
        deadline = time.monotonic() + timeout
        failed: Optional[int] = None
        while any(p.poll() is None for p in procs):
            codes = [p.rc for p in procs if p.rc not in (None, 0)]
            if codes and failed is None:  # torchrun: one rank failed, stop the others
                failed = codes[0]
                for p in procs:
                    if p.rc is None:
                        p.kill()
            if time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise subprocess.TimeoutExpired(cmd, timeout)
            time.sleep(0.02)
        rc = failed if failed is not None else next((p.rc for p in procs if p.rc), 0)
        return subprocess.CompletedProcess(cmd, rc, Path(out).read_text() if
                                           os.path.exists(out) else "",
                                           Path(err).read_text() if os.path.exists(err) else "")


def start(script: str, args: List[str], env: dict, cwd: str, out: str, err: str) -> _Process:
    """One warm process, not waited for (the caller signals it, polls it, kills it)."""
    return _Process(_ensure_server(dict(os.environ)), [script, *args], env, cwd, out, err)


if __name__ == "__main__":
    serve(sys.argv[1])
