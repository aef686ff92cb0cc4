"""The promotion lock of a registered model: a lease in a tag on the model itself.

Why a lock: moving `champion` is read (the champion and the scores), decide, write (the alias and
the history tag). MLflow has no compare-and-set: every alias and tag write is last-writer-wins.
Two promoters that both read champion v1 and then both write leave whichever wrote last, the
worse candidate as often as not.

Why a tag: the lock must not show as a model. Earlier versions created and deleted a registered
model `NAME.promotion-lock`, which the registry UI listed and which fired `registered_model.created`
webhooks. A registered-model tag is shown only on NAME's page and fires no webhook.

The lease is one tag, `orbitgen.lock.lease` on NAME: JSON with a random token per acquisition, the
lease length, its expiry (the holder's clock) and, for people reading it, the holder's host and
process. A tag write is last-writer-wins, so taking it is write, wait, read back (Fischer's
algorithm):
1. read the tag; someone else's live lease: wait (polling with jitter) and read again;
2. write our lease (a fresh token);
3. wait SETTLE_S, then read it back: still our token means we hold it; another token means a
   concurrent taker wrote after us, and we go back to 1.
Two takers can both see the tag free, but the later write wins for both read-backs, provided every
write lands within SETTLE_S of the read that allowed it (a request takes milliseconds; SETTLE_S is
a second). The same bound protects the holder's writes: `check()` reads the tag right before each
write, and a taker that overwrote the lease in between reads the champion only SETTLE_S after its
own write, so it sees what the holder wrote after its check. This is the one timing assumption (a
request the HTTP client retried for longer than SETTLE_S could break it). Two *first* writes of the
tag at once are not even last-writer-wins: the store's insert-or-update inserts twice and one is
refused on the tag's unique key; the refused taker finds the other's lease and waits.

The lease outlives any wait: a thread renews it every third of its length while held, so a live
holder keeps it however long its registry calls take (a server that is away: `buffered.retried`
waits up to 300 s). A holder that died stops renewing: a waiter takes a lease over once it has seen
the same lease value unchanged for the lease's length on its own clock (no clock agreement needed),
or at once when its written expiry is a whole lease in the past (a lease left long ago). A holder
whose renewals failed for a whole lease is no longer sure it holds it: `check()` raises `LockLost`,
and the promoter starts again. Every acquisition has its own token, so two processes, threads or
containers never mistake each other's lease for their own; a lease this process left behind (its
release failed with the server) is recognised by its token and not waited for.

Waiting is bounded (`WAIT_S`, longer than a lease, so a dead holder's lease always expires within
it): a waiter that runs out raises `LockBusy`, which `promote` turns into "registered, not promoted".
Lease, wait and settle can be set by `ORBITGEN_PROMOTION_LEASE_S`, `_WAIT_S` and `_SETTLE_S`.

An unexpired lock model `NAME.promotion-lock` written by an older orbitgen is still respected
(waited for), and `is_lock` still hides such leftovers from listings.
"""
from __future__ import annotations

import json
import logging
import os
import random
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

TAG_LEASE = "orbitgen.lock.lease"
LEASE_S, WAIT_S, SETTLE_S = 60.0, 300.0, 1.0
LEASE_ENV, WAIT_ENV, SETTLE_ENV = ("ORBITGEN_PROMOTION_LEASE_S", "ORBITGEN_PROMOTION_WAIT_S",
                                   "ORBITGEN_PROMOTION_SETTLE_S")
# The lock of older versions: a registered model with these tags.
LEGACY_TAG_OWNER, LEGACY_TAG_EXPIRES = "orbitgen.lock.owner", "orbitgen.lock.expires"

_ended: set[str] = set()    # tokens of this process whose acquisition is over (released or given up)


class LockBusy(RuntimeError):
    """Another promotion held the lock for the whole wait."""


class LockLost(RuntimeError):
    """The lease is no longer (surely) ours: start the promotion again."""


def lock_name(name: str) -> str:
    """The registered model that older versions used as the lock of `name`."""
    return f"{name}.promotion-lock"


def is_lock(model) -> bool:
    """A lock model left by an older orbitgen, not a model (`models list` hides it)."""
    return LEGACY_TAG_OWNER in (model.tags or {})


def setting(env: str, default: float) -> float:
    return float(os.environ.get(env) or default)


@dataclass(frozen=True)
class Lease:
    token: str
    lease_s: float
    expires: float                   # the holder's clock, for people and for leases left long ago
    holder: str = ""                 # host:pid, for people only
    raw: str = ""                    # the tag's value as read: a renewal changes it

    def to_json(self) -> str:
        return json.dumps({"token": self.token, "lease_s": self.lease_s, "expires": round(self.expires, 3),
                           "holder": self.holder})

    @classmethod
    def parse(cls, raw: str | None) -> "Lease | None":
        if not raw:
            return None
        try:
            d = json.loads(raw)
            return cls(str(d["token"]), float(d["lease_s"]), float(d["expires"]), str(d.get("holder", "")), raw)
        except (ValueError, KeyError, TypeError):
            return cls("unreadable", LEASE_S, 0.0, "", raw)    # a hand-edited tag: it expires like a lease

    def describe(self) -> str:
        return f"held by {self.holder or 'unknown'} until {time.strftime('%H:%M:%S', time.localtime(self.expires))}"


def read_lease(client: MlflowClient, name: str) -> Lease | None:
    return Lease.parse((client.get_registered_model(name).tags or {}).get(TAG_LEASE))


