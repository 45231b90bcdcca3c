import dataclasses

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from toys import ToyDiffusion, toy_images, toy_loader

from lightning_memwatch import EvalSchedule, MemWatch, TimescaleDetector
from lightning_memwatch.adaptive import AdaptiveSchedule
from lightning_memwatch.metrics.loss_gap import LossGapReading

GRID = 100
TAU = 1800  # the dense schedule's tau_mem on the scripted history
# A scripted history: the dense run of `memwatch demo` at n = 64 (benchmarks/adaptive_demo.py), f_mem every
# 100 steps and the probe's held-out / training losses every 267 steps (its default period there).
F_MEM = {
    0: 0.0, 100: 0.0, 200: 0.0, 300: 0.0, 400: 0.0, 500: 0.0, 600: 0.0, 700: 0.0, 800: 0.0, 900: 0.00195,
    1000: 0.00586, 1100: 0.00977, 1200: 0.00977, 1300: 0.01562, 1400: 0.01172, 1500: 0.01562, 1600: 0.01953,
    1700: 0.02539, 1800: 0.04492, 1900: 0.03516, 2000: 0.04102,
}  # fmt: skip
HELDOUT = {
    0: 1.35443, 267: 0.16471, 534: 0.16331, 801: 0.16722, 1068: 0.17271, 1335: 0.17927, 1602: 0.18319,
    1869: 0.18576,
}  # fmt: skip
TRAIN = {
    0: 1.3474, 267: 0.12253, 534: 0.09064, 801: 0.07162, 1068: 0.06242, 1335: 0.05525, 1602: 0.0503,
    1869: 0.04636,
}  # fmt: skip
PROBE_EVERY = 267


def f_mem_at(step: int) -> float:
    return F_MEM[step]


def reading(step: int) -> LossGapReading:
    held, train = HELDOUT[step], TRAIN[step]
    return LossGapReading(step, loss_train=train, loss_heldout=held, gap=(held - train) / held, band_gaps=())


def scripted(
    schedule: AdaptiveSchedule, *, until: int = 2000, probe_every: int | None = PROBE_EVERY, probe_first=False
):
    """Drive ``schedule`` as MemWatch and a probe would; returns the evaluated steps."""
    evaluated = []
    for step in range(until + 1):
        probe_now = probe_every is not None and step % probe_every == 0
        if probe_now and probe_first:
            schedule.observe_probe(reading(step))
        if step in schedule:
            schedule.observe({"step": step, "f_mem": f_mem_at(step)})
            evaluated.append(step)
        if probe_now and not probe_first:
            schedule.observe_probe(reading(step))
    return evaluated


def dense_tau_mem(until: int = 2000) -> int:
    detector = TimescaleDetector(mem_rule="threshold", f0=0.03, patience=1)
    for step in range(0, until + 1, GRID):
        detector.update({"step": step, "f_mem": f_mem_at(step)})
    return detector.tau_mem.step


def make(**kwargs) -> AdaptiveSchedule:
    return AdaptiveSchedule(**{"min_every": GRID, "max_every": 16 * GRID, **kwargs})


def test_scripted_history_evaluates_at_the_dense_tau_mem_with_few_evaluations():
    assert dense_tau_mem() == TAU
    evaluated = scripted(make())
    assert all(s % GRID == 0 for s in evaluated)  # a subset of the dense grid
    assert TAU in evaluated
    assert [s for s in evaluated if f_mem_at(s) > 0.03][0] == TAU
    dense_to_tau = TAU // GRID + 1
    assert len([s for s in evaluated if s <= TAU]) <= 0.4 * dense_to_tau
    # x4 while flat; the held-out loss 2% up at the reading of step 801 brings 1600 forward to 900, where
    # f_mem leaves zero; then a quarter of the way to the extrapolated crossing; every 100 steps above 3%
    assert evaluated == [0, 100, 400, 900, 1200, 1500, 1800, 1900, 2000]


def test_reasons_say_why_each_evaluation_happened():
    s = make()
    evaluated = scripted(s)
    rules = [d.rule for d in s.evaluations]
    assert len(rules) == len(evaluated) and rules[0] == "start"
    assert {"flat", "probe", "f_mem", "above"} <= set(rules)
    assert "f_mem" in s.reason_for(TAU) and "left zero" in s.reason_for(TAU)
    assert s.reason_for(TAU + 1) is None
    probe_pulled = [d for d in s.decisions if d.rule == "probe" and d.f_mem is None]
    assert probe_pulled and probe_pulled[0].at_step == 801  # the reading that brought an evaluation forward
    assert probe_pulled[0].next_step == 900


