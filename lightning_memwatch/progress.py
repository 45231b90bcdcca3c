"""What a user sees while MemWatch works: progress of an evaluation inside the trainer's progress bar, the
one-line summary of the set-up, and a word when watching costs more than training.

An evaluation stops the training loop for as long as sampling takes (tens of seconds to minutes), and the
trainer's own progress bar stands still meanwhile. :class:`EvalProgress` adds a line to that bar, the way
Lightning shows validation: a sub-bar under the training bar of :class:`~lightning.pytorch.callbacks.TQDMProgressBar`
(where its validation bar goes), or a task of :class:`~lightning.pytorch.callbacks.RichProgressBar`'s
``progress``. It is silent when the trainer has no progress bar (``enable_progress_bar=False``), when the bar is
disabled, on ranks other than 0, and for any other progress-bar class.

Example:
    >>> from lightning.pytorch import Trainer
    >>> trainer = Trainer(enable_progress_bar=False, logger=False)
    >>> with EvalProgress(trainer, total=8, step=0) as progress:
    ...     progress.advance(8)  # nothing shown: the trainer has no progress bar
    >>> progress.done
    8
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

__all__ = ["CostNote", "EvalProgress", "setup_summary"]

COSTLY_FACTOR = 2.0  # CostNote speaks when an evaluation takes more than this many times the training before it


class CostNote:
    """Says once per fit when an evaluation took more than twice as long as the training since the one before it
    (watching then takes two thirds of the wall time; seconds on this rank, training including the data loading
    and the other callbacks).

    Example:
        >>> clock = iter([0.0, 10.0, 12.0, 13.0, 50.0, 52.0]).__next__
        >>> note = CostNote(clock)
        >>> note.training_from(0)                       # train start, at t = 0 s
        >>> note.evaluating()                            # the evaluation at step 100 starts at t = 10 s
        >>> note.evaluated(100, "schedule=500") is None  # it took 2 s after 10 s of training: nothing to say
        True
        >>> note.evaluating()                            # step 200's starts at t = 13 s: 1 s of training
        >>> note.evaluated(200, "schedule=500")[:60]     # it took 37 s
        'MemWatch: the evaluation at step 200 took 37.0 s, the 100 tr'
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._since: float | None = None  # when training last resumed (an evaluation's end, or the fit's start)
        self._from_step: int | None = None
        self._started: float | None = None
        self.said = False

    def training_from(self, step: int) -> None:
        """Training (re)starts at optimizer step ``step``: at the fit's start."""
        self._since, self._from_step = self._clock(), step

    def evaluating(self) -> None:
        """An evaluation starts now."""
        self._started = self._clock()

    def evaluated(self, step: int, fix: str) -> str | None:
        """The evaluation at ``step`` ended: the sentence to say (once per fit) when it took more than twice the
        training since the one before, else None. ``fix``: how to watch less often, named in the sentence."""
        now, started, since, from_step = self._clock(), self._started, self._since, self._from_step
        self._since, self._from_step = now, step
        if self.said or started is None or since is None or from_step is None or step <= from_step:
            return None
        evaluation, training = now - started, started - since
        if evaluation <= COSTLY_FACTOR * training:
            return None
        self.said = True
        return (
            f"MemWatch: the evaluation at step {step} took {evaluation:.1f} s, the {step - from_step} training steps "
            f"before it {training:.1f} s: watching takes more than twice the time of training here. To watch less "
            f"often: {fix}."
        )


