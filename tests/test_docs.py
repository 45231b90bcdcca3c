"""The documentation cannot drift from the code.

* Every ```python block in docs/ is the text of a file in docs/snippets/ (marked ``<!-- snippet: FILE -->`` and
  kept equal to the file by ``python docs/tools/sync_docs.py``, so a code host shows the code too) or is
  explicitly marked ``<!-- not-runnable: reason -->``; every shown snippet is run by a test below.
* The snippets run here at tiny sizes (CPU, a few optimizer steps, temporary directories).
* Facts the pages state about the code are checked against it: logged keys, the confidence-interval numbers of
  the concepts page, the command lines of bash blocks, the printed line formats of the recorded tutorial run.

The full-size tutorial run (about two minutes) is opt-in: ``MEMWATCH_DOCS_FULL=1 pytest tests/test_docs.py``.
"""

from __future__ import annotations

import io
import logging
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_memwatch.log as mwlog
from lightning_memwatch import FID, EvalSchedule, MemWatch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SNIPPETS = DOCS / "snippets"
if str(SNIPPETS) not in sys.path:  # the snippets import each other by plain name, as users' files do
    sys.path.insert(0, str(SNIPPETS))

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
PYTHON_LANGS = {"python", "py", "python3", "pycon"}
SNIPPET_MARK = re.compile(r"^\s*<!--\s*snippet:\s*(?P<target>\S+)\s*-->\s*$")
NOT_RUNNABLE = re.compile(r"<!--\s*not-runnable:\s*\S.*?-->\s*$")

# Every snippet file a page may include, and the test that runs it.
TESTED_SNIPPETS = {
    "tutorial_module.py": "test_tutorial_runs_and_logs_every_documented_key",
    "tutorial_train.py": "test_tutorial_runs_and_logs_every_documented_key",
    "standalone_metric.py": "test_standalone_metric_prints_what_the_concepts_page_says",
    "stock_callbacks.py": "test_stock_callbacks_act_on_memwatch_keys",
    "sample_fn.py": "test_sample_fn_adapter",
    "ema_callback.py": "test_ema_sampler_evaluates_the_averaged_weights",
    "ddp.py": "test_ddp_trainer_is_built_as_documented",
    "feature_space.py": "test_feature_fn_puts_the_index_in_feature_space",
    "public_api.py": "test_public_api_snippet_imports",
    "offline_fid.py": "test_offline_fid_fails_at_build_with_the_documented_fix",
    "plain_loop.py": "test_plain_loop_evaluates_without_lightning",
    "conditional.py": "test_conditional_snippet_reports_classes_onsets_and_copies",
}


def doc_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if SNIPPETS not in p.parents and DOCS / "tools" not in p.parents)


