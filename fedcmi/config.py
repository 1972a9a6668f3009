"""The one configuration model of fedcmi, loaded from ``params.yaml``.

Every setting lives in :class:`Config`; unknown keys and invalid values are
errors that name the dotted field path. ``--set a.b=value`` overrides are
parsed as YAML scalars, so ``--set federation.rounds=3`` gives an int.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from fedcmi.errors import EXIT_USAGE, FedcmiError
from fedcmi.metrics import headline_names
from fedcmi.registry import ALGORITHMS, DATASETS, RULES, SAMPLERS, Registry

#: Numbers in settings: YAML's true/false is never taken for 1/0 (``federation.rounds: true`` is an error).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]


class ConfigError(FedcmiError, ValueError):
    """A params file or override that does not make a valid :class:`Config`."""

    exit_code = EXIT_USAGE
    retry_helps = False


class Section(BaseModel):
    """A section of settings: unknown keys and NaN or infinite numbers are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


OptionsT = TypeVar("OptionsT", bound=BaseModel)


def validate_plugin_sections(section: BaseModel, registry: Registry, where: str) -> None:
    """Validate, in place, the sections of every plug-in in ``registry`` that has settings (``Options``) among
    ``section``'s extra keys (defaults where one is absent); any other extra key is an unknown setting."""
    extra = section.__pydantic_extra__ if section.__pydantic_extra__ is not None else {}
    # a plug-in's section is keyed by its name, unless it names another (``section``: OGM-GE's ``ogm``)
    sections = {getattr(cls, "section", None) or name: cls.Options  # type: ignore[attr-defined]
                for name, cls in registry.all().items()
                if getattr(cls, "Options", None)}
    errors = []
    for key in sorted(set(extra) - set(sections)):
        errors.append(InitErrorDetails(type="extra_forbidden", loc=(key,), input=extra[key]))
    for key, options in sections.items():
        raw = extra.get(key, {})
        if isinstance(raw, options):
            continue
        try:
            extra[key] = options.model_validate(raw)
        except ValidationError as err:
            # re-raised under the section's key, each with its own message (any error type, ours or pydantic's)
            errors += [InitErrorDetails(type=PydanticCustomError(e["type"], e["msg"].replace("{", "{{")
                                                                 .replace("}", "}}")),
                                        loc=(key, *e["loc"]), input=e["input"]) for e in err.errors()]
    if errors:
        raise ValidationError.from_exception_data(where, errors)
    section.__pydantic_extra__ = extra


def plugin_options(section: BaseModel, cls: type[OptionsT]) -> OptionsT:
    """The validated plug-in section of type ``cls`` among ``section``'s extras."""
    for value in (section.__pydantic_extra__ or {}).values():
        if isinstance(value, cls):
            return value
    raise KeyError(f"no section of type {cls.__name__}")


class PluginSection(BaseModel):
    """A section that also holds the sections of its plug-ins (``algorithm.fedcmi``, ``server.krum``,
    ``data.cremad``), validated against the registry."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, allow_inf_nan=False)
    #: the registry whose plug-ins' sections this section holds
    registry: ClassVar[Registry]

    @model_validator(mode="after")
    def _sections(self) -> PluginSection:
        validate_plugin_sections(self, self.registry, type(self).__name__)
        return self

    def options(self, cls: type[OptionsT]) -> OptionsT:
        """The validated plug-in section of type ``cls``."""
        return plugin_options(self, cls)


class DataConfig(PluginSection):
    """Which dataset, where it lives and which two modalities it holds; each dataset's own settings at
    ``data.<name>`` (see :mod:`fedcmi.datasets`)."""

    registry = DATASETS
    name: str = Field("synthetic", description="a registered dataset (fedcmi.registry.DATASETS): synthetic "
                      "(embedded default), npz (bring your own), cremad, ave, crisismmd")
    path: Path = Path("data/raw")
    prepared_dir: Path = Path("data/prepared")
    modalities: tuple[str, str] = ("audio", "visual")
    workers: Int = Field(0, ge=0, le=256,
                         description="processes decoding files in prepare; 0: one per CPU but one, at most 8")
    max_bad_fraction: Float = Field(0.01, ge=0, le=1, description="unreadable or unlabelled samples prepare "
                                    "skips and reports; above this fraction of all samples it stops")

    @field_validator("name")
    @classmethod
    def _registered(cls, v: str) -> str:
        DATASETS.get(v)  # UnknownPlugin, a ValueError naming the known ones
        return v

    @field_validator("modalities")
    @classmethod
    def _distinct(cls, v: tuple[str, str]) -> tuple[str, str]:
        for name in v:
            if not name.isidentifier() or name == "label":
                raise ValueError(f"modality name {name!r} must be an identifier other than 'label'")
        if v[0] == v[1]:
            raise ValueError("the two modalities must have different names")
        return v



class FaultsConfig(Section):
    """Data faults as real deployments have them (FedMultimodal, Feng et al., KDD 2023), drawn per sample
    from the seed when the partition is made and kept in the partition file, so every executor and every
    method sees the same faulty data. Rates are fractions of a client's samples."""

    missing_modality: Float = Field(0.0, ge=0, le=1, description="training samples of multimodal clients that "
                                    "lose one of their two modalities (zero-filled; which one drawn evenly)")
    label_noise: Float = Field(0.0, ge=0, le=1, description="training samples whose label is replaced by another "
                               "class drawn evenly")
    missing_labels: Float = Field(0.0, ge=0, lt=1, description="training samples without a label (left out of "
                                  "training; every client keeps at least one labelled sample)")


