"""`janus-server check` (model/selfcheck.py): the golden set through the device's runtime, and the step timing."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).parent / "golden" / "janus-tiny"
ROOT = Path(__file__).resolve().parents[1]


def check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "server.cli", "check", "--device", "cpu", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)


def test_check_passes_on_cpu_and_reports_every_part(tmp_path):
    report_path = tmp_path / "report.json"
    done = check("--layers", "1", "--rows", "2,4", "--rounds", "2", "--report", str(report_path))
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["device"] == "cpu" and report["dtype"] == "float32" and report["passed"] is True
    assert report["runtime"]["runtime"] == "cpu" and report["runtime"]["golden"] == str(GOLDEN)
    names = [c["name"] for c in report["golden"]]
    assert [n.split(":")[0] for n in names] == ["understanding conv1", "understanding conv2", "generation",
                                                "VQ decode", "sampling"]
    for c in report["golden"]:
        assert c["passed"] and c["agreement"] == 1.0 and c["max_abs_error"] <= c["tolerance"] and c["compared"] > 0
    timing = report["timing"]
    assert timing["layers"] == 1 and timing["floor_ms"] > 0 and timing["bandwidth_gbs"] > 0
    assert {(s["step"], s["rows"]) for s in timing["steps"]} == {(step, rows) for step in ("eager", "static", "openvino")
                                                                 for rows in (2, 4)}
    assert all(s["ms_median"] > 0 and s["x_floor"] > 0 for s in timing["steps"])
    assert timing["ops_per_step"] == sum(timing["ops"].values()) > 0
    assert "not available" in timing["captured"]
    assert "passed" in done.stdout and "understanding conv1" in done.stdout


def test_check_fails_when_the_device_misses_the_reference(tmp_path):
    """A golden set whose first understanding logits are moved by 0.01: that comparison fails, the rest pass,
    and the command exits 1."""
    golden = tmp_path / "golden"
    shutil.copytree(GOLDEN, golden, ignore=shutil.ignore_patterns("images", "generated"))
    with np.load(golden / "cases.npz") as data:
        arrays = {name: data[name] for name in data.files}
    arrays["understanding.conv1.step_logits"] = arrays["understanding.conv1.step_logits"] + np.float32(0.01)
    np.savez(golden / "cases.npz", **arrays)
    report_path = tmp_path / "report.json"
    done = check("--golden", str(golden), "--no-timing", "--report", str(report_path))
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["passed"] is False and "timing" not in report
    assert [c["passed"] for c in report["golden"]] == [False, True, True, True, True]
    assert 0.0099 < report["golden"][0]["max_abs_error"] < 0.0101
    assert "FAIL understanding conv1" in done.stdout


def test_check_says_where_the_golden_set_is_missing(tmp_path):
    done = check("--golden", str(tmp_path), "--no-timing", "--report", str(tmp_path / "r.json"))
    assert done.returncode == 2 and "golden set" in done.stderr and not (tmp_path / "r.json").exists()
