"""The pieces of one adaptive-schedule demo run, shared by ``adaptive_demo.py`` (runs) and
``adaptive_analysis.py`` (the live check of the replay): the demo's watch, stopper, model and data for one n,
the trainer, the digit classifier of the FID, the EMA warm-up and a timer of the training steps.

Both scripts import this module; neither imports the other's pieces (``adaptive_demo.py`` calls the analysis
entry points, the analysis never imports the demo script).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch


def build_parts(n: int, config: Any, classifier_state: dict, schedule: Any) -> dict[str, Any]:
    """The demo's pieces for one n (see lightning_memwatch.apps.demo.train_one), with ``schedule`` for MemWatch:
    ``{"datamodule", "watch", "stopper", "model"}``."""
    import lightning as L

    from lightning_memwatch import FID, MemorizationEarlyStopping, MemWatch, TimescaleDetector
    from lightning_memwatch.apps.data import DigitsDataModule
    from lightning_memwatch.apps.demo import DigitFeatureNet
    from lightning_memwatch.apps.models import DDPM, ResidualMLP

    L.seed_everything(config.seed + n, verbose=False)
    datamodule = DigitsDataModule(n=n, num_heldout=config.num_heldout, full_batch=True, split_seed=config.seed)
    datamodule.setup("fit")
    classifier = DigitFeatureNet()
    classifier.load_state_dict(classifier_state)
    classifier.eval().requires_grad_(False)
    detector = TimescaleDetector(**config.detector_kwargs())
    watch = MemWatch(
        train_data=datamodule.train_images(),
        num_samples=config.num_samples,
        sample_batch_size=config.num_samples,
        schedule=schedule,
        fid=FID(reference=datamodule.heldout_images(), feature_extractor=classifier, cache=False),
        seed=config.seed,
        detector=detector,
        bootstrap=config.bootstrap,
        log_images=False,
        verbose=False,
    )
    stopper = MemorizationEarlyStopping(watch, restore_best=True)  # patience lives in the detector
    model = DDPM(
        ResidualMLP(dim=64, width=config.width, num_blocks=config.num_blocks),
        optimizer="adam",
        lr=config.lr,
        sample_steps=config.sample_steps,
        ema_decay=config.ema_decay,
    )
    return {"datamodule": datamodule, "watch": watch, "stopper": stopper, "model": model}


def demo_trainer(config: Any, n: int, callbacks: list) -> Any:
    """The demo's CPU trainer for one n (no logger, no checkpoints, no progress bar)."""
    import lightning as L

    return L.Trainer(
        max_steps=config.max_steps(n),
        callbacks=callbacks,
        logger=False,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def load_classifier(config: Any, out: Path) -> dict:
    """The digit classifier's weights (the FID feature extractor), trained once and kept under ``out``."""
    from lightning_memwatch.apps.demo import CLASSIFIER_FILENAME, _prepare_classifier

    path = out / CLASSIFIER_FILENAME
    if path.exists():
        return torch.load(path)
    net, _ = _prepare_classifier(config)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    torch.save(state, path)
    return state


def ema_warmup_callback(config: Any) -> Any:
    """A callback setting the module's EMA decay from the demo's warm-up before each training step."""
    import lightning as L

    from lightning_memwatch.apps.demo import ema_warmup_decay

    class EMAWarmup(L.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            pl_module.ema_decay = ema_warmup_decay(trainer.global_step, float(config.ema_decay))

    return EMAWarmup()


class StepTimer:
    """Wall time of the training steps alone (batch start to batch end), to express costs as fractions."""

    def __init__(self) -> None:
        import lightning as L

        timer = self

        class Timer(L.Callback):
            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                timer._t0 = time.perf_counter()

            def on_train_batch_end(self, *args: Any) -> None:
                timer.seconds += time.perf_counter() - timer._t0
                timer.steps += 1

        self.seconds, self.steps, self._t0 = 0.0, 0, 0.0
        self.callback = Timer()