def test_deterministic_and_independent_of_hook_order():
    a, b, c = make(), make(), make()
    first = scripted(a)
    assert scripted(b) == first and b.decisions == a.decisions
    assert scripted(c, probe_first=True) == first  # probe before or after MemWatch in the same step


def test_without_probe_the_flat_phase_runs_on():
    evaluated = scripted(make(), probe_every=None)
    assert evaluated[:4] == [0, 100, 400, 1600]  # nothing pulls the next evaluation forward from 400 x 4


def test_resumable_mid_run():
    full = make()
    expected = scripted(full)
    first = make()
    evaluated = []
    for step in range(1001):
        if step in first:
            first.observe({"step": step, "f_mem": f_mem_at(step)})
            evaluated.append(step)
        if step % PROBE_EVERY == 0:
            first.observe_probe(reading(step))
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    for step in range(1001, 2001):
        if step in resumed:
            resumed.observe({"step": step, "f_mem": f_mem_at(step)})
            evaluated.append(step)
        if step % PROBE_EVERY == 0:
            resumed.observe_probe(reading(step))
    assert evaluated == expected and resumed.decisions == full.decisions


def test_resume_past_the_planned_step_moves_on():
    s = make()
    s.observe({"step": 0, "f_mem": 0.0})
    assert s.next_step == 100
    assert s.between(0, 250) == [100]  # what MemWatch warns about at resume
    assert s.next_step == 300 and s.decisions[-1].rule == "resume"
    assert 300 in s and 250 not in s


def test_stop_and_bounds():
    s = make(stop=350, max_every=200)
    for step in (0, 100, 300):
        assert step in s
        s.observe({"step": step, "f_mem": 0.0})
    assert s.next_step is None and 400 not in s and s.next_after(300) is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"min_every": 0, "max_every": 10}, "min_every"),
        ({"min_every": 100, "max_every": 50}, "max_every"),
        ({"min_every": 100, "max_every": 500, "growth": 1.0}, "growth"),
        ({"min_every": 100, "max_every": 500, "watch_growth": 5.0}, "growth"),
        ({"min_every": 100, "max_every": 500, "signal": "loss"}, "signal"),
        ({"min_every": 100, "max_every": 500, "start": 150}, "multiple"),
        ({"min_every": 100, "max_every": 500, "safety": 0.0}, "safety"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveSchedule(**kwargs)


def test_loading_another_schedules_state_is_refused():
    state = make().state_dict()
    with pytest.raises(ValueError, match="settings differ"):
        make(growth=3.0).load_state_dict(state)


def test_memwatch_with_an_adaptive_schedule_and_its_resume(tmp_path):
    from lightning.pytorch import Trainer

    train = toy_images(64)

    def trainer(path, callbacks, max_steps):
        return Trainer(
            max_steps=max_steps,
            callbacks=callbacks,
            logger=False,
            accelerator="cpu",
            devices=1,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(path),
            enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        )

    def watch():
        schedule = AdaptiveSchedule(min_every=2, max_every=8, f_mem_target=0.5)
        return MemWatch(num_samples=16, sample_batch_size=8, schedule=schedule, bootstrap=50, verbose=False)

    full = watch()
    trainer(tmp_path / "a", [full], 30).fit(ToyDiffusion(train, memorize_from=20), toy_loader(train))
    steps = [r["step"] for r in full.history]
    assert steps == [0, 2, 8, 16, 24, 26, 28, 30]  # x4 while f_mem = 0, every 2 steps once it is 1
    assert isinstance(full.schedule, EvalSchedule)
    assert [d.rule for d in full.schedule.evaluations][:2] == ["start", "flat"]

    first = watch()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1)
    trainer(tmp_path / "b", [first, ckpt], 10).fit(ToyDiffusion(train, memorize_from=20), toy_loader(train))
    path = next((tmp_path / "ckpt").glob("*step=10*.ckpt"))
    resumed = watch()
    trainer(tmp_path / "c", [resumed, ModelCheckpoint(dirpath=tmp_path / "c2")], 30).fit(
        ToyDiffusion(train, memorize_from=20), toy_loader(train), ckpt_path=str(path)
    )
    assert [r["step"] for r in resumed.history] == steps
    assert [dataclasses.asdict(d) for d in resumed.schedule.decisions] == [
        dataclasses.asdict(d) for d in full.schedule.decisions
    ]