class PartitionConfig(Section):
    """How the training set is split across clients (seeded by ``seed``)."""

    num_clients: Int = Field(10, ge=1, le=100_000)
    scheme: Literal["iid", "dirichlet", "natural"] = Field(
        "dirichlet", description="iid; dirichlet (label skew, alpha); natural: clients are the data's own groups "
        "(CREMA-D's actors, an npz 'group' array), whole groups per client")
    alpha: Float = Field(1.0, gt=0)
    max_samples_per_client: Float | None = Field(
        1.1, gt=1.0, description="cap as a multiple of N/num_clients (1.1 in the reference code); null for none"
    )
    multimodal_fraction: Float = Field(0.5, ge=0, le=1)
    min_samples: Int = Field(8, ge=1)
    max_attempts: Int = Field(100, ge=1)
    file: Path = Path("data/partition.json")
    faults: FaultsConfig = FaultsConfig()

    @field_validator("file")
    @classmethod
    def _a_file_name(cls, v: Path) -> Path:
        if not v.name or str(v).endswith(("/", os.sep)):
            raise ValueError(f"{str(v)!r} names a folder; partition.file must name a file (data/partition.json)")
        return v


class ModelConfig(Section):
    """Encoders per modality and the heads on top of them."""

    encoders: dict[str, Literal["mlp", "cnn", "clip", "resnet18", "text"]] = {"audio": "cnn", "visual": "clip"}
    embed_dim: Int = Field(64, ge=2, le=4096)
    width: Int = Field(16, ge=1, le=512, description="channel width of the small CNN/MLP encoders")
    projector: Literal["linear", "mlp"] = "linear"
    projectors: Literal["two", "one"] = "two"
    fusion: Literal["concat", "sum", "film", "gated"] = "concat"


class LatencyConfig(Section):
    """A seeded model of when each sampled client reports (simulated seconds), for deadlines and
    over-selection: a client's time is its examples x local epochs x ``seconds_per_example``, over its speed
    (fixed for the run, log-normal with ``speed_spread``), times a round's log-normal ``jitter``; in each
    round it reports at all with probability ``availability``. Drawn from the run's seed and the round alone,
    so every executor (the engine, a pipeline's pods) finds the same clients late."""

    model: Literal["none", "lognormal"] = Field("none", description="none: every client reports, and the round "
                                                "waits for all; lognormal: the seeded model above")
    seconds_per_example: Float = Field(0.01, gt=0, le=1e4, description="an average client's seconds per example "
                                       "per local epoch")
    speed_spread: Float = Field(0.5, ge=0, le=5, description="std of a client's log speed (fixed for the run)")
    jitter: Float = Field(0.2, ge=0, le=5, description="std of the log noise on a client's time in each round")
    availability: Float = Field(1.0, gt=0, le=1, description="chance that a sampled client reports at all in a "
                                "round")
    stragglers: list[Int] = Field(default_factory=list, description="clients on a slow device: their time is "
                                  "straggler_slowdown times longer")
    straggler_slowdown: Float = Field(10.0, ge=1, le=1e6, description="how much longer a straggler takes")


