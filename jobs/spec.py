"""The job spec: one YAML file, validated before anything starts; errors name the field.

Section and key names are a contract (docs/ARCHITECTURE.md): later work may add keys, never
rename them. `--set section.key=value` overrides any key; values are parsed as YAML (numbers,
booleans, lists). Validation reads no file and no store: the spec is validated where it is parsed,
which may not be where it runs; the driver checks the data and the files the spec names once
(jobs/inputs.py), and workers take the checked spec as it is (`JobSpec.from_checked`).
"""
from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from data_shards.builtin import is_builtin, parse_builtin
from data_shards.errors import UserError
from data_shards.split import holdout_problem
from models.family import Family
from models.registry import available_families, get_family_cls, make_family
from models.metrics.suite import reported_names
from search.config import SearchConfig, SearchConfigError, resolve_candidates

SPECS_DIR = Path(__file__).parent / "specs"
STORAGE_ROOT_ENV = "ORBITGEN_STORAGE"   # the storage root a user sets once for every spec
_CHECKED = "orbitgen.checked"   # validation context: the driver already ran the cross-section checks


class SpecError(UserError):
    """A spec that cannot run; the message names the field and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(_Section):
    train: str = Field(description="fsspec URL of a shard set (file://, s3://) or builtin:NAME?count=N&seed=S; also "
                                   "plain WebDataset shards, adopted on first use (data_shards/adopt.py): a brace "
                                   "URL (s3://b/x/shard-{000000..000099}.tar), a folder of tars, or a dataset.json "
                                   "pointing at shards elsewhere")
    resolution: int = Field(64, ge=8, le=4096)
    channels: int = Field(1, ge=1, le=16)
    shuffle_buffer: int = Field(256, ge=1)
    loader_workers: int = Field(1, ge=0, description="DataLoader processes per training worker")
    resize: Literal["refuse", "resize"] = Field("refuse", description="images of another size than data.resolution "
                                                "in an adopted set: refuse (one line naming the sizes) or resize "
                                                "(centre crop, then Lanczos to data.resolution, on read)")
    # A float or an int on purpose: 0.1 is a fraction, 100 a count (data_shards/split.py).
    holdout: float | int | None = Field(None, description="samples set aside for evaluation, chosen by a hash of "
                                                          "their key: a fraction 0<x<1, a count >= 2, or null (none)")

    @field_validator("holdout", mode="before")
    @classmethod
    def _holdout_is_a_fraction_or_a_count(cls, v: Any) -> Any:
        if problem := holdout_problem(v):
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _holdout_fits_a_builtin_set(self) -> "DataSpec":
        if isinstance(self.holdout, int) and is_builtin(self.train):
            try:
                count = parse_builtin(self.train)[1]["count"]
            except ValueError:
                return self   # a bad URL is reported where the set is built, with what is allowed
            if self.holdout >= count:
                raise ValueError(f"data.holdout ({self.holdout}) must be smaller than the {count} samples of "
                                 f"{self.train}: training needs some")
        return self


class AugmentSpec(_Section):
    ada: dict[str, Any] | None = None
    mineaug: list[str] = []
    search_run: str | None = Field(None, description="the MLflow run of the `orbitgen search mineaug` that chose `mineaug`")


class SchedulerSpec(_Section):
    """A learning-rate factor per optimizer step (one per train step), on top of the family's own
    schedule (a phase's StepLR, see models/family.py), the same for every phase."""

    kind: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0, description="linear ramp from 0 to the full rate first")


class TrainSpec(_Section):
    batch: int = Field(16, ge=1, description="global batch, split evenly over the workers")
    steps: int | None = Field(None, ge=1, description="overrides kimg when set")
    kimg: float | None = Field(None, gt=0)
    lr: float = Field(2e-4, gt=0)
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    log_every: int = Field(10, ge=1)
    grad_accum: int = Field(1, ge=1, description="micro-batches per worker batch: same update, less memory")
    grad_clip: float | None = Field(None, gt=0, description="clip each network's gradient norm to this; null = off")
    optimizer: Literal["adam", "adamw"] = Field("adam", description="betas and weight decay come from the family")
    scheduler: SchedulerSpec = SchedulerSpec()
    channels_last: bool = Field(False, description="NHWC memory layout for networks and images (faster convs on GPU)")
    compile: bool = Field(False, description="torch.compile the trained network of each phase (refused with "
                                             "DeepSpeed where a gradient penalty needs a double backward)")
    cudnn_benchmark: bool = Field(True, description="on GPU, cuDNN times its convolution algorithms once and keeps "
                                                    "the fastest (no effect on CPU)")
    fused_adam: bool = Field(True, description="on GPU under DDP, torch's fused (one-kernel) Adam: the same update, "
                                               "fewer launches (no effect on CPU)")
    broadcast_buffers: bool | None = Field(None, description="under DDP, copy rank 0's buffers into every rank before "
                                                         "each forward; null = the family's call "
                                                         "(Family.broadcast_buffers: off for stylegan2 and diffusion)")


