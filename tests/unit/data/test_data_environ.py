"""`environ_set` (data_shards/environ.py): the values hold inside the block; after it, only those
variables are put back, as they were or absent, and what was set meanwhile stays."""
from __future__ import annotations

import os

import pytest

from data_shards.environ import environ_set


def test_values_hold_in_the_block_and_only_they_are_put_back(monkeypatch):
    monkeypatch.setenv("ORBITGEN_T_KEPT", "before")
    monkeypatch.delenv("ORBITGEN_T_NEW", raising=False)
    monkeypatch.delenv("ORBITGEN_T_MEANWHILE", raising=False)
    with pytest.raises(RuntimeError):
        with environ_set({"ORBITGEN_T_KEPT": "inside", "ORBITGEN_T_NEW": "1"}):
            assert (os.environ["ORBITGEN_T_KEPT"], os.environ["ORBITGEN_T_NEW"]) == ("inside", "1")
            os.environ["ORBITGEN_T_MEANWHILE"] = "set by other code"
            raise RuntimeError("the block fails")
    assert os.environ["ORBITGEN_T_KEPT"] == "before"
    assert "ORBITGEN_T_NEW" not in os.environ
    assert os.environ.pop("ORBITGEN_T_MEANWHILE") == "set by other code"