class FederationConfig(PluginSection):
    """Rounds, client sampling and local work; each client sampler's own settings at
    ``federation.<sampler>`` (see :mod:`fedcmi.samplers`)."""

    registry = SAMPLERS
    rounds: Int = Field(20, ge=1, le=100_000)
    clients_per_round: Int = Field(5, ge=1)
    sampler: str = Field("uniform", description="how a round's clients are drawn (fedcmi.registry.SAMPLERS): "
                         "uniform, or modality_aware (at least federation.modality_aware.min_holders holders "
                         "of each modality every round)")
    local_epochs: Int = Field(3, ge=1)
    batch_size: Int = Field(16, ge=1)
    min_clients: Int = Field(1, ge=1, description="valid updates a round needs to complete")
    over_selection: Float = Field(0.0, ge=0, le=10, description="extra share of clients sampled each round; "
                                  "the first clients_per_round to report are kept (needs latency.model)")
    deadline: Float | None = Field(None, gt=0, description="simulated seconds after which a round closes; a "
                                   "client reporting later is late (needs latency.model); null: no deadline")
    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    workers: Int | Literal["auto"] = Field(
        "auto", description="processes that train a round's clients side by side (each with `threads` torch "
        "threads); auto: the CPUs this process may use over `threads`. The model does not depend on it")

    @field_validator("sampler")
    @classmethod
    def _registered(cls, v: str) -> str:
        SAMPLERS.get(v)  # UnknownPlugin, a ValueError naming the known ones
        return v

    @field_validator("workers")
    @classmethod
    def _workers_range(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 1024:
            raise ValueError("must be auto or a whole number from 1 to 1024")
        return v


class OptimConfig(Section):
    """Local SGD; the learning rate decays by round, never re-created per client."""

    lr: Float = Field(0.02, gt=0, allow_inf_nan=False)
    momentum: Float = Field(0.9, ge=0, lt=1)
    weight_decay: Float = Field(1e-4, ge=0)
    lr_decay: Float = Field(1.0, gt=0, le=1, description="multiplied into lr every lr_decay_every rounds")
    lr_decay_every: Int = Field(1, ge=1)
    precision: Literal["32", "bf16-mixed", "16-mixed"] = Field(
        "32", description="local training precision: 32, or mixed with bfloat16 / float16 (loss scaling) autocast")


class ServerConfig(PluginSection):
    """What the server admits into a round and how it combines what it admits.

    Every update is checked against the round first (sampled client, this round, once, the global model's
    keys, dtypes and shapes, finite values, a sample count within the client's shard, the client's own
    modalities); then a change larger than ``max_change_ratio`` times the global model's norm is refused.
    ``clip_norm`` scales each client's change down to that L2 norm. ``rule`` combines the admitted updates
    (see :mod:`fedcmi.rules`; each rule's own settings at ``server.<rule>``): ``mean`` is FedAvg's
    sample-weighted mean (one running sum, memory flat in the number of clients); ``median``,
    ``trimmed_mean``, ``krum`` and ``multi_krum`` are unweighted and robust to a minority of lying clients,
    and hold every admitted update of a round in memory. ``optimizer`` steps from the aggregate.
    """

    registry = RULES
    rule: str = Field("mean", description="the aggregation rule (fedcmi.registry.RULES): mean, median, "
                      "trimmed_mean, krum, multi_krum")
    clip_norm: Float | None = Field(None, gt=0, allow_inf_nan=False, description="L2 norm each client's change "
                                    "is scaled down to before it is combined; null: no clipping")
    max_change_ratio: Float = Field(10.0, gt=0, allow_inf_nan=False, description="an update whose change is "
                                    "larger than this times max(1, norm of the global model) is refused")
    optimizer: Literal["auto", "none", "momentum", "adam"] = Field(
        "auto", description="the server's step after aggregation (Reddi et al., ICLR 2021): none (take the "
        "aggregate), momentum (FedAvgM), adam (FedAdam); auto: the algorithm's own (fedavgm: momentum, "
        "fedadam: adam, every other: none)")
    lr: Float | None = Field(None, gt=0, allow_inf_nan=False, description="server learning rate; null: 1.0 for "
                             "momentum, 0.01 for adam")
    momentum: Float = Field(0.9, ge=0, lt=1, description="momentum: the server momentum")
    betas: tuple[Float, Float] = Field((0.9, 0.99), description="adam: the moments' decay rates")
    tau: Float = Field(1e-3, gt=0, allow_inf_nan=False, description="adam: the adaptivity (added to sqrt(v))")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("both betas must lie in [0, 1)")
        return v

    @field_validator("rule")
    @classmethod
    def _registered(cls, v: str) -> str:
        RULES.get(v)  # UnknownPlugin, a ValueError naming the known ones
        return v


    def rule_options(self, rule: type) -> BaseModel | None:
        """The settings of aggregation rule class ``rule`` (None when it has none)."""
        options = getattr(rule, "Options", None)
        return self.options(options) if options is not None else None


class AlgorithmConfig(PluginSection):
    """Which algorithm trains, the settings algorithms share, and each algorithm's own section
    (``algorithm.<section>``, declared by its strategy: ``fedcmi``, ``ogm``, ...)."""

    registry = ALGORITHMS
    name: str = Field("fedcmi", description="a registered algorithm (fedcmi.registry.ALGORITHMS)")
    mu: Float = Field(0.0, ge=0, description="proximal weight for fedprox and fedcmi; 0 turns it off")
    modality: str | None = Field(None, description="the modality trained by 'unimodal'")
    aggregation: Literal["auto", "plain", "modality_aware"] = Field(
        "auto", description="which clients average each parameter: every client (plain), or a modality's "
        "parameters only the clients holding it (modality_aware); auto: the algorithm's own (FedCMI: "
        "modality_aware)")
    control_variates: bool | Literal["auto"] = Field(
        "auto", description="SCAFFOLD's drift correction (Karimireddy et al., ICML 2020) on top of the "
        "algorithm's client update; auto: on for scaffold only")

    @field_validator("name")
    @classmethod
    def _registered(cls, v: str) -> str:
        ALGORITHMS.get(v)  # UnknownPlugin, a ValueError naming the known ones
        return v



class EvaluationConfig(Section):
    every: Int = Field(1, ge=1)
    batch_size: Int = Field(256, ge=1)
    linear_probe: bool = Field(True, description="fit a ridge probe on each frozen encoder at the final round")
    divergence_patience: Int = Field(
        3, ge=1, le=1_000_000, description="evaluations in a row at chance level (after being above it) that "
        "stop a run as diverged")
    divergence_margin: Float = Field(
        0.02, ge=0, le=1, allow_inf_nan=False, description="within this of chance accuracy counts as at chance")
    missing_modality: Float = Field(
        0.0, ge=0, le=1, description="evaluated samples that lose one modality (zero-filled, drawn from the seed "
        "per split): a test-time fault; the linear probes always see both")
    absent_rates: list[Float] = Field(
        [0.3, 0.6], max_length=20, description="shares of the samples that lack one modality, each answered "
        "by the other's path as a served model answers (figures absent_acc_<percent>; the promotion gate "
        "guards them); whole percents above 0, up to 1")

    @field_validator("absent_rates")
    @classmethod
    def _whole_percents(cls, v: list[float]) -> list[float]:
        bad = [r for r in v if not 0 < r <= 1 or abs(r * 100 - round(r * 100)) > 1e-9]
        if bad:
            raise ValueError(f"{bad} are not whole percents in (0, 1] (0.3 is 30%)")
        if len({round(r * 100) for r in v}) != len(v):
            raise ValueError("a rate is listed twice")
        return sorted(v)


class PromotionConfig(Section):
    """What the registry's ``champion`` guards besides the headline: a candidate that beats it there but
    falls further than a tolerance below it on a single-modality path or with modalities absent is not
    promoted."""

    path_tolerance: Float = Field(0.02, ge=0, le=1, description="largest fall below the champion's path_acc_<m> "
                                  "(each single-modality path) that a promotion accepts")
    absent_tolerance: Float = Field(0.02, ge=0, le=1, description="largest fall below the champion's "
                                    "absent_acc_<percent> (evaluation.absent_rates) that a promotion accepts")


class AdaptiveClipConfig(Section):
    """Adaptive clipping (Andrew et al., "Differentially Private Learning with Adaptive Clipping", NeurIPS
    2021): the bound follows a quantile of the clients' change norms, learnt from a noised count."""

    target_quantile: Float = Field(0.5, gt=0, lt=1, description="the share of clients whose change the bound "
                                   "should leave unclipped")
    learning_rate: Float = Field(0.2, gt=0, le=10, description="the bound's geometric step per round")
    count_noise: Float | None = Field(None, gt=0, description="noise std of the clipped-count (in clients); "
                                      "null: the larger of clients_per_round / 20 (the paper's) and the noise "
                                      "multiplier")


class DpSgdConfig(Section):
    """Sample-level differential privacy inside each client's local training: DP-SGD (Abadi et al., CCS 2016)
    with Opacus's per-sample gradients. Each step draws a Poisson batch (every example with probability
    batch_size / the client's examples), clips each example's gradient to ``max_grad_norm``, sums and adds
    Gaussian noise of std ``noise_multiplier x max_grad_norm`` from the client's seeded generator. Epsilon is
    accounted per client over the rounds it trained (``dp-accounting``'s RDP accountant) and the worst
    client's is reported each round. A method whose loss couples the samples of a batch or of the client
    (FedCMI's infiltration, OGM-GE, PMR, MMPareto) is refused, with the reason."""

    enabled: bool = False
    noise_multiplier: Float = Field(1.0, gt=0, le=1000, description="noise std over max_grad_norm")
    max_grad_norm: Float = Field(1.0, gt=0, le=1e6, description="the L2 bound on each example's gradient")
    delta: Float = Field(1e-5, gt=0, lt=1, description="the delta of each client's (epsilon, delta)")


class PrivacyConfig(Section):
    """Client-level differential privacy of the global model (DP-FedAvg, McMahan et al., ICLR 2018).

    ``central``: the server clips each admitted client's change to ``clip_norm``, sums the clipped changes,
    adds Gaussian noise of std ``noise_multiplier x clip_norm`` from the run's seeded generator and divides by
    the number of contributors (every client counts the same: a weight by sample count would let one client
    move the mean further than the bound). With ``per_group`` and modality-aware aggregation each modality
    group (each encoder, and the shared fusion head) is clipped, noised and accounted on its own: a rarely held
    modality is averaged over few clients, and its holders may be sampled at another rate. Epsilon comes from
    the ``dp-accounting`` library (RDP accountant), reported per round, per group and for the worst-placed
    client; a run whose rounds would spend past ``budget_epsilon`` is refused before it starts.
    """

    mechanism: Literal["none", "central"] = Field("none", description="none, or central (DP-FedAvg on the "
                                                  "server: clip, sum, Gaussian noise)")
    noise_multiplier: Float | None = Field(1.0, ge=0, le=1000, description="noise std over the clip bound; null "
                                           "with target_epsilon: the smallest that meets it after all the rounds")
    target_epsilon: Float | None = Field(None, gt=0, le=1000, description="the epsilon the run should end at; "
                                         "chooses noise_multiplier (set it null)")
    delta: Float = Field(1e-5, gt=0, lt=1, description="the delta of (epsilon, delta)-DP")
    clipping: Literal["fixed", "adaptive"] = Field("fixed", description="fixed bound, or adaptive (a quantile "
                                                   "of the change norms)")
    clip_norm: Float = Field(1.0, gt=0, le=1e6, description="the L2 bound on a client's change (adaptive: its "
                             "start)")
    per_group: bool = Field(True, description="under modality-aware aggregation, clip, noise and account each "
                            "modality group on its own")
    budget_epsilon: Float | None = Field(None, gt=0, description="refuse a run whose rounds would spend more "
                                         "epsilon than this")
    adaptive: AdaptiveClipConfig = Field(default_factory=AdaptiveClipConfig)
    dp_sgd: DpSgdConfig = Field(default_factory=DpSgdConfig)

    @model_validator(mode="after")
    def _noise(self) -> PrivacyConfig:
        if self.mechanism == "central" and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of privacy.noise_multiplier and privacy.target_epsilon (set the "
                             "other to null)")
        return self


class TrackingConfig(Section):
    """MLflow tracking and the model registry."""

    enabled: bool = True
    tracking_uri: str | None = Field(None, description="MLFLOW_TRACKING_URI wins; default sqlite:///mlflow.db")
    experiment: str = Field("fedcmi", min_length=1)
    registered_model: str = Field("fedcmi-synthetic", min_length=1)
    headline_metric: str = "mm_acc"
    request_timeout: Float = Field(30.0, gt=0, le=3600, description="seconds one request to a tracking server "
                                   "may take (MLFLOW_HTTP_REQUEST_TIMEOUT wins)")
    max_retries: Int = Field(2, ge=0, le=20, description="retries of a request that failed for a passing reason "
                             "(MLFLOW_HTTP_REQUEST_MAX_RETRIES wins)")
    time_budget: Float = Field(600.0, gt=0, description="seconds a run may wait on the tracking server in all; "
                               "past it, what is left is not sent (the local files keep everything) and reported")
    close_wait: Float = Field(120.0, ge=0, description="seconds the end of a run waits, within time_budget, for a "
                              "server that is away to answer, so what is queued is sent before the run ends")
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)


