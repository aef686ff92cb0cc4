"""The promotion lock of a registered model, built on the one atomic operation the MLflow registry has.

Why a lock: moving `champion` is read (the champion and the scores), decide, write (the alias and
the history tag). MLflow has no compare-and-set: every alias and tag write is last-writer-wins.
Two promoters that both read champion v1 and then both write leave whichever wrote last, the
worse candidate as often as not.

The design: creating a registered model *is* a compare-and-set. Its name is the primary key of
the registry's table, so of two concurrent `create_registered_model` calls with one name exactly
one succeeds and the other gets RESOURCE_ALREADY_EXISTS, whatever the interleaving: the database
decides, not the clients' timing. The lock of model NAME is the registered model
`NAME.promotion-lock`, created together with (same transaction) tags naming its owner and an
expiry; the owner releases it by deleting it.
- Mutual exclusion needs no timing assumption while holders finish within their lease: a
  promoter enters only after its own create succeeded, and no other create of that name can
  succeed until the holder deleted it. A waiter polls with jitter until it gets it.
- The HTTP client retries a request that failed with a 5xx; a retried create of our own that
  reports ALREADY_EXISTS is recognised by the owner tag (host, process, thread), as is a lock
  left by an earlier promotion of the same thread that failed before releasing it.
- A promoter that died holding the lock leaves it behind: once its expiry has passed, a waiter
  deletes it and competes again. This is the one timing assumption: a holder never spends longer
  than LEASE_S (written by the holder, checked on the waiter's clock; clocks agree within
  seconds) between acquiring and releasing. Its protected section is a handful of registry calls
  (read the champion and both versions' scores, move the alias, append the history), well under
  a second; evaluation and artifact uploads stay outside. The holder checks it still owns the
  lock right before it writes, so a holder stalled past its lease backs off instead of writing
  over the next one (except within the moment between that check and its write); the same check
  stops the first of two waiters that both broke one abandoned lock.
The registry must be database-backed (sqlite, PostgreSQL, MySQL; directly or behind `mlflow
server`), as orbitgen's stores are: MLflow's file-based registry checks, then creates a folder,
which is no atomic operation.
"""
from __future__ import annotations

import os
import random
import socket
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from data_shards.errors import UserError

LEASE_S = 120.0
WAIT_S = 120.0
TAG_OWNER = "orbitgen.lock.owner"
TAG_EXPIRES = "orbitgen.lock.expires"


def lock_name(name: str) -> str:
    return f"{name}.promotion-lock"


def is_lock(model) -> bool:
    """A registered model that is some model's promotion lock, not a model (`models list` hides it)."""
    return TAG_OWNER in (model.tags or {})


@contextmanager
def promotion_lock(client: MlflowClient, name: str, *, wait_s: float = WAIT_S,
                   lease_s: float = LEASE_S) -> Iterator[Callable[[], None]]:
    """Holds the lock of `name` for the `with` body; yields `check()`, to call right before each
    write: it raises when the lock is no longer ours (held past its lease and broken)."""
    lock = lock_name(name)
    # One promotion at a time per thread: a lock this thread left behind (its promotion failed with
    # the server, and a retry comes) is its own again.
    owner = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
    deadline = time.monotonic() + wait_s
    while not _acquire(client, lock, owner, lease_s):
        if time.monotonic() > deadline:
            held_by, expires = _holder(client, lock)
            raise UserError(f"another promotion of {name!r} holds its lock (registered model {lock!r}, owner "
                            f"{held_by}, expires {time.strftime('%H:%M:%S', time.localtime(expires))}); try "
                            "again later, or delete that registered model if its promoter is gone")
        time.sleep(random.uniform(0.02, 0.2))

    def check() -> None:
        if _holder(client, lock)[0] != owner:
            raise RuntimeError(f"lost the promotion lock of {name!r}: held longer than its {lease_s:.0f} s lease")

    try:
        yield check
    finally:
        if _holder(client, lock)[0] == owner:
            _delete(client, lock)


def _acquire(client: MlflowClient, lock: str, owner: str, lease_s: float) -> bool:
    try:
        client.create_registered_model(lock, tags={TAG_OWNER: owner, TAG_EXPIRES: f"{time.time() + lease_s:.3f}"},
                                       description="orbitgen promotion lock: deleted when the promotion ends")
        return True
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    held_by, expires = _holder(client, lock)
    if held_by == owner:                    # our own create, retried by the HTTP client
        return True
    if held_by is not None and time.time() > expires:
        _delete(client, lock)               # abandoned by a promoter that died
    return False


def _holder(client: MlflowClient, lock: str) -> tuple[str | None, float]:
    """(owner, expiry) of the lock; (None, 0) when nobody holds it."""
    try:
        tags = client.get_registered_model(lock).tags or {}
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None, 0.0
    return tags.get(TAG_OWNER), float(tags.get(TAG_EXPIRES, "inf"))


def _delete(client: MlflowClient, lock: str) -> None:
    try:
        client.delete_registered_model(lock)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":   # another waiter deleted it first
            raise
