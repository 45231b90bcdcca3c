"""EvalRecord: the typed record of one evaluation and the one mapping to and from logged scalar keys."""

from __future__ import annotations

import json
import math

import pytest

import lightning_memwatch.log as mwlog
from lightning_memwatch import EvalRecord
from lightning_memwatch.detection import TimescaleDetector
from lightning_memwatch.record import (
    F_MEM,
    FID_KEY,
    FID_TRAIN_FLOOR,
    NOT_RECORD_KEYS,
    RECORD_FIELDS,
    SCALAR_KEYS,
    TAU_MEM,
    RecordField,
    finite_float,
)


def full_record(**changes) -> EvalRecord:
    values = dict(
        step=500, num_samples=1000, f_mem=0.25, f_mem_ci_low=0.2, f_mem_ci_high=0.3,
        ratio_q05=0.05, ratio_q25=0.3, ratio_median=0.6, ratio_q75=0.8, ratio_q95=0.95,
        fid=12.5, fid_num_samples=2000, metrics={"sharpness": 3.5}, sample_seconds=4.0, metric_seconds=0.25,
    )
    return EvalRecord(**(values | changes))


def test_the_mapping_view_is_the_dict_record_of_earlier_versions():
    record = full_record()
    assert list(record) == [
        "step", "num_samples", "f_mem", "f_mem_ci_low", "f_mem_ci_high", "ratio_q05", "ratio_q25", "ratio_median",
        "ratio_q75", "ratio_q95", "fid", "fid_num_samples", "sharpness", "metric_seconds", "sample_seconds",
    ]
    assert record["f_mem"] == record.f_mem == 0.25 and record["sharpness"] == 3.5 and record.get("missing") is None
    assert "sharpness" in record and "metrics" not in record and len(record) == 15
    off = full_record(fid=None, fid_num_samples=None)
    assert off["fid"] is None and off.get("fid_num_samples") is None and "fid" in off  # FID off: None, as before


def test_a_misspelt_key_fails_loudly():
    record = full_record()
    with pytest.raises(KeyError, match="Did you mean 'f_mem'"):
        record["f_mme"]
    with pytest.raises(TypeError):
        EvalRecord(step=1, f_mem=0.0, f_mme=0.1)  # type: ignore[call-arg]
    with pytest.raises(AttributeError):
        RecordField.F_MME  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(ValueError, match="unknown key 'f_mme'"):
        EvalRecord.from_dict(full_record().to_dict() | {"f_mme": 0.1})
    with pytest.raises(ValueError, match="not a MemWatch key"):
        EvalRecord.from_scalars(1, {"f_mem": 0.1})  # the field name, not the logged key
    with pytest.raises(ValueError, match="no 'memwatch/f_mem'"):
        EvalRecord.from_scalars(1, {"memwatch/f_mme": 0.1})
    with pytest.raises(ValueError, match="clash"):
        EvalRecord(step=1, f_mem=0.0, metrics={"fid": 1.0})
    with pytest.raises(ValueError, match="step"):
        EvalRecord(step=-1, f_mem=0.0)
    with pytest.raises(AttributeError):
        full_record().f_mem = 0.5  # type: ignore[misc]  # records are read-only


def test_field_names_and_keys_are_defined_once_and_agree():
    names = {v for k, v in vars(RecordField).items() if k.isupper()}
    assert names == set(RECORD_FIELDS) and set(SCALAR_KEYS) <= names
    assert mwlog.SCALAR_KEYS is SCALAR_KEYS and mwlog.F_MEM == F_MEM == "memwatch/f_mem"
    assert mwlog.FID_TRAIN_FLOOR == FID_TRAIN_FLOOR and TAU_MEM in NOT_RECORD_KEYS
    assert all(key.startswith(mwlog.PREFIX) for key in SCALAR_KEYS.values())


def test_scalars_round_trip_through_the_one_mapping():
    record = full_record(
        extra={"loss_gap": 0.1}, scored_weights="averaged",
        onset_forecast=900.0, onset_forecast_low=800.0, onset_forecast_high=1200.0,
    )  # fmt: skip
    scalars = record.to_scalars()
    assert scalars == {
        "memwatch/f_mem": 0.25, "memwatch/f_mem_ci_low": 0.2, "memwatch/f_mem_ci_high": 0.3,
        "memwatch/ratio_median": 0.6, "memwatch/fid": 12.5, "memwatch/fid_num_samples": 2000.0,
        "memwatch/onset_forecast": 900.0, "memwatch/onset_forecast_low": 800.0,
        "memwatch/onset_forecast_high": 1200.0, "memwatch/sharpness": 3.5, "memwatch/loss_gap": 0.1,
    }  # fmt: skip
    back = EvalRecord.from_scalars(500, scalars | {TAU_MEM: 400.0, FID_TRAIN_FLOOR: 3.0})  # run-level keys skipped
    assert back.step == 500 and back.fid_num_samples == 2000 and isinstance(back.fid_num_samples, int)
    for name in SCALAR_KEYS:
        assert back[name] == record[name], name
    # what the log does not hold: no num_samples, outer quantiles or timings; extra signals come back as metrics
    assert back.num_samples is None and back.ratio_q05 is None and back.sample_seconds is None
    assert back.scored_weights is None  # a string: the record's, not a logged scalar
    assert back.metrics == {"sharpness": 3.5, "loss_gap": 0.1} and "num_samples" not in back
    assert FID_KEY not in EvalRecord(step=1, f_mem=0.0).to_scalars()  # FID off: not logged


