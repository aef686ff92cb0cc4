"""One progress bar on the driver for a training run on Ray: step, losses, img/s, ETA.

The workers' own console lines go to Ray's logs (shown with `--verbose`), so rank 0 posts its
progress to a small named Ray actor, the board, and a thread on the driver draws it. Nothing is
read from disk, so the bar works on a cluster and under Ray Jobs alike. The board lives on the
driver's node: on another node it would go down with that node, and the bar and its notes
("resumed from step …") with it. Posting never blocks a training step (fire and forget).

The bar appears once training runs (rank 0's first post or note); until then, every so often, a
line says what the run waits for (`waiting`, from jobs/capacity.py).
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable, Mapping

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

NAMESPACE = "orbitgen"
POLL_S = 0.5


@ray.remote(num_cpus=0)
class ProgressBoard:
    """The latest step of a run and the notes (resumed, evaluating…) not shown yet."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] | None = None
        self.notes: list[str] = []

    def post(self, step: int, values: Mapping[str, float], images_per_s: float) -> None:
        self.latest = {"step": step, "values": dict(values), "images_per_s": images_per_s}

    def note(self, text: str) -> None:
        self.notes.append(text)

    def read(self) -> tuple[dict[str, Any] | None, list[str]]:
        notes, self.notes = self.notes, []
        return self.latest, notes


def board_name(run_name: str) -> str:
    return f"progress-{run_name}"


class WorkerProgress:
    """Rank 0's side: posts to the run's board (when the driver made one)."""

    def __init__(self, name: str | None):
        self.board = ray.get_actor(name, namespace=NAMESPACE) if name else None

    def post(self, step: int, values: Mapping[str, float], images_per_s: float) -> None:
        if self.board is not None:
            self.board.post.remote(step, {k: float(v) for k, v in values.items()}, images_per_s)

    def note(self, text: str) -> None:
        if self.board is not None:
            self.board.note.remote(text)


class ProgressBar:
    """The driver's side: makes the board, draws it on stderr until `close`."""

    def __init__(self, run_name: str, total_steps: int, start_step: int = 0, shown: int = 3,
                 waiting: Callable[[], str] | None = None, waiting_every_s: float = 30):
        self.name = board_name(run_name)
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.board = ProgressBoard.options(name=self.name, namespace=NAMESPACE, scheduling_strategy=here).remote()
        self.total, self.start, self.shown = total_steps, start_step, shown
        self.bar: tqdm | None = None   # made when training runs
        self.waiting, self.waiting_every_s = waiting, waiting_every_s
        self._since = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._draw, name="orbitgen-progress", daemon=True)
        self._thread.start()

    def _make_bar(self) -> tqdm:
        tty = sys.stderr.isatty()
        return tqdm(total=self.total, initial=self.start, unit="step", dynamic_ncols=True, file=sys.stderr,
                    mininterval=0.5 if tty else 30, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
                    "[{elapsed}<{remaining}{postfix}]" if tty else None)

    def _draw(self) -> None:
        while not self._stop.wait(POLL_S):
            self._update()

    def _update(self) -> None:
        try:
            latest, notes = ray.get(self.board.read.remote(), timeout=10)
        except Exception:   # a slow or restarting cluster: the next poll tries again
            return
        if self.bar is None and not (latest or notes):
            self._say_what_it_waits_for()
            return
        self.bar = self.bar or self._make_bar()
        for text in notes:
            self.bar.write(f"[orbitgen] {text}", file=sys.stderr)
        if latest:
            self.bar.update(max(0, latest["step"] - self.bar.n))
            values = latest["values"]
            first = sorted(values, key=lambda k: (not k.startswith("loss"), k))[: self.shown]   # the losses first
            losses = ", ".join(f"{k} {values[k]:.3f}" for k in first)
            self.bar.set_postfix_str(f"{losses}, {latest['images_per_s']:.0f} img/s", refresh=False)

    def _say_what_it_waits_for(self) -> None:
        if self.waiting is None or time.monotonic() - self._since < self.waiting_every_s:
            return
        self._since = time.monotonic()
        try:
            line = self.waiting()
        except Exception as e:   # the cluster's state API busy or not up yet: say so rather than nothing
            # requests' ConnectionError and the built-in one are both OSErrors
            why = ("Ray's state API does not answer yet" if isinstance(e, OSError)
                   else f"Ray's state API: {type(e).__name__}")
            line = f"waiting for the workers to start ({why})"
        print(f"[orbitgen] {line}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._update()
        if self.bar is not None:
            self.bar.close()
        ray.kill(self.board)
