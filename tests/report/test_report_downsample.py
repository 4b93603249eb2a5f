"""Downsampling for long profiles: every peak is kept, the page stays small (synthetic
profiles built with numpy, see benchmarks/report_size.py for the 20M-event figure)."""
import numpy as np
import pytest

import memprof
from memprof.report import series as S
from memprof.report.html_data import undelta
from report_page import Page
from report_synthetic import synthetic_profile


@pytest.fixture(scope="module")
def long_profile():
    return synthetic_profile(400_000)


def test_envelope_keeps_every_bucket_maximum(long_profile):
    prof = long_profile
    live = prof.live_bytes()
    t = prof.memory["t_ns"]
    buckets = 500
    idx = S.envelope(t, live, buckets, keep=[prof.peak_index])
    assert idx.size <= 2 * buckets + 2 and prof.peak_index in idx
    b = ((t - t[0]) * (buckets - 1) // (t[-1] - t[0])).astype(np.int64)
    true_max = np.full(buckets, -1, dtype=np.int64)
    np.maximum.at(true_max, b, live)
    kept_max = np.full(buckets, -1, dtype=np.int64)
    np.maximum.at(kept_max, b[idx], live[idx])
    assert (kept_max == true_max).all()
    true_min = np.full(buckets, live.max() + 1)
    np.minimum.at(true_min, b, live)
    kept_min = np.full(buckets, live.max() + 1)
    np.minimum.at(kept_min, b[idx], live[idx])
    assert (kept_min == true_min).all()


def test_series_categories_are_exact_at_kept_points(long_profile):
    prof = long_profile
    s = S.series(prof, 300)
    assert (s.total == prof.live_bytes()[s.index]).all()
    for p in S.step_peaks(prof):                       # each step's peak is a kept point
        assert p in set(s.index.tolist())
    k = int(np.flatnonzero(s.index == prof.peak_index)[0])
    from memprof.record.events import CATEGORIES
    assert dict(zip(CATEGORIES, s.by_category[k].tolist())) == prof.breakdown("category")


def test_long_profile_page_is_small_and_keeps_the_peak(long_profile, tmp_path):
    prof = long_profile
    path = tmp_path / "long.html"
    memprof.export(prof, str(path))
    size = path.stat().st_size
    assert size < 1_000_000, size
    tl = Page(path.read_text()).data()["timeline"]
    totals = np.sum([undelta(c) for c in tl["points"]["c"]], axis=0)
    assert totals.max() == prof.peak == tl["peak"]["bytes"]
    assert len(totals) < 2 * 6_000 + len(prof.steps) + 10
    detail = np.sum([undelta(c) for c in tl["detail"]["c"]], axis=0)
    events = undelta(tl["detail"]["event"])
    assert prof.peak_index in events.tolist() and detail.max() == prof.peak
    assert (np.diff(events) == 1).all()                # every event near the peak
