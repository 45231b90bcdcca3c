"""The `memwatch` command: every recipe loads, the paper recipes say what the paper did, fit and sweep run."""

from __future__ import annotations

import json
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from lightning_memwatch import EvalSchedule, MemWatch
from lightning_memwatch.apps.cli import RecipeCLI, main, plan_sweep
from lightning_memwatch.apps.data import CelebA32DataModule, GMMDataModule
from lightning_memwatch.apps.models import DDPM, ResidualMLP, UNet, count_parameters

torch.set_num_threads(1)
RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SHIPPED = sorted(RECIPES.glob("*.yaml"))


def test_the_expected_recipes_are_shipped() -> None:
    names = {p.stem for p in SHIPPED}
    assert {
        "celeba_n_sweep",
        "celeba_width_sweep",
        "celeba_full_batch",
        "celeba_smoke",
        "gmm",
        "quick_gmm",
        "quick_unet_digits",
    } <= names


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: p.stem)
def test_every_recipe_prints_its_config(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    callbacks = [c["class_path"] for c in printed["trainer"]["callbacks"]]
    assert "lightning_memwatch.MemWatch" in callbacks
    assert printed["model"]["class_path"] == "lightning_memwatch.apps.models.DDPM"


def _instantiate(recipe: str, *extra: str) -> RecipeCLI:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RecipeCLI(
            run=False,
            args=["--config", str(RECIPES / recipe), "--trainer.accelerator", "cpu", *extra],
            subclass_mode_model=True,
            subclass_mode_data=True,
        )


def _watch(cli: RecipeCLI) -> MemWatch:
    (watch,) = [c for c in cli.trainer.callbacks if isinstance(c, MemWatch)]
    return watch


def test_celeba_n_sweep_is_the_paper_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = _instantiate("celeba_n_sweep.yaml")
    model, data, watch = cli.model, cli.datamodule, _watch(cli)
    assert isinstance(model, DDPM) and isinstance(model.denoiser, UNet)
    assert count_parameters(model.denoiser) == 4_023_233  # W = 32
    assert (model.num_timesteps, model.sample_steps, model.ema_decay) == (1000, 100, None)
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.95 and opt.defaults["lr"] == 1e-2
    assert isinstance(data, CelebA32DataModule)
    assert (data.n, data.index, data.num_heldout, data.normalization) == (1024, 0, 2048, "center")
    assert data.batch_size == 512 and not data.full_batch
    assert watch.num_samples == 10_000 and watch.fid is not None and watch.fid.num_samples == 10_000
    assert watch.fid.reference is None  # MemWatch takes the datamodule's reference_images(): the held-out set
    assert watch.schedule.steps == EvalSchedule.paper().steps
    assert cli.trainer.max_steps == 2_000_000
    small = _instantiate("celeba_n_sweep.yaml", "--data.init_args.n", "128")
    assert small.datamodule.batch_size == 128  # min(512, n)


def test_width_and_full_batch_variants(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    wide = _instantiate("celeba_width_sweep.yaml", "--model.init_args.denoiser.init_args.base_width", "64")
    assert count_parameters(wide.model.denoiser) / 1e6 == pytest.approx(16.05, rel=1e-3)
    full = _instantiate("celeba_full_batch.yaml", "--data.init_args.n", "2048")
    assert full.datamodule.full_batch and full.datamodule.batch_size == 2048
    assert _watch(full).schedule.steps == EvalSchedule.paper().steps


def test_gmm_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = _instantiate("gmm.yaml")
    assert isinstance(cli.model.denoiser, ResidualMLP) and count_parameters(cli.model.denoiser) == 102_024
    opt = cli.model.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == 6e-3 and opt.defaults["momentum"] == 0.95
    data = cli.datamodule
    assert isinstance(data, GMMDataModule) and (data.dim, data.n, data.mu, data.sigma) == (8, 1024, 1.0, 1.0)
    assert data.batch_size == 512
    schedule = _watch(cli).schedule
    assert all(s in schedule for s in (250, 4750, 5000, 10_000, 4_000_000))
    assert 5250 not in schedule and 100 not in schedule
    assert cli.trainer.max_steps == 4_000_000


def _tiny_config(source: str, tmp_path: Path, **data_args: object) -> Path:
    """A recipe shrunk to seconds: 2 steps, one evaluation of 8 samples at step 2."""
    tree = yaml.safe_load((RECIPES / source).read_text())
    tree["trainer"]["max_steps"] = 2
    tree["trainer"]["enable_progress_bar"] = False
    tree["trainer"]["enable_model_summary"] = False
    tree["trainer"]["callbacks"] = [c for c in tree["trainer"]["callbacks"] if c["class_path"].endswith("MemWatch")]
    watch = tree["trainer"]["callbacks"][0]["init_args"]
    watch.update(num_samples=8, sample_batch_size=8, schedule=[2], bootstrap=50)
    tree["model"]["init_args"]["sample_steps"] = 3
    tree["data"]["init_args"].update(passes_per_epoch=1, **data_args)
    path = tmp_path / f"tiny_{source}"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_fit_saves_config_next_to_logs_and_reads_data_range(tmp_path: Path) -> None:
    config = _tiny_config("quick_unet_digits.yaml", tmp_path, n=8, num_heldout=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = RecipeCLI(
            args=["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run")],
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
        )
    log_dir = Path(cli.trainer.log_dir)
    assert (log_dir / "config.yaml").is_file() and list(log_dir.glob("events.out.tfevents.*"))
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["data"]["init_args"]["n"] == 8
    watch = _watch(cli)
    lo, hi = cli.datamodule.data_range
    assert lo == pytest.approx(-cli.datamodule.mean) and hi == pytest.approx(1 - cli.datamodule.mean)
    assert watch.data_range == (lo, hi) != (-1.0, 1.0)  # centred data: (-mean, 1 - mean)
    assert [r["step"] for r in watch.history] == [2] and watch.history[0]["fid"] is not None


def test_sweep_plans_names_and_overrides(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    runs = plan_sweep(
        "x.yaml",
        {("data.init_args.n",): ["64", "128"], ("data.init_args.dim", "model.init_args.denoiser.init_args.dim"): ["8"]},
        tmp_path,
        ["--trainer.max_steps", "5"],
    )
    assert [r["name"] for r in runs] == ["n64_d8", "n128_d8"]
    argv = runs[1]["argv"]
    assert argv[:3] == ["fit", "--config", "x.yaml"]
    assert argv[argv.index("--data.init_args.n") + 1] == "128"
    assert argv[argv.index("--model.init_args.denoiser.init_args.dim") + 1] == "8"
    assert argv[argv.index("--trainer.default_root_dir") + 1] == str(tmp_path / "n128_d8")
    assert argv[-2:] == ["--trainer.max_steps", "5"]
    recipe = str(RECIPES / "celeba_width_sweep.yaml")
    code = main(
        ["sweep", "--config", recipe, "--set", "model.init_args.denoiser.init_args.base_width=16,32", "--dry_run"]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == 2 and lines[0].startswith("memwatch fit --config")
    assert "runs/celeba_width_sweep/W16" in lines[0]


@pytest.mark.slow
def test_sweep_runs_processes_writes_manifest_and_report_reads_it(tmp_path: Path) -> None:
    config = _tiny_config("quick_gmm.yaml", tmp_path, num_heldout=16)
    out = tmp_path / "sweep"
    # two "GPUs" on a CPU machine: exercises the one-process-per-device pool (CUDA_VISIBLE_DEVICES is moot here)
    code = main(["sweep", "--config", str(config), "--n", "16", "32", "--out", str(out), "--gpus", "0,1"])
    assert code == 0
    manifest = json.loads((out / "sweep.json").read_text())
    assert [(r["name"], r["returncode"]) for r in manifest["runs"]] == [("n16", 0), ("n32", 0)]
    for run, n in zip(manifest["runs"], (16, 32), strict=True):
        meta = json.loads((Path(run["dir"]) / "memwatch_run.json").read_text())
        assert meta["n"] == n and meta["quality_label"].startswith("Frechet distance")
        (saved,) = Path(run["dir"]).glob("lightning_logs/version_*/config.yaml")
        assert yaml.safe_load(saved.read_text())["data"]["init_args"]["n"] == n
    from lightning_memwatch.apps.report import main as report_main

    assert report_main([str(out), "--no-plots"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(r["n"] for r in summary["runs"]) == [16, 32]


def test_commands_usage_and_lazy_subcommands(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main([]) == 2 and "usage: memwatch" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert main(["bogus"]) == 2 and "unknown command" in capsys.readouterr().err
    seen: list[list[str]] = []
    fake = types.ModuleType("lightning_memwatch.apps.report")
    fake.main = lambda argv: seen.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lightning_memwatch.apps.report", fake)
    assert main(["report", "runs/x"]) == 0 and seen == [["runs/x"]]

    import importlib

    real_import = importlib.import_module

    def missing(name: str, *args: object) -> object:
        if name == "lightning_memwatch.apps.demo":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", missing)
    assert main(["demo"]) == 2
    assert "no lightning_memwatch.apps.demo module" in capsys.readouterr().err
