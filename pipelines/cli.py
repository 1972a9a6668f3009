"""``fedcmi pipeline compile | submit | run-local``."""

import argparse
import json
from pathlib import Path

from fedcmi.config import Config


class PipelineError(RuntimeError):
    """A pipeline that cannot be compiled or submitted; the message says why."""


def _options(args: argparse.Namespace):
    from pipelines.federated import PipelineOptions

    return PipelineOptions(image=args.image, accelerator_type=args.accelerator_type,
                           accelerator_count=args.accelerator_count, cpu=args.cpu, memory=args.memory,
                           retries=args.retries, parallelism=args.parallelism, pvc=args.pvc,
                           data_root=args.data_root)


def cmd_compile(cfg: Config, args: argparse.Namespace) -> int:
    from pipelines.federated import compile_pipeline

    out = compile_pipeline(cfg, _options(args), args.out)
    print(f"wrote {out}: {cfg.federation.rounds} rounds x {cfg.federation.clients_per_round} clients, image {args.image}")
    return 0


def cmd_submit(cfg: Config, args: argparse.Namespace) -> int:
    import tempfile

    import kfp

    from pipelines.federated import compile_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(cfg, _options(args), Path(tmp) / "pipeline.yaml")
        try:
            client = kfp.Client(host=args.host, namespace=args.namespace)
            run = client.create_run_from_pipeline_package(
                str(package), experiment_name=args.experiment or cfg.tracking.experiment,
                run_name=args.run_name or f"{cfg.algorithm.name}-seed{cfg.seed}",
                arguments={"source": "path" if args.pvc else args.source, "data_root": args.data_root,
                           "dvc_repo": args.dvc_repo,
                           "dvc_rev": args.dvc_rev, "tracking_uri": args.tracking_uri},
            )
        except Exception as exc:  # kfp raises urllib3/ApiException/ValueError variants for the same fault
            first = str(exc).splitlines()[0][:300] if str(exc) else ""
            raise PipelineError(f"could not submit to Kubeflow Pipelines at {args.host}: "
                                f"{exc.__class__.__name__}: {first}") from None
    print(json.dumps({"run_id": run.run_id, "host": args.host}))
    return 0


def cmd_run_local(cfg: Config, args: argparse.Namespace) -> int:
    from fedcmi.io import load_state, save_state
    from pipelines.federated import run_local

    final = run_local(cfg, args.data_root, args.pipeline_root, args.tracking_uri)
    state, meta = load_state(final)
    out = save_state(args.out, state, meta)
    print(f"final global model: {out}")
    return 0


def register(sub, common) -> None:
    p = sub.add_parser("pipeline", help="Kubeflow Pipelines: compile, submit, or run locally.",
                       description="Kubeflow Pipelines built from params.yaml: one component per step of a round.")
    psub = p.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")
    shape = argparse.ArgumentParser(add_help=False)
    shape.add_argument("--image", default="fedcmi:latest", help="the component image (see Dockerfile)")
    shape.add_argument("--accelerator-type", default="nvidia.com/gpu", help="accelerator for client training")
    shape.add_argument("--accelerator-count", type=int, default=1, help="accelerators per client pod (0: none)")
    shape.add_argument("--cpu", default="4", help="CPU limit per client pod")
    shape.add_argument("--memory", default="16G", help="memory limit per client pod")
    shape.add_argument("--retries", type=int, default=2, help="retries of a failed client pod")
    shape.add_argument("--parallelism", type=int, default=0, help="client pods at once (0: all of a round)")
    shape.add_argument("--pvc", default="", help="PersistentVolumeClaim with the DVC outputs, mounted at --data-root "
                       "for the data step (kfp-kubernetes); implies --source path")
    shape.add_argument("--data-root", default="/data", help="where the data volume is mounted (source path)")

    c = psub.add_parser("compile", parents=[common, shape], help="Write the pipeline YAML.")
    c.add_argument("--out", default="outputs/pipeline.yaml", help="where to write it (default: %(default)s)")
    c.set_defaults(func=cmd_compile)

    s = psub.add_parser("submit", parents=[common, shape], help="Compile and submit a run with kfp.Client.")
    s.add_argument("--host", required=True, help="the Kubeflow Pipelines API endpoint")
    s.add_argument("--namespace", default=None, help="the Kubeflow namespace")
    s.add_argument("--experiment", help="KFP experiment (default: tracking.experiment)")
    s.add_argument("--run-name", help="run name (default: <algorithm>-seed<seed>)")
    s.add_argument("--source", choices=["dvc", "path"], default="dvc", help="how components get the data")
    s.add_argument("--dvc-repo", default="", help="git URL of this project (source dvc)")
    s.add_argument("--dvc-rev", default="", help="git revision (source dvc)")
    s.add_argument("--tracking-uri", default="", help="MLflow server the pods log to ('' for none)")
    s.set_defaults(func=cmd_submit)

    r = psub.add_parser("run-local", parents=[common], help="Run the whole pipeline here with kfp.local.")
    r.set_defaults(image="fedcmi:latest", accelerator_type="", accelerator_count=0, cpu="", memory="", retries=0,
                   parallelism=0, pvc="")
    r.add_argument("--data-root", default=".", help="folder holding data.prepared_dir and partition.file")
    r.add_argument("--pipeline-root", default="outputs/kfp_local", help="where kfp.local keeps artifacts")
    r.add_argument("--tracking-uri", default="", help="MLflow tracking URI to log to ('' for none)")
    r.add_argument("--out", default="outputs/pipeline/model.safetensors", help="copy the final model here")
    r.set_defaults(func=cmd_run_local)