def test_plain_dicts_for_checkpoints_and_json_and_old_flat_records():
    record = full_record(extra={"loss_gap": 0.1})
    state = json.loads(json.dumps(record.to_dict()))
    assert EvalRecord.from_dict(state) == record
    old_flat = dict(full_record())  # a MemWatch.history item of an earlier version
    again = EvalRecord.from_dict(old_flat)
    assert again.metrics == {"sharpness": 3.5} and again == full_record() and again == old_flat
    assert record.replace(sample_seconds=1.0).sample_seconds == 1.0 and record.sample_seconds == 4.0


def test_the_detector_reads_records_and_dicts_alike():
    records = [full_record(step=s, f_mem=f, f_mem_ci_low=f, fid=q) for s, f, q in
               [(100, 0.0, 50.0), (200, 0.0, 10.4), (300, 0.2, 10.0)]]
    a, b = TimescaleDetector(floor=10.0), TimescaleDetector(floor=10.0)
    for record in records:
        assert [e.to_dict() for e in a.update(record)] == [e.to_dict() for e in b.update(dict(record))]
    assert (a.tau_gen.step, a.tau_mem.step) == (200, 300)


def test_finite_float():
    assert finite_float("1.0") is None and finite_float(None) is None and finite_float(math.nan) is None
    assert finite_float(2) == 2.0 and finite_float(math.inf) is None


def test_every_table_of_names_is_read_from_the_dataclass():
    """The names are spelled once, in EvalRecord's fields (quantiles and logged keys in their metadata)."""
    import dataclasses

    import lightning_memwatch.evaluator as evaluator
    from lightning_memwatch import FID, MemWatch
    from lightning_memwatch.record import RATIO_QUANTILES, listed_keys

    declared = [f for f in dataclasses.fields(EvalRecord)]
    own = [f.name for f in declared if f.name not in ("metrics", "extra")]
    assert list(RECORD_FIELDS) == own and {getattr(RecordField, name.upper()) for name in own} == set(own)
    assert RATIO_QUANTILES == {f.name: f.metadata["quantile"] for f in declared if "quantile" in f.metadata}
    assert list(RATIO_QUANTILES.values()) == [0.05, 0.25, 0.5, 0.75, 0.95]
    assert evaluator.RATIO_QUANTILES is RATIO_QUANTILES
    assert SCALAR_KEYS == {f.name: f.metadata["scalar"] for f in declared if "scalar" in f.metadata}
    # the mapping's keys come in the dataclass's order, which is the dict records' order of earlier versions
    record = full_record(extra={"loss_gap": 0.1}, scored_weights="raw")
    assert list(record) == [
        "step", "num_samples", "f_mem", "f_mem_ci_low", "f_mem_ci_high",
        "ratio_q05", "ratio_q25", "ratio_median", "ratio_q75", "ratio_q95",
        "fid", "fid_num_samples", "sharpness", "loss_gap", "metric_seconds", "sample_seconds", "scored_weights",
    ]  # fmt: skip
    assert "onset_forecast" in record.replace(onset_forecast=900.0)  # a key where it holds a value
    assert list(record) == listed_keys(fid=True, metrics=["sharpness"], extra=["loss_gap"])
    assert MemWatch(fid=None).record_keys == [k for k in listed_keys(fid=False) if k in own]
    watch = MemWatch(fid=FID(), metrics={"sharpness": lambda x: 0.0})
    assert watch.record_keys == listed_keys(fid=True, metrics=["sharpness"])
    with pytest.raises(TypeError):  # all but the step by name
        EvalRecord(500, 0.25)


def test_each_choice_tuple_is_its_literals_arguments():
    from typing import get_args

    from lightning_memwatch import adaptive, detection, weights
    from lightning_memwatch.callbacks import memwatch
    from lightning_memwatch.metrics import features

    assert memwatch.KNN_SHARDING == get_args(memwatch.KnnSharding) == ("auto", "sharded", "rank0")
    assert detection.QUALITY_MODES == get_args(detection.QualityMode) == ("min", "max")
    assert detection._GEN_RULES == get_args(detection.GenRule) and detection._MEM_RULES == get_args(detection.MemRule)
    assert adaptive._SIGNALS == get_args(adaptive.Signal)
    assert weights.WEIGHTS_NAMES == get_args(weights.WeightsName) == ("auto", "raw", "averaged")
    assert features.RESIZE_MODES == get_args(features.ResizeMode)
