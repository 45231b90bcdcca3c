"""`memwatch report` on recorded histories: synthetic TensorBoard logs with known scalars and known answers."""

from __future__ import annotations

import json
import math

import pytest
from torch.utils.tensorboard import SummaryWriter

from lightning_memwatch import log as mwlog
from lightning_memwatch.apps.report import (
    PLOT_NAMES,
    RUN_METADATA,
    find_runs,
    format_table,
    load_run,
    main,
    read_event_records,
    report,
    write_run_metadata,
)
from lightning_memwatch.detection import detect_timescales

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DETECTOR = {"quality_key": "fid", "gen_rule": "floor", "floor": 20.0, "eps": 0.0, "mem_rule": "threshold", "f0": 0.03}
EVERY = 100


def planted_history(n: int, tau_gen: int, tau_mem: int, last: int) -> list[dict]:
    """Records every EVERY steps: quality falls from 300 and reaches 19 exactly at tau_gen; f_mem is 0 (with a
    sub-threshold blip of 0.02) before tau_mem and rises linearly from 0.05 at tau_mem."""
    records = []
    for step in range(0, last + 1, EVERY):
        if step < tau_gen:
            fid = 300.0 - (300.0 - 25.0) * step / tau_gen  # stays above 25 until tau_gen
        else:
            fid = 19.0 - 0.001 * (step - tau_gen)
        if step < tau_mem:
            f_mem = 0.02 if step == tau_mem - 2 * EVERY else 0.0
        else:
            f_mem = 0.05 + 0.01 * (step - tau_mem) / EVERY
        records.append({
            "step": step, "f_mem": f_mem, "f_mem_ci_low": max(0.0, f_mem - 0.01), "f_mem_ci_high": f_mem + 0.01,
            "ratio_median": 0.8 - f_mem, "fid": fid, "fid_num_samples": 512, "sharpness": float(step) / 7,
        })
    return records


def write_run(run_dir, records, *, n=None, metadata=True):
    """Write MemWatch's scalars for `records` to a TensorBoard event file under run_dir/tb (+ the metadata)."""
    writer = SummaryWriter(log_dir=str(run_dir / "tb"))
    for record in records:
        step = record["step"]
        for field, key in mwlog.SCALAR_KEYS.items():
            if record.get(field) is not None:
                writer.add_scalar(key, record[field], global_step=step)
        writer.add_scalar(f"{mwlog.PREFIX}sharpness", record["sharpness"], global_step=step)
        writer.add_scalar("train/loss", 0.1, global_step=step)  # not a memwatch key: ignored
    writer.add_scalar(mwlog.TAU_MEM, 1234.0, global_step=1234)  # the online flag's scalar is not a record
    writer.close()
    if metadata:
        write_run_metadata(run_dir, n=n, label=f"toy n={n}", quality_label="toy distance", detector=DETECTOR)


PLANTED = {100: (500, 1000), 200: (500, 2000), 400: (600, 4000)}  # n -> (tau_gen, tau_mem): slope 10, exponent 1


@pytest.fixture
def logdir(tmp_path):
    root = tmp_path / "sweep"
    for n, (tau_gen, tau_mem) in PLANTED.items():
        write_run(root / f"n{n}", planted_history(n, tau_gen, tau_mem, tau_mem + 3 * EVERY), n=n)
    return root


def test_records_are_rebuilt_from_event_files(logdir):
    records = read_event_records([logdir / "n100" / "tb"])
    expected = planted_history(100, 500, 1000, 1300)
    assert [r["step"] for r in records] == [r["step"] for r in expected]
    for got, want in zip(records, expected, strict=True):
        for key in ("f_mem", "f_mem_ci_low", "f_mem_ci_high", "ratio_median", "fid", "sharpness"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), key
        assert got["fid_num_samples"] == 512 and isinstance(got["fid_num_samples"], int)
        assert "tau_mem" not in got and "loss" not in got


