"""The words every choice is printed with: which rule produced it, and in what feature space.

A label never says "published" for something the paper's rule would not have produced: the K best
singles are the published rule only with the gate's 0.02 and near-duplicates allowed
(`search.preset: paper` sets both), and only Inception-v3 features are the paper's.
"""
from __future__ import annotations

from search.config import PAPER_PRESET, SearchConfig


def singles_rule(cfg: SearchConfig) -> str:
    """How the K best singles were picked, with every departure from the published rule named."""
    departures = []
    if cfg.mse_min != PAPER_PRESET["mse_min"]:
        departures.append(f"MSE gate {cfg.mse_min:g}, the paper's is {PAPER_PRESET['mse_min']:g}")
    if cfg.dedupe:
        departures.append("near-duplicates dropped (search.dedupe), the paper keeps them")
    base = f"the {cfg.k} best singles by FID"
    if cfg.preset == "paper":
        return base + " (search.preset=paper: the published rule)"
    if departures:
        return base + " (the published rule, except: " + "; ".join(departures) + ")"
    return base + " (the published rule)"


def best_set_rule(cfg: SearchConfig) -> str:
    return f"the best {cfg.k}-set by stage-1 mixture FID (this project's rule, not the paper's)"


def stage1_rule(cfg: SearchConfig) -> str:
    """The rule of search.select, named with the setting that chose it."""
    return f"search.select={cfg.select}: " + (singles_rule(cfg) if cfg.select == "singles" else best_set_rule(cfg))


def features_note(extractor: str, extractor_name: str = "") -> str:
    """What the report says about the feature space stage 1's FIDs and KIDs were measured in
    (`extractor` as the spec names it, `extractor_name` the network's own name)."""
    named = f"{extractor} ({extractor_name})" if extractor_name and extractor_name != extractor else extractor
    if extractor == "inception":
        return f"features: {named}, Inception-v3 2048-d pool features (the paper's)"
    return (f"features: {named}, NOT the paper's Inception-v3 2048-d features: FIDs and KIDs are on their own "
            "scale and the ranking may differ from the paper's; search.features: inception (or search.preset: paper) "
            "with eval.inception_weights reproduces the published selection")