class LoaderConfig(Section):
    """How batches reach the model (never what they hold: the order is the seed's alone)."""

    workers: Int = Field(0, ge=0, le=64, description="processes reading batches (0: the training process), "
                         "started once per training process and kept across clients; raise for real datasets "
                         "on a GPU")
    pin_memory: bool | Literal["auto"] = Field(
        "auto", description="page-locked batches for asynchronous copies to the GPU (auto: on CUDA)")

    def pinned(self, device_type: str) -> bool:
        return device_type == "cuda" if self.pin_memory == "auto" else bool(self.pin_memory)


class OutputConfig(Section):
    dir: Path = Path("outputs")
    keep_checkpoints: Int = Field(2, ge=1)


#: Settings of ``algorithm`` every algorithm reads.
SHARED_ALGORITHM_KEYS = ("name", "aggregation", "control_variates")


def _default_setting(dotted: str) -> Any:
    """A setting's default by its dotted name (``partition.scheme``, ``data.cremad.split``)."""
    section, *rest = dotted.split(".")
    model: Any = Config.model_fields[section].annotation
    if section == "data" and len(rest) == 2:  # a dataset's own section
        options = DATASETS.get(rest[0]).Options
        return options.model_fields[rest[1]].default if options is not None else None
    for name in rest[:-1]:
        model = model.model_fields[name].annotation
    field = model.model_fields[rest[-1]]
    return field.default_factory() if field.default_factory is not None else field.default


