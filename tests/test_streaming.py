"""Streaming in describe: scans are read one at a time (the group ICA keeps at most ``ica_max_scans``), measures
are kept as compact arrays, texts are built one scan at a time. Memory figures: benchmarks/bench_stream.py."""

import json
import weakref

import numpy as np
import pandas as pd
import pytest

from fmrilm.data.cohort import Cohort, load_cohort
from fmrilm.descriptors import pipeline, text
from fmrilm.descriptors.pipeline import _block, _Blocks, _texts, run_describe
from fmrilm.descriptors.reference import DescribeConfig
from test_describe import make_cohort

ICA_MAX_SCANS = 5


class LiveScans:
    """Wraps ``Cohort.scan`` to count the scan arrays it returned that are still alive (and the most at once)."""

    def __init__(self, scan):
        self.scan, self.live, self.most, self.reads = scan, 0, 0, 0

    def __call__(self, cohort: Cohort, index: int) -> np.ndarray:
        x = self.scan(cohort, index)
        self.live, self.reads = self.live + 1, self.reads + 1
        self.most = max(self.most, self.live)
        weakref.finalize(x, self._freed)
        return x

    def _freed(self) -> None:
        self.live -= 1


@pytest.fixture(scope="module")
def described(tmp_path_factory):
    """A 24-scan cohort described (serially) while counting the scans held at once."""
    root = tmp_path_factory.mktemp("streaming")
    cohort = make_cohort(root / "cohort", n_scans=24)
    counter = LiveScans(Cohort.scan)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Cohort, "scan", lambda self, index: counter(self, index))
        run_describe(cohort, root / "desc", config=DescribeConfig(ica_components=4, ica_max_scans=ICA_MAX_SCANS))
    return cohort, root / "desc", counter


def test_describe_holds_a_bounded_number_of_scans(described):
    _, _, counter = described
    # every scan is read for the group FC and for its measures; the ICA reads its evenly spaced subset
    assert counter.reads == 2 * 24 + ICA_MAX_SCANS
    assert counter.live == 0
    # the ICA subset (+ the one being read) is the most ever held: not the 24 scans of the cohort
    assert counter.most <= ICA_MAX_SCANS + 1


def test_blocks_equal_a_frame_of_dicts_with_missing_keys():
    rows = [{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 4.0}, {"b": 5.0, "c": 6.0}, {"a": 7.0, "b": np.nan}]
    blocks = _Blocks()
    for start in range(0, len(rows), 2):
        assert blocks.add(_block(rows[start:start + 2])) == 2
    pd.testing.assert_frame_equal(blocks.table(), pd.DataFrame(rows))
    same = _Blocks()
    for start in range(0, 2):
        same.add(_block(rows[start:start + 1]))
    assert same.blocks[0][0] is same.blocks[1][0]  # one tuple of column names for chunks of the same layout
    pd.testing.assert_frame_equal(same.table(), pd.DataFrame(rows[:2]))
    pd.testing.assert_frame_equal(_Blocks().table(), pd.DataFrame([]))


def test_texts_are_built_one_scan_at_a_time(described, monkeypatch):
    cohort_path, desc, _ = described
    calls = []
    describe = text.describe
    monkeypatch.setattr(text, "describe", lambda *a, **k: calls.append(1) or describe(*a, **k))
    raw = pd.read_parquet(desc / pipeline.RAW_FILE).drop(columns=["scan_id", "subject_id"])
    z = pd.read_parquet(desc / pipeline.Z_FILE).drop(columns=["scan_id", "subject_id"])
    with load_cohort(cohort_path) as cohort:
        records = _texts(cohort, z, raw, DescribeConfig(ica_components=4))
        first = next(records)
        assert len(calls) == 1  # nothing beyond the first scan was described yet
        written = [line for line in (desc / pipeline.TEXTS_FILE).read_text().splitlines() if line]
        assert first["text"] == json.loads(written[0])["text"]
        assert sum(1 for _ in records) == len(written) - 1 == 23
