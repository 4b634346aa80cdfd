"""`DRY_RUN=1 benches/gpu/run.sh`: the GPU check's bench phases on tiny shapes, on the CPU — so the
script the one device run depends on cannot rot unnoticed (issue 12)."""

import os
import subprocess

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.slow
def test_gpu_check_dry_run_measures_every_phase_and_summarizes(tmp_path):
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "PYTHON": os.environ.get("PYTHON", "python"),
        "OMP_NUM_THREADS": "1",
    }
    import sys

    env["PYTHON"] = sys.executable
    p = subprocess.run(
        ["bash", "benches/gpu/run.sh", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = (tmp_path / "log.txt").read_text()
    assert "=== [headline] rc=0" in log and "=== [ktargets] rc=0" in log, log[-3000:]
    assert log.index("[headline]") < log.index("[ktargets]")
    summary = (tmp_path / "summary.md").read_text()
    assert (
        "MFU" in summary
        and "analytic incl. attention" in summary
        and "unlearn_batched K=4" in summary
    ), summary
    assert p.returncode == 0, p.stderr[-2000:]
