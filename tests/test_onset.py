"""The onset forecast (lightning_memwatch.onset): from the drift of the low ratio quantiles, the step at which
f_mem leaves zero, with an interval; in MemWatch's records and verbose line; the adaptive schedule evaluates
densely around it."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from toys import toy_images, toy_loader

from lightning_memwatch import AdaptiveSchedule, EvalSchedule, MemWatch
from lightning_memwatch.evaluator import RATIO_QUANTILES
from lightning_memwatch.onset import forecast_onset, lowest_ratio


def drifting_history(seed: int, m: int = 512, every: int = 100, drift: float = 1e-4) -> tuple[list[dict], int]:
    """Records of m samples whose ratios all slide down by ``drift`` per step (plus per-evaluation jitter), as
    before the onset of copying; and the first evaluated step with f_mem > 0 (the truth)."""
    g = torch.Generator().manual_seed(seed)
    start = (0.85 + 0.06 * torch.randn(m, generator=g)).clamp(0, 1)
    end = int(1.3 * (float(start.min()) - 1 / 3) / drift)
    levels = torch.tensor(list(RATIO_QUANTILES.values()), dtype=torch.float64)
    records = []
    for step in range(0, end, every):
        ratios = (start - drift * step + 0.01 * torch.randn(m, generator=g)).clamp(0, 1)
        quantiles = torch.quantile(ratios.double(), levels)
        records.append(
            {"step": step, "f_mem": float((ratios < 1 / 3).float().mean()), "num_samples": m,
             **{name: float(q) for name, q in zip(RATIO_QUANTILES, quantiles, strict=True)}}
        )  # fmt: skip
    onset = next(r["step"] for r in records if r["f_mem"] > 0)
    return records, onset


def _before(records: list[dict], step: float) -> list[dict]:
    return [r for r in records if r["step"] <= step]


def test_forecast_of_a_scripted_drift_lands_within_its_interval():
    records, onset = drifting_history(seed=0)
    assert onset == 3300
    for share in (0.5, 0.75):
        forecast = forecast_onset(_before(records, share * onset))
        assert forecast.low <= onset <= forecast.high, (share, forecast)
        assert forecast.low <= forecast.step <= forecast.high
    late = forecast_onset(_before(records, 0.75 * onset))
    assert abs(late.step - onset) <= 0.25 * onset
    covered = 0
    for seed in range(1, 11):  # the interval covers the truth in most drifts, not by luck of one seed
        records, onset = drifting_history(seed)
        forecast = forecast_onset(_before(records, 0.75 * onset))
        covered += forecast.low <= onset <= (forecast.high if forecast.high is not None else float("inf"))
    assert covered >= 8


def test_no_forecast_without_a_drift_or_after_the_onset():
    flat = [{"step": s, "f_mem": 0.0, "ratio_q05": 0.8 + 0.01 * (s % 200 == 0), "ratio_q25": 0.9,
             "num_samples": 512} for s in range(0, 1000, 100)]  # fmt: skip
    assert forecast_onset(flat).step is None and "does not fall" in forecast_onset(flat).reason
    records, onset = drifting_history(seed=0)
    assert forecast_onset(records[:2]).step is None  # too few evaluations
    after = forecast_onset(_before(records, onset))
    assert after.step is None and "already above zero" in after.reason
    assert forecast_onset([{"step": 0, "f_mem": 0.0}] * 4).step is None  # records without quantiles
    assert lowest_ratio({"ratio_q05": 0.5, "ratio_q25": 0.6, "num_samples": 512}) < 0.5


class DriftingCopier(LightningModule):
    """Sample i is training image i plus a fixed offset that shrinks linearly with the step: the ratios fall
    steadily, and f_mem leaves zero once the offsets are a third of the distance to the next image."""

    def __init__(self, train: torch.Tensor, steps_to_copy: int = 60) -> None:
        super().__init__()
        self.register_buffer("train_images", train.clone())
        self.layer = torch.nn.Linear(train[0].numel(), 1)
        self.steps_to_copy = steps_to_copy

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0].flatten(1)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def sample(self, num_samples, generator=None, noise=None):
        scale = max(0.0, 1.0 - self.global_step / self.steps_to_copy)
        picks = torch.arange(len(noise)) % len(self.train_images)
        return (self.train_images[picks] + 0.5 * scale * noise.clamp(-2, 2)).clamp(-1, 1)


def test_memwatch_records_and_prints_the_forecast(caplog, tmp_path):
    train = toy_images(32, seed=1)
    model = DriftingCopier(train)
    watch = MemWatch(num_samples=128, sample_batch_size=128, schedule=EvalSchedule.every(5), bootstrap=10,
                     log_images=False, verbose=True)  # fmt: skip
    trainer = Trainer(max_steps=60, accelerator="cpu", callbacks=[watch], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)  # fmt: skip
    with caplog.at_level("INFO"):
        trainer.fit(model, toy_loader(train, batch_size=8))
    onset = next(r.step for r in watch.history if r.f_mem > 0)
    forecasts = [r for r in watch.history if r.onset_forecast is not None]
    assert forecasts and all(r.step < onset for r in forecasts)  # forecasts come before the copies, not after
    last = forecasts[-1]
    assert last.onset_forecast_low <= onset <= (last.onset_forecast_high or float("inf"))
    assert "onset forecast ~" in caplog.text
    assert "memwatch/onset_forecast" in last.to_scalars()
    # the warning before the copies: said once, at the first forecast, before the onset
    first = forecasts[0]
    said = [m for m in caplog.messages if "copying forecast at step" in m]
    assert len(said) == 1 and f"step {first.step}: the samples are drifting" in said[0]


def test_the_adaptive_schedule_evaluates_densely_around_the_forecast():
    schedule = AdaptiveSchedule(min_every=50, max_every=5000, growth=4.0, watch_growth=1.25)
    schedule.observe({"step": 0, "f_mem": 0.0})
    schedule.observe({"step": 400, "f_mem": 0.0})  # flat: 4 x 400 = 1600 next
    assert schedule.next_step == 1600
    schedule = AdaptiveSchedule(min_every=50, max_every=5000, growth=4.0, watch_growth=1.25)
    schedule.observe({"step": 0, "f_mem": 0.0})
    forecast = {"onset_forecast": 1200.0, "onset_forecast_low": 900.0, "onset_forecast_high": 1500.0}
    schedule.observe({"step": 400, "f_mem": 0.0, **forecast})
    assert schedule.next_step == 900 and schedule.decisions[-1].rule == "forecast"  # its early end, not 1600
    schedule.observe({"step": 900, "f_mem": 0.0, **forecast})
    assert schedule.next_step == 1150  # inside the interval: x1.25 (rounded up to the grid)
    # before the interval the forecast only caps the plan: with the probe's signal up, the watching rate holds
    from lightning_memwatch.metrics.loss_gap import LossGapReading

    probed = AdaptiveSchedule(min_every=50, max_every=5000, growth=4.0, watch_growth=1.25)
    probed.observe({"step": 0, "f_mem": 0.0})
    for step, heldout in ((300, 1.0), (390, 1.05)):  # the held-out loss 5% above its lowest: signal up
        probed.observe_probe(LossGapReading(step=step, loss_train=0.9, loss_heldout=heldout, gap=0.1, band_gaps=()))
    probed.observe({"step": 400, "f_mem": 0.0, **forecast})
    assert probed.next_step == 500 and probed.decisions[-1].rule == "probe"  # x1.25, not the forecast's 900
    state = schedule.state_dict()
    again = AdaptiveSchedule(min_every=50, max_every=5000, growth=4.0, watch_growth=1.25)
    again.load_state_dict(state)
    assert again.state_dict() == state


@pytest.mark.parametrize("window", [3, 8])
def test_the_window_bounds_the_evaluations_used(window):
    records, onset = drifting_history(seed=3)
    forecast = forecast_onset(_before(records, 0.75 * onset), window=window)
    assert f"over {window} evaluations" in forecast.reason


def test_the_level_aimed_at_is_where_the_detectors_rule_holds():
    from lightning_memwatch.onset import detector_level

    assert detector_level("threshold", 0.03, 512) == 0.03
    level = detector_level("ci", 0.0, 1000)  # the default rule: the 95% interval's lower end leaves 0
    assert 3 / 1000 < level < 4 / 1000  # the fourth copy of 1000 samples


def test_the_default_window_is_the_last_doubling_of_training_time():
    """A fall, then a pause of 400 steps (as the demo's n = 256, seed 1 paused before its onset): the last five
    evaluations (every 100 steps) see only the pause and forecast nothing; the last doubling of training
    time, steps (1000, 2000], holds the fall too, and its forecast holds the step the fall would resume to."""

    def record(step: int) -> dict:
        ratio = 0.95 - 2.5e-4 * min(step, 1600)  # 0.55 from step 1600 on
        return {"step": step, "f_mem": 0.0, "ratio_q05": ratio, "ratio_q25": ratio + 0.08, "num_samples": 1000}

    history = [record(step) for step in range(0, 2001, 100)]
    assert forecast_onset(history, window=5).step is None  # the pause only: "does not fall"
    forecast = forecast_onset(history)
    assert "over 10 evaluations" in forecast.reason  # steps 1100 to 2000
    resumed = 2000 + (lowest_ratio(record(2000)) - 1 / 3) / 2.5e-4  # the onset if the fall resumed at 2000
    assert forecast.low <= resumed <= forecast.high and abs(forecast.step - resumed) <= 0.25 * resumed
    sparse = [record(step) for step in range(0, 2001, 500)]  # every 500: (1000, 2000] holds 2, so the last 3
    assert "over 3 evaluations" in forecast_onset(sparse).reason
