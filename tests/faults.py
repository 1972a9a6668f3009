"""Run the fedcmi command line in a child process with one fault injected at an exact point.

The fault travels as JSON in ``FEDCMI_TEST_FAULT``; the child patches the one
function the fault needs, then runs ``fedcmi.cli.main``. Kinds:

- ``kill_client``: SIGKILL when client ``client`` starts training in round ``round``
- ``raise_clients``: every client of round ``round`` raises (a round with no valid update)
- ``kill_before_replace``: at the ``nth`` commit of file ``file``, cut its temporary copy to half
  its size (a write in progress) and SIGKILL before it replaces the old file
- ``kill_after_replace``: SIGKILL just after the ``nth`` commit of ``file``
- ``fill_after_replace``: after the ``nth`` commit of ``file``, fill the disk: write a junk file
  into ``fill_dir`` until it is full, or where no small filesystem could be mounted, cap the size of
  any file this process writes at ``fsize_limit`` bytes
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, os, signal, sys

fault = json.loads(os.environ["FEDCMI_TEST_FAULT"])
kind = fault["kind"]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def fill():
    if fault.get("fill_dir"):
        with open(os.path.join(fault["fill_dir"], "junk"), "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * (1 << 16))
                    fh.flush()
            except OSError:
                pass
    else:
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the cap fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (fault["fsize_limit"], fault["fsize_limit"]))


if kind in ("kill_client", "raise_clients"):
    from fedcmi.federation import Federation

    real = Federation.train_client

    def train_client(self, state, cid, rnd):
        if rnd == fault["round"] and kind == "raise_clients":
            raise RuntimeError(f"injected fault in client {cid}")
        if rnd == fault["round"] and cid == fault["client"]:
            die()
        return real(self, state, cid, rnd)

    Federation.train_client = train_client
else:
    real_replace = os.replace
    seen = [0]

    def replace(src, dst, *a, **k):
        hit = os.path.basename(str(dst)) == fault["file"]
        if hit:
            seen[0] += 1
            hit = seen[0] == fault.get("nth", 1)
        if hit and kind == "kill_before_replace":
            with open(src, "r+b") as fh:
                fh.truncate(os.path.getsize(src) // 2)
            die()
        real_replace(src, dst, *a, **k)
        if hit and kind == "kill_after_replace":
            die()
        if hit and kind == "fill_after_replace":
            fill()

    os.replace = replace

from fedcmi.cli import main

sys.exit(main(sys.argv[1:]))
"""


def fedcmi_project(root: Path, **federation) -> Path:
    """A prepared and partitioned tiny FedCMI project in ``root`` (half the clients multimodal), its
    ``federation`` section overridden by ``federation``; made through the command line."""
    import yaml
    from conftest import TINY, merge

    raw = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    raw["algorithm"]["name"] = "fedcmi"
    raw["partition"]["multimodal_fraction"] = 0.5
    raw["federation"].update(federation)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    for cmd in ("prepare", "partition"):
        r = run_cli([cmd], root)
        assert r.returncode == 0, r.stderr
    return root


def run_cli(args: list[str], cwd: Path, fault: dict | None = None, timeout: float = 600,
            env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``fedcmi ARGS`` in ``cwd``, with ``fault`` injected when given."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    if fault is None:
        cmd = [sys.executable, "-m", "fedcmi.cli", *args]
    else:
        env["FEDCMI_TEST_FAULT"] = json.dumps(fault)
        cmd = [sys.executable, "-c", _CHILD, *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


_WORKER_FAULT = r"""
import json, os, signal

_fault = json.loads(os.environ["FEDCMI_TEST_WORKER_FAULT"])
from fedcmi.federation import Federation

_real = Federation.train_client


def _train_client(self, state, cid, rnd):
    if rnd == _fault["round"] and cid == _fault["client"]:
        marker = _fault["marker"]
        if _fault["always"] or not os.path.exists(marker):
            open(marker, "a").close()
            os.kill(os.getpid(), signal.SIGKILL)
    return _real(self, state, cid, rnd)


Federation.train_client = _train_client
"""


def worker_fault(site: Path, round: int, client: int, always: bool) -> dict[str, str]:
    """Environment that makes every Python process started with it SIGKILL itself when it starts training
    ``client`` in ``round`` (from 1): once (a marker file remembers) or ``always``. The code goes in a
    ``sitecustomize`` module under ``site``, so it reaches worker processes that a run starts itself."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(_WORKER_FAULT)
    fault = {"round": round, "client": client, "always": always, "marker": str(site / "killed-once")}
    return {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "FEDCMI_TEST_WORKER_FAULT": json.dumps(fault)}
