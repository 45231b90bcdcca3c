"""MemWatch's settings in the run's one hyperparameter session, with MemWatch's scalars as its metrics.

Lightning logs the module's (and datamodule's) hparams once per fit, right after ``on_fit_start``. A second
``log_hyperparams`` call would write a second TensorBoard hparams session, which the HPARAMS tab does not
show, and a second ``hp_metric``; and with ``TensorBoardLogger(default_hp_metric=False)`` Lightning writes no
session at all, so the tab is missing. No public hook adds entries to Lightning's call, so
:class:`HparamsSession` wraps each logger's ``log_hyperparams`` for that one call (an instance attribute, removed
again inside it, or at the end of fit when the call never came). For TensorBoard loggers it writes the session
itself, always, declaring MemWatch's scalars (and ``hp_metric`` when Lightning logs one) as the tab's metrics.

The session object belongs to the MemWatch that made it and lives as long as one fit: MemWatch calls
:meth:`~HparamsSession.join` from ``on_fit_start``, :meth:`~HparamsSession.flush` from ``on_train_start`` and
:meth:`~HparamsSession.release` from ``teardown``, on global rank 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger, TensorBoardLogger

__all__ = ["HparamsSession"]


def _as_dict(params: Any) -> dict[str, Any]:
    return dict(vars(params)) if hasattr(params, "__dict__") and not isinstance(params, Mapping) else dict(params)


class HparamsSession:
    """Join ``settings()`` to the hparams each of a trainer's loggers logs next, in the same call.

    Args:
        settings: called when the hparams are logged (so it reports what was built by then), returns
            ``{name: value}``.
        metrics: scalar tags the TensorBoard HPARAMS tab lists as metrics (their last value per run).
    """

    def __init__(self, settings: Callable[[], Mapping[str, Any]], metrics: Sequence[str]) -> None:
        self.settings = settings
        self.metrics = tuple(metrics)
        self._pending: dict[int, Logger] = {}  # loggers whose log_hyperparams is wrapped, by id

    @property
    def pending(self) -> list[Logger]:
        """Loggers whose wrapped ``log_hyperparams`` has not been called yet."""
        return list(self._pending.values())

    def join(self, trainer: Trainer) -> None:
        """Wrap each logger's ``log_hyperparams`` for its next call (call from ``on_fit_start``, rank 0)."""
        for lg in trainer.loggers:
            if id(lg) in self._pending:
                continue
            original = lg.log_hyperparams

            def joined(params: Any, *args: Any, _lg: Logger = lg, _original: Any = original, **kwargs: Any) -> Any:
                self._unwrap(_lg)
                merged = {**_as_dict(params), **dict(self.settings())}
                if isinstance(_lg, TensorBoardLogger):
                    return self._log_tensorboard(_lg, _original, merged, *args, **kwargs)
                return _original(merged, *args, **kwargs)

            lg.log_hyperparams = joined  # type: ignore[method-assign]
            self._pending[id(lg)] = lg

    def flush(self) -> None:
        """Log the settings to the loggers whose wrapped call never came (``enable_autolog_hparams=False``)."""
        for lg in self.pending:
            lg.log_hyperparams({})  # the wrapper adds the settings

    def release(self) -> None:
        """Give every logger its own ``log_hyperparams`` back (call at the end of fit, also after a failure)."""
        for lg in self.pending:
            self._unwrap(lg)

    def _unwrap(self, lg: Logger) -> None:
        if self._pending.pop(id(lg), None) is not None and "log_hyperparams" in vars(lg):
            del lg.log_hyperparams  # type: ignore[attr-defined]

    def _log_tensorboard(
        self,
        lg: TensorBoardLogger,
        original: Callable[..., Any],
        params: dict[str, Any],
        metrics: Any = None,
        step: int | None = None,
    ) -> None:
        """Lightning's call stores the hparams (``hparams.yaml``) and writes nothing (``metrics={}``); the session
        is written here, with ``hp_metric`` where Lightning would log one and MemWatch's scalars as metrics."""
        from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
        from torch.utils.tensorboard.summary import hparams

        if metrics is None:
            metrics = {"hp_metric": -1} if getattr(lg, "_default_hp_metric", True) else {}
        elif not isinstance(metrics, Mapping):
            metrics = {"hp_metric": metrics}
        original(params, {}, step)
        if metrics:
            lg.log_metrics(dict(metrics), step)
        flat = lg._sanitize_params(_flatten_dict(_convert_params(params)))
        declared = {**{tag: 0.0 for tag in self.metrics}, **dict(metrics)}  # hparams() reads only the names
        writer = lg.experiment._get_file_writer()
        for summary in hparams(flat, declared):
            writer.add_summary(summary, step)
        lg.experiment.flush()
