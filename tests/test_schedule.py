import pytest

from lightning_memwatch.schedule import EvalSchedule, paper_grid


def test_paper_grid_matches_authors_code():
    grid = paper_grid()
    assert len(grid) == 81
    assert grid[:10] == [0, 250, 500, 750, 1250, 1750, 2750, 4250, 6500, 10000]
    assert grid[-9:] == [1290000, 1665000, 2150000, 2780000, 3590000, 4640000, 5990000, 7740000, 10000000]
    assert all(s % 250 == 0 for s in grid) and all(s % 5000 == 0 for s in grid if s >= 10000)
    assert sum(s <= 2_000_000 for s in grid) == 74


def test_every_membership_and_next():
    s = EvalSchedule.every(500)
    assert 0 not in s and 500 in s and 1000 in s and 750 not in s
    assert s.next_after(0) == 500 and s.next_after(500) == 1000 and s.next_after(501) == 1000
    assert 0 in EvalSchedule.every(500, include_zero=True)
    stopped = EvalSchedule.every(10, stop=30)
    assert 30 in stopped and 40 not in stopped and stopped.next_after(30) is None


def test_auto_is_memwatchs_default_and_dense_at_the_start():
    """Every 100 steps to 1,000, every 250 to 2,000, every 500 after: from step 400 on each evaluation comes at
    most a quarter of the training time after the one before (what the onset forecast's trend needs)."""
    from lightning_memwatch import MemWatch

    s = EvalSchedule.auto()
    steps = s.between(0, 10_001)
    assert steps[:10] == list(range(100, 1001, 100))
    assert steps[10:14] == [1250, 1500, 1750, 2000]
    assert steps[14:] == list(range(2500, 10_001, 500))
    assert 0 not in s and 2100 not in s and s.next_after(2000) == 2500 and s.next_after(1000) == 1250
    assert all(b - a <= 0.25 * a for a, b in zip(steps, steps[1:]) if a >= 400)
    assert repr(MemWatch().schedule) == "EvalSchedule.auto()"
    with_zero = EvalSchedule.auto(include_zero=True)
    assert 0 in with_zero and with_zero.between(-1, 3000) == [0, *steps[:15]]


def test_explicit_and_between():
    s = EvalSchedule.at([30, 10, 20, 10])
    assert s.steps == (10, 20, 30)
    assert s.between(10, 30) == [20]
    assert s.next_after(30) is None
    assert EvalSchedule.every(5).between(0, 21) == [5, 10, 15, 20]


def test_log_spaced_rounds_and_dedupes():
    s = EvalSchedule.log_spaced(1000, 1_000_000, per_decade=4, multiple=50)
    steps = s.steps
    assert steps[0] == 0 and steps[1] == 1000 and steps[-1] == 1_000_000
    assert all(x % 50 == 0 for x in steps)
    assert list(steps) == sorted(set(steps))
    ratios = [b / a for a, b in zip(steps[1:], steps[2:])]
    assert all(1.7 < r < 1.85 for r in ratios)  # 10 ** (1/4) ~ 1.78 per step


@pytest.mark.parametrize(
    "spec, expected",
    [(250, "every"), ("paper", "paper"), ([5, 7], "at"), ("auto", "auto")],
)
def test_coerce(spec, expected):
    s = EvalSchedule.coerce(spec)
    if expected == "every":
        assert 250 in s and 500 in s
    elif expected == "paper":
        assert len(s.steps) == 81
    elif expected == "auto":
        assert repr(s) == "EvalSchedule.auto()" and 1250 in s and 2250 not in s
    else:
        assert s.steps == (5, 7)


@pytest.mark.parametrize(
    "kwargs, message",
    [({}, "Empty EvalSchedule"), ({"every_n_train_steps": 0}, "positive"), ({"steps": [-1]}, ">= 0")],
)
def test_bad_schedules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalSchedule(**kwargs)
    with pytest.raises(ValueError, match="named schedules are 'auto' and 'paper'"):
        EvalSchedule.coerce("weekly")


def test_numpy_torch_and_integral_float_steps_are_accepted():
    np = pytest.importorskip("numpy")
    import torch

    assert EvalSchedule.at([np.int64(10), torch.tensor(20), 30.0]).steps == (10, 20, 30)
    assert EvalSchedule.every(np.int32(5)).next_after(0) == 5
    assert EvalSchedule.coerce(4.0).next_after(0) == 4  # was "'float' object is not iterable"
    assert EvalSchedule.coerce(np.int64(4)).next_after(4) == 8
    assert EvalSchedule.coerce(torch.tensor(4)).next_after(0) == 4
    assert EvalSchedule.coerce(np.array([3, 6])).steps == (3, 6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: EvalSchedule.at([4.5]),  # was silently truncated to step 4
        lambda: EvalSchedule.coerce([10, 4.5]),
        lambda: EvalSchedule.coerce(4.5),
        lambda: EvalSchedule.every(2.5),
    ],
)
def test_non_integral_steps_are_refused_not_truncated(make):
    with pytest.raises(ValueError, match="non-integral number 4.5|non-integral number 2.5"):
        make()


def test_wrong_types_name_the_accepted_forms():
    with pytest.raises(TypeError, match="an int \\(every N optimizer steps\\), 'paper' or a list of steps"):
        EvalSchedule.coerce(True)
    with pytest.raises(TypeError, match="an int \\(every N optimizer steps\\), 'paper' or a list of steps"):
        EvalSchedule.coerce(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="list of optimizer steps"):
        EvalSchedule.at(10)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="EvalSchedule steps must be an int"):
        EvalSchedule.at(["10"])  # type: ignore[list-item]


def test_every_schedule_has_the_contract_memwatch_calls():
    """MemWatch calls observe / state_dict / load_state_dict on any schedule: a fixed one does nothing."""
    schedule = EvalSchedule.every(5)
    before = (schedule.steps, schedule.next_after(7))
    assert schedule.observe({"step": 5, "f_mem": 0.5}) is None
    assert schedule.state_dict() == {}
    schedule.load_state_dict({})
    assert (schedule.steps, schedule.next_after(7)) == before == ((), 10)
