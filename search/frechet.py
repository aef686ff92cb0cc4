"""Fréchet distances from cached feature statistics: single candidates, pairs, and mixtures.

FID(X, Y) = |mu_x - mu_y|^2 + Tr S_x + Tr S_y - 2 Tr sqrt(S_x S_y), covariances unbiased (n - 1)
as torchmetrics computes them, everything in float64.

Why statistics and not features: a mixture of feature sets (the originals plus one augmented copy
per chosen augmentation) has a mean and covariance that follow from each set's count, sum and
sum of outer products, so any subset is scored without touching features again. Against one
fixed reference (the originals, covariance S_ref = V L V^T of rank r) the only non-linear term
is Tr sqrt(S_ref S) = Tr sqrt(A S A) with A = S_ref^(1/2); its non-zero eigenvalues are those of
the r x r matrix B^T S B with B = V_r L_r^(1/2). So every set is stored once as its projection
on B, and a subset costs one symmetric r x r eigenvalue problem (batched), with r = min(d, N-1):
64 for the random-conv extractor; for Inception (d = 2048) fewer than 2048 when the set has
fewer images (the low-rank case), else 2048 (seconds per hundred subsets on a CPU, far less on a
GPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from search.set_matrices import MEMORY_BYTES, SetMatrices

# Reference eigenvalues below this fraction of the largest are numerically zero (rank cut).
RANK_TOL = 1e-12
# Bytes of one (B, r, r) batch of a mixture table's scoring (B = 2 at r = 2048, 2048 at r = 64).
BATCH_BYTES = 2**26


def _f64(features) -> np.ndarray:
    a = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    a = a.astype(np.float64, copy=False)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"need (N >= 2, d) features, got shape {a.shape}")
    return a


def _sqrt_trace(eigenvalues: torch.Tensor) -> torch.Tensor:
    # Tiny negative eigenvalues are round-off of a PSD matrix: count them as zero (as torchmetrics'
    # complex sqrt(...).real does).
    return eigenvalues.clamp_min(0.0).sqrt().sum(-1)


@dataclass
class SetStats:
    """What a mixture needs of one feature set: count, sum, sum of squared norms, and its
    projection on the reference basis (sum and sum of outer products)."""

    n: int
    total: np.ndarray      # (d,)
    sq: float              # sum of |f|^2
    ptotal: np.ndarray     # (r,)
    pouter: np.ndarray     # (r, r)


class Reference:
    """The originals' feature distribution, and FIDs of feature sets (or mixtures) against it."""

    def __init__(self, features):
        f = _f64(features)
        self.n, self.d = f.shape
        self.mu = f.mean(axis=0)
        centred = f - self.mu
        if self.n <= self.d:
            # Fewer images than dimensions (Inception features of a small set): the n x n Gram matrix
            # G = C C^T / (n-1) has the covariance's non-zero eigenvalues, and B = C^T U / sqrt(n-1)
            # (U: G's eigenvectors) equals V L^(1/2); one n x n problem instead of d x d.
            lam, u = np.linalg.eigh(centred @ centred.T / (self.n - 1))
            keep = lam > RANK_TOL * max(float(lam[-1]), 0.0)
            self.trace = float(np.trace(centred @ centred.T)) / (self.n - 1)
            self.basis = centred.T @ u[:, keep] / np.sqrt(self.n - 1)   # B: d x r
        else:
            cov = np.cov(f, rowvar=False)
            self.trace = float(np.trace(cov))
            lam, vec = np.linalg.eigh(cov)
            keep = lam > RANK_TOL * max(float(lam[-1]), 0.0)
            self.basis = vec[:, keep] * np.sqrt(lam[keep])     # B: d x r
        self.rank = int(keep.sum())
        self.own = self.stats(f)

    def stats(self, features) -> SetStats:
        f = _f64(features)
        if f.shape[1] != self.d:
            raise ValueError(f"features of width {f.shape[1]}, the reference has {self.d}")
        p = f @ self.basis
        return SetStats(n=f.shape[0], total=f.sum(axis=0), sq=float(np.einsum("ij,ij->", f, f)),
                        ptotal=p.sum(axis=0), pouter=p.T @ p)

    def _cheap_terms(self, parts: Sequence[SetStats]) -> tuple[float, np.ndarray, np.ndarray, int]:
        """Everything of the FID of the union of `parts` but the square-root term, and the r x r
        matrix whose eigenvalues give it."""
        n = sum(p.n for p in parts)
        mu = sum(p.total for p in parts) / n
        tr = (sum(p.sq for p in parts) - n * float(mu @ mu)) / (n - 1)
        pmu = sum(p.ptotal for p in parts) / n
        m = (sum(p.pouter for p in parts) - n * np.outer(pmu, pmu)) / (n - 1)
        diff = mu - self.mu
        return float(diff @ diff) + self.trace + tr, m, pmu, n

    def fid(self, parts: Sequence[SetStats] | SetStats) -> float:
        """FID of the union of `parts` (one set, or a mixture) against the reference."""
        return float(self.fid_many([parts if isinstance(parts, (list, tuple)) else [parts]])[0])

    def fid_many(self, mixtures: Sequence[Sequence[SetStats]], batch_bytes: int = 2**28) -> np.ndarray:
        """FIDs of many mixtures, the eigenvalue problems batched (one LAPACK call per batch)."""
        out = np.empty(len(mixtures))
        per_batch = max(1, batch_bytes // (8 * max(1, self.rank) ** 2))
        for s in range(0, len(mixtures), per_batch):
            chunk = [self._cheap_terms(parts) for parts in mixtures[s:s + per_batch]]
            mats = torch.from_numpy(np.stack([c[1] for c in chunk]))
            root = _sqrt_trace(torch.linalg.eigvalsh(mats)).numpy()
            out[s:s + len(chunk)] = [c[0] - 2.0 * r for c, r in zip(chunk, root)]
        return out


class Gaussian:
    """Mean and covariance of one feature set, with its covariance's square root computed once
    (for the pairwise distances between candidates, where neither side is the reference)."""

    def __init__(self, features):
        f = _f64(features)
        self.mu = f.mean(axis=0)
        self.cov = np.cov(f, rowvar=False)
        self._root: np.ndarray | None = None

    @property
    def root(self) -> np.ndarray:
        if self._root is None:
            lam, vec = np.linalg.eigh(self.cov)
            self._root = (vec * np.sqrt(np.clip(lam, 0.0, None))) @ vec.T
        return self._root


def fid_gaussians(a: Gaussian, b: Gaussian) -> float:
    """FID between two sets: Tr sqrt(S_a S_b) = Tr sqrt(R S_b R), R = S_a^(1/2) symmetric."""
    diff = a.mu - b.mu
    m = a.root @ b.cov @ a.root
    root = _sqrt_trace(torch.linalg.eigvalsh(torch.from_numpy((m + m.T) / 2)))
    return float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * float(root))


