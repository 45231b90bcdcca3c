"""`memwatch demo --quick` end to end (logs, summary.json, plots), plus the demo's small pieces."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightning_memwatch import log as mwlog
from lightning_memwatch.apps.demo import (
    CLASSIFIER_FILENAME,
    QUICK_OUT,
    DemoConfig,
    DigitFeatureNet,
    build_parser,
    classifier_accuracy,
    classifier_frechet_distance,
    config_from_args,
    ema_warmup_decay,
    main,
    train_digit_classifier,
)
from lightning_memwatch.apps.report import PLOT_NAMES, RUN_METADATA, read_event_records

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["--quick", "--out", str(out)])
    return out, code, buffer.getvalue()


@pytest.mark.slow
def test_quick_demo_flags_memorization_in_the_order_of_n(quick_run):
    out, _, printed = quick_run
    config = DemoConfig.quick()
    summary = json.loads((out / "summary.json").read_text())
    flagged = {r["n"]: r["tau_mem"] for r in summary["runs"] if r["tau_mem"] is not None}
    assert len(flagged) >= 2, summary["runs"]
    taus = [flagged[n] for n in sorted(flagged)]
    assert taus == sorted(taus) and taus[0] < taus[-1], flagged  # smaller training sets are copied sooner
    for run in summary["demo"]["runs"]:
        if run["n"] in flagged:  # early stopping ended the run a few evaluations after its tau_mem
            assert run["stopped_early"] and run["steps"] < config.max_steps(run["n"])
            assert run["steps"] == flagged[run["n"]] + (config.mem_patience - 1) * config.eval_period(run["n"])
    for n in flagged:
        records = read_event_records([out / "logs" / config.run_name(n)])
        assert records[0]["f_mem"] == 0.0 and records[-1]["f_mem"] > config.mem_threshold
    assert set(summary["fit"]) >= {"slope", "intercept", "r2", "exponent"} and summary["fit"]["slope"] > 0
    assert "repeated to 256 noisy copies per step" in printed  # the header (the runs print from their workers)


@pytest.mark.slow
def test_quick_demo_writes_summary_plots_and_logs(quick_run):
    out, code, printed = quick_run
    assert code == 0
    config = DemoConfig.quick()
    summary = json.loads((out / "summary.json").read_text())
    assert [r["n"] for r in summary["runs"]] == list(config.ns)
    for run in summary["runs"]:
        for key in ("tau_gen", "tau_mem"):
            assert run[key] is None or (isinstance(run[key], int) and run[key] >= 0)
        assert 0.0 <= run["final_f_mem"] <= 1.0
        assert math.isfinite(run["best_fid"]) and run["best_fid"] >= 0
        assert run["detector"]["mem_rule"] == "threshold" and run["detector"]["f0"] == config.mem_threshold
    # the offline flags of the report equal the ones MemWatch raised during training
    online = {r["n"]: (r["tau_gen_online"], r["tau_mem_online"]) for r in summary["demo"]["runs"]}
    assert {r["n"]: (r["tau_gen"], r["tau_mem"]) for r in summary["runs"]} == online
    for name in PLOT_NAMES:
        data = (out / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    assert "tau_gen" in printed and "tensorboard --logdir" in printed and "memwatch report:" in printed


@pytest.mark.slow
def test_quick_demo_tensorboard_logs_hold_every_evaluation(quick_run):
    out, _, _ = quick_run
    config = DemoConfig.quick()
    for n in config.ns:
        run_dir = out / "logs" / config.run_name(n)
        meta = json.loads((run_dir / RUN_METADATA).read_text())
        assert meta["n"] == n and meta["detector"]["floor"] == config.gen_threshold
        assert meta["result"]["steps"] == config.max_steps(n) or meta["result"]["stopped_early"]
        records = read_event_records([run_dir])
        steps = [r["step"] for r in records]
        period = config.eval_period(n)
        assert steps == list(range(0, meta["result"]["steps"] + 1, period))
        assert all(0.0 <= r["f_mem"] <= 1.0 and r["fid"] is not None and r["fid"] > 0 for r in records)
        assert all(r["f_mem_ci_low"] <= r["f_mem"] <= r["f_mem_ci_high"] for r in records)
        assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "logs" / config.run_name(config.ns[0])), size_guidance={"images": 0})
    acc.Reload()
    assert mwlog.SAMPLES_IMAGE in acc.Tags()["images"]
    net = DigitFeatureNet()
    net.load_state_dict(torch.load(out / CLASSIFIER_FILENAME, weights_only=True))


@pytest.mark.slow
def test_quick_demo_prints_the_patience_that_runs(quick_run):
    """The header shows the detector each run builds; its patience is the one the runs' flags and metadata hold,
    and the stopper is built without the deprecated patience=."""
    import re

    out, _, printed = quick_run
    config = DemoConfig.quick()
    header = re.search(r"detector = TimescaleDetector\((.*)\)", printed)
    assert header is not None, printed[:2000]
    printed_patience = int(re.search(r"patience=(\d+)", header.group(1)).group(1))
    assert "MemorizationEarlyStopping(watch, restore_best=True)" in printed and "patience=" not in printed.split(
        "MemorizationEarlyStopping(", 1
    )[1].split(")", 1)[0]
    for n in config.ns:
        meta = json.loads((out / "logs" / config.run_name(n) / RUN_METADATA).read_text())
        assert meta["detector"]["patience"] == printed_patience == config.mem_patience
    # the runs' own lines (flags, outcome) are printed by the worker processes, outside this capture


def test_run_outcome_lines_say_in_words_what_happened():
    from types import SimpleNamespace as NS

    from lightning_memwatch.apps.demo import stopper_line, tau_gen_line

    tau_mem = NS(step=150, reason="f_mem > f0")
    detector = NS(tau_gen=None, tau_mem=tau_mem)
    history = [{"step": 0, "fid": 800.0}, {"step": 25, "fid": 208.2}, {"step": 50, "fid": None}]
    line = tau_gen_line(detector, history, 50.0)
    assert line.startswith("tau_gen: not flagged (the Frechet distance never fell to 50; its best was 208.2 at step 25")
    assert "copied training digits before its samples were good" in line
    stopper = NS(stopped_step=200, restored_step=125, best_score=268.24, best_f_mem=0.0196)
    assert stopper_line(stopper, detector, 200, 620) == (
        "stopped at step 200 (tau_mem = step 150, flagged at step 200); restored the weights of step 125, "
        "Frechet distance 268.2, f_mem 0.020: the best evaluation before the onset"
    )
    idle = NS(stopped_step=None, restored_step=None, best_score=None, best_f_mem=None)
    assert stopper_line(idle, NS(tau_gen=None, tau_mem=None), 620, 620).startswith("not stopped: tau_mem was not")


def test_demo_refuses_an_output_folder_that_holds_runs(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "logs" / "n64").mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "already holds logs, summary.json" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["logs", "summary.json"]  # nothing touched
    (out / "notes.txt").write_text("mine")  # --overwrite replaces only the demo's own outputs
    with pytest.raises(SystemExit):
        main(["--quick", "--out", str(out), "--overwrite"])
    assert "notes.txt" in capsys.readouterr().err and (out / "logs" / "n64").is_dir()


def test_quick_demo_has_its_own_default_folder():
    assert config_from_args(build_parser().parse_args(["--quick"])).out == QUICK_OUT
    assert config_from_args(build_parser().parse_args([])).out == DemoConfig().out != QUICK_OUT
    assert DemoConfig.quick().run_name(8) == "n08" and DemoConfig().run_name(512) == "n512"


def test_digit_classifier_features_separate_digits_from_noise():
    from lightning_memwatch.apps.data import DigitsDataModule

    data = DigitsDataModule(n=256, num_heldout=1285)
    data.setup("fit")
    net = train_digit_classifier(data.heldout_images(), data.heldout_labels(), epochs=150, seed=1)
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    assert classifier_accuracy(net, data.train_images(), data.train_labels()) > 0.9  # unseen digits
    assert net(data.train_images()).shape == (256, DigitFeatureNet.num_features)
    real = classifier_frechet_distance(net, data.train_images(), data.heldout_images())
    noise = torch.rand(256, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert real * 10 < classifier_frechet_distance(net, noise, data.heldout_images())


def test_ema_warmup_decay():
    assert ema_warmup_decay(0, 0.999) == pytest.approx(0.1)
    assert ema_warmup_decay(90, 0.999) == pytest.approx(0.91)
    assert ema_warmup_decay(100_000, 0.999) == 0.999
    assert all(ema_warmup_decay(t, 0.999) <= ema_warmup_decay(t + 1, 0.999) for t in range(0, 20_000, 7))


def test_config_from_command_line():
    config = config_from_args(build_parser().parse_args(["--n", "32", "64", "--ema", "0", "--out", "x"]))
    assert config.ns == (32, 64) and config.ema_decay is None and str(config.out) == "x"
    assert config.num_samples == DemoConfig().num_samples
    quick = config_from_args(build_parser().parse_args(["--quick", "--mem-threshold", "0.1"]))
    assert quick.mem_threshold == 0.1 and quick.ns == DemoConfig.quick().ns
    assert DemoConfig().eval_period(256) == 128 and DemoConfig().eval_period(64) == 100


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ns": (64, 64)}, "distinct"),
        ({"ns": (1300,)}, "non-held-out"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"workers": 0}, "workers"),
        ({"mem_threshold": 1.5}, "mem_threshold"),
    ],
)
def test_bad_settings_name_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DemoConfig(**kwargs)


def test_in_process_run_leaves_warning_filters_and_loggers_alone(tmp_path):
    import logging
    import warnings

    from lightning_memwatch.apps.demo import run_demo

    filters_before = list(warnings.filters)
    level_before = logging.getLogger("lightning.pytorch").level
    config = DemoConfig.quick(
        out=tmp_path / "one", ns=(8, 16), workers=1, max_steps_per_image=0, max_steps_extra=50, plots=False
    )
    lines: list[str] = []
    summary = run_demo(config, echo=lines.append)
    assert [r["n"] for r in summary["runs"]] == [8, 16] and summary["plots"] == []
    assert [r["steps"] for r in summary["demo"]["runs"]] == [50, 50]
    assert any("memwatch report: 2 run(s)" in line for line in lines)
    assert warnings.filters == filters_before
    assert logging.getLogger("lightning.pytorch").level == level_before


def test_ordinals_in_the_printed_settings():
    from lightning_memwatch.apps.demo import ordinal

    assert [ordinal(k) for k in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 101, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "101st", "111th"
    ]


def test_conditional_demo_reports_per_class_onsets_and_the_copied_digits(tmp_path):
    from lightning_memwatch.apps.demo import run_demo

    config = DemoConfig.quick(
        out=tmp_path / "c", ns=(8,), workers=1, max_steps_per_image=0, max_steps_extra=100, plots=False,
        conditional=True,
    )  # fmt: skip
    assert config_from_args(build_parser().parse_args(["--quick", "--conditional"])).conditional
    lines: list[str] = []
    summary = run_demo(config, echo=lines.append)
    run = summary["demo"]["runs"][0]
    assert run["class_sizes"] and sum(run["class_sizes"].values()) == 8
    copied = run["copied_training_images"]
    assert copied and all(row["label"] in run["class_sizes"] for row in copied)
    assert [row["times_copied"] for row in copied] == sorted((row["times_copied"] for row in copied), reverse=True)
    assert (tmp_path / "c" / "logs" / "n8" / "memwatch_copied_training_images.csv").exists()