def fences(path: Path) -> list[tuple[str, str, int]]:
    """(language, body, line number) of every fenced block of a page."""
    text = path.read_text()
    return [(m["lang"], m["body"], text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def snippet_target(page_lines: list[str], line: int) -> str | None:
    """The ``FILE[:SECTION]`` of the ``<!-- snippet: ... -->`` mark right above the block at ``line`` (1-based)."""
    m = SNIPPET_MARK.match(page_lines[line - 2]) if line >= 2 else None
    return m["target"] if m else None


def snippet_path(target: str) -> tuple[Path, str | None]:
    name, _, section = target.partition(":")
    for base in (SNIPPETS, ROOT):
        if (base / name).is_file():
            return base / name, section or None
    raise AssertionError(f"included file {name!r} exists neither in docs/snippets/ nor in the repository root")


# ------------------------------------------------------------------------------------------------ doc structure


def test_every_python_block_is_a_tested_snippet_or_marked_not_runnable():
    problems, included = [], set()
    for page in doc_pages():
        lines = page.read_text().splitlines()
        for lang, _body, line in fences(page):
            if lang.lower() not in PYTHON_LANGS:
                continue
            target = snippet_target(lines, line)
            if target is None:
                previous = lines[line - 2] if line >= 2 else ""
                if not NOT_RUNNABLE.search(previous):
                    problems.append(
                        f"{page.relative_to(ROOT)}:{line}: python block is neither a snippet of "
                        "docs/snippets/ (<!-- snippet: FILE -->) nor marked <!-- not-runnable: reason -->"
                    )
                continue
            path, section = snippet_path(target)
            if section is not None:
                text = path.read_text()
                assert f"--8<-- [start:{section}]" in text and f"--8<-- [end:{section}]" in text, (
                    f"{page.relative_to(ROOT)}:{line}: section {section!r} missing in {path.name}"
                )
            if path.parent == SNIPPETS:
                included.add(path.name)
    assert not problems, "\n".join(problems)
    untested = included - set(TESTED_SNIPPETS)
    assert not untested, f"snippets included in the docs but run by no test: {sorted(untested)}"
    for name, test in TESTED_SNIPPETS.items():
        assert (SNIPPETS / name).is_file(), name
        assert callable(globals().get(test)), test


def test_every_snippet_file_is_used_by_a_page():
    used = set()
    for page in doc_pages():
        lines = page.read_text().splitlines()
        for _, _, line in fences(page):
            target = snippet_target(lines, line)
            if target is not None:
                used.add(target.partition(":")[0])
    orphans = {p.name for p in SNIPPETS.glob("*.py")} - used
    assert not orphans, f"snippets no page includes (stale files): {sorted(orphans)}"


def test_not_runnable_blocks_compile_and_import_real_names():
    """Blocks marked not-runnable still have to be valid Python whose imports exist."""
    import ast

    for page in doc_pages():
        lines = page.read_text().splitlines()
        for lang, body, line in fences(page):
            if lang.lower() not in PYTHON_LANGS or snippet_target(lines, line) is not None:
                continue
            tree = ast.parse(body, filename=f"{page.name}:{line}")
            imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
            exec(compile(ast.Module(body=imports, type_ignores=[]), f"{page.name}:{line}", "exec"), {})
            assert NOT_RUNNABLE.search(lines[line - 2])


def _sync_docs():
    tools = str(DOCS / "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    import sync_docs

    return sync_docs


def test_pages_show_the_current_snippets_recipes_and_signatures():
    """What a code host shows equals what the site shows: snippet code, recipes/README.md, API summaries."""
    sync_docs = _sync_docs()
    stale = [str(p.relative_to(ROOT)) for p in sync_docs.doc_pages() if sync_docs.synced(p) != p.read_text()]
    assert not stale, f"out of date (run `python docs/tools/sync_docs.py`): {stale}"


def test_no_page_is_only_markers_on_a_code_host():
    """No bare pymdownx include lines; every API page says in plain Markdown what its objects are."""
    for page in doc_pages():
        text = page.read_text()
        bare = [line for line in text.splitlines() if line.strip().startswith("--8<--")]
        assert not bare, f"{page.relative_to(ROOT)} shows include markers on a code host: {bare}"
        if any(line.startswith("::: ") for line in text.splitlines()):
            region = text.split("<!-- api-summary -->", 1)[-1].split("<!-- end api-summary -->", 1)[0]
            names = re.findall(r"^::: ([\w.]+)", text, re.M)
            assert "<!-- api-summary -->" in text, f"{page.relative_to(ROOT)}: no API summary"
            for name in names:
                assert f"`{name.rsplit('.', 1)[-1]}`" in region or f"`{name}`" in region, (page.name, name)


def test_snippet_sections_are_shown_dedented_without_markers():
    sync_docs = _sync_docs()
    text = sync_docs.snippet_text("ddp.py:ddp")
    assert "--8<--" not in text and not text.startswith(" ") and text.endswith("\n")
    converted = sync_docs.sync_snippets('```python\n--8<-- "ddp.py:ddp"\n```\n')
    assert converted == "<!-- snippet: ddp.py:ddp -->\n```python\n" + text + "```\n"


def _fence_after(text: str, heading: str, lang: str) -> str:
    part = text[text.index(heading) :]
    start = part.index(f"```{lang}\n")
    return part[start : part.index("```", start + 3) + 3]


def test_docs_home_shows_the_readmes_install_lines_and_snippet():
    """One install story: the docs home page starts with install, the first command and what to look at, and its
    install lines and code are the README's, each preceded by the Inception-weights caveat with its offline
    route."""
    readme, home = (ROOT / "README.md").read_text(), (DOCS / "index.md").read_text()
    assert _fence_after(home, "## Install", "bash") == _fence_after(readme, "## Install", "bash")
    assert _fence_after(home, "## What it measures", "python") == _fence_after(
        readme, "## Add it to your training code", "python"
    )
    assert re.findall(r"^## (.+)$", home, flags=re.M)[:3] == ["Install", "First command", "What to look at"]
    for text in (readme, home):
        code = text.index("```python")
        assert text.index("download=True") < code and text.index("weights_path=") < code
        assert "pip install 'lightning-memwatch[cpu]'" in text and "pip install -e '.[cpu]'" in text
    tutorial = (DOCS / "tutorial.md").read_text()
    assert _fence_after(tutorial, "## 1. Install", "bash") == _fence_after(readme, "## Install", "bash")
    assert "index.md#install" in (DOCS / "quickstart.md").read_text() and "index.md#install" in tutorial


def test_no_deprecated_call_in_the_docs_or_the_apps():
    """What users copy shows no deprecated call: the stopper without `patience=` (the detector's), the apps'
    new import paths, `watch.hparams()`."""
    from lightning_memwatch._moved import MOVED

    old_path = re.compile(rf"(import |from |class_path: *|-m )lightning_memwatch\.({'|'.join(MOVED)})\b")
    files = [*DOCS.rglob("*.md"), *SNIPPETS.glob("*.py"), ROOT / "README.md", *(ROOT / "recipes").rglob("*.yaml")]
    files += list((ROOT / "lightning_memwatch" / "apps").rglob("*.py"))
    for path in files:
        text = path.read_text()
        where = path.relative_to(ROOT)
        for call in re.finditer(r"MemorizationEarlyStopping\(([^()]*)\)", text):
            assert "patience" not in call.group(1), f"{where}: {call.group(0)}"
        assert not old_path.search(text), f"{where}: {old_path.search(text).group(0)}"  # type: ignore[union-attr]
        assert "memwatch_settings(" not in text, where


def test_tensorboard_table_lists_exactly_the_logged_keys():
    text = (DOCS / "tutorial.md").read_text()
    table = text[text.index("### In TensorBoard") : text.index("### Stock Lightning callbacks")]
    documented = set(re.findall(r"`(memwatch/[a-z_]+)`", table))
    constants = {name: getattr(mwlog, name) for name in mwlog.__all__ if isinstance(getattr(mwlog, name), str)}
    assert set(constants.values()) <= documented, set(constants.values()) - documented
    assert documented - set(constants.values()) == set(), "the table names keys log.py does not define"
    for name in constants:  # each constant's Python name appears next to its key
        assert f"`{name}`" in table, name


def test_bash_blocks_use_real_commands_and_options():
    from lightning_memwatch.apps.demo import build_parser

    demo_parser = build_parser()
    pages = doc_pages() + [ROOT / "recipes" / "README.md", ROOT / "README.md"]
    for page in (p for p in pages if p.is_file()):
        for lang, body, line in fences(page):
            if lang != "bash":
                continue
            for raw in body.replace("\\\n", " ").splitlines():
                command = raw.split("#", 1)[0].strip().removeprefix(".venv/bin/")
                if not command.startswith("memwatch "):
                    continue
                words = shlex.split(command)
                where = f"{page.relative_to(ROOT)}:{line}: {command}"
                assert words[1] in {"fit", "sweep", "demo", "report"}, where
                if words[1] == "demo" and not {"-h", "--help"} & set(words):
                    try:
                        demo_parser.parse_args(words[2:])
                    except SystemExit:
                        pytest.fail(f"{where}: `memwatch demo` rejects these options")
                if "--config" in words:
                    config = words[words.index("--config") + 1]
                    assert (ROOT / config).is_file(), where


def test_quickstart_states_the_demo_defaults():
    from lightning_memwatch.apps.demo import DemoConfig

    defaults = DemoConfig()
    text = (DOCS / "quickstart.md").read_text()
    sizes = ", ".join(map(str, defaults.ns[:-1])) + f" and {defaults.ns[-1]}"
    assert f"training sets of n = {sizes} digits" in text, f"the demo's default n are now {defaults.ns}"
    assert f"from {defaults.num_samples} fixed noises" in text
    assert defaults.workers == 2 and defaults.threads_per_worker == 1  # "two runs side by side, one thread each"
    assert "two runs train side by side, one thread each" in text
    assert defaults.ema_decay is not None and "with EMA weights" in text


# ------------------------------------------------------------------------------------------------ snippets


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """One CPU thread, caches and working directory under tmp_path."""
    monkeypatch.setenv("LIGHTNING_MEMWATCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits16():
    from tutorial_train import digits

    train, heldout, labels = digits(16)
    return train, heldout[:64], labels[:64]


def loader_of(images: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(images), batch_size=len(images), shuffle=True)


def quiet_trainer_kwargs(tmp_path: Path) -> dict:
    return dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )


def memwatch_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("MemWatch step ")]


def shape(line: str) -> str:
    """A printed line with every number replaced by '#', to compare formats."""
    return re.sub(r"\d+(\.\d+)?", "#", line)


def test_tutorial_runs_and_logs_every_documented_key(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tutorial_train import main

    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="lightning.pytorch")  # other tests may have quietened Lightning
    with redirect_stdout(io.StringIO()) as out:
        watch, stopper, model = main(
            n=32,
            max_steps=40,
            eval_every=20,
            num_samples=32,
            log_dir=str(tmp_path / "tb"),
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    assert [r["step"] for r in watch.history] == [0, 20, 40]
    assert all(r["fid"] is not None and 0.0 <= r["f_mem"] <= 1.0 for r in watch.history)
    assert watch.history[-1]["fid"] < watch.history[0]["fid"]  # the EMA weights moved and samples improved
    assert "TensorBoard: tensorboard --logdir" in out.getvalue()

    events = EventAccumulator(
        str(next((tmp_path / "tb").rglob("events.out.tfevents.*")).parent),
        size_guidance={"images": 0, "histograms": 0, "scalars": 0},
    )
    events.Reload()
    tags = events.Tags()
    for key in (
        mwlog.F_MEM,
        mwlog.F_MEM_CI_LOW,
        mwlog.F_MEM_CI_HIGH,
        mwlog.RATIO_MEDIAN,
        mwlog.FID_KEY,
        mwlog.FID_NUM_SAMPLES,
    ):
        assert [e.step for e in events.Scalars(key)] == [0, 20, 40], key
    assert {mwlog.SAMPLES_IMAGE, mwlog.PAIRS_IMAGE} <= set(tags["images"])
    assert mwlog.RATIO_HISTOGRAM in tags["histograms"]

    # the recorded run on the tutorial page prints lines of the same format as this run
    recorded = [line for line in (DOCS / "tutorial.md").read_text().splitlines() if line.startswith("MemWatch step 0:")]
    assert recorded and shape(recorded[0]) == shape(memwatch_lines(caplog)[0])


@pytest.mark.skipif(os.environ.get("MEMWATCH_DOCS_FULL") != "1", reason="full tutorial run: set MEMWATCH_DOCS_FULL=1")
def test_full_tutorial_stops_inside_the_window(tmp_path):
    from tutorial_train import main

    watch, stopper, model = main(log_dir=str(tmp_path / "tb"), enable_progress_bar=False)
    assert watch.tau_gen is not None and watch.tau_mem is not None and watch.tau_gen < watch.tau_mem
    assert stopper.stopped_step == watch.tau_mem
    assert watch.tau_gen <= stopper.restored_step < watch.tau_mem


def test_standalone_metric_prints_what_the_concepts_page_says():
    with redirect_stdout(io.StringIO()) as out:
        runpy.run_path(str(SNIPPETS / "standalone_metric.py"), run_name="__main__")
    first = out.getvalue().splitlines()[0]
    assert first == "f_mem = 0.0040, 95% CI [0.0010, 0.0080]"
    assert f"It prints `{first}`" in (DOCS / "concepts.md").read_text()
    assert "memorized samples: [996, 997, 998, 999]" in out.getvalue()


def test_concepts_confidence_interval_numbers():
    """Four memorized samples lift the interval's lower bound above 0 at every m the page names; the upper
    bounds at zero copies are the ones it quotes."""
    from lightning_memwatch.metrics.memorization import _fraction_interval

    def interval(count, m):
        return _fraction_interval(count, m, bootstrap=1000, seed=0, confidence=0.95)

    for m in (256, 512, 1000, 10_000):
        assert interval(3, m)[0] == 0.0 and interval(4, m)[0] > 0.0, m
    assert round(100 * interval(0, 256)[1], 1) == 1.4
    assert round(100 * interval(0, 1000)[1], 2) == 0.37
    text = (DOCS / "concepts.md").read_text()
    assert "tau_mem fires once 4 samples are memorized" in text and "1.4% at m = 256, 0.37% at m = 1000" in text


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A randomly initialised torch-fidelity Inception state dict (the real file is 91 MB and offline here)."""
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    cls = tf_inception.FeatureExtractorInceptionV3
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(cls, "load_state_dict", lambda self, state, strict=True: None)
        torch.manual_seed(0)
        network = cls("inception-v3-compat", ["2048"])
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("weights") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(network.state_dict(), path)
    return path


def test_stock_callbacks_act_on_memwatch_keys(tmp_path, monkeypatch, digits16, random_inception_weights):
    from stock_callbacks import stock_callbacks
    from tutorial_module import TinyDiffusion

    from lightning_memwatch.metrics.features import INCEPTION_WEIGHTS_ENV

    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(random_inception_weights))  # the offline page's variable
    train, heldout, _ = digits16
    with pytest.warns(UserWarning):  # FID from 8 samples: rank-deficient covariance, warned
        trainer, watch, best_fid, stop = stock_callbacks(
            heldout[:8], eval_every=2, max_steps=4, num_samples=8, sample_batch_size=8, verbose=False
        )
        trainer.fit(TinyDiffusion(ema_decay=None), loader_of(train))
    assert [r["step"] for r in watch.history] == [0, 2, 4]
    best = min(watch.history[1:], key=lambda r: r["fid"])  # checkpoints are taken at steps 2 and 4
    assert float(best_fid.best_model_score) == pytest.approx(best["fid"], rel=1e-6)
    assert f"step={best['step']}" in Path(best_fid.best_model_path).name
    assert stop.monitor == mwlog.F_MEM and trainer.global_step == 4  # no copies: nothing stopped


def test_sample_fn_adapter(tmp_path, digits16):
    import lightning as L
    import sample_fn as snippet

    assert snippet.watch.sample_fn is snippet.sample_fn  # the documented construction
    train, _, _ = digits16
    model = snippet.PipelineModel()
    watch = MemWatch(
        sample_fn=snippet.sample_fn,
        num_samples=8,
        sample_batch_size=4,
        schedule=EvalSchedule.at([2]),
        bootstrap=50,
        verbose=False,
    )
    L.Trainer(max_steps=2, callbacks=[watch], **quiet_trainer_kwargs(tmp_path)).fit(model, loader_of(train))
    assert [r["step"] for r in watch.history] == [2]
    noise = torch.randn(3, 1, 8, 8)
    model.eval()
    adapted = snippet.sample_fn(model, 3, noise=noise)
    assert torch.allclose(adapted, model.sample(3, noise=noise), atol=1e-6)  # back in [-1, 1], same images
    assert float(model.generate(noise).min()) >= 0.0


def test_ema_sampler_evaluates_the_averaged_weights(tmp_path, digits16):
    import ema_callback as snippet
    import lightning as L
    from lightning.pytorch import Callback
    from lightning.pytorch.callbacks import EMAWeightAveraging
    from tutorial_module import TinyDiffusion

    cbs = snippet.trainer.callbacks
    assert cbs.index(snippet.ema) < cbs.index(snippet.watch) and snippet.watch.weights == "auto"
    train, _, _ = digits16
    decay = 0.5

    class OwnAverage(Callback):  # the average EMAWeightAveraging(decay) keeps, from the raw weights
        average: dict | None = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            raw = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
            self.raw = raw
            self.average = raw if self.average is None else {
                k: decay * self.average[k] + (1 - decay) * raw[k] for k in raw
            }

    own = OwnAverage()
    ema = EMAWeightAveraging(decay=decay)
    watch = MemWatch(num_samples=8, sample_batch_size=8, schedule=EvalSchedule.at([3, 6]), bootstrap=50,
                     verbose=False)
    seen = []

    def check(trainer, module, record):  # during the evaluation the module holds the averaged weights
        params = dict(module.named_parameters())
        assert all(torch.allclose(params[k], own.average[k], atol=1e-6) for k in params)
        assert not all(torch.equal(params[k], own.raw[k]) for k in params)  # the raw weights differ
        seen.append(record["step"])

    watch.add_listener(check)
    model = TinyDiffusion(ema_decay=None)
    L.Trainer(max_steps=6, callbacks=[own, ema, watch], **quiet_trainer_kwargs(tmp_path)).fit(model, loader_of(train))
    assert seen == [3, 6] and watch.scored_weights.name == "averaged"


def test_ddp_trainer_is_built_as_documented(tmp_path, digits16, monkeypatch):
    from ddp import ddp_trainer
    from lightning.pytorch.strategies import DDPStrategy
    from tutorial_module import TinyDiffusion

    train, heldout, _ = digits16
    trainer, watch, stopper = ddp_trainer(heldout, accelerator="cpu", devices=1, max_steps=10)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert watch in trainer.callbacks and stopper in trainer.callbacks and stopper.watch is watch
    assert len(watch.schedule.steps) == 81 and watch.num_samples == 10_000 and watch.fid is not None
    assert stopper.dirpath == "checkpoints/memwatch"

    # the same callbacks train (one CPU process, DDP strategy), with a small feature extractor for FID
    monkeypatch.chdir(tmp_path)
    features = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(train[0].numel(), 8)).requires_grad_(False)
    small_fid = FID(reference=heldout, feature_extractor=features, cache=False)
    trainer, watch, stopper = ddp_trainer(
        heldout,
        accelerator="cpu",
        devices=1,
        max_steps=4,
        schedule=EvalSchedule.at([2, 4]),
        fid=small_fid,
        num_samples=16,
    )
    trainer.fit(TinyDiffusion(ema_decay=None), loader_of(train))
    assert [r["step"] for r in watch.history] == [2, 4] and watch.history[0]["fid"] is not None


def test_feature_fn_puts_the_index_in_feature_space(tmp_path, digits16):
    import lightning as L
    from feature_space import FrozenEncoder, LatentModel, make_watch

    train, _, _ = digits16
    torch.manual_seed(0)  # the encoder's weights
    encoder = FrozenEncoder()
    watch = make_watch(
        encoder, num_samples=8, sample_batch_size=8, schedule=EvalSchedule.at([2]), bootstrap=50, verbose=False
    )
    L.Trainer(max_steps=2, callbacks=[watch], **quiet_trainer_kwargs(tmp_path)).fit(LatentModel(), loader_of(train))
    assert len(watch.history) == 1
    assert watch.index.dim == 16  # the encoder's features, not the 64 pixels
    copies = train[:4]
    distances, indices = watch.index.search(copies)
    assert indices[:, 0].tolist() == [0, 1, 2, 3]
    # The copies are encoded in a batch of 4 and the index's rows in larger batches: the encoder's GEMM gives
    # other bits for other batch sizes (2.4e-7 on an AVX-512/AMX Xeon), so "zero" is relative to the features'
    # norm, far below the distance to the second neighbour.
    scale = float(feature_norms(encoder, copies).max())
    assert float(distances[:, 0].max()) <= 1e-5 * scale < float(distances[:, 1].min())


def feature_norms(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encoder(images).flatten(1).norm(dim=1)


def test_public_api_snippet_imports():
    namespace = runpy.run_path(str(SNIPPETS / "public_api.py"))
    import lightning_memwatch

    exported = {name for name in lightning_memwatch.__all__}
    assert exported <= set(namespace), exported - set(namespace)


def test_plain_loop_evaluates_without_lightning():
    """The architecture page's plain PyTorch loop runs with Lightning unimportable and flags tau_mem."""
    code = (
        "import sys, runpy, torch\n"
        "for name in ('lightning', 'lightning.pytorch', 'lightning.fabric', 'pytorch_lightning'):\n"
        "    sys.modules[name] = None  # importing Lightning now fails\n"
        "torch.set_num_threads(1)\n"
        f"runpy.run_path({str(SNIPPETS / 'plain_loop.py')!r}, run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    evaluations = [re.fullmatch(r"step (\d+): f_mem = ([\d.]+) \[([\d.]+), ([\d.]+)\]", line) for line in lines[:-1]]
    assert evaluations and all(evaluations), lines
    steps = [int(m[1]) for m in evaluations]
    assert steps == list(range(100, 100 * len(steps) + 1, 100))
    assert float(evaluations[0][2]) == 0.0  # nothing copied at the first evaluation
    tau_mem = re.fullmatch(r"tau_mem at step (\d+): .*", lines[-1])
    assert tau_mem is not None and float(evaluations[-1][3]) > 0.0, lines  # stopped where the interval left 0
    assert int(tau_mem[1]) == steps[-1]


def test_conditional_snippet_reports_classes_onsets_and_copies(tmp_path, monkeypatch):
    """The conditional page's run (300 steps, as the page reports): per-class lines, onsets, the copy table."""
    import conditional as snippet

    monkeypatch.setattr(snippet, "MAX_STEPS", 300)
    monkeypatch.chdir(tmp_path)  # the trainer's default_root_dir: where the CSV goes without a checkpoint callback
    out = io.StringIO()
    with redirect_stdout(out):
        watch = snippet.main()
    lines = out.getvalue().splitlines()
    line = re.compile(r"class (\d): f_mem = ([\d.]+) \[([\d.]+), ([\d.]+)\] over 50 samples")
    per_class = [line.fullmatch(x) for x in lines[:4]]
    assert all(per_class) and [int(m[1]) for m in per_class] == [0, 1, 2, 3], lines
    onsets = {int(k): e.step for k, e in watch.detector.class_tau_mem.items()}
    assert onsets and all(f"class {k}: tau_mem at step {s}" in lines for k, s in onsets.items())
    rows = watch.copied_training_images()
    assert rows and lines[-min(5, len(rows))].startswith(f"training image {rows[0].train_index} (class ")
    assert all(int(snippet.torch.arange(16)[r.train_index] % 4) == r.label for r in rows)  # the training class
    assert (tmp_path / "memwatch_copied_training_images.csv").exists()


def test_offline_fid_fails_at_build_with_the_documented_fix(digits16, monkeypatch, tmp_path):
    from offline_fid import offline_watch

    from lightning_memwatch.metrics import features

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    watch = offline_watch(digits16[1])
    assert watch.fid.weights_path.endswith(features.INCEPTION_WEIGHTS_FILENAME)
    with pytest.raises(features.InceptionWeightsNotFoundError) as error:
        watch.fid.build(data_range=(-1.0, 1.0), device="cpu")
    message = str(error.value)
    assert features.INCEPTION_WEIGHTS_URL in message and features.INCEPTION_WEIGHTS_ENV in message


def test_offline_page_names_the_real_files_and_variables(monkeypatch, tmp_path):
    from lightning_memwatch import cache
    from lightning_memwatch.metrics import features

    text = (DOCS / "offline.md").read_text()
    for fact in (
        features.INCEPTION_WEIGHTS_URL,
        features.INCEPTION_WEIGHTS_FILENAME,
        features.INCEPTION_WEIGHTS_ENV,
        cache.CACHE_DIR_ENV,
        "`~/.cache/lightning_memwatch`",
        "fid-ref-<key>.pt",
    ):
        assert fact in text, fact
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    hub = tmp_path / "th" / "hub" / "checkpoints" / features.INCEPTION_WEIGHTS_FILENAME
    assert features.hub_inception_weights_path() == hub
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "c"))
    assert cache.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(cache.CACHE_DIR_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache.default_cache_dir() == Path.home() / ".cache" / "lightning_memwatch"


# ------------------------------------------------------------------------------------------------ tooling


def require_chromium() -> None:
    """Skip without Chromium, except under CI (``CI=true``), where `.ci/run` installs it: there, fail."""
    if any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")):
        return
    message = "no Chromium installed (Debian: apt-get install -y chromium chromium-driver)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message}: under CI the real-browser TensorBoard check must run (.ci/run installs it)")
    pytest.skip(message)


def test_screenshot_tool_shoots_a_memwatch_run(tmp_path, digits16):
    require_chromium()
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from tutorial_module import TinyDiffusion

    train, _, _ = digits16
    watch = MemWatch(num_samples=8, sample_batch_size=8, schedule=EvalSchedule.every(2), bootstrap=50, verbose=False)
    kwargs = quiet_trainer_kwargs(tmp_path) | {"logger": TensorBoardLogger(str(tmp_path / "logs"), name="run")}
    L.Trainer(max_steps=4, callbacks=[watch], **kwargs).fit(TinyDiffusion(), loader_of(train))
    out = tmp_path / "shot.png"
    result = subprocess.run(
        [
            sys.executable,
            str(DOCS / "tools" / "screenshot.py"),
            "--logdir",
            str(tmp_path / "logs"),
            "--out",
            str(out),
            "--width",
            "800",
            "--height",
            "600",
            "--render-ms",
            "5000",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_browser_shows_the_hparams_tab_and_the_custom_scalars_layout(tmp_path, digits16):
    """In Chromium, TensorBoard shows MemWatch's settings and scalars in the HPARAMS tab, also for a logger with
    ``default_hp_metric=False`` (the demo's), and MemWatch's CUSTOM SCALARS layout with the documented link's
    smoothing off."""
    require_chromium()
    if shutil.which("chromedriver") is None:
        pytest.skip("no chromedriver (Debian: apt-get install -y chromium-driver)")
    import lightning as L
    from _browser import Browser, TensorBoard
    from lightning.pytorch.loggers import TensorBoardLogger
    from tutorial_module import TinyDiffusion

    from lightning_memwatch import tensorboard_layout

    train, _, _ = digits16
    watch = MemWatch(num_samples=8, sample_batch_size=8, schedule=EvalSchedule.every(2), bootstrap=50, verbose=False)
    logger = TensorBoardLogger(str(tmp_path / "logs"), name="", version="n16", default_hp_metric=False)
    kwargs = quiet_trainer_kwargs(tmp_path) | {"logger": logger}
    L.Trainer(max_steps=4, callbacks=[watch], **kwargs).fit(TinyDiffusion(), loader_of(train))
    charts = [title for title in tensorboard_layout.layout(watch.detector)[tensorboard_layout.CATEGORY]]
    with TensorBoard(tmp_path / "logs", mwlog.F_MEM) as board, Browser() as browser:
        browser.open(f"{board.url}/#hparams")
        browser.wait_for_text("memwatch/num_samples", "memwatch/detector_mem_rule", "n16")
        browser.open(f"{board.url}/#hparams")  # the metrics columns: the tab's metrics are MemWatch's scalars
        text = browser.wait_for_text("memwatch/f_mem_ci_low", "memwatch/tau_mem")
        assert "hp_metric" not in text
        browser.screenshot(tmp_path / "hparams.png")
        url = tensorboard_layout.dashboard_url(board.port)
        assert url.endswith("#custom_scalars&_smoothingWeight=0")
        browser.open(url)
        text = browser.wait_for_text(tensorboard_layout.CATEGORY, *charts)
        smoothing = text.split("Smoothing", 1)[1][:40]
        assert "[input=0]" in smoothing, smoothing  # the link turns TensorBoard's 0.6 default off
        browser.screenshot(tmp_path / "custom_scalars.png")
    assert (tmp_path / "custom_scalars.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_commands_in_the_docs_are_accepted_by_tensorboard(tmp_path):
    """Every `tensorboard ...` line the docs and the printed hints give parses with TensorBoard's own parser, and
    says `--host 127.0.0.1` (loopback); `--bind_all=false`, once suggested, is an error."""
    from tensorboard import program

    def parses(words: list[str]) -> bool:
        try:
            program.TensorBoard().configure(argv=[None, *words])
        except SystemExit:
            return False
        return True

    pages = doc_pages() + [ROOT / "recipes" / "README.md", ROOT / "README.md"]
    found = 0
    for page in (p for p in pages if p.is_file()):
        for lang, body, line in fences(page):
            if lang != "bash":
                continue
            for raw in body.splitlines():
                command = raw.split("#", 1)[0].strip().removeprefix(".venv/bin/")
                if not command.startswith("tensorboard "):
                    continue
                found += 1
                words = [str(tmp_path) if w.startswith("runs/") else w for w in shlex.split(command)[1:]]
                where = f"{page.relative_to(ROOT)}:{line}: {command}"
                assert parses(words), where
                assert words[words.index("--host") + 1] == "127.0.0.1", where
    assert found >= 3
    assert not parses(["--logdir", str(tmp_path), "--bind_all=false"])
    from lightning_memwatch.apps.demo import tensorboard_command

    printed = shlex.split(tensorboard_command(tmp_path))  # the demo's hint, with this environment's tensorboard
    assert Path(printed[0]).name == "tensorboard" and parses(printed[1:]) and "127.0.0.1" in printed


def test_browser_check_fails_rather_than_skips_under_ci(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="must run"):
        require_chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_chromium()
# ------------------------------------------------------------------------------------------------ integrations page
# (docs/integrations.md: the adapters' snippets; owned with lightning_memwatch/adapters/)

TESTED_SNIPPETS.update(
    {
        "integrations_diffusers.py": "test_integrations_diffusers_snippets_drive_memwatch",
        "integrations_lucidrains.py": "test_integrations_lucidrains_snippet_drives_memwatch",
        "integrations_global_rng.py": "test_integrations_own_noise_snippet_repeats_and_spares_the_rng",
        "integrations_ema.py": "test_integrations_ema_snippet_scores_the_averaged_weights",
    }
)


def _unit_digits(digits16) -> torch.Tensor:
    train, _, _ = digits16
    return (train + 1) / 2  # the snippets' datasets are in [0, 1]


def _tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )


def _small_watch(sample_fn, data_range, steps=(2,)) -> MemWatch:
    return MemWatch(
        sample_fn=sample_fn,
        data_range=data_range,
        num_samples=8,
        sample_batch_size=4,
        schedule=EvalSchedule.at(list(steps)),
        bootstrap=50,
        log_images=False,
        verbose=False,
    )


def test_integrations_diffusers_snippets_drive_memwatch(tmp_path, digits16):
    pytest.importorskip("diffusers")
    import integrations_diffusers as snippet
    import lightning as L

    assert snippet.watch.sample_fn is snippet.sample_fn and snippet.watch.data_range == (0.0, 1.0)
    train = _unit_digits(digits16)
    module = snippet.DiffusersDDPM(_tiny_unet())
    seen = []
    watch = _small_watch(snippet.sample_fn, (0.0, 1.0))
    watch.add_listener(lambda trainer, m, record: seen.append(record["step"]))
    L.Trainer(max_steps=2, callbacks=[watch], **quiet_trainer_kwargs(tmp_path)).fit(module, loader_of(train))
    assert seen == [2]
    samples = snippet.sample_fn(module.eval(), 3, noise=torch.randn(3, 1, 8, 8))
    module.train()
    assert samples.min() >= 0.0 and samples.max() <= 1.0  # diffusers' [-1, 1] mapped to the data's [0, 1]

    piped = snippet.pipeline_watch(module)
    watch = _small_watch(piped.sample_fn, piped.data_range)
    L.Trainer(max_steps=2, callbacks=[watch], **quiet_trainer_kwargs(tmp_path)).fit(module, loader_of(train))
    assert [r["step"] for r in watch.history] == [2]


def test_integrations_probe_snippet_reads_the_adapters_loss(tmp_path, digits16):
    """integrations_diffusers.py:probe (docs/integrations.md and docs/probe.md): the loss of MemWatch's adapter."""
    pytest.importorskip("diffusers")
    import integrations_diffusers as snippet
    import lightning as L

    from lightning_memwatch.callbacks.probe import LOSS_GAP
    from lightning_memwatch.metrics.loss_gap import measure_loss_gap

    _, heldout, _ = digits16
    callbacks = snippet.watch_and_probe((heldout + 1) / 2)
    watch, probe = callbacks
    assert watch is snippet.watch and probe.sampler is None and probe.loss_fn is None  # nothing named
    trainer = L.Trainer(max_steps=1, callbacks=callbacks, **quiet_trainer_kwargs(tmp_path))
    trainer.fit(snippet.DiffusersDDPM(_tiny_unet()), loader_of(_unit_digits(digits16)))
    assert [r.step for r in probe.history] == [0] and probe.triples.edges[-1] == 1000  # T: the scheduler's
    assert float(trainer.callback_metrics[LOSS_GAP]) == pytest.approx(probe.history[0].gap, rel=1e-6)
    fresh = snippet.DiffusersDDPM(_tiny_unet()).eval()  # the weights of step 0 (seeded)
    with torch.no_grad():
        expected = measure_loss_gap(
            lambda x0, t, noise: snippet.sample_fn.denoising_loss(fresh, x0, t, noise), probe.triples
        )
    assert probe.history[0].loss_train == pytest.approx(expected.loss_train, rel=1e-4)
    assert probe.history[0].loss_heldout == pytest.approx(expected.loss_heldout, rel=1e-4)


def test_integrations_lucidrains_snippet_drives_memwatch(tmp_path, digits16):
    pytest.importorskip("denoising_diffusion_pytorch")
    import integrations_lucidrains as snippet
    import lightning as L

    module = snippet.lucidrains_model(image_size=8, dim=8)
    watch = _small_watch(snippet.watch.sample_fn, snippet.watch.data_range)
    L.Trainer(max_steps=2, callbacks=[watch], **quiet_trainer_kwargs(tmp_path)).fit(
        module, loader_of(_unit_digits(digits16))
    )
    assert [r["step"] for r in watch.history] == [2]


def test_integrations_own_noise_snippet_repeats_and_spares_the_rng():
    import integrations_global_rng as snippet

    model = torch.nn.Module()
    model.bias = torch.tensor(0.1)
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    first = snippet.sample_fn(model, 4, noise=noise)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(snippet.sample_fn(model, 4, noise=noise), first)  # same seeds: identical by construction
    assert torch.equal(torch.cat([snippet.sample_fn(model, 1, noise=noise[i : i + 1]) for i in range(4)]), first)


def test_integrations_ema_snippet_scores_the_averaged_weights(tmp_path, digits16):
    pytest.importorskip("diffusers")
    import integrations_diffusers
    import integrations_ema as snippet
    import lightning as L
    from lightning.pytorch.callbacks import EMAWeightAveraging

    callbacks = snippet.trainer.callbacks
    assert callbacks.index(snippet.ema) < callbacks.index(snippet.watch) < callbacks.index(snippet.stopper)
    module = integrations_diffusers.DiffusersDDPM(_tiny_unet(), lr=1e-2)
    ema = EMAWeightAveraging(decay=0.5)
    watch = _small_watch(snippet.watch.sample_fn, (0.0, 1.0), steps=(3,))
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    scored = []

    def check(trainer, m, record):  # the module holds the scored (averaged) weights while listeners run
        scored.append(snippet.watch.sample_fn(m, 2, noise=noise))
        raw = {k: v.clone() for k, v in m.state_dict().items()}
        scored.append(raw)

    watch.add_listener(check)
    L.Trainer(max_steps=3, callbacks=[ema, watch], **quiet_trainer_kwargs(tmp_path)).fit(
        module, loader_of(_unit_digits(digits16))
    )
    averaged = ema._average_model.module.state_dict()  # test-only look at the average the callback keeps
    kept = scored[1]
    assert all(torch.allclose(kept[k], averaged[k]) for k in kept if k.startswith("unet."))


def test_every_module_the_architecture_page_names_exists():
    """docs/architecture.md's map (the layout block and the table) names only modules and folders that exist,
    and names every module of the core's top level and of callbacks/."""
    text = (DOCS / "architecture.md").read_text()
    layout = text.split("```text\nlightning_memwatch/", 1)[1].split("```", 1)[0]
    table = text.split("| Module | Owns | Does not |", 1)[1].split("\n\n", 1)[0]
    package = ROOT / "lightning_memwatch"
    named = set(re.findall(r"(?<![\w./])((?:\w+/)*\w+\.py)\b", layout))
    named |= set(re.findall(r"`((?:\w+/)*\w+\.py)`", table))
    folders = set(re.findall(r"(?<![\w./])((?:\w+/)+)(?=\s)", layout))
    assert len(named) > 20 and {"callbacks/memwatch.py", "callbacks/_train_images.py"} <= named
    missing = sorted(n for n in named | folders if not (package / n).exists())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"
    modules = [*package.glob("*.py"), *(package / "callbacks").glob("*.py")]
    core = {p.relative_to(package).as_posix() for p in modules if p.name != "__init__.py"}
    unnamed = sorted(core - named)
    assert not unnamed, f"docs/architecture.md does not place these modules: {unnamed}"