@contextmanager
def promotion_lock(client: MlflowClient, name: str, *, wait_s: float | None = None, lease_s: float | None = None,
                   settle_s: float | None = None) -> Iterator[Callable[[], None]]:
    """Holds the lock of registered model `name` for the `with` body; yields `check()`, to call
    right before each write: it raises `LockLost` when the lease is no longer surely ours.
    Raises `LockBusy` when another holder kept it for `wait_s`."""
    wait_s = setting(WAIT_ENV, WAIT_S) if wait_s is None else wait_s
    lease_s = setting(LEASE_ENV, LEASE_S) if lease_s is None else lease_s
    settle_s = setting(SETTLE_ENV, SETTLE_S) if settle_s is None else settle_s
    token = secrets.token_hex(16)
    lease = _acquire(client, name, token, wait_s, lease_s, settle_s)
    renewer = _Renewer(client, name, lease)
    renewer.start()

    def check() -> None:
        renewer.check()

    try:
        yield check
    finally:
        renewer.stop()
        _release(client, name, token)


def _acquire(client: MlflowClient, name: str, token: str, wait_s: float, lease_s: float, settle_s: float) -> Lease:
    deadline = time.monotonic() + wait_s
    seen: dict[str, float] = {}     # lease value -> when this waiter first saw it (its own clock)
    holder = f"{socket.gethostname()}:{os.getpid()}"
    while True:
        current = read_lease(client, name)
        if _free(current, seen) and not _legacy_held(client, name):
            mine = Lease(token, lease_s, time.time() + lease_s, holder)
            try:
                client.set_registered_model_tag(name, TAG_LEASE, mine.to_json())
            except Exception:
                # Two first writes of the tag at once: the store's insert-or-update inserts twice and
                # one fails on the tag's unique key. The other's lease is there: wait for it.
                back = read_lease(client, name)
                if back is None or back.token == token:
                    raise
            else:
                time.sleep(settle_s)    # a taker that read "free" before our write writes within this
                back = read_lease(client, name)
            if back is not None and back.token == token:
                return Lease(token, lease_s, mine.expires, holder, back.raw)
            current = back              # a later write won: it holds the lock, we wait for it
        if time.monotonic() > deadline:
            _ended.add(token)
            what = current.describe() if current else f"an older orbitgen's lock model {lock_name(name)!r}"
            raise LockBusy(f"another promotion of {name!r} holds its lock ({what}) after a wait of {wait_s:.0f} s")
        time.sleep(random.uniform(0.05, 0.25))


def _free(lease: Lease | None, seen: dict[str, float]) -> bool:
    """No lease, one this process ended, or one whose holder stopped renewing it."""
    if lease is None or lease.token in _ended:
        return True
    first = seen.setdefault(lease.raw, time.monotonic())
    if time.monotonic() - first > lease.lease_s:
        return True                     # unchanged for a whole lease on our clock: its holder is gone
    return time.time() > lease.expires + lease.lease_s     # left long ago (tolerates clocks a lease apart)


def _legacy_held(client: MlflowClient, name: str) -> bool:
    """An unexpired lock model of an older orbitgen (one still running during an upgrade)."""
    try:
        tags = client.get_registered_model(lock_name(name)).tags or {}
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return False
    return LEGACY_TAG_OWNER in tags and time.time() < float(tags.get(LEGACY_TAG_EXPIRES) or 0)


def _release(client: MlflowClient, name: str, token: str) -> None:
    """Removes our lease. Best effort: a server that does not answer now leaves it to expire (and
    this process does not wait for it: its token is in `_ended`)."""
    _ended.add(token)
    try:
        current = read_lease(client, name)
        if current is not None and current.token == token:
            client.delete_registered_model_tag(name, TAG_LEASE)
    except Exception as e:   # noqa: BLE001 - the promotion's own outcome (or error) is what matters
        log.warning("could not release the promotion lock of %r (%s); it expires by itself", name, e)


class _Renewer:
    """Renews the lease every third of its length while held; knows whether it is still surely ours."""

    def __init__(self, client: MlflowClient, name: str, lease: Lease):
        self.client, self.name, self.lease = client, name, lease
        self.confirmed = time.monotonic()      # when the lease was last seen ours and fresh
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"promotion-lease-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.lease.lease_s / 3):
            try:
                current = read_lease(self.client, self.name)
                if current is None or current.token != self.lease.token:
                    self.lost = "another promoter took it over"
                    return
                renewed = Lease(self.lease.token, self.lease.lease_s, time.time() + self.lease.lease_s,
                                self.lease.holder)
                self.client.set_registered_model_tag(self.name, TAG_LEASE, renewed.to_json())
                self.confirmed = time.monotonic()
            except Exception as e:   # noqa: BLE001 - a server away: check() decides once the lease ran out
                log.warning("could not renew the promotion lock of %r: %s", self.name, e)

    def check(self) -> None:
        if self.lost:
            raise LockLost(f"lost the promotion lock of {self.name!r}: {self.lost}")
        if time.monotonic() - self.confirmed > self.lease.lease_s:
            raise LockLost(f"lost the promotion lock of {self.name!r}: not renewed for its "
                           f"{self.lease.lease_s:.0f} s lease")
        current = read_lease(self.client, self.name)
        if current is None or current.token != self.lease.token:
            raise LockLost(f"lost the promotion lock of {self.name!r}: another promoter took it over")
