"""Cost of the class-conditional bookkeeping against one evaluation's metric time.

What a class-conditional evaluation adds to an unconditional one: f_mem per class with its bootstrap interval
(:func:`~lightning_memwatch.metrics.per_class.per_class_memorization`), reading the copies out of the
nearest-neighbour result and updating the copy table (:class:`~lightning_memwatch.copies.CopyTable`), and the
record's larger broadcast payload. The reference is the evaluator's metric time (``record.metric_seconds``:
nearest-neighbour search, f_mem, its interval, the ratio quantiles), measured on the same samples. The target
(issue 21): the bookkeeping under 5% of it.

Setup: the scikit-learn digits (8x8, [-1, 1]) as training set, ``num_samples`` generated samples of which a
quarter are exact copies of training digits (so the copy table has rows to update), 10 classes drawn by
MemWatch's own rule (:func:`~lightning_memwatch.labels.draw_labels`). Medians over ``--repeats`` runs.

Run: ``python benchmarks/conditional_cost.py [--n 1285] [--num-samples 1000] [--repeats 7]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_memwatch import Evaluator
from lightning_memwatch.apps.data import DigitsDataModule
from lightning_memwatch.callbacks._copies import copied_rows
from lightning_memwatch.copies import CopyTable
from lightning_memwatch.labels import draw_labels
from lightning_memwatch.metrics.per_class import per_class_memorization


def measure(n: int, num_samples: int, repeats: int, bootstrap: int) -> dict:
    dm = DigitsDataModule(n=n, num_heldout=1797 - n)
    dm.setup("fit")
    train, labels = dm.train_images(), dm.train_labels()
    gen = torch.Generator().manual_seed(0)
    samples = torch.rand((num_samples, *train.shape[1:]), generator=gen) * 2 - 1
    copies = torch.randint(0, n, (num_samples // 4,), generator=gen)
    samples[: len(copies)] = train[copies]
    sample_labels = draw_labels(range(num_samples), labels, seed=0)
    evaluator = Evaluator(train, data_range=(-1.0, 1.0), bootstrap=bootstrap, inputs_checked=True)
    evaluator.evaluate(samples, 0)  # warm-up (index build caches, first-call overheads)

    metric, with_labels, bookkeeping = [], [], []
    table = CopyTable()
    for step in range(1, repeats + 1):
        metric.append(evaluator.evaluate(samples, step).metric_seconds)
        with_labels.append(evaluator.evaluate(samples, step, labels=sample_labels).metric_seconds)
        result = evaluator.last_result
        start = time.perf_counter()
        per_class_memorization(result.memorized, sample_labels)
        pairs = copied_rows(result)
        rows = [row for _, row in pairs]
        table.update(step, rows, labels[torch.as_tensor(rows, dtype=torch.long)].tolist())
        bookkeeping.append(time.perf_counter() - start)
    return {
        "n": n,
        "num_samples": num_samples,
        "copied_samples": int(result.memorized.sum()),
        "table_rows": len(table),
        "metric_ms": 1000 * statistics.median(metric),
        "metric_with_labels_ms": 1000 * statistics.median(with_labels),
        "bookkeeping_ms": 1000 * statistics.median(bookkeeping),
        "share": statistics.median(bookkeeping) / statistics.median(metric),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[512, 1285])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for n in args.n:
        r = measure(n, args.num_samples, args.repeats, args.bootstrap)
        print(
            f"n={r['n']}, {r['num_samples']} samples ({r['copied_samples']} copies, {r['table_rows']} table rows): "
            f"metric time {r['metric_ms']:.1f} ms (with labels {r['metric_with_labels_ms']:.1f} ms); per-class "
            f"f_mem + copy table {r['bookkeeping_ms']:.2f} ms = {100 * r['share']:.2f}% of the metric time"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
