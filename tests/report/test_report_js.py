"""The HTML report's script, run headless with node + jsdom (a test dependency that
`make test` installs into tests/report/js when npm is present): it redraws the timeline,
keeps the peak at every zoom, shows the event under the cursor, zooms, pans and resets."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

import memprof
from report_synthetic import synthetic_profile

JS = Path(__file__).parent / "js"


def _run_page(path) -> dict:
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the page's script cannot be run headless")
    if not (JS / "node_modules" / "jsdom").is_dir():
        pytest.skip("jsdom is not installed: `make test` installs it (npm install in "
                    "tests/report/js) when npm is present")
    r = subprocess.run(["node", str(JS / "run_page.js"), str(path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_script_draws_zooms_and_hovers(leaky_profile, tmp_path):
    prof = leaky_profile
    path = tmp_path / "r.html"
    memprof.export(prof, str(path))
    out = _run_page(path)
    assert out["errors"] == [] and out["hasApi"] and out["rendered"] == "js"
    assert out["maxTotal"] == prof.peak
    assert "parameters" in out["layers"] and "optimizer_state" in out["layers"]
    pe = prof.peak_event
    tip = out["peakTooltip"]
    assert out["tooltipShown"] and tip == out["mousemoveTooltip"]
    assert f"step {pe['step']}, {pe['phase']}" in tip
    assert f"op {pe['op']}" in tip and f"module {pe['module']}" in tip
    assert f"live {memprof.units.fmt_bytes(prof.peak)}" in tip
    z0, z1 = out["zoomedView"]
    assert z1 - z0 < (out["initialView"][1] - out["initialView"][0]) / 100
    assert out["zoomedMax"] == prof.peak                 # zoomed in at the peak: still there
    p0, p1 = out["pannedView"]
    assert p0 != z0 and abs((p1 - p0) - (z1 - z0)) < 1e-6
    assert out["resetView"] == out["initialView"]
    assert out["buttons"] == ["zoom in", "zoom out", "zoom to peak", "reset"]


def test_script_on_a_long_profile_uses_the_events_near_the_peak(tmp_path):
    prof = synthetic_profile(400_000)
    path = tmp_path / "long.html"
    memprof.export(prof, str(path))
    out = _run_page(path)
    assert out["errors"] == [] and out["maxTotal"] == prof.peak
    assert out["zoomedUsesDetail"] and out["zoomedMax"] == prof.peak


def _zoomed_to_the_peak(out: dict, prof) -> None:
    """The view "zoom to peak" left: around the peak, narrower than the run, the peak in it."""
    t0, t1 = out["peakView"]
    full = out["initialView"][1] - out["initialView"][0]
    assert out["errors"] == []
    assert t1 - t0 <= full / 2 and t0 <= out["peakT"] <= t1
    assert out["peakViewMax"] == prof.peak


def test_zoom_to_peak_zooms_on_a_short_run(leaky_profile, tmp_path):
    """A run with fewer events than the timeline's points embeds no `detail`; the button
    zoomed to the whole run (it did nothing)."""
    path = tmp_path / "r.html"
    memprof.export(leaky_profile, str(path))
    out = _run_page(path)
    _zoomed_to_the_peak(out, leaky_profile)


def test_zoom_to_peak_on_a_long_run_shows_the_events_near_it(tmp_path):
    prof = synthetic_profile(400_000)
    path = tmp_path / "long.html"
    memprof.export(prof, str(path))
    out = _run_page(path)
    _zoomed_to_the_peak(out, prof)
    assert out["peakViewUsesDetail"]
