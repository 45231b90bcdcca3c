import dataclasses

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from toys import ToyDiffusion, toy_images, toy_loader

from lightning_memwatch import EvalSchedule, MemWatch, TimescaleDetector
from lightning_memwatch.adaptive import AdaptiveSchedule
from lightning_memwatch.metrics.loss_gap import LossGapReading

GRID = 100
TAU = 2800  # the dense schedule's tau_mem on the scripted history


def f_mem_at(step: int) -> float:
    """A scripted run: f_mem = 0 until step 1800, then growing (past 3% from step 2800 on)."""
    return 0.0 if step < 1800 else 0.031 * ((step - 1700) / 1100) ** 2


def heldout_loss_at(step: int) -> float:
    """Held-out loss: falls to its lowest value at step 500, then rises (2% above it from step 800 on)."""
    return 0.15 + (0.0 if step <= 500 else 0.0001 * (step - 500) / 15)


def reading(step: int) -> LossGapReading:
    held = heldout_loss_at(step)
    return LossGapReading(step, loss_train=0.05, loss_heldout=held, gap=(held - 0.05) / held, band_gaps=())


def scripted(schedule: AdaptiveSchedule, *, until: int = 4000, probe_every: int | None = 134, probe_first=False):
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


def dense_tau_mem(until: int = 4000) -> int:
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
    # sparse first, denser once the held-out loss rises (step 800), after f_mem leaves zero, every step above
    assert evaluated[:3] == [0, 100, 400]
    above = [s for s in evaluated if s > TAU]
    assert above[:2] == [TAU + GRID, TAU + 2 * GRID]


def test_reasons_say_why_each_evaluation_happened():
    s = make()
    evaluated = scripted(s)
    rules = [d.rule for d in s.evaluations]
    assert len(rules) == len(evaluated) and rules[0] == "start"
    assert {"flat", "probe", "f_mem", "above"} <= set(rules)
    assert "f_mem" in s.reason_for(TAU) and "left zero" in s.reason_for(TAU)
    assert s.reason_for(TAU + 1) is None
    probe_pulled = [d for d in s.decisions if d.rule == "probe" and d.f_mem is None]
    assert probe_pulled and probe_pulled[0].at_step == 804  # the reading that brought an evaluation forward


def test_deterministic_and_independent_of_hook_order():
    a, b, c = make(), make(), make()
    first = scripted(a)
    assert scripted(b) == first and b.decisions == a.decisions
    assert scripted(c, probe_first=True) == first  # probe before or after MemWatch in the same step


def test_without_probe_the_flat_phase_runs_on():
    evaluated = scripted(make(), probe_every=None)
    assert evaluated[:4] == [0, 100, 400, 1600]
    assert 2000 not in evaluated  # nothing pulls the next evaluation forward from 1600 + 1600
    assert evaluated[4] == 3200


def test_resumable_mid_run():
    full = make()
    expected = scripted(full)
    first = make()
    evaluated = []
    for step in range(1701):
        if step in first:
            first.observe({"step": step, "f_mem": f_mem_at(step)})
            evaluated.append(step)
        if step % 134 == 0:
            first.observe_probe(reading(step))
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    for step in range(1701, 4001):
        if step in resumed:
            resumed.observe({"step": step, "f_mem": f_mem_at(step)})
            evaluated.append(step)
        if step % 134 == 0:
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