def fid_features(x, y) -> float:
    return fid_gaussians(Gaussian(x), Gaussian(y))


class MixtureTable:
    """Per-(candidate, repeat) statistics, for scoring many subsets at once.

    mixture(subset, repeat) = the originals + candidate c's repeat-`repeat` copy for every c in
    `subset`; its FID against the originals is `fids(subsets)[:, repeat]`.

    Built all at once (`MixtureTable(reference, stats)`) or incrementally (`MixtureTable(reference,
    candidates=C, repeats=R)`, then `add(c, rep, stats)` as each set's statistics are computed, so
    the caller holds one feature set at a time). Memory: per (candidate, repeat) a count, a d-vector
    and two r-vectors, filled into preallocated arrays (no np.stack copy); the r x r float64 matrix
    of each goes to `search.set_matrices.SetMatrices`, in memory when all of them fit
    `memory_bytes` (64 x 64 for random-conv features), else one file each on local disk (32 MB each
    at r = 2048), read back per batch of subsets. Batches are sized by `batch_bytes`: a batch holds
    a few (B, r, r) arrays.
    """

    def __init__(self, reference: Reference, stats: Sequence[Sequence[SetStats]] | None = None, *,
                 candidates: int | None = None, repeats: int | None = None, memory_bytes: int = MEMORY_BYTES):
        if stats is not None:
            candidates, repeats = len(stats), len(stats[0])
        if not candidates or not repeats:
            raise ValueError("a mixture table needs at least one candidate and one repeat")
        self.ref = reference
        r = reference.rank
        self.n = np.zeros((candidates, repeats))                    # (C, R)
        self.total = np.zeros((candidates, repeats, reference.d))   # (C, R, d)
        self.sq = np.zeros((candidates, repeats))                   # (C, R)
        self.ptotal = np.zeros((candidates, repeats, r))            # (C, R, r)
        self.pdiag = np.zeros((candidates, repeats, r))             # (C, R, r): the matrices' diagonals
        self.outer = SetMatrices(candidates, repeats, r, memory_bytes)
        self.repeats = repeats
        self._added = np.zeros((candidates, repeats), dtype=bool)
        for c, per in enumerate(stats or ()):
            if len(per) != repeats:
                raise ValueError(f"candidate {c} has {len(per)} repeats, the first has {repeats}")
            for rep, st in enumerate(per):
                self.add(c, rep, st)

    def add(self, c: int, rep: int, stats: SetStats) -> None:
        """Candidate `c`'s repeat-`rep` statistics (any order; each (c, rep) once before scoring)."""
        self.n[c, rep], self.total[c, rep], self.sq[c, rep] = stats.n, stats.total, stats.sq
        self.ptotal[c, rep], self.pdiag[c, rep] = stats.ptotal, np.diagonal(stats.pouter)
        self.outer.put(c, rep, stats.pouter)
        self._added[c, rep] = True

    def close(self) -> None:
        """Free the matrices' files now (else when the table is collected)."""
        self.outer.close()

    def fids(self, subsets, batch_bytes: int = BATCH_BYTES) -> np.ndarray:
        """(S, R) FIDs of the mixtures of `subsets` (an (S, k) array of candidate indices, k >= 0)."""
        return self._run(subsets, None, batch_bytes)[0]

    def bounds(self, subsets, rank: int, batch_bytes: int = BATCH_BYTES) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) bounds of `fids(subsets)` from the `rank` leading principal directions of
        the reference only (a p x p block P of the r x r matrix M instead of all of it):
          Tr sqrt(M) >= Tr sqrt(P)                  (eigenvalue interlacing)  -> upper bound of FID
          Tr sqrt(M) <= Tr sqrt(P) + sum sqrt(M_ii) over the other directions (pinching, then the
                        diagonal majorised by the spectrum, sqrt concave)    -> lower bound of FID
        In the reference's eigenbasis M is close to diagonal (M = L^2 when the mixture equals the
        originals), so the lower bound is tight."""
        return self._run(subsets, rank, batch_bytes)

    def _run(self, subsets, rank: int | None, batch_bytes: int) -> tuple[np.ndarray, np.ndarray]:
        if not self._added.all():
            missing = np.argwhere(~self._added)[0]
            raise ValueError(f"mixture table: candidate {missing[0]} repeat {missing[1]} was never added")
        subsets = np.asarray(subsets, dtype=np.int64).reshape(len(subsets), -1)
        own, r = self.ref.own, max(1, self.ref.rank)
        # The basis columns come from eigh in ascending eigenvalue order: the leading ones are last.
        cut = max(0, r - rank) if rank else 0
        lead, tail = slice(cut, None), slice(0, cut)
        p = r - cut
        upper = np.empty((subsets.shape[0], self.repeats))
        lower = np.empty_like(upper)
        per_batch = max(1, batch_bytes // (8 * p * p))
        own_diag = np.diagonal(own.pouter)
        for rep in range(self.repeats):
            for s in range(0, subsets.shape[0], per_batch):
                idx = subsets[s:s + per_batch]
                n = own.n + self.n[idx, rep].sum(1)                                         # (B,)
                mu = (own.total + self.total[idx, rep].sum(1)) / n[:, None]                 # (B, d)
                tr = (own.sq + self.sq[idx, rep].sum(1) - n * np.einsum("bd,bd->b", mu, mu)) / (n - 1)
                ptot = own.ptotal + self.ptotal[idx, rep].sum(1)                            # (B, r)
                pmu = ptot[:, lead] / n[:, None]
                # In place on the summed block: the batch holds two (B, p, p) arrays, not five.
                m = self.outer.summed(idx, rep, lead)
                m += own.pouter[lead, lead]
                m -= n[:, None, None] * pmu[:, :, None] * pmu[:, None, :]
                m /= (n - 1)[:, None, None]
                root = _sqrt_trace(torch.linalg.eigvalsh(torch.from_numpy(m))).numpy()
                diff = mu - self.ref.mu
                cheap = np.einsum("bd,bd->b", diff, diff) + self.ref.trace + tr
                upper[s:s + len(idx), rep] = cheap - 2.0 * root
                if cut:
                    tmu = ptot[:, tail] / n[:, None]
                    diag = (own_diag[tail] + self.pdiag[idx, rep, tail].sum(1) - n[:, None] * tmu * tmu) / (n - 1)[:, None]
                    lower[s:s + len(idx), rep] = upper[s:s + len(idx), rep] - 2.0 * np.sqrt(np.clip(diag, 0, None)).sum(1)
                else:
                    lower[s:s + len(idx), rep] = upper[s:s + len(idx), rep]
        return lower, upper