class Config(Section):
    """Everything a run needs; see ``params.yaml`` for the defaults."""

    #: a published protocol whose class set, split, clients and metric this run follows (fedcmi.protocols)
    protocol: str | None = Field(None, description="a published protocol's preset: fedcmi-cremad or "
                                 "fedmultimodal-cremad (fixes data.name, the CREMA-D labels and split, "
                                 "partition.scheme and tracking.headline_metric); null: your own settings")
    seed: Int = Field(0, ge=0, lt=2**31)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Int = Field(1, ge=0, le=1024)
    # the sections that hold plug-ins' settings are built on first use: they read the registries
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = PartitionConfig()
    model: ModelConfig = ModelConfig()
    federation: FederationConfig = Field(default_factory=FederationConfig)
    optim: OptimConfig = OptimConfig()
    server: ServerConfig = Field(default_factory=ServerConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    loader: LoaderConfig = LoaderConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    tracking: TrackingConfig = TrackingConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="before")
    @classmethod
    def _protocol(cls, raw: Any) -> Any:
        from fedcmi.protocols import apply_protocol

        return apply_protocol(raw, _default_setting) if isinstance(raw, dict) else raw

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        mods = self.data.modalities
        if set(self.model.encoders) != set(mods):
            raise ValueError(
                f"model.encoders must name exactly the modalities {list(mods)}, got {sorted(self.model.encoders)}"
            )
        DATASETS.get(self.data.name).check(self)
        strategy = ALGORITHMS.get(self.algorithm.name)
        strategy.check(self)
        own = strategy.server_optimizer
        if own != "none" and self.server.optimizer not in ("auto", own):
            raise ValueError(f"server.optimizer {self.server.optimizer!r} contradicts algorithm.name "
                             f"{self.algorithm.name!r}, whose server step is {own!r}; for another step use "
                             f"algorithm.name 'fedavg' with server.optimizer {self.server.optimizer!r}")
        if strategy.control_variates and self.algorithm.control_variates is False:
            raise ValueError(f"algorithm.control_variates cannot be false for {self.algorithm.name!r}, whose "
                             "client update is the drift correction; use algorithm.name 'fedavg'")
        if self.federation.clients_per_round > self.partition.num_clients:
            raise ValueError(
                f"federation.clients_per_round ({self.federation.clients_per_round}) exceeds "
                f"partition.num_clients ({self.partition.num_clients})"
            )
        if self.federation.min_clients > self.federation.clients_per_round:
            raise ValueError("federation.min_clients exceeds federation.clients_per_round")
        self._check_participation()
        SAMPLERS.get(self.federation.sampler).check(self)
        if self.privacy.mechanism != "none":
            from fedcmi.privacy.checks import check_composition

            check_composition(self)
        if self.privacy.dp_sgd.enabled:
            from fedcmi.privacy.checks import check_dp_sgd

            check_dp_sgd(self, strategy.per_sample_obstacle(self))
        headlines = headline_names(mods)
        if self.tracking.headline_metric not in headlines:
            raise ValueError(f"tracking.headline_metric {self.tracking.headline_metric!r} is not a figure the "
                             f"evaluation reports where higher is better; one of {', '.join(headlines)}")
        return self

    def _check_participation(self) -> None:
        fed = self.federation
        if fed.latency.model == "none":
            asked = [f for f, on in (("federation.deadline", fed.deadline is not None),
                                     ("federation.over_selection", fed.over_selection > 0)) if on]
            if asked:
                raise ValueError(f"{' and '.join(asked)} need(s) a latency model (federation.latency.model: "
                                 "lognormal): without one every client reports at once")
        if self.sampled_per_round > self.partition.num_clients:
            raise ValueError(f"federation.over_selection {fed.over_selection:g} samples {self.sampled_per_round} "
                             f"clients a round, more than partition.num_clients ({self.partition.num_clients})")
        outside = sorted({c for c in fed.latency.stragglers if not 0 <= c < self.partition.num_clients})
        if outside:
            raise ValueError(f"federation.latency.stragglers names clients {outside}, outside 0.."
                             f"{self.partition.num_clients - 1} (partition.num_clients)")

    # -- derived values -------------------------------------------------
    @property
    def sampled_per_round(self) -> int:
        """Clients drawn each round: ``clients_per_round`` and the over-selected extra (rounded up)."""
        k = self.federation.clients_per_round
        return k + math.ceil(round(self.federation.over_selection * k, 9))

    @property
    def aggregation(self) -> str:
        """Which clients average each parameter: ``algorithm.aggregation``, or the algorithm's own (FedCMI's
        is modality-aware) when it is auto."""
        if self.algorithm.aggregation != "auto":
            return self.algorithm.aggregation
        return str(ALGORITHMS.get(self.algorithm.name).aggregation)

    @property
    def server_optimizer(self) -> str:
        """The server step in force: ``server.optimizer``, or the algorithm's own when it is auto."""
        if self.server.optimizer != "auto":
            return self.server.optimizer
        return str(ALGORITHMS.get(self.algorithm.name).server_optimizer)

    @property
    def control_variates(self) -> bool:
        """Whether clients correct their drift with SCAFFOLD's control variates."""
        if self.algorithm.control_variates != "auto":
            return bool(self.algorithm.control_variates)
        return bool(ALGORITHMS.get(self.algorithm.name).control_variates)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """Dotted-key view, as logged to MLflow."""
        out: dict[str, Any] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = node

        walk("", self.to_dict())
        return out

    def applicable(self) -> dict[str, Any]:
        """:meth:`flat` without the settings this run does not use: the sections of other datasets, of
        other aggregation rules, of other client samplers and of other algorithms, and what its own
        dataset does not read (what MLflow shows)."""
        dataset = DATASETS.get(self.data.name)
        unused = {f"data.{key}" for key in (self.data.__pydantic_extra__ or {}) if key != self.data.name}
        unused |= dataset.unused_settings(self)
        unused |= {f"server.{key}" for key in (self.server.__pydantic_extra__ or {}) if key != self.server.rule}
        unused |= {f"federation.{key}" for key in (self.federation.__pydantic_extra__ or {})
                   if key != self.federation.sampler}
        strategy = ALGORITHMS.get(self.algorithm.name)
        used = {*SHARED_ALGORITHM_KEYS, *strategy.reads, strategy.options_key()}
        unused |= {f"algorithm.{key}" for key in self.algorithm.model_dump() if key not in used}
        if self.federation.latency.model == "none":
            unused |= {f"federation.latency.{key}" for key in LatencyConfig.model_fields if key != "model"}
        if self.privacy.mechanism == "none":
            unused |= {f"privacy.{key}" for key in PrivacyConfig.model_fields if key not in ("mechanism", "dp_sgd")}
        if not self.privacy.dp_sgd.enabled:
            unused |= {f"privacy.dp_sgd.{key}" for key in DpSgdConfig.model_fields if key != "enabled"}
        elif self.privacy.clipping == "fixed":
            unused.add("privacy.adaptive")
        # a key is left out when it is an unused setting or lies inside an unused section
        return {k: v for k, v in self.flat().items()
                if not any(k == u or k.startswith(u + ".") for u in unused)}

    def fingerprint(self, *sections: str) -> str:
        """Stable hash of the named top-level sections (all when none named)."""
        d = self.to_dict()
        keys = sections or tuple(sorted(d))
        blob = json.dumps({k: d[k] for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- loading --------------------------------------------------------------
def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling; see params.yaml for every setting)"
        elif "input" in e and e["type"] != "missing" and not isinstance(e["input"], (dict, list)):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"{path}: {msg}")
    head = f"invalid configuration in {source}:" if len(lines) > 1 else f"invalid configuration in {source}: "
    return head + ("\n  " + "\n  ".join(lines) if len(lines) > 1 else lines[0])


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: the problem and where."""
    problem = getattr(exc, "problem", None) or exc.__class__.__name__
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(problem)


#: More values than any params file holds (about 400): YAML aliases that expand past this are a bomb.
MAX_VALUES = 100_000


def _expanded_size(node: Any, memo: dict[int, int], limit: int) -> int:
    """How many values ``node`` holds once YAML aliases are expanded (shared nodes counted once each use,
    computed once each: fast on a billion-laughs file)."""
    if not isinstance(node, (dict, list)):
        return 1
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = limit + 1  # a node that holds itself never ends
    children = node.values() if isinstance(node, dict) else node
    total = 1
    for child in children:
        total += _expanded_size(child, memo, limit)
        if total > limit:
            break
    memo[id(node)] = total
    return total


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as the number YAML 1.2 (and every user) means, not a string,
    and refusing a key given twice in one mapping (PyYAML keeps the last silently; YAML forbids it)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise ConfigError(f"setting {key!r} is given twice in one section (lines {seen[key] + 1} and "
                                  f"{key_node.start_mark.line + 1}); keep one")
            if isinstance(key, str | int | float | bool):
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


#: A params file larger than this is no settings file (the shipped one is a few KiB).
MAX_PARAMS_BYTES = 1_000_000


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _safe_yaml(text: str | bytes, where: str) -> Any:
    """``yaml.safe_load`` with limits: nesting past Python's recursion and alias bombs are ConfigErrors."""
    try:
        value = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to be settings") from None
    try:
        size = _expanded_size(value, {}, MAX_VALUES)
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to be settings") from None
    if size > MAX_VALUES:
        raise ConfigError(f"{where} expands to more than {MAX_VALUES} values (YAML aliases that multiply?); "
                          "refused")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (['a','b','c'], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(p.strip() for p in parts):
        raise ConfigError(f"override {text!r} has an empty key segment")
    try:
        value = _safe_yaml(raw, f"override {text[:60]!r}") if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(exc)})") from None
    return [p.strip() for p in parts], value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a nested dict (a copy)."""
    out = json.loads(json.dumps(raw, default=str))
    for ov in overrides:
        parts, value = parse_override(ov)
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"override {ov!r}: {p!r} is a value, not a section")
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


#: The training settings a pipeline takes at run time (what users compare and rerun), by the name they
#: carry there, with the config field each sets.
RUN_SETTINGS: dict[str, str] = {
    "seed": "seed", "algorithm": "algorithm.name", "lr": "optim.lr", "mu": "algorithm.mu",
    "rounds": "federation.rounds", "local_epochs": "federation.local_epochs",
}


def config_with_settings(params_json: str, settings: dict[str, Any], source: str = "pipeline parameters") -> Config:
    """The config in ``params_json`` with run-time ``settings`` (names of :data:`RUN_SETTINGS`) applied;
    a bad value is one :class:`ConfigError` naming the field."""
    raw = json.loads(params_json)
    unknown = sorted(set(settings) - set(RUN_SETTINGS))
    if unknown:
        raise ConfigError(f"unknown run setting(s) {unknown}; known: {sorted(RUN_SETTINGS)}")
    for name, value in settings.items():
        node = raw
        *path, last = RUN_SETTINGS[name].split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return config_from_dict(raw, source)


def config_from_dict(raw: Any, source: str = "params") -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid configuration in {source}: the top level must be a mapping of settings")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Config:
    """Load ``params.yaml`` (or defaults when ``path`` is None) and apply overrides."""
    raw: Any = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"params file {p} not found")
        if p.stat().st_size > MAX_PARAMS_BYTES:
            raise ConfigError(f"{p} holds {p.stat().st_size:,} bytes; a params file is at most "
                              f"{MAX_PARAMS_BYTES:,} (is it the right file?)")
        try:
            raw = _safe_yaml(p.read_bytes().decode("utf-8"), str(p)) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p} is not valid YAML: {_yaml_problem(exc)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"invalid configuration in {p}: the top level must be a mapping of settings")
    if overrides:
        raw = apply_overrides(raw, overrides)
        source = f"{source} with --set overrides"
    return config_from_dict(raw, source)