def test_report_reproduces_planted_timescales_and_fit(logdir, capsys):
    summary = report(logdir)
    runs = summary["runs"]
    assert [r["n"] for r in runs] == [100, 200, 400]
    assert [(r["tau_gen"], r["tau_mem"]) for r in runs] == [PLANTED[n] for n in (100, 200, 400)]
    for run in runs:
        last = PLANTED[run["n"]][1] + 3 * EVERY
        assert run["final_step"] == last and run["num_evaluations"] == last // EVERY + 1
        assert run["final_f_mem"] == pytest.approx(0.08)
        assert run["best_fid"] == pytest.approx(19.0 - 0.001 * (last - PLANTED[run["n"]][0]), rel=1e-6)
        assert run["best_fid_step"] == last
        assert run["tau_gen_rule"] == "floor" and run["tau_mem_rule"] == "threshold"
        assert run["detector"]["f0"] == 0.03
    fit = summary["fit"]
    assert fit["slope"] == pytest.approx(10.0)
    assert fit["r2"] == pytest.approx(1.0)
    assert fit["exponent"] == pytest.approx(1.0)
    assert fit["intercept"] == pytest.approx(0.0, abs=1e-6)
    assert fit["affine"] == pytest.approx({"slope": 10.0, "intercept": 0.0, "r2": 1.0}, abs=1e-6)
    assert summary["forecast"]["n"] == [800, 1600, 3200]
    assert summary["forecast"]["tau_mem"] == pytest.approx([8000.0, 16000.0, 32000.0])

    on_disk = json.loads((logdir / "summary.json").read_text())
    assert on_disk["runs"] == runs and on_disk["fit"] == fit
    for name in PLOT_NAMES:
        data = (logdir / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    printed = capsys.readouterr().out
    assert "tau_mem = 10 * n" in printed and "log-log exponent 1.000" in printed
    assert any(line.split()[:3] == ["200", "500", "2000"] for line in printed.splitlines())


def test_offline_flags_equal_detector_on_the_same_history(logdir):
    run = load_run(logdir / "n200")
    tau_gen, tau_mem = detect_timescales(planted_history(200, 500, 2000, 2300), **DETECTOR)
    entry = report(logdir, plots=False, write=False, echo=None)["runs"][1]
    assert (entry["tau_gen"], entry["tau_mem"]) == (tau_gen.step, tau_mem.step)
    assert run.n == 200 and run.label == "toy n=200" and run.quality_label == "toy distance"


def test_detector_override_changes_the_answer(logdir):
    # f0 = 0.065: f_mem = 0.05 + 0.01 k first exceeds it two evaluations after the planted tau_mem
    summary = report(logdir, detector={"f0": 0.065}, plots=False, write=False, echo=None)
    assert [r["tau_mem"] for r in summary["runs"]] == [1200, 2200, 4200]
    # the library default (CI lower bound > 0) fires at the first evaluation with f_mem_ci_low > 0: the blip
    summary = report(logdir, detector={"mem_rule": "ci", "f0": 0.0}, plots=False, write=False, echo=None)
    assert [r["tau_mem"] for r in summary["runs"]] == [800, 1800, 3800]
    assert not (logdir / "summary.json").exists()


def test_affine_fit_of_a_law_with_an_offset(tmp_path):
    root = tmp_path / "logs"
    for n in (100, 200, 400):  # tau_mem = 1000 + 5 n: linear with an offset, sublinear on log-log
        write_run(root / f"n{n}", planted_history(n, 500, 1000 + 5 * n, 1000 + 5 * n + EVERY), n=n)
    fit = report(root, plots=False, write=False, echo=None)["fit"]
    assert fit["affine"] == pytest.approx({"slope": 5.0, "intercept": 1000.0, "r2": 1.0})
    assert fit["intercept"] == 0.0  # "fit" is the law through the origin; the offset lives in "affine"
    assert fit["exponent"] == pytest.approx(math.log(3000 / 1500) / math.log(4), rel=0.05)
    assert fit["r2"] < 0.95  # the law through the origin fits worse


def test_never_memorizing_runs_give_null_taus_and_no_fit(tmp_path):
    root = tmp_path / "logs"
    write_run(root / "a", planted_history(64, 500, 10_000, 1500), n=64)
    write_run(root / "b", planted_history(128, 500, 1000, 1500), n=128)
    summary = report(root, echo=None)
    assert [r["tau_mem"] for r in summary["runs"]] == [None, 1000]
    assert summary["fit"] == {"slope": None, "intercept": None, "r2": None, "exponent": None}
    assert summary["forecast"] is None
    saved = json.loads((root / "summary.json").read_text())
    assert saved["runs"][0]["tau_mem"] is None and saved["fit"]["slope"] is None
    assert all((root / "plots" / name).is_file() for name in PLOT_NAMES)
    assert "needs tau_mem at two or more distinct n" in format_table(summary)


def test_run_without_metadata_is_reported_but_left_out_of_the_fit(tmp_path):
    root = tmp_path / "logs"
    write_run(root / "plain", planted_history(0, 500, 1000, 1200), metadata=False)
    assert find_runs(root) == [root / "plain" / "tb"]
    with pytest.warns(UserWarning, match="write_run_metadata"):
        summary = report(root, plots=False, echo=None)
    assert summary["runs"][0]["n"] is None
    assert summary["runs"][0]["tau_mem"] == 800  # library defaults (no detector in metadata): CI rule, the blip
    assert summary["fit"]["slope"] is None


def test_sweep_manifest_gives_n_to_runs_without_metadata(tmp_path):
    root = tmp_path / "sweep"  # the layout of `memwatch sweep --out sweep --n 100 200`
    manifest = {"config": "x.yaml", "runs": []}
    for n in (100, 200):
        history = planted_history(n, 500, 10 * n, 10 * n)
        write_run(root / f"n{n}" / "lightning_logs" / "version_0", history, metadata=False)
        manifest["runs"].append({"name": f"n{n}", "params": {"data.init_args.n": str(n)}, "dir": f"elsewhere/n{n}"})
    (root / "sweep.json").write_text(json.dumps(manifest))
    summary = report(root, plots=False, write=False, echo=None)  # no warning about missing n
    assert [(r["n"], r["tau_mem"]) for r in summary["runs"]] == [(100, 800), (200, 1800)]  # default rule: the blip
    assert summary["fit"]["slope"] is not None


def test_metadata_round_trip_and_bad_inputs(tmp_path):
    path = write_run_metadata(tmp_path / "r", n=64, label="x", detector=DETECTOR)
    data = json.loads(path.read_text())
    assert path.name == RUN_METADATA and data["n"] == 64 and data["format"].startswith("lightning_memwatch.run/")
    with pytest.raises(ValueError, match="positive number"):
        write_run_metadata(tmp_path / "r", n=0)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No MemWatch runs"):
        report(tmp_path / "empty")


def test_command_line(logdir, capsys):
    assert main([str(logdir), "--no-plots", "--detector", "f0=0.065"]) == 0
    saved = json.loads((logdir / "summary.json").read_text())
    assert [r["tau_mem"] for r in saved["runs"]] == [1200, 2200, 4200]
    assert saved["plots"] == [] and not (logdir / "plots").exists()
    slope = (100 * 1200 + 200 * 2200 + 400 * 4200) / (100**2 + 200**2 + 400**2)  # least squares through 0
    assert math.isclose(saved["fit"]["slope"], slope, rel_tol=1e-9)
    assert "memwatch report: 3 run(s)" in capsys.readouterr().out


def test_plot_legends_name_every_line_and_band(logdir, monkeypatch):
    import lightning_memwatch.apps.report as report_module

    figures = []
    original = report_module._new_figure

    def recording(ncols=1):
        fig, axes = original(ncols)
        figures.append(fig)
        return fig, axes

    monkeypatch.setattr(report_module, "_new_figure", recording)
    report(logdir, plots=True, write=True, echo=None)
    f_mem, f_mem_per_n, quality = (fig.axes[0] for fig in figures[:3])
    for ax in (f_mem, f_mem_per_n):
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "95% bootstrap interval of f_mem" in labels
        assert any(t.startswith("tau_mem threshold") for t in labels)
        assert "tau_mem of the run (its colour)" in labels
    title = quality.get_title()
    assert "dashed" not in title and "dotted" not in title  # the legend says which line is which
    labels = [t.get_text() for t in quality.get_legend().get_texts()]
    styles = {t.get_text(): h.get_linestyle() for t, h in zip(quality.get_legend().get_texts(),
                                                               quality.get_legend().legend_handles)}
    assert "tau_gen of the run (its colour)" in labels and "tau_mem of the run (its colour)" in labels
    # three different line styles: tau_gen, tau_mem and the threshold are never confused
    marks = [styles[k] for k in labels if k.startswith("tau_")]
    assert len(set(marks)) == len(marks)


def test_runs_without_labels_are_named_after_their_experiment(tmp_path):
    from lightning_memwatch.apps.report import run_name

    assert run_name(tmp_path / "baseline" / "version_0") == "baseline"
    assert run_name(tmp_path / "baseline" / "version_3") == "baseline v3"
    assert run_name(tmp_path / "sweep" / "n64" / "lightning_logs" / "version_0") == "n64"
    assert run_name(tmp_path / "my_run") == "my_run"
    from lightning_memwatch.apps.report import load_run

    write_run(tmp_path / "logs" / "baseline" / "version_0", planted_history(100, 500, 1000, 1500), metadata=False)
    assert load_run(tmp_path / "logs" / "baseline" / "version_0").label == "baseline"  # the legend's text


def test_report_warns_when_runs_were_made_with_different_settings(tmp_path):
    """Two demos into one folder: the fit would mix them, so the report says which settings differ."""
    for n, lr in ((8, 0.003), (16, 0.003), (64, 0.001)):
        run_dir = tmp_path / f"n{n}"
        write_run(run_dir, planted_history(n, 500, 1000 + 10 * n, 1000 + 10 * n + 3 * EVERY), n=n)
        meta = json.loads((run_dir / RUN_METADATA).read_text())
        write_run_metadata(run_dir, **{**meta, "settings": {"lr": lr, "out": str(tmp_path)}})
    with pytest.warns(UserWarning, match=r"different settings \(settings\.lr: 0\.003 \(toy n=8, toy n=16\), 0\.001"):
        summary = report(tmp_path, plots=False, write=False, echo=None)
    assert [r["n"] for r in summary["runs"]] == [8, 16, 64]  # by n, not by name (n16, n64, n8)


def test_report_is_silent_when_runs_share_their_settings(logdir, recwarn):
    report(logdir, plots=False, write=False, echo=None)
    assert not [w for w in recwarn if "different settings" in str(w.message)]