class StrategySpec(_Section):
    kind: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = Field(1, ge=0, le=2, description="DeepSpeed ZeRO stage (0, 1 or 2)")
    timeout_s: int = Field(300, ge=10, description="collective timeout: a hung peer fails the group after this long")
    deepspeed: dict[str, Any] = Field({}, description="extra DeepSpeed config, merged over the one built from the spec")

    @field_validator("deepspeed")
    @classmethod
    def _nothing_that_unpickles(cls, value: dict[str, Any]) -> dict[str, Any]:
        # DeepSpeed's universal-checkpoint load reads its files with torch.load(weights_only=False),
        # outside the restricted load every engine state goes through (models/safe_load.py): a file
        # in run storage could run code on every worker. orbitgen resumes from its own checkpoints.
        for path, why in UNPICKLING_DEEPSPEED_KEYS.items():
            section, _, key = path.partition(".")
            block = value.get(section)
            if isinstance(block, dict) and key in block and block[key] not in (False, None):
                raise ValueError(f"strategy.deepspeed.{path} is refused: {why}; remove it (orbitgen resumes "
                                 "from its own checkpoints with --resume)")
        return value


# DeepSpeed config keys that make it unpickle files, and why they are refused.
UNPICKLING_DEEPSPEED_KEYS = {
    "checkpoint.load_universal": "DeepSpeed's universal-checkpoint load unpickles files (torch.load with "
                                 "weights_only=False), which can run code",
}


class ScalingSpec(_Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK", description="where Ray puts the workers: PACK fills one node first, SPREAD spreads them over "
                            "nodes where it can, STRICT_SPREAD one worker a node (waits until there are enough)")


class StorageSpec(_Section):
    """Where a job's files live when its nodes share no disk (a cluster): one root for run storage,
    built-in data and searches, and the local folders that every node mounts."""

    root: str | None = Field(None, description="fsspec URL every node reaches (s3://bucket/orbitgen); default "
                                               "$ORBITGEN_STORAGE; unset: the workdir, which only one machine has")
    shared_mounts: list[str] = Field([], description="folders every node of the cluster mounts (FSx, NFS): local "
                                                     "paths under them are shared")


class CheckpointSpec(_Section):
    every_steps: int = Field(1000, ge=1)
    keep: int = Field(3, ge=1)
    storage: str | None = Field(None, description="fsspec URL for run storage; default <storage.root>/runs, else "
                                                  "<workdir>/runs")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint")
    best_metric: str | None = Field(None, description="keep the `keep` best checkpoints by this eval metric "
                                                       "(evaluated at every checkpoint) instead of the latest")
    best_mode: Literal["min", "max"] = "min"


class EvalSpec(_Section):
    every_steps: int | None = Field(None, ge=1)
    metrics: list[str] | None = Field(None, description="which of the family's metrics evaluation computes; "
                                                     "null = all of them")
    num_samples: int = Field(1000, ge=2)
    fid_extractor: Literal["randconv", "inception"] = "randconv"
    inception_weights: str | None = None
    vgg_weights: str | None = Field(None, description="NVIDIA's VGG-16 TorchScript (vgg16.pt), a local file: the "
                                                       "feature space of precision/recall; null = the fid_extractor's")
    lpips_weights: str | None = Field(None, description="LPIPS's weights (backbone and lin layers, the state dict of "
                                                         "the reference lpips.LPIPS module; models/metrics/lpips.py), a "
                                                         "local file: a family's perceptual metric is then published "
                                                         "LPIPS, logged as `lpips`; null = `perceptual_randconv`")

    @model_validator(mode="after")
    def _inception_has_weights(self) -> "EvalSpec":
        # That the files are there is the driver's check (jobs/inputs.py check_files).
        if self.fid_extractor == "inception" and not self.inception_weights:
            raise ValueError("fid_extractor 'inception' needs eval.inception_weights (a local file path)")
        return self

    @model_validator(mode="after")
    def _perceptual_named_for_its_weights(self) -> "EvalSpec":
        """A family lists its perceptual metric as `lpips`; what is computed, and its logged name, follow
        eval.lpips_weights (models.metrics.suite.named_for_weights): without weights it is
        `perceptual_randconv`, and a run that asked for it as `lpips` says so in its params. Here
        `perceptual_randconv` is read as that family metric (held as `lpips`, the name families list), so
        old specs (`lpips`) and new ones parse alike. (No warning: every re-read of a dumped spec would repeat it.)"""
        if self.metrics is None:
            return self
        if self.lpips_weights and "perceptual_randconv" in self.metrics:
            raise ValueError("eval.metrics: with eval.lpips_weights a family's perceptual metric is published LPIPS: "
                             "write lpips for perceptual_randconv (or drop eval.lpips_weights)")
        self.metrics = list(dict.fromkeys("lpips" if m == "perceptual_randconv" else m for m in self.metrics))
        return self

    def weight_files(self) -> dict[str, str]:
        """The extractor weights this section names, by spec key."""
        return {f"eval.{key}": path for key in ("inception_weights", "vgg_weights", "lpips_weights")
                if (path := getattr(self, key))}


