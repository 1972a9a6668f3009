"""The federated pipeline: data, initial model, R unrolled rounds, registration.

Rounds are unrolled at compile time: each is a ``fedcmi-round`` sub-pipeline
with a ParallelFor over that round's clients (drawn from the seed and the
round, exactly as the in-process engine draws them), then aggregation of the
collected updates and evaluation.
"""


import json
from dataclasses import dataclass, field
from pathlib import Path

from kfp import compiler, dsl
from kfp.dsl import Artifact, Dataset, Input, Model

from components import make_components
from fedcmi.config import Config
from fedcmi.federation import sample_clients

DEFAULT_IMAGE = "fedcmi:latest"


@dataclass
class PipelineOptions:
    """Where and how the components run; not part of the training config."""

    image: str = DEFAULT_IMAGE
    accelerator_type: str = "nvidia.com/gpu"
    accelerator_count: int = 1  # 0: no accelerator request (CPU clusters, local runs)
    cpu: str = "4"
    memory: str = "16G"
    retries: int = 2
    parallelism: int = 0  # clients trained at once in a round; 0: all of them
    pvc: str = ""  # a PersistentVolumeClaim holding the DVC outputs, mounted at data_root for source 'path'
    data_root: str = "/data"
    extra: dict = field(default_factory=dict)


def build_pipeline(cfg: Config, opts: PipelineOptions):
    """The pipeline function for ``cfg``, with its rounds and clients fixed at compile time."""
    comp = make_components(opts.image)
    params_json = json.dumps(cfg.to_dict(), sort_keys=True)
    rounds = cfg.federation.rounds
    clients = [sample_clients(cfg, r) for r in range(rounds)]
    parallelism = opts.parallelism or cfg.federation.clients_per_round

    @dsl.pipeline(name="fedcmi-round", description="One round: clients in parallel, aggregation, evaluation.")
    def fl_round(
        params_json: str,
        prepared: Input[Dataset],
        partition: Input[Artifact],
        global_model: Input[Model],
        round_index: int,
        clients: list,
        tracking_uri: str,
        run_id: str,
    ) -> Model:
        with dsl.ParallelFor(items=clients, parallelism=parallelism, name="clients") as cid:
            t = comp.train_client(params_json=params_json, prepared=prepared, partition=partition,
                                  global_model=global_model, client_id=cid, round_index=round_index)
            t.set_display_name("train-client")
            t.set_cpu_limit(opts.cpu).set_memory_limit(opts.memory).set_retry(opts.retries)
            if opts.accelerator_count > 0:
                t.set_accelerator_type(opts.accelerator_type).set_accelerator_limit(opts.accelerator_count)
        agg = comp.aggregate(params_json=params_json, prepared=prepared, partition=partition,
                             global_model=global_model, updates=dsl.Collected(t.outputs["update"]),
                             round_index=round_index)
        agg.set_display_name("aggregate")
        ev = comp.evaluate(params_json=params_json, prepared=prepared, partition=partition,
                           model=agg.outputs["new_global"], round_index=round_index, tracking_uri=tracking_uri,
                           run_id=run_id)
        ev.set_display_name("evaluate")
        return agg.outputs["new_global"]

    @dsl.pipeline(name=f"fedcmi-{cfg.algorithm.name}",
                  description=f"{cfg.algorithm.name}: {rounds} rounds, {cfg.federation.clients_per_round} of "
                              f"{cfg.partition.num_clients} clients per round (seed {cfg.seed}).")
    def fedcmi_pipeline(
        source: str = "path" if opts.pvc else "dvc",
        data_root: str = opts.data_root,
        dvc_repo: str = "",
        dvc_rev: str = "",
        tracking_uri: str = "",
        run_name: str = f"{cfg.algorithm.name}-seed{cfg.seed}",
    ) -> Model:
        data = comp.load_data(params_json=params_json, source=source, data_root=data_root, dvc_repo=dvc_repo,
                              dvc_rev=dvc_rev)
        if opts.pvc:
            from kfp import kubernetes

            kubernetes.mount_pvc(data, pvc_name=opts.pvc, mount_path=opts.data_root)
        run = comp.start_run(params_json=params_json, tracking_uri=tracking_uri, run_name=run_name)
        init = comp.init_model(params_json=params_json, prepared=data.outputs["prepared"],
                               partition=data.outputs["partition"])
        model = init.outputs["model"]
        for r in range(rounds):
            step = fl_round(params_json=params_json, prepared=data.outputs["prepared"],
                            partition=data.outputs["partition"], global_model=model, round_index=r,
                            clients=clients[r], tracking_uri=tracking_uri, run_id=run.output)
            step.set_display_name(f"round-{r + 1}")
            model = step.output
        reg = comp.register_model(params_json=params_json, prepared=data.outputs["prepared"],
                                  partition=data.outputs["partition"], model=model, tracking_uri=tracking_uri,
                                  run_id=run.output)
        reg.set_display_name("register")
        return model

    return fedcmi_pipeline


def compile_pipeline(cfg: Config, opts: PipelineOptions, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(cfg, opts), str(out))
    return out


def run_local(cfg: Config, data_root: str | Path, pipeline_root: str | Path, tracking_uri: str = "") -> Path:
    """Run the whole pipeline here with kfp.local's subprocess runner, in this environment.

    ``data_root`` is the folder that holds ``cfg.data.prepared_dir`` and
    ``cfg.partition.file`` (the project root after ``dvc repro``). Returns the
    final global model file.
    """
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=True)
    pipeline = build_pipeline(cfg, PipelineOptions(accelerator_count=0))
    task = pipeline(source="path", data_root=str(Path(data_root).resolve()), tracking_uri=tracking_uri)
    return Path(task.output.path)
