"""The `search:` section of a job spec: what a MineAug search scores, keeps and validates.

Errors name the field as it is written in the spec (`search.k`, `search.candidates`, ...), so the
CLI can print them as one line.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data_shards.errors import UserError
from models.augment.pool import COLOUR_ONLY, POOL_NAMES, names_for


class SearchConfigError(UserError):
    """A bad `search:` value; the message starts with the field's name."""


PROXY_SAMPLES = 2048

# `search.preset: paper`: the published MineAug selection (MINEAUG.md §1), field by field.
PAPER_PRESET = {"select": "singles", "dedupe": False, "mse_min": 0.02, "k": 3, "features": "inception"}
# `search.features`: "eval" scores stage 1 in eval.fid_extractor's space (the behaviour before the setting).
FEATURES = ("eval", "randconv", "inception")


class ValidateConfig(BaseModel):
    """Stage 2: short proxy trainings of subsets of the `top_m` best kept candidates."""

    model_config = ConfigDict(extra="forbid")
    top_m: int = Field(0, ge=0)          # 0 = stage 2 off
    trials: int = Field(0, ge=0)         # Optuna proposals (subsets of the top M), beside the controls
    budget_steps: int = Field(0, ge=0)   # training steps of one proxy training
    # Seeds per control (and for the best proposal's confirmation): the verdict pairs runs at equal seeds.
    seeds: int = Field(3, ge=1)
    # Generated images per proxy FID. None: eval.num_samples capped at PROXY_SAMPLES (the paper's
    # specs evaluate 50,000, far too many for a proxy scored four times per training).
    num_samples: int | None = Field(None, ge=2)
    # Family-wise error rate of the verdict (Holm across the subsets compared with "none").
    alpha: float = Field(0.05, gt=0.0, lt=1.0)

    def proxy_samples(self, eval_num_samples: int) -> int:
        """What one proxy FID generates: `num_samples`, else eval.num_samples capped at PROXY_SAMPLES."""
        return self.num_samples or min(eval_num_samples, PROXY_SAMPLES)

    @model_validator(mode="after")
    def _complete_when_on(self) -> "ValidateConfig":
        if self.top_m > 0 and (self.trials < 1 or self.budget_steps < 1):
            raise ValueError("with top_m > 0, trials and budget_steps must be >= 1")
        return self


class SearchConfig(BaseModel):
    """The spec's `search:` section. `preset: paper` fills in the published rule's values (PAPER_PRESET)
    and refuses a conflicting value written beside it, so a spec never claims the paper's mode while
    departing from it."""

    # `validate` is a (deprecated) BaseModel method, so the field is `validate_` spelled `validate` in specs.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)
    k: int = Field(3, ge=1)
    candidates: Literal["all"] | list[str] = "all"
    repeats: int = Field(3, ge=1)
    mse_min: float = Field(0.02, ge=0.0)
    dedupe: bool = True
    concurrency: int | None = Field(None, ge=1)
    # Ray resource names as the spec writes them; fractional GPUs pack several trials on one GPU.
    resources_per_trial: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0, "GPU": 0.0})
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    select: Literal["singles", "sets"] = "sets"
    seed: int = Field(0, ge=0)
    max_images: int | None = Field(None, ge=2)   # cap on the originals, for quick runs
    preset: Literal["paper"] | None = None
    # Stage 1's feature space: "eval" = eval.fid_extractor (and its weights); "inception" needs
    # eval.inception_weights (a local file; nothing is downloaded).
    features: Literal["eval", "randconv", "inception"] = "eval"

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, values):
        if not isinstance(values, dict) or values.get("preset") != "paper":
            return values
        clash = [f"search.{k}={values[k]!r}" for k, v in PAPER_PRESET.items() if k in values and values[k] != v]
        if clash:
            fixed = ", ".join(f"{k}={v!r}" for k, v in PAPER_PRESET.items())
            raise ValueError(f"preset 'paper' fixes {fixed}; the spec also sets {', '.join(clash)}: remove it, "
                             "or remove the preset")
        return {**values, **PAPER_PRESET}

    @field_validator("candidates")
    @classmethod
    def _names_known(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("an empty list; use 'all' or name at least one pool entry")
            unknown = [n for n in v if n not in POOL_NAMES]
            if unknown:
                raise ValueError(f"unknown augmentation(s) {', '.join(unknown)}; allowed: {', '.join(POOL_NAMES)}")
            if len(set(v)) != len(v):
                raise ValueError("names a candidate twice")
        return v

    @field_validator("resources_per_trial")
    @classmethod
    def _resources(cls, v: dict[str, float]):
        unknown = [k for k in v if k not in ("CPU", "GPU")]
        if unknown:
            raise ValueError(f"unknown resource(s) {', '.join(unknown)}; allowed: CPU, GPU")
        v = {"CPU": float(v.get("CPU", 1.0)), "GPU": float(v.get("GPU", 0.0))}
        if v["CPU"] <= 0 or v["GPU"] < 0:
            raise ValueError("CPU must be > 0 and GPU >= 0")
        if v["GPU"] > 1 and v["GPU"] != int(v["GPU"]):
            raise ValueError("a GPU share above 1 must be a whole number of GPUs")
        return v

    @property
    def validate_cfg(self) -> ValidateConfig:
        return self.validate_

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)


