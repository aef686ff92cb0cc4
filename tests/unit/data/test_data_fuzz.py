"""Hostile data is bounded: thousands of mutated shards, zips and GeoTIFFs (bit flips,
truncations, splices, tar / pax / zip / TIFF header edits, PNG dimensions), each read by the
reader orbitgen uses for it. No case hangs (a timer bounds each), none crashes with anything
but the user-error class, every refusal names the shard or archive (and member), and peak
memory stays within a bound. Each kind runs in one child process (fuzz_harness.py), so its
peak RSS is the cases' own; the figures are printed (run with -s to see them)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
# kind -> (cases, seed). Seeds are fixed: the same mutations on every run, so a failure reproduces
# with `python tests/unit/data/fuzz_harness.py KIND 1 SEED /tmp` for the seed it names.
RUNS = {"tar": (6000, 1000), "zip": (1000, 20000), "geotiff": (1000, 30000)}
PEAK_RSS_GROWTH_MIB = 100   # the caps the harness sets allow a 16 MiB raster and its float copies


def fuzz(kind: str, tmp_path: Path) -> dict:
    cases, seed = RUNS[kind]
    proc = subprocess.run([sys.executable, str(HERE / "fuzz_harness.py"), kind, str(cases), str(seed), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", list(RUNS))
def test_mutated_inputs_are_refused_in_bounded_time_and_memory_naming_the_input(kind, tmp_path):
    figures = fuzz(kind, tmp_path)
    print(f"\nfuzz {kind}: " + json.dumps({k: v for k, v in figures.items() if k != "failures"}))
    assert figures["failure_count"] == 0, json.dumps(figures["failures"], indent=1)
    assert figures["cases"] == RUNS[kind][0] and figures["mutations_tried"] >= figures["cases"]
    assert figures["longest_case_s"] < 2.0
    assert figures["peak_rss_growth_mib"] < PEAK_RSS_GROWTH_MIB
    # The mutations reach every outcome, not only the first check: some inputs still read.
    assert len(figures["outcomes"]) >= 3, figures["outcomes"]
