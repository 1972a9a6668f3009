"""What one lying client does to accuracy under each server rule.

One client of ten (client 0) lies in every round it is sampled, in one of two ways:

- ``flip``: it sends the global model minus ``--scale`` times its honest change (a sign-flipped, boosted
  update, within ``server.max_change_ratio`` so that admission lets it through: the case robust rules
  are for), claiming its whole shard;
- ``samples``: it sends its honest model but claims 1e12 samples (admission refuses it; before admission
  existed, this update took over the global model).

Each rule trains the project's default setting (``params.yaml``: FedCMI, Dirichlet partition, half the
clients multimodal) for ``--rounds`` rounds, once without the liar and once with it, through the engine
(the same admission and aggregation the Kubeflow step runs). A run the liar drives to divergence (every
update NaN, or accuracy back at chance: the divergence guard stops it) has no usable model and counts at
chance accuracy. ``mean+clip`` clips every change to
``--clip``, by default the 90th percentile of the honest change norms of the run without the liar.

    python benchmarks/hostile_client.py --rounds 20 --seeds 0 1 2 --out benchmarks/results/hostile_client.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, ensure_data, save_results  # noqa: E402

from fedcmi.config import load_config  # noqa: E402
from fedcmi.data import DataModule  # noqa: E402
from fedcmi.divergence import Diverged  # noqa: E402
from fedcmi.federation import Federation  # noqa: E402
from fedcmi.io import read_json  # noqa: E402
from fedcmi.round.server import RoundFailed  # noqa: E402
from fedcmi.round.update import ClientUpdate, change_norm  # noqa: E402
from fedcmi.runners.engine import train  # noqa: E402

LIAR = 0
RULES = {
    "mean": [],
    "median": ["server.rule=median"],
    "trimmed_mean": ["server.rule=trimmed_mean", "server.trimmed_mean.trim_fraction=0.2"],
}


def liar(attack: str, scale: float, norms: list[float]):
    """Federation.train_client with client ``LIAR`` lying; every honest change norm goes to ``norms``."""
    honest = Federation.train_client

    def train_client(self: Federation, global_state, cid: int, round_no: int) -> ClientUpdate | None:
        u = honest(self, global_state, cid, round_no)
        if u is None:
            return u
        if cid != LIAR or attack == "none":
            norms.append(change_norm(global_state, u.state))
            return u
        if attack == "samples":
            return ClientUpdate(cid, u.state, 10**12, u.modalities, u.metrics)
        state = {k: g - scale * (u.state[k] - g) if g.is_floating_point() else u.state[k]
                 for k, g in global_state.items()}
        return ClientUpdate(cid, state, u.num_examples, u.modalities, u.metrics)

    return train_client


def run(work: Path, rounds: int, seed: int, extra: list[str], attack: str | None, scale: float) -> dict:
    cfg = load_config(ROOT / "params.yaml", [
        f"seed={seed}", f"federation.rounds={rounds}", "tracking.enabled=false", "evaluation.linear_probe=false",
        f"data.prepared_dir={work / f'prepared{seed}'}", f"partition.file={work / f'partition{seed}.json'}",
        f"output.dir={work / 'out'}",
        "federation.workers=1",  # the liar is patched into this process's clients, so they must train here
        *extra])
    ensure_data(cfg)
    norms: list[float] = []
    diverged: str | None = None
    t0 = time.perf_counter()
    with mock.patch.object(Federation, "train_client", liar(attack or "none", scale, norms)):
        try:
            res = train(cfg, work / "out" / "run", resume="never", progress=False)
        except (Diverged, RoundFailed) as exc:  # the liar broke the federation: no usable model, chance accuracy
            history = read_json(work / "out" / "run" / "checkpoints" / "state.json")["history"]
            chance = 1 / DataModule(cfg.data.prepared_dir).spec.num_classes
            res = None
            diverged = str(exc).split(";")[0]
    if res is not None:
        history = [r.to_json() for r in res.history]
        final = res.final.mm_acc
        evaluated = [r["mm_acc"] for r in history if "mm_acc" in r]
        last5 = sum(evaluated[-5:]) / 5
    else:
        final = last5 = chance
    rejected = sum(1 for r in history for c in r["rejected"] if int(c) == LIAR)
    liar_rounds = sum(1 for r in history if LIAR in r["clients"])
    norms.sort()
    return {"mm_acc": round(final, 4), "mm_acc_last5": round(last5, 4), "diverged": diverged,
            "liar_sampled_rounds": liar_rounds,
            "liar_rejected_rounds": rejected, "seconds": round(time.perf_counter() - t0, 1),
            "honest_change_norm_median": round(norms[len(norms) // 2], 4) if norms else None,
            "honest_change_norm_p90": round(norms[int(len(norms) * 0.9)], 4) if norms else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="federation.rounds (params.yaml's default: 20)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--scale", type=float, default=4.0, help="flip: the liar sends global - scale * change")
    ap.add_argument("--clip", type=float, default=None,
                    help="mean+clip: server.clip_norm (default: the 90th percentile of the honest change norms "
                    "in the run without the liar)")
    ap.add_argument("--out", type=Path, default=RESULTS / "hostile_client.json")
    args = ap.parse_args()
    rows: list[dict] = []
    clips: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name, extra in [*RULES.items(), ("mean+clip", None)]:
                if extra is None:
                    clips[seed] = args.clip if args.clip is not None else next(
                        r["honest_change_norm_p90"] for r in rows if r["seed"] == seed and r["rule"] == "mean")
                    extra = [f"server.clip_norm={clips[seed]}"]
                for attack in (None, "flip", "samples"):
                    if attack == "samples" and name != "mean":
                        continue  # refused at admission whatever the rule
                    r = run(Path(tmp), args.rounds, seed, extra, attack, args.scale)
                    rows.append({"seed": seed, "rule": name, "attack": attack or "none", **r})
                    print(f"seed {seed} {name:13s} {attack or 'none':8s} mm_acc {r['mm_acc']:.4f} (last 5: "
                          f"{r['mm_acc_last5']:.4f})  liar rejected {r['liar_rejected_rounds']}/"
                          f"{r['liar_sampled_rounds']} rounds  {r['seconds']:.0f} s", flush=True)
    summary = {}
    for key in sorted({(r["rule"], r["attack"]) for r in rows}):
        sel = [r for r in rows if (r["rule"], r["attack"]) == key]
        summary[f"{key[0]}/{key[1]}"] = {
            "mm_acc_mean": round(sum(r["mm_acc"] for r in sel) / len(sel), 4),
            "diverged": sum(1 for r in sel if r["diverged"]),
            "mm_acc_last5_mean": round(sum(r["mm_acc_last5"] for r in sel) / len(sel), 4), "seeds": len(sel)}
    for name, s in summary.items():
        print(f"{name:22s} mm_acc {s['mm_acc_mean']:.4f}  last 5 {s['mm_acc_last5_mean']:.4f}  diverged "
              f"{s['diverged']}/{s['seeds']}")
    save_results(args.out, {"rounds": args.rounds, "scale": args.scale, "clip_norm": clips, "seeds": args.seeds,
                            "liar": LIAR, "summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
