"""Which weights MemWatch scores: the raw weights, a module's own EMA copy, or Lightning's averaged weights.

One argument, ``MemWatch(weights=...)``, chooses them:

* ``"auto"`` (default): the average of a Lightning
  :class:`~lightning.pytorch.callbacks.WeightAveraging` callback (e.g. ``EMAWeightAveraging``) when one is
  among the trainer's callbacks, else the raw weights.
* ``"averaged"``: the average of that callback; setup fails when there is none.
* ``"raw"``: the weights the optimizer updates, even when an averaging callback is present.
* :class:`ModuleEMA` ``(attribute, target)``: an EMA copy the module keeps itself (``pl_module.<attribute>``,
  a module or a ``torch.optim.swa_utils.AveragedModel``) of its submodule ``target`` (None: the whole module).

During each evaluation the chosen weights are put into the module (sampling and every listener, e.g.
:class:`~lightning_memwatch.MemorizationEarlyStopping`'s copy, see them) and the raw weights are put back
afterwards, so ``module.state_dict()`` read by a listener is exactly what was scored. At the end of fit,
:meth:`ScoredWeights.restore` loads a kept state dict so that the module returned by ``trainer.fit`` holds it,
whatever the order of the ``on_train_end`` calls (the averaging callback copies its average into the module
there: the kept weights are loaded into the average too, also under ``weights="raw"``). When nothing is
restored and the average was never updated, :meth:`ScoredWeights.hand_back` loads the module's raw weights
into the average, so that the callback's end-of-fit copy hands back the raw weights that were scored, not
the initial weights.

An average that was never updated holds the initial weights (Lightning's ``WeightAveraging`` and
``EMAWeightAveraging(update_starting_at_step=...)`` start averaging late; a ``ModuleEMA`` held as an
``AveragedModel`` counts its updates too). Until its first update the evaluation scores the raw weights
instead, and says so: :meth:`ScoredWeights.in_use` names the weights an evaluation scores (:data:`RAW_WARMUP`
then), which MemWatch stores in the record (``record.scored_weights``), the verbose line and the TensorBoard
text. So a kept copy of the scored weights is never a never-updated average, and neither is what is restored.

Lightning's averaging callback has no public accessor for its averaged model; its public hooks
``on_validation_epoch_start``/``on_validation_epoch_end`` swap the averaged and the current weights (that is
how Lightning validates with the average), and this module calls those hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor, nn

from lightning_memwatch._checks import check_choice, config_error

__all__ = [
    "RAW_WARMUP",
    "ModuleEMA",
    "ScoredWeights",
    "WeightsChoice",
    "average_updates",
    "find_weight_averaging",
    "resolve_weights",
    "scoring",
]

RAW_WARMUP = "raw_warmup"
"""``record.scored_weights`` of an evaluation that scored the raw weights because the chosen average had not
been updated yet (its warm-up)."""


@dataclass(frozen=True)
class ModuleEMA:
    """An EMA copy kept by the module itself: ``pl_module.<attribute>`` mirrors ``pl_module.<target>``.

    Args:
        attribute: attribute name of the EMA copy on the LightningModule (e.g. ``"ema"``); a module, or a
            ``torch.optim.swa_utils.AveragedModel`` (its ``.module`` is used).
        target: dotted name of the submodule the copy mirrors (e.g. ``"unet"``); None when it mirrors the whole
            LightningModule (same state-dict keys).
    """

    attribute: str
    target: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.attribute, str) or not self.attribute:
            raise config_error(f"ModuleEMA.attribute must be an attribute name, e.g. 'ema'; got {self.attribute!r}.")


WeightsName = Literal["auto", "raw", "averaged"]
"""The named choices of ``MemWatch(weights=...)``."""
WeightsChoice = WeightsName | ModuleEMA
WEIGHTS_NAMES: tuple[str, ...] = get_args(WeightsName)


def find_weight_averaging(trainer: Trainer) -> WeightAveraging | None:
    """The trainer's :class:`~lightning.pytorch.callbacks.WeightAveraging` callback (e.g. EMA), or None."""
    found = [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, WeightAveraging)]
    if len(found) > 1:
        raise config_error(
            f"MemWatch found {len(found)} WeightAveraging callbacks; keep one, or pass MemWatch(weights='raw')."
        )
    return found[0] if found else None


