"""The container image built and run on this machine: scripts/build_image.sh builds a base image (a registry's
python:3.11-slim, or a Debian root filesystem from Debian's packages), builds alignflow's image on it with podman,
and runs a tiny pipeline inside it with a work folder mounted at /work. What the pipeline wrote must be in that
folder on the host: the run happened in the image, from the package installed there."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("podman") is None or shutil.which("runc") is None,
                    reason="podman and runc are not installed (Debian: apt-get install podman runc mmdebstrap)")
def test_the_image_builds_and_runs_a_pipeline_with_work_mounted(tmp_path):
    work = tmp_path / "work"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "build_image.sh"), str(work)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=1200)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "[evaluate] done" in out and "build_image: image" in out, out[-4000:]
    assert (work / "mlflow.db").is_file(), out[-2000:]
    for stage in ("world", "sft", "evaluate"):
        assert (work / "runs" / "stages" / stage).is_dir(), f"{stage} wrote nothing under {work}/runs/stages\n{out[-2000:]}"
