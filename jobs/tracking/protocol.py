"""The evaluation protocol: what a metric value was measured under, and where it is recorded.

Two FIDs are comparable only when the same reals (data fingerprint, split, the seed that drew
them), the same feature extractor (its name and a hash of its weights), the same number of
samples and the same generator seeds produced them. Every evaluation, in training and in
`orbitgen eval`, records its protocol; `orbitgen models promote` compares only values recorded
under one protocol.

Where it is recorded (the contract the registry, `eval`, `promote` and `models show` share):
- on a run: the tag `orbitgen.eval_protocol` (the protocol's JSON) beside its metrics;
- on a model version: for each protocol `K` (its `key()`), the tags `orbitgen.eval.K.protocol`
  (JSON), `orbitgen.eval.K.<metric>` (the value, as text) and `orbitgen.eval.K.run` (the run
  that measured it).
- on a registered model: `orbitgen.champion_history`, a JSON list of the versions that were
  champion, oldest first (`promote` appends, `rollback` pops).
- on an `orbitgen eval` run, besides its protocol: `orbitgen.eval_of` (the model reference it
  evaluated), `orbitgen.model_name` and `orbitgen.model_version` (when that is a registered version).
"""
from __future__ import annotations

import hashlib
import json
import math
import weakref
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

TAG_RUN_PROTOCOL = "orbitgen.eval_protocol"
TAG_VERSION_PREFIX = "orbitgen.eval."
TAG_CHAMPION_HISTORY = "orbitgen.champion_history"
TAG_EVAL_OF = "orbitgen.eval_of"
TAG_MODEL_NAME = "orbitgen.model_name"
TAG_MODEL_VERSION = "orbitgen.model_version"
PRECISION_FP32_HIGHEST = "fp32-highest"


@dataclass(frozen=True)
class EvalProtocol:
    data_fingerprint: str
    split: str                      # "all", or "holdout=<fraction or count>"
    real_seed: int                  # draws the reals from the split
    seed_base: int                  # generator seeds (unconditional); unused by conditional families
    num_samples: int
    extractors: dict[str, str] = field(default_factory=dict)   # extractor name -> weights hash
    # The arithmetic of feature extraction and distances: "fp32-highest" is fp32 with TF32 off and
    # matmul precision "highest" (jobs/eval/core.py's `fp32_highest`). Protocols recorded before
    # this field were measured so (on CPUs, where TF32 does not exist): the default is left out of
    # the JSON, so their keys and JSON stay what they were and they compare equal to today's.
    precision: str = PRECISION_FP32_HIGHEST

    def key(self) -> str:
        """12 hex characters naming this protocol in tag keys."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    def to_json(self) -> str:
        d = asdict(self)
        if d["precision"] == PRECISION_FP32_HIGHEST:
            del d["precision"]
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "EvalProtocol":
        d = json.loads(text)
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or not names - {"precision"} <= set(d) <= names:
            raise ValueError(f"not an evaluation protocol: keys {sorted(d)}, expected {sorted(names)}")
        return cls(**{**d, "extractors": dict(d["extractors"])})

    def differences(self, other: "EvalProtocol") -> list[str]:
        """Human-readable differences, e.g. `num_samples: 2000 vs 50000`; empty when equal."""
        a, b = asdict(self), asdict(other)
        return [f"{k}: {a[k]} vs {b[k]}" for k in a if a[k] != b[k]]


def weights_hash(module: nn.Module) -> str:
    """16 hex characters of sha256 over the module's parameters and buffers, in state order.

    Non-persistent buffers count too (the random-conv extractor's weights are such buffers)."""
    h = hashlib.sha256()
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    for name, t in sorted(tensors, key=lambda item: item[0]):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


_HASHES: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def extractor_hashes(extractors) -> dict[str, str]:
    """{extractor.name: weights_hash(extractor)}, hashed once per module in this process
    (extractors are frozen; Inception's 24M weights take a while)."""
    for module in extractors:
        if module not in _HASHES:
            _HASHES[module] = weights_hash(module)
    return {module.name: _HASHES[module] for module in extractors}


def version_tags(protocol: EvalProtocol, scores: dict[str, float], run_id: str) -> dict[str, str]:
    """The model-version tags recording `scores` measured under `protocol` by `run_id`."""
    k = TAG_VERSION_PREFIX + protocol.key()
    tags = {f"{k}.protocol": protocol.to_json(), f"{k}.run": run_id}
    tags |= {f"{k}.{metric}": repr(float(v)) for metric, v in scores.items() if not math.isnan(float(v))}
    return tags


def read_version_tags(tags: dict[str, str]) -> dict[str, tuple[EvalProtocol, dict[str, float], str]]:
    """{protocol key: (protocol, {metric: value}, run id)} from a model version's tags."""
    out: dict[str, tuple[EvalProtocol, dict[str, float], str]] = {}
    for name, value in tags.items():
        if name.startswith(TAG_VERSION_PREFIX) and name.endswith(".protocol"):
            key = name[len(TAG_VERSION_PREFIX):-len(".protocol")]
            prefix = f"{TAG_VERSION_PREFIX}{key}."
            scores = {t[len(prefix):]: float(v) for t, v in tags.items()
                      if t.startswith(prefix) and t[len(prefix):] not in ("protocol", "run")}
            out[key] = (EvalProtocol.from_json(value), scores, tags.get(prefix + "run", ""))
    return out


def tag_version(client, name: str, version: str, protocol: EvalProtocol, scores: dict[str, float], run_id: str) -> None:
    """Records `scores` measured under `protocol` by `run_id` on the model version (`client`: an MlflowClient)."""
    for key, value in version_tags(protocol, scores, run_id).items():
        client.set_model_version_tag(name, version, key, value)
