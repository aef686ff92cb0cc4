"""`orbitgen models promote` as CI drives it, against a real MLflow server: the exit code says
what happened (0 champion, 3 not better, 4 no common protocol, 2 bad input, as `--help` says)
and `--json` prints one object with the decision and the numbers compared."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from jobs.cli import main
from jobs.tracking.protocol import EvalProtocol

from registered_versions import scored_version

pytestmark = pytest.mark.integration
NAME = "promote-exits"
P = EvalProtocol(data_fingerprint="exit" * 4, split="all", real_seed=0, seed_base=1_000_000, num_samples=64,
                 extractors={"orbitgen-randconv64-v1": "00ff00ff00ff00ff"})


def promote(uri: str, *args: str):
    res = CliRunner().invoke(main, ["models", "promote", NAME, *args, "--tracking-uri", uri])
    return res.exit_code, res.stdout, res.stderr


def test_exit_codes_and_json_say_what_promote_did(mlflow_server):
    uri = mlflow_server.url
    client = MlflowClient(uri)
    experiment = client.create_experiment(NAME)
    client.create_registered_model(NAME)

    def version(protocol, scores):
        return scored_version(client, experiment, NAME, protocol, scores)

    v1, v2 = version(P, {"fid": 5.0, "kid": 0.3}), version(P, {"fid": 6.0, "kid": 0.2})
    v3 = version(replace(P, num_samples=128), {"fid": 1.0})

    code, out, _ = promote(uri, "--version", v1, "--json")
    first = json.loads(out)
    assert code == 0 and (first["promoted"], first["outcome"], first["champion_after"]) == (True, "promoted", v1)
    code, out, _ = promote(uri, "--version", v1, "--json")             # a CI job run twice: still success
    assert code == 0 and json.loads(out)["outcome"] == "already-champion"

    code, out, _ = promote(uri, "--version", v2)
    assert code == 3 and f"v{v2} does not beat champion v{v1}" in out and "fid *" in out, out
    code, out, _ = promote(uri, "--version", v2, "--json")
    worse = json.loads(out)                                              # stdout is the JSON object alone
    assert code == 3 and (worse["promoted"], worse["outcome"], worse["candidate"], worse["champion_before"],
                          worse["champion_after"]) == (False, "not-better", v2, v1, v1)
    assert (worse["candidate_score"], worse["champion_score"], worse["protocol"]) == (6.0, 5.0, P.key())
    assert worse["compared"] == {"fid": {"candidate": 6.0, "champion": 5.0},
                                 "kid": {"candidate": 0.2, "champion": 0.3}}

    code, out, _ = promote(uri, "--version", v3, "--json")
    apart = json.loads(out)
    assert code == 4 and (apart["promoted"], apart["outcome"]) == (False, "incomparable")
    assert "num_samples: 128 vs 64" in apart["reason"] and f"orbitgen eval models:/{NAME}/{v1}" in apart["reason"]
    aliases = {a: str(v) for a, v in client.get_registered_model(NAME).aliases.items()}
    assert aliases == {"champion": v1, "challenger": v2}                 # refused: nothing written for v3

    code, out, err = promote(uri, "--version", "9", "--json")
    assert code == 2 and not out and err.startswith("error: ") and "version 9" in err
