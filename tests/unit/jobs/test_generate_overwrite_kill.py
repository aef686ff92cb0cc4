"""A hard kill (SIGKILL: no handler runs) in `models generate --overwrite`'s swap loses neither set:
the old one waits in the named backup, and the next `generate` at that --out puts it back (or,
when the new set was already complete, drops the backup), saying so in one line.

The killed generation runs in a subprocess with Ray's actors replaced by the function of
test_generate_atomic.py that writes the same one-shard parts (also used here in-process), and is killed by
patching the move of the new set's second shard (mid-publish), or by the ORBITGEN_TEST_KILL_AT
hook once the new set is in.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from data_shards.card import MANIFEST, read_card
from data_shards.verify import verify
from data_shards.writer import LOCK
from jobs import generate as gen
from test_generate_atomic import old_set  # noqa: F401  (the fixture: the same old set)

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = textwrap.dedent('''
    import os, signal, sys
    from types import SimpleNamespace
    from fsspec.implementations.local import LocalFileSystem
    import models.snapshot
    from jobs import generate as gen
    from test_generate_atomic import fake_workers

    out, source, seed_base, n, kill_mid_publish = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
    family = SimpleNamespace(name="fake", conditional=False, resolution=16, channels=1, data_keys=("image",))
    models.snapshot.load_snapshot = lambda snapshot: (family, None, None)
    gen._write_shards = fake_workers()
    if kill_mid_publish:
        real_mv = LocalFileSystem.mv
        def mv(self, src, dst, **kw):
            if dst.endswith("/out/shard-000001.tar") and gen.BACKUP not in src:   # the new set's 2nd shard
                os.kill(os.getpid(), signal.SIGKILL)
            return real_mv(self, src, dst, **kw)
        LocalFileSystem.mv = mv
    gen.generate(gen.ModelSource(source, source), n, out, seed_base=seed_base, shard_size=4, overwrite=True,
                 progress=False, say=lambda m: None)
''')


def run(out: Path, source: str, seed_base: int, n: int, *, kill_mid_publish: bool = False,
        kill_at: str | None = None) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(__file__).parent)])}
    env.pop("ORBITGEN_TEST_KILL_AT", None)
    if kill_at:
        env["ORBITGEN_TEST_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-c", SCRIPT, str(out), source, str(seed_base), str(n),
                           "1" if kill_mid_publish else "0"], env=env, cwd=ROOT, timeout=120).returncode


def set_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if gen._is_set_file(p.name))


def test_a_kill_while_the_new_set_moves_in_leaves_the_old_set_to_restore(old_set):
    before = {name: (old_set / name).read_bytes() for name in set_files(old_set)}
    assert run(old_set, "new.pt", 100, 12, kill_mid_publish=True) == -signal.SIGKILL
    # Killed: part of the new set at --out, the old set whole in the backup, the lock left behind.
    assert MANIFEST not in set_files(old_set) and (old_set / gen.BACKUP / MANIFEST).is_file()
    assert (old_set / LOCK).is_file()

    said = []
    line = gen.recover_interrupted_swap(str(old_set), said.append)
    assert line == said[-1] and "restored the old set" in line and "\n" not in line
    assert {name: (old_set / name).read_bytes() for name in set_files(old_set)} == before
    assert verify(str(old_set)).ok and read_card(str(old_set)).source == "old.pt"
    assert not (old_set / gen.BACKUP).exists() and not (old_set / LOCK).exists()
    assert gen.recover_interrupted_swap(str(old_set), said.append) is None   # nothing left to do


def test_a_kill_after_the_new_set_is_in_keeps_it_and_drops_the_backup(old_set):
    assert run(old_set, "new.pt", 100, 12, kill_at="published") == -signal.SIGKILL
    assert (old_set / gen.BACKUP).is_dir()
    line = gen.recover_interrupted_swap(str(old_set), lambda m: None)
    assert "removed the old set's backup" in line
    assert verify(str(old_set)).ok and read_card(str(old_set)).source == "new.pt" and read_card(str(old_set)).count == 12
    assert not (old_set / gen.BACKUP).exists()


def test_the_next_generate_recovers_first_then_overwrites(old_set):
    """What a kill at the swap leaves, made by hand (the kill itself is the first test's): the old
    set in the backup, journalled as publishing, the first shard of a new set at --out."""
    backup = old_set / gen.BACKUP
    backup.mkdir()
    for name in set_files(old_set):
        (old_set / name).rename(backup / name)
    (backup / gen.JOURNAL).write_text('{"phase": "publishing"}')
    (old_set / "shard-000000.tar").write_bytes(b"part of a new set")
    said = []
    gen.generate(gen.ModelSource("newer.pt", "newer.pt"), 4, str(old_set), seed_base=200, shard_size=4,
                 overwrite=True, progress=False, say=said.append)
    assert any("restored the old set" in line for line in said)
    assert verify(str(old_set)).ok and read_card(str(old_set)).source == "newer.pt"
    assert set_files(old_set) == ["dataset.json", MANIFEST, "shard-000000.tar"]
    assert not backup.exists()
