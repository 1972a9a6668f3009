"""What the benchmark scripts share: the project on the path, seeded data set-up, result files."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedcmi.config import Config  # noqa: E402
from fedcmi.data import DataModule, prepare  # noqa: E402
from fedcmi.io import write_json  # noqa: E402
from fedcmi.partition import make_partition, save_partition  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

# The setting the speed and memory figures were measured in (the first version's defaults: IID, every client
# multimodal, one local epoch of batch 32, the templates generator). Speed per sample does not depend on it; pinning
# it keeps those figures reproducible, and their bare-loop references exact, now that params.yaml follows FedCMI's
# protocol.
SPEED_SETTING = [
    "partition.scheme=iid", "partition.max_samples_per_client=null", "partition.multimodal_fraction=1.0",
    "federation.local_epochs=1", "federation.batch_size=32", "optim.lr=0.05", "algorithm.mu=0.01",
    "algorithm.fedcmi.warmup_epochs=null", "algorithm.fedcmi.dominance=round",
    "data.synthetic.generator=templates", "data.synthetic.weak_snr=1.5",
    "threads=0",  # torch's own count (2 here), as these figures were measured and as their bare loops run
]


def ensure_data(cfg: Config) -> DataModule:
    """Prepare ``cfg``'s data and partition once (skipped when their files exist); returns the data."""
    if not (Path(cfg.data.prepared_dir) / "meta.json").is_file():
        prepare(cfg)
    dm = DataModule(cfg.data.prepared_dir)
    if not Path(cfg.partition.file).is_file():
        save_partition(make_partition(cfg, dm.train.labels, dm.spec.modalities, dm.spec.num_classes),
                       cfg.partition.file)
    return dm


def machine() -> dict:
    """Where a figure was measured."""
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def command_line() -> str:
    """This process's command, quoted so that it can be pasted into a shell."""
    script = str(Path(sys.argv[0]).relative_to(ROOT)) if Path(sys.argv[0]).is_absolute() else sys.argv[0]
    return "python " + shlex.join([script, *sys.argv[1:]])


def save_results(path: Path, payload: dict) -> Path:
    """Write a results file with the command and machine that produced it; print where."""
    out = write_json(path, {"command": command_line(), "machine": machine(), **payload})
    print(f"wrote {out}")
    return out


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def monitor(cmd: list[str], env: dict | None = None, pss_every: float = 1.0) -> tuple[dict, float, dict[str, float]]:
    """Run ``cmd`` (it prints a JSON line last); returns that JSON, the wall seconds and the peak memory of its
    process tree in MiB: ``rss`` (the resident sizes added up, so pages shared between processes count once per
    process) and ``pss`` (proportional: a page shared by k processes counts 1/k in each, so the sum is the
    memory the tree really holds). Sampled every 0.1 s, PSS every ``pss_every`` s (reading smaps costs this
    process a share of a core, taken from the run it measures)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak = {"rss": 0.0, "pss": 0.0}
    last_pss = 0.0
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            peak["rss"] = max(peak["rss"], sum(p.memory_info().rss for p in procs if p.is_running()))
            if time.perf_counter() - last_pss >= pss_every:
                last_pss = time.perf_counter()
                pss = 0
                for p in procs:
                    try:
                        pss += p.memory_full_info().pss
                    except psutil.Error:
                        pass
                peak["pss"] = max(peak["pss"], pss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[1:4]} failed ({proc.returncode}):\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1]), wall, {k: v / 2**20 for k, v in peak.items()}


BURNER = "import torch; torch.set_num_threads(1); a = torch.randn(384, 384)\nwhile True: a = torch.tanh(a @ a)"


def second_job() -> subprocess.Popen:
    """Another job on the machine: one process keeping one core busy (a one-thread training loop's load)."""
    return subprocess.Popen([sys.executable, "-c", BURNER], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
