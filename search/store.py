"""A search's folder (local path or fsspec URL): per-trial results, written by the trials
themselves, so that a restarted search finds what already finished.

    <storage>/search.json            the config and the MLflow parent run of this search
    <storage>/stage1/<name>.npz      fids, mses, features (repeats, N, d) of one candidate
    <storage>/stage1/<name>.json     written last: its presence marks the trial finished
    <storage>/stage2/<subset>/seed-<s>.json   one proxy training's outcome (a subset at a seed)
    <storage>/optuna.db              stage 2's Optuna study (local folders; `optuna-dashboard sqlite:///...`)
    <storage>/tune/                  Ray Tune's own experiment folders

The store travels pickled (trial payloads, Tune's callbacks) and Tune pickles its storage
filesystem and callbacks into `tune/` (tuner.pkl, the experiment state): so the store's
filesystem holds no credentials. It takes them where it is used: from the standard AWS
variables, which Tune hands on from the driver to its trials, or from the node's instance profile.
"""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from data_shards.storage import filesystem, is_local, join, to_url
from search.scoring import CandidateScore


# What a filesystem may be given as credentials (s3fs's names).
CREDENTIAL_ARGS = ("key", "secret", "token", "username", "password")


def without_credentials(fs: Any) -> Any:
    """`fs` made again without the credentials it was given; the same `fs` when it had none."""
    options = {k: v for k, v in fs.storage_options.items() if k not in CREDENTIAL_ARGS}
    return fs if len(options) == len(fs.storage_options) else type(fs)(*fs.storage_args, **options)


class SearchStore:
    def __init__(self, storage: str):
        self.url = to_url(storage)
        fs, self.path = filesystem(self.url)
        self.fs = without_credentials(fs)

    def _p(self, *parts: str) -> str:
        return join(self.path, *parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self._p(*parts))

    def read_json(self, *parts: str) -> Any:
        with self.fs.open(self._p(*parts), "rb") as f:
            return json.loads(f.read().decode("utf-8"))

    def write_json(self, value: Any, *parts: str) -> None:
        self.fs.pipe(self._p(*parts), json.dumps(value, indent=1, sort_keys=True).encode("utf-8"))

    def write_bytes(self, data: bytes, *parts: str) -> None:
        self.fs.pipe(self._p(*parts), data)

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self._p(*parts))

    def has_any_state(self) -> bool:
        return self.exists("search.json")

    # -- stage 1 -------------------------------------------------------------------------------
    def stage1_done(self, name: str) -> bool:
        return self.exists("stage1", f"{name}.json")

    def save_score(self, score: CandidateScore) -> None:
        buf = io.BytesIO()
        np.savez(buf, fids=np.asarray(score.fids), mses=np.asarray(score.mses),
                 features=np.stack(score.features).astype(np.float32), seconds=np.asarray(score.seconds),
                 kids=np.asarray(score.kids, dtype=np.float64))
        self.write_bytes(buf.getvalue(), "stage1", f"{score.name}.npz")
        # The marker goes last: a trial killed between the two files counts as unfinished.
        self.write_json({"candidate": score.name, "fid": score.fid, "fid_std": score.fid_std, "mse": score.mse,
                         "kid": score.kid, "kid_std": score.kid_std, "repeats": len(score.fids), "seconds": score.seconds}, "stage1", f"{score.name}.json")

    def load_score(self, name: str, features: bool = True) -> CandidateScore:
        """One candidate's stored score; `features=False` leaves its features on storage (the npz is
        read member by member, so a summary never reads the (repeats, N, d) array)."""
        with self.fs.open(self._p("stage1", f"{name}.npz"), "rb") as f, np.load(f) as z:
            return CandidateScore(name, [float(v) for v in z["fids"]], [float(v) for v in z["mses"]],
                                  list(z["features"]) if features else [], float(z["seconds"]),
                                  # a score stored before KID has none: search.scoring.with_kids fills it in
                                  [float(v) for v in z["kids"]] if "kids" in z.files else [])

    def load_features(self, name: str) -> list[np.ndarray]:
        """One candidate's augmented features, float32 (N, d) per repeat: what the driver reads for one
        candidate at a time and drops after (at the paper's scale 61 MB a candidate, 1.6 GB all)."""
        with self.fs.open(self._p("stage1", f"{name}.npz"), "rb") as f, np.load(f) as z:
            return list(z["features"])

    def optuna_storage(self) -> str | None:
        """The URL of the Optuna study's database beside the search (sqlite: local folders only,
        a remote store keeps its study in memory and a resumed search starts a new one)."""
        if not is_local(self.url):
            return None
        import os

        os.makedirs(self.path, exist_ok=True)
        return f"sqlite:///{self._p('optuna.db')}"

    def tune_storage(self) -> tuple[str, Any]:
        """(storage_path, storage_filesystem) for Tune's own folders, under this search's: the
        store's own filesystem (no credentials), wrapped for pyarrow; None for a local folder."""
        if is_local(self.url):
            return self._p("tune"), None
        import pyarrow.fs

        return self._p("tune"), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(self.fs))
