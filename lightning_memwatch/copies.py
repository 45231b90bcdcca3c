"""The copied-training-images table: which training images the model reproduces, how often, since when.

Every evaluation already finds each sample's nearest training image; a memorized sample (d1/d2 < threshold)
is a copy of that image. :class:`CopyTable` keeps, per copied training row, its class (the training label,
when the training data has labels), how many samples copied it over all evaluations so far, the first and
last step (optimizer steps) it was copied at and, for a class-conditional model, the classes the copying
samples were generated for (a sample generated for class 2 may copy a training image labelled 4).
Duplicated training rows report their first index, as the nearest-neighbour index does.

The table is plain Python (``state_dict``/``load_state_dict`` round-trip exactly, so a resumed run continues
it bit for bit) and is updated from the same broadcast values on every rank, so every rank holds the same table.
Pure Python: no torch or Lightning import.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["CSV_NAME", "CopiedTrainingImage", "CopyTable"]

CSV_NAME = "memwatch_copied_training_images.csv"
"""File name of the table MemWatch writes at the end of fit (see ``MemWatch.copied_training_images``)."""
_STATE_VERSION = 2  # 2: rows carry the generated classes (version 1 rows load without them)


@dataclass(frozen=True)
class CopiedTrainingImage:
    """One training image that generated samples copied.

    Attributes:
        train_index: row of the training set (its first row when it is duplicated).
        label: its class (training label), or None when the training data has no labels.
        times_copied: generated samples that copied it, summed over evaluations (samples).
        first_step: step of the first evaluation that copied it (optimizer steps).
        last_step: step of the last evaluation that copied it (optimizer steps).
        generated_classes: ``((generated class, samples), ...)`` in class order: the classes the copying samples
            were generated for, with how many of its copies each produced (samples); empty for an
            unconditional model.
    """

    train_index: int
    label: int | None
    times_copied: int
    first_step: int
    last_step: int
    generated_classes: tuple[tuple[int, int], ...] = ()


class CopyTable:
    """The copied training images of one run, updated after each evaluation.

    Example:
        >>> table = CopyTable()
        >>> table.update(step=100, train_indices=[7, 7, 2], labels=[3, 3, 1])
        >>> table.update(step=200, train_indices=[7], labels=[3])
        >>> [(r.train_index, r.times_copied, r.first_step, r.last_step) for r in table.rows()]
        [(7, 3, 100, 200), (2, 1, 100, 100)]
    """

    def __init__(self) -> None:
        # train index -> [label, times copied, first step, last step, {generated class: samples}]
        self._rows: dict[int, list[Any]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def update(
        self,
        step: int,
        train_indices: Sequence[int],
        labels: Sequence[int | None] | None = None,
        generated_labels: Sequence[int] | None = None,
    ) -> None:
        """Add one evaluation's copies: the nearest training row of each memorized sample (repeats count).

        Args:
            step: the evaluation's step (optimizer steps).
            train_indices: one training row per memorized sample.
            labels: the class of each of those rows, or None when unknown.
            generated_labels: the class each of those samples was generated for (class-conditional models),
                or None.
        """
        step = int(step)
        for position, row in enumerate(train_indices):
            label = None if labels is None or labels[position] is None else int(labels[position])
            entry = self._rows.get(int(row))
            if entry is None:
                entry = self._rows[int(row)] = [label, 1, step, step, {}]
            else:
                entry[0], entry[1], entry[3] = label, entry[1] + 1, step
            if generated_labels is not None:
                generated = int(generated_labels[position])
                entry[4][generated] = entry[4].get(generated, 0) + 1

    def rows(self, label: int | None = None) -> list[CopiedTrainingImage]:
        """The copied training images, most-copied first (then earliest first copy, then lowest row); only
        those of class ``label`` when given."""
        chosen: Iterable[CopiedTrainingImage] = (_row(k, v) for k, v in self._rows.items())
        if label is not None:
            chosen = (r for r in chosen if r.label == label)
        return sorted(chosen, key=lambda r: (-r.times_copied, r.first_step, r.train_index))

    def copying_classes(self, step: int) -> dict[int, int]:
        """``{class: training images of that class copied at step}`` (classes with labels only)."""
        out: dict[int, int] = {}
        for label, _, _, last, _ in self._rows.values():
            if last == step and label is not None:
                out[label] = out.get(label, 0) + 1
        return dict(sorted(out.items()))

    # -- output -------------------------------------------------------------------------------------------
    def to_csv(self) -> str:
        """The table as CSV text, a header line then the rows in :meth:`rows` order (empty class: no labels;
        ``generated_classes`` as ``class:samples`` pairs joined by ``;``, e.g. ``2:5;4:1``, empty when
        unconditional)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["train_index", "class", "times_copied", "first_step", "last_step", "generated_classes"])
        for r in self.rows():
            label = "" if r.label is None else r.label
            generated = ";".join(f"{k}:{n}" for k, n in r.generated_classes)
            writer.writerow([r.train_index, label, r.times_copied, r.first_step, r.last_step, generated])
        return buffer.getvalue()

    def to_markdown(self, max_rows: int = 20) -> str:
        """The ``max_rows`` most-copied rows as a Markdown table (TensorBoard's text tab renders it)."""
        shown = self.rows()[:max_rows]
        lines = [
            f"{len(self)} training image(s) copied; the {len(shown)} most copied:",
            "",
            "| train index | class | times copied | first step | last step | generated for class (samples) |",
            "|---|---|---|---|---|---|",
        ]
        for r in shown:
            label = "-" if r.label is None else r.label
            generated = ", ".join(f"{k} ({n})" for k, n in r.generated_classes) or "-"
            lines.append(
                f"| {r.train_index} | {label} | {r.times_copied} | {r.first_step} | {r.last_step} | {generated} |"
            )
        return "\n".join(lines)

    # -- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain Python values, rows in training-row order (``torch.load(weights_only=True)``- and JSON-safe)."""
        rows = []
        for k in sorted(self._rows):
            label, times, first, last, generated = self._rows[k]
            rows.append([k, label, times, first, last, [[c, n] for c, n in sorted(generated.items())]])
        return {"version": _STATE_VERSION, "rows": rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the rows saved by :meth:`state_dict` (replacing the current ones); tables saved before the
        generated classes were kept (version 1) load with none."""
        if state_dict.get("version") not in (1, _STATE_VERSION):
            raise ValueError(
                f"Unsupported copy-table state version {state_dict.get('version')!r} (this version reads 1 and "
                f"{_STATE_VERSION})."
            )
        rows: dict[int, list[Any]] = {}
        for row in state_dict["rows"]:
            train_index, label, times, first, last, *rest = row
            generated = {int(c): int(n) for c, n in (rest[0] if rest else [])}
            label = None if label is None else int(label)
            rows[int(train_index)] = [label, int(times), int(first), int(last), generated]
        self._rows = rows

    def __repr__(self) -> str:
        return f"CopyTable({len(self)} copied training images)"


def _row(train_index: int, entry: list[Any]) -> CopiedTrainingImage:
    """The typed row of one table entry ``[label, times copied, first step, last step, {class: samples}]``."""
    label, times, first, last, generated = entry
    return CopiedTrainingImage(train_index, label, times, first, last, tuple(sorted(generated.items())))