def load_config(values: dict | SearchConfig | None) -> SearchConfig:
    """Validate a `search:` mapping; errors name the field (`search.<key>: message`)."""
    if isinstance(values, SearchConfig):
        return values
    try:
        return SearchConfig.model_validate(values or {})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            # The preset's check runs on the whole section: it names its own field.
            loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int)) or (
                "preset" if msg.startswith("preset ") else "(section)")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            lines.append(f"search.{loc}: {msg}")
        raise SearchConfigError("; ".join(lines)) from None


def resolve_candidates(cfg: SearchConfig, channels: int) -> list[str]:
    """The candidate names for `channels`-channel data, in pool order for "all" (colour-only
    entries silently dropped for 1 channel) and in the spec's order for a list (where a colour
    entry on 1-channel data is an error: the user asked for something that cannot run)."""
    if channels not in (1, 3):
        raise SearchConfigError(f"data.channels: MineAug searches 1- or 3-channel images, not {channels}")
    if cfg.candidates == "all":
        return names_for(channels)
    unknown = [n for n in cfg.candidates if n not in POOL_NAMES]
    if unknown:   # a config built without validation (model_construct) still gets a clear error
        raise SearchConfigError(f"search.candidates: unknown augmentation(s) {', '.join(unknown)}; "
                                f"allowed: {', '.join(names_for(channels))}")
    colour = [n for n in cfg.candidates if n in COLOUR_ONLY and channels != 3]
    if colour:
        raise SearchConfigError(f"search.candidates: {', '.join(colour)} need(s) 3-channel images, the data has "
                                f"{channels}; remove them or use 'all' (which skips colour-only entries)")
    return list(cfg.candidates)


def stage1_features(cfg: SearchConfig, eval_extractor: str, eval_weights: str | None) -> tuple[str, str | None]:
    """(extractor name, weights path) of stage 1: `search.features`, or eval.fid_extractor for "eval".
    Inception without a weights file is refused here in one line, before anything runs."""
    import os

    name = eval_extractor if cfg.features == "eval" else cfg.features
    if name != "inception":
        return name, eval_weights   # unused by randconv; kept so a resumed search compares the same state
    if not eval_weights or not os.path.isfile(eval_weights):
        why = ("search.preset paper scores with Inception-v3 2048-d features" if cfg.preset == "paper"
               else "search.features" + (" (eval.fid_extractor)" if cfg.features == "eval" else "") + " is inception")
        where = "it is not set" if not eval_weights else f"no file at {eval_weights!r}"
        way_out = ("or remove search.preset (the paper's selection needs Inception's features)" if cfg.preset == "paper"
                   else "or set search.features: randconv")
        raise SearchConfigError(f"search.features: {why}, which needs eval.inception_weights, the local file "
                                f"inception-2015-12-05.pt ({where}; nothing is downloaded), {way_out}")
    return name, eval_weights