class ScoredWeights:
    """The raw weights: nothing to swap in (the base of the other choices).

    Attributes:
        name: ``"raw"``, ``"averaged"`` or ``"module_ema"``.
    """

    name = "raw"

    def in_use(self, pl_module: LightningModule) -> str:
        """The weights an evaluation now scores: :attr:`name`, or :data:`RAW_WARMUP` while the chosen average
        has not been updated yet."""
        return self.name

    def warmup_note(self) -> str:
        """Why the raw weights are scored during the warm-up (for the verbose line and the logged text)."""
        return ""

    @contextlib.contextmanager
    def applied(self, trainer: Trainer, pl_module: LightningModule) -> Iterator[None]:
        """Inside the block the module holds the scored weights; the raw weights come back on exit."""
        yield

    def restore(self, trainer: Trainer, pl_module: LightningModule, state_dict: dict[str, Tensor]) -> None:
        """Load kept weights (a state dict read inside :meth:`applied`) so that fit ends with them."""
        pl_module.load_state_dict(state_dict)

    def hand_back(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Make fit end with the weights the module holds now (the raw weights) when the chosen average was never
        updated, so never hand back its initial weights; call it before the averaging callback's
        ``on_train_end``. Returns whether the average was written (False: nothing to do)."""
        return False

    def describe(self) -> str:
        return "raw weights"


class _Averaged(ScoredWeights):
    name = "averaged"

    def __init__(self, callback: WeightAveraging) -> None:
        self.callback = callback

    def in_use(self, pl_module: LightningModule) -> str:
        updates = average_updates(getattr(self.callback, "_average_model", None))
        if updates is None:  # the callback's own count (Lightning keeps it in its state)
            step = getattr(self.callback, "_latest_update_step", None)
            epoch = getattr(self.callback, "_latest_update_epoch", None)
            if step is not None or epoch is not None:
                updates = int((step or 0) > 0 or (epoch if epoch is not None else -1) >= 0)
        return RAW_WARMUP if updates == 0 else self.name

    def warmup_note(self) -> str:
        start = getattr(self.callback, "update_starting_at_step", None)
        when = f" (update_starting_at_step={start})" if start is not None else ""
        return (
            f"raw weights scored: {type(self.callback).__name__} has not updated its average yet{when}, "
            "which still holds the initial weights"
        )

    @contextlib.contextmanager
    def applied(self, trainer: Trainer, pl_module: LightningModule) -> Iterator[None]:
        if self.in_use(pl_module) == RAW_WARMUP:  # never score the initial weights of a never-updated average
            yield
            return
        self.callback.on_validation_epoch_start(trainer, pl_module)  # swap: the module gets the average
        try:
            yield
        finally:
            self.callback.on_validation_epoch_end(trainer, pl_module)  # swap back

    def restore(self, trainer: Trainer, pl_module: LightningModule, state_dict: dict[str, Tensor]) -> None:
        _restore_beside(self.callback, trainer, pl_module, state_dict)

    def hand_back(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        # A never-updated average holds the initial weights, and the callback copies it into the module when
        # training ends. Its first update copies the module's weights (AveragedModel with n_averaged == 0), so
        # writing into it changes no later average.
        if self.in_use(pl_module) != RAW_WARMUP:
            return False
        self.restore(trainer, pl_module, {k: v.detach().clone() for k, v in pl_module.state_dict().items()})
        return True

    def describe(self) -> str:
        return f"averaged weights of {type(self.callback).__name__}"


class _RawBesideAveraging(ScoredWeights):
    """The raw weights (``weights="raw"``) while an averaging callback runs: restored into its average too."""

    def __init__(self, callback: WeightAveraging) -> None:
        self.callback = callback

    def restore(self, trainer: Trainer, pl_module: LightningModule, state_dict: dict[str, Tensor]) -> None:
        _restore_beside(self.callback, trainer, pl_module, state_dict)


def _restore_beside(
    callback: WeightAveraging, trainer: Trainer, pl_module: LightningModule, state_dict: dict[str, Tensor]
) -> None:
    """Load kept weights into the module and into ``callback``'s average: the callback copies its average into
    the module in its own ``on_train_end``, which may come after the caller's, so both orders end with them."""
    pl_module.load_state_dict(state_dict)
    callback.on_validation_epoch_start(trainer, pl_module)  # swap: the average now holds the kept weights
    pl_module.load_state_dict(state_dict)


class _ModuleEMA(ScoredWeights):
    name = "module_ema"

    def __init__(self, spec: ModuleEMA, pl_module: LightningModule) -> None:
        self.spec = spec
        self._ema(pl_module)
        self._target(pl_module)

    def _ema(self, pl_module: LightningModule) -> nn.Module:
        ema = getattr(pl_module, self.spec.attribute, None)
        if isinstance(ema, torch.optim.swa_utils.AveragedModel):
            ema = ema.module
        if not isinstance(ema, nn.Module):
            raise config_error(
                f"MemWatch(weights=ModuleEMA({self.spec.attribute!r})): {type(pl_module).__name__} has no module "
                f"attribute `{self.spec.attribute}` (got {type(ema).__name__}). Name the attribute that holds the "
                "EMA copy, or pass weights='raw'."
            )
        return ema

    def _target(self, pl_module: LightningModule) -> nn.Module:
        if self.spec.target is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.spec.target)
        except AttributeError as err:
            raise config_error(
                f"MemWatch(weights=ModuleEMA(target={self.spec.target!r})): {err}. Name the submodule the EMA "
                "copy mirrors (e.g. 'unet'), or target=None when it mirrors the whole module."
            ) from None

    def in_use(self, pl_module: LightningModule) -> str:
        held = getattr(pl_module, self.spec.attribute, None)  # an AveragedModel counts its updates
        return RAW_WARMUP if average_updates(held) == 0 else self.name

    def warmup_note(self) -> str:
        return (
            f"raw weights scored: the EMA copy `{self.spec.attribute}` (an AveragedModel) has not been updated yet"
        )

    @contextlib.contextmanager
    def applied(self, trainer: Trainer, pl_module: LightningModule) -> Iterator[None]:
        if self.in_use(pl_module) == RAW_WARMUP:
            yield
            return
        target = self._target(pl_module)
        raw = {k: v.detach().clone() for k, v in target.state_dict().items()}
        ema_state = self._ema(pl_module).state_dict()
        try:
            target.load_state_dict(ema_state)
        except RuntimeError as err:
            raise config_error(
                f"MemWatch(weights={self.spec!r}): the EMA copy's weights do not fit the target ({err})."
            ) from None
        try:
            yield
        finally:
            target.load_state_dict(raw)

    def describe(self) -> str:
        where = "the module" if self.spec.target is None else f"`{self.spec.target}`"
        return f"EMA copy `{self.spec.attribute}` of {where}"


