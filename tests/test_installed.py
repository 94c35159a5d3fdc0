"""alignflow installed the way users install it: the wheel, no editable checkout on the path.

The wheel is built from this checkout and installed without `-e` (and without its dependencies) into a fresh
virtual environment whose only other packages are the suite's, reached through a path line: the suite's
editable finder for this checkout is a .pth file there, which a path line does not run, so `import tasks`
can only find the wheel's copy. From a folder outside the repository the installed CLI validates the
packaged pipelines and runs a tiny pipeline. (The wheel that left out `tasks.stages` failed both.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY = (ROOT / "scripts" / "tiny_pipeline.yaml").read_text()  # the one scripts/build_image.sh runs in the image


def test_the_wheel_installed_without_the_checkout_validates_and_runs_a_pipeline(tmp_path, prefect_server):
    source, wheels = tmp_path / "source", tmp_path / "wheels"  # built from a copy: setuptools writes build/ in place
    for name in ("pyproject.toml", "README.md", "pipelines.yaml"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    for package in ("alignment", "tasks", "flows"):  # flows/pipelines.yaml stays a link to ../pipelines.yaml
        shutil.copytree(ROOT / package, source / package, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(wheels), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = wheels.glob("alignflow-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert "tasks/stages/dpo.py" in names and "tasks/stages/__init__.py" in names
        shipped = z.read("flows/pipelines.yaml").decode()  # the file itself, not a link to ../pipelines.yaml
    assert shipped == (ROOT / "pipelines.yaml").read_text()

    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "suite_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co., not the checkout
    installed = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import tasks.stages.dpo as m; print(m.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True)
    assert where.returncode == 0 and str(site) in where.stdout, where.stdout + where.stderr  # the wheel's copy
    cli = str(env_dir / "bin" / "alignflow")
    shipped_ok = subprocess.run([cli, "validate"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert shipped_ok.returncode == 0 and "quickstart" in shipped_ok.stdout, shipped_ok.stdout + shipped_ok.stderr
    (work / "pipelines.yaml").write_text(TINY)
    run = subprocess.run([cli, "run", "tiny"], cwd=work, env={**env, "TQDM_DISABLE": "1"}, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "[sft] done" in run.stdout + run.stderr
    assert (work / "runs" / "stages" / "sft").is_dir() and (work / "mlflow.db").is_file()
