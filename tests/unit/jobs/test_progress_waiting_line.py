"""The line a training prints while its workers have not started, when Ray's state API cannot say
why: a user reads what is not answering, not a bare exception class name."""
from __future__ import annotations

import requests

from jobs.train.progress import ProgressBar


def waiting_line(raised: Exception, capsys) -> str:
    bar = object.__new__(ProgressBar)   # only the waiting part: no Ray, no board
    bar.waiting_every_s, bar._since = 0.0, -1e9

    def waiting():
        raise raised

    bar.waiting = waiting
    bar._say_what_it_waits_for()
    return capsys.readouterr().err.strip()


def test_a_state_api_not_up_yet_is_named(capsys):
    assert waiting_line(requests.exceptions.ConnectionError("refused"), capsys) == (
        "[orbitgen] waiting for the workers to start (Ray's state API does not answer yet)")
    assert waiting_line(ConnectionRefusedError(), capsys).endswith("(Ray's state API does not answer yet)")


def test_anything_else_names_its_class(capsys):
    assert waiting_line(KeyError("x"), capsys) == "[orbitgen] waiting for the workers to start (Ray's state API: KeyError)"