def average_updates(averaged: object) -> int | None:
    """How many times ``averaged`` (a ``torch.optim.swa_utils.AveragedModel``) was updated, from its
    ``n_averaged`` buffer (saved with its state, so right after a resume too); None when it is not one."""
    count = getattr(averaged, "n_averaged", None) if isinstance(averaged, torch.optim.swa_utils.AveragedModel) else None
    return None if count is None else int(count)


def resolve_weights(choice: Any, trainer: Trainer, pl_module: LightningModule) -> ScoredWeights:
    """The :class:`ScoredWeights` for ``choice`` (see the module docstring), checked at setup.

    Raises:
        MisconfigurationException: (a ``ConfigError``, also a ``ValueError``) an unknown choice, ``"averaged"``
            without an averaging callback, or a :class:`ModuleEMA` naming no module.
    """
    if isinstance(choice, ModuleEMA):
        return _ModuleEMA(choice, pl_module)
    check_choice(choice, "MemWatch(weights=...)", WEIGHTS_NAMES, hint="Or pass ModuleEMA('attribute') for an EMA copy.")
    if choice == "raw":  # beside one averaging callback, a restore goes into its average too
        found = [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, WeightAveraging)]
        return _RawBesideAveraging(found[0]) if len(found) == 1 else ScoredWeights()
    callback = find_weight_averaging(trainer)
    if callback is None:
        if choice == "averaged":
            raise config_error(
                "MemWatch(weights='averaged') needs a WeightAveraging callback (e.g. "
                "`lightning.pytorch.callbacks.EMAWeightAveraging()`) among the Trainer's callbacks; add one, or "
                "pass weights='raw' (or ModuleEMA('attribute') for an EMA copy the module keeps)."
            )
        return ScoredWeights()
    return _Averaged(callback)


@contextlib.contextmanager
def scoring(trainer: Trainer, pl_module: LightningModule, scored: ScoredWeights | None) -> Iterator[None]:
    """The module as it is scored, for one evaluation or probe reading: the ``scored`` weights in it (None: the
    weights it holds) and eval mode. Its own weights and training mode come back afterwards, also on an error.
    MemWatch and LossGapProbe both read the module through this bracket."""
    was_training = pl_module.training
    with (scored if scored is not None else ScoredWeights()).applied(trainer, pl_module):
        pl_module.eval()
        try:
            yield
        finally:
            pl_module.train(was_training)