class TrackingSpec(_Section):
    uri: str | None = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite under workdir")
    experiment: str | None = Field(None, description="default: the spec name")
    registry_model: str | None = Field(None, description="registered model name; null = do not register")
    promote_metric: str = "fid"
    promote_mode: Literal["min", "max"] = "min"


class JobSpec(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    family: str
    workdir: str = Field("orbitgen-work", description="local folder for defaults: built-in data, runs, MLflow store")
    data: DataSpec
    model: dict[str, Any] = {}
    augment: AugmentSpec = AugmentSpec()
    train: TrainSpec = TrainSpec()
    strategy: StrategySpec = StrategySpec()
    scaling: ScalingSpec = ScalingSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    storage: StorageSpec = StorageSpec()
    eval: EvalSpec = EvalSpec()
    tracking: TrackingSpec = TrackingSpec()
    search: SearchConfig = SearchConfig()   # `orbitgen search mineaug`; training ignores it

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str) -> str:
        if ":" not in v and v not in available_families():   # else a lab's own family, `pkg.module:Class`
            raise ValueError(f"unknown family {v!r}; allowed: {', '.join(available_families())} "
                             "or a reference pkg.module:Class")
        try:
            get_family_cls(v)   # importable, and defines the whole contract
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        return v

    @classmethod
    def from_checked(cls, data: dict[str, Any]) -> "JobSpec":
        """A spec the driver validated and checked (`model_dump(mode="json")` of it), as a worker
        takes it: field types are parsed again, the cross-section checks are not repeated."""
        return cls.model_validate(data, context={_CHECKED: True})

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> "JobSpec":
        if info.context and info.context.get(_CHECKED):
            return self
        if self.train.batch % self.scaling.num_workers:
            raise ValueError(f"train.batch ({self.train.batch}) must be divisible by "
                             f"scaling.num_workers ({self.scaling.num_workers})")
        if self.per_worker_batch % self.train.grad_accum:
            raise ValueError(f"train.batch / scaling.num_workers ({self.per_worker_batch}) must be divisible by "
                             f"train.grad_accum ({self.train.grad_accum})")
        if self.train.steps is None and self.train.kimg is None:
            raise ValueError("set train.steps or train.kimg")
        family = get_family_cls(self.family)
        try:
            config = family.config_cls.model_validate(self.model)
        except ValidationError as e:
            raise SpecError(_format_errors(e, prefix="model")) from None
        self.model = config.model_dump()
        try:
            instance = self.make_family()
        except ValidationError as e:
            raise SpecError(_format_errors(e, prefix="augment.ada")) from None
        if self.eval.metrics is not None:
            unknown = [m for m in self.eval.metrics if m not in instance.metrics]
            if unknown or not self.eval.metrics:
                raise ValueError(f"eval.metrics: {', '.join(unknown) or 'an empty list'} — the {self.family} family is "
                                 f"judged by {', '.join(instance.metrics)}; pick among those (or null for all)")
        check_training_setup(self, instance)
        logged = self.reported_metrics(instance)
        if self.tracking.registry_model and self.tracking.promote_metric not in logged:
            raise ValueError(f"tracking.promote_metric {self.tracking.promote_metric!r} is not computed; "
                             f"eval.metrics gives {', '.join(logged)}")
        if self.checkpoint.best_metric is not None and self.checkpoint.best_metric not in logged:
            raise ValueError(f"checkpoint.best_metric {self.checkpoint.best_metric!r} is not a metric of this "
                             f"{self.family} model; allowed: {', '.join(logged)}")
        if self.augment.mineaug:
            if instance.conditional:
                raise ValueError(f"augment.mineaug: the {self.family} family is conditional; MineAug augments "
                                 "unconditional image sets only")
            from models.augment.mineaug import MineAugExpansion

            MineAugExpansion(self.augment.mineaug, self.data.channels)   # names known and fit the channels
        try:
            candidates = resolve_candidates(self.search, self.data.channels)
        except SearchConfigError as e:
            raise ValueError(str(e)) from None
        if self.search.k > len(candidates):
            raise ValueError(f"search.k ({self.search.k}) is larger than the {len(candidates)} candidate(s) "
                             f"for {self.data.channels}-channel data")
        return self

    def eval_metrics(self, family: Family) -> tuple[str, ...]:
        """What evaluation computes: `eval.metrics`, else every metric the family is judged by."""
        return tuple(self.eval.metrics) if self.eval.metrics is not None else tuple(family.metrics)

    def reported_metrics(self, family: Family) -> tuple[str, ...]:
        """The names evaluation logs its values under (promotion, best checkpoint, registration):
        `lpips` with eval.lpips_weights, else perceptual_randconv; `pr` as precision and recall."""
        return reported_names(self.eval_metrics(family), self.eval.lpips_weights)

    def make_family(self) -> Family:
        """This spec's family (models.registry.make_family: the one construction path)."""
        return make_family(self.family, self.model, resolution=self.data.resolution, channels=self.data.channels,
                           lr=self.train.lr, ada=self.augment.ada)

    # Derived values: one place so the driver, the workers and the tests agree.
    @property
    def total_steps(self) -> int:
        if self.train.steps is not None:
            return self.train.steps
        return max(1, round(self.train.kimg * 1000 / self.train.batch))

    @property
    def per_worker_batch(self) -> int:
        return self.train.batch // self.scaling.num_workers

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or self.name

    def workdir_path(self) -> Path:
        return Path(self.workdir).expanduser().absolute()

    def tracking_uri(self) -> str:
        return self.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.workdir_path() / 'mlflow.db'}"

    def storage_root(self) -> str | None:
        """`storage.root`, else $ORBITGEN_STORAGE: where files go that every node must reach."""
        return self.storage.root or os.environ.get(STORAGE_ROOT_ENV) or None

    def storage_url(self) -> str:
        root = self.storage_root()
        return self.checkpoint.storage or (f"{root.rstrip('/')}/runs" if root else (self.workdir_path() / "runs").as_uri())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def sha(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


_NAMES_FIELD = re.compile(r"^[a-z_]+\.[a-z_.]+\b")


def _format_errors(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(e["loc"]) if p != "__root__")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; see jobs/specs/*.yaml for the keys)"
        got = e.get("input")
        shown = "" if e["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
        # Cross-field checks name their fields in the message: no "(spec)" in front of those.
        lines.append(f"{msg}{shown}" if not loc and _NAMES_FIELD.match(msg) else f"{loc or '(spec)'}: {msg}{shown}")
    # One line however many fields are wrong: an error stays two lines (which spec, then what).
    return "  " + "; ".join(lines)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"  --set {item!r}: expected key.path=value")
        path, value = item.split("=", 1)
        keys = path.strip().split(".")
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise SpecError(f"  --set {path}: {k} is not a section")
        node[keys[-1]] = yaml.safe_load(value) if value.strip() else None
    return raw


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's own message spans several lines with a caret drawing: one line, with where."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(getattr(e, "problem", None) or e).split())


def parse_spec(text: str, overrides: list[str] = (), source: str = "<spec>") -> JobSpec:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{source}: not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a spec is a YAML mapping with keys name, family, data, ...")
    try:
        return JobSpec.model_validate(apply_overrides(raw, list(overrides)))
    except SpecError as e:
        raise SpecError(f"{source} is not a valid job spec:\n{e}") from None
    except ValidationError as e:
        raise SpecError(f"{source} is not a valid job spec:\n{_format_errors(e)}") from None


def load_spec(path: str | Path, overrides: list[str] = ()) -> JobSpec:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"no spec file at {p} (ready specs: {', '.join(s.name for s in sorted(SPECS_DIR.glob('*.yaml')))})")
    return parse_spec(p.read_text(), overrides, source=str(p))


def encode_inline(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


def decode_inline(b64: str) -> str:
    return base64.urlsafe_b64decode(b64.encode()).decode()


def ready_specs() -> dict[str, Path]:
    """The ready specs in jobs/specs/, by file stem."""
    return {p.stem: p for p in sorted(SPECS_DIR.glob("*.yaml"))}


def check_training_setup(spec: JobSpec, family) -> None:
    """Refuses, in one line each, spec settings the family cannot train under: checked with the
    spec, so on the driver before anything starts (and again where a worker builds its engines)."""
    if spec.train.precision not in family.precisions:
        raise ValueError(f"train.precision {spec.train.precision}: the {family.name} family trains only in "
                         f"{' or '.join(family.precisions)} (fp16's range is too small for it)")
    if spec.train.compile and spec.strategy.kind == "deepspeed" and family.needs_double_backward():
        # DeepSpeed compiles the network in place, so the bare module that R1 / path length run
        # through is compiled too, and compiled code has no double backward (DDP compiles a copy).
        raise ValueError(f"train.compile with strategy.kind deepspeed: the {family.name} family's gradient penalties "
                         "(R1, path length) need a double backward, which compiled code cannot run; "
                         "use strategy.kind ddp, or set train.compile false")