class EvalProgress:
    """Progress of one evaluation (images sampled out of ``total``) in the trainer's progress bar.

    Args:
        trainer: the trainer whose progress bar shows the evaluation.
        total: images this rank samples in this evaluation.
        step: the optimizer step being evaluated (shown in the description).
        description: text before the step, ``"MemWatch"`` by default.
    """

    def __init__(self, trainer: Trainer, total: int, step: int, description: str = "MemWatch") -> None:
        self.total = int(total)
        self.done = 0
        self.description = f"{description} step {step}: sampling"
        self._tqdm: Any = None
        self._rich: Any = None
        self._task: Any = None
        bar = trainer.progress_bar_callback if trainer.is_global_zero else None
        if bar is None or not bar.is_enabled:
            return
        if isinstance(bar, TQDMProgressBar):
            # Where and how Lightning draws its validation sub-bar (`init_validation_tqdm`), with our own text from
            # the start: that hook would first print "Validation".
            self._tqdm = Tqdm(
                desc=self.description,
                total=self.total,
                position=2 * bar.process_position + 1,
                leave=False,
                dynamic_ncols=True,
                file=sys.stdout,
                bar_format=bar.BAR_FORMAT,
            )
        elif isinstance(bar, RichProgressBar) and bar.progress is not None:
            self._rich = bar
            self._task = bar.progress.add_task(self.description, total=self.total)
            bar.refresh()

    @property
    def shown(self) -> bool:
        """Whether a progress bar displays this evaluation."""
        return self._tqdm is not None or self._task is not None

    def advance(self, count: int) -> None:
        """Record ``count`` more images sampled."""
        self.done += int(count)
        if self._tqdm is not None:
            self._tqdm.update(int(count))
            self._tqdm.refresh()  # one call per sampler batch (seconds apart): show each, unthrottled
        elif self._task is not None:
            self._rich.progress.update(self._task, advance=int(count))
            self._rich.refresh()

    def phase(self, text: str) -> None:
        """Replace the description's last part (``sampling``) by ``text``, e.g. ``"nearest neighbours"``."""
        head = self.description.rsplit(": ", 1)[0]
        self.description = f"{head}: {text}"
        if self._tqdm is not None:
            self._tqdm.set_description(self.description)
        elif self._task is not None:
            self._rich.progress.update(self._task, description=self.description)
            self._rich.refresh()

    def close(self) -> None:
        """Remove the evaluation's line from the progress bar (idempotent)."""
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
        if self._task is not None:
            self._rich.progress.remove_task(self._task)
            self._rich.refresh()
            self._task = None

    def __enter__(self) -> EvalProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _count(value: int) -> str:
    return f"{int(value):,}"


def setup_summary(
    *,
    num_train: int,
    image_shape: Sequence[int],
    backend: str | None,
    feature_dim: int | None,
    fid: Mapping[str, Any] | None,
    next_step: int | None,
    num_samples: int,
    sample_batch_size: int,
    world_size: int = 1,
    last_seconds: float | None = None,
) -> str:
    """The one line MemWatch prints per fit: what it indexed, which backend, the FID reference, the next
    evaluation and what it costs.

    Args:
        num_train: training images in the index (images).
        image_shape: shape of one training image.
        backend: the nearest-neighbour backend in use (None: not built on this rank).
        feature_dim: dimension of the index's vectors when a ``feature_fn`` maps images to features.
        fid: the FID evaluator's :meth:`~lightning_memwatch.metrics.fid.FIDEvaluator.hparams`, or None.
        next_step: optimizer step of the next scheduled evaluation (None: none left before ``max_steps``).
        num_samples: images sampled per evaluation (f_mem's and FID's count, the larger).
        sample_batch_size: images per sampler call.
        world_size: ranks sharing the sampling.
        last_seconds: wall time of the last evaluation (seconds), when one ran (e.g. before a resume).

    Example:
        >>> line = setup_summary(num_train=1797, image_shape=(1, 8, 8), backend="torch", feature_dim=None,
        ...                      fid=None, next_step=0, num_samples=512, sample_batch_size=256)
        >>> for part in line.split("; "):
        ...     print(part)
        MemWatch: indexed 1,797 training images (1x8x8, pixel space) with the torch backend
        no FID
        next evaluation at step 0: 512 samples in 2 sampler calls of up to 256 images
    """
    shape = "x".join(str(int(s)) for s in image_shape)
    space = "pixel space" if feature_dim is None else f"{feature_dim}-d features"
    where = f"with the {backend} backend" if backend else "(index on rank 0)"
    parts = [f"MemWatch: indexed {_count(num_train)} training images ({shape}, {space}) {where}"]
    if fid is None:
        parts.append("no FID")
    else:
        origin = {
            "cache": "cache hit",
            "state": "restored from the checkpoint",
            "computed": "cache miss, computed",
        }.get(str(fid.get("reference_stats")), "not prepared yet")
        num_ref = fid.get("num_reference")
        ref = f"{_count(num_ref)} {fid.get('reference', 'reference')} images" if num_ref else fid.get("reference")
        parts.append(f"FID with {fid.get('extractor')} against {ref} ({origin})")
    if next_step is None:
        parts.append("no evaluation left in the schedule")
    else:
        per_rank = -(-int(num_samples) // max(1, int(world_size)))
        calls = -(-per_rank // max(1, int(sample_batch_size)))
        cost = f"{_count(num_samples)} samples in {calls} sampler call{'s' if calls != 1 else ''} of up to " \
            f"{_count(sample_batch_size)} images"
        if world_size > 1:
            cost += f" on each of {world_size} ranks"
        if last_seconds is not None:
            cost += f", about {last_seconds:.0f} s as the last evaluation took"
        parts.append(f"next evaluation at step {next_step}: {cost}")
    return "; ".join(parts)
