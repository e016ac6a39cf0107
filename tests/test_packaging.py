"""The wheel is complete: an installed aurora_ds finds its DeepSpeed configs and recipes."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a copy so the checkout gets no build/ or *.egg-info folders.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("aurora_ds", "shard_tools", "ds_configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, timeout=600)
    (whl,) = out.glob("aurora_ds-*.whl")
    return whl


def test_wheel_carries_ds_configs_and_recipes(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(p.name for p in (ROOT / "ds_configs").glob("*.json"))
    assert shipped and {f"ds_configs/{n}" for n in shipped} <= names
    assert "ds_configs/__init__.py" in names
    assert {f"aurora_ds/recipes/{p.name}" for p in (ROOT / "aurora_ds" / "recipes").glob("*.yaml")} <= names
    assert "aurora_ds/plan.py" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "aurora-plan = aurora_ds.plan:main" in entry_points


def test_installed_wheel_resolves_ds_configs_by_name(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import json; from aurora_ds.engine.dsconfig import resolve_ds_config, shipped_ds_configs\n"
            "import aurora_ds.engine.dsconfig as m; assert m.__file__.startswith(%r), m.__file__\n"
            "print(sorted(shipped_ds_configs()))\n"
            "print(json.loads(resolve_ds_config('zero3').read_text())['zero_optimization']['stage'])\n"
            "try:\n    resolve_ds_config('zero9')\nexcept FileNotFoundError as e:\n    print(e)\n") % str(site)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(site)),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    known, stage, error = out.stdout.splitlines()
    assert known == str(sorted(p.stem for p in (ROOT / "ds_configs").glob("*.json")))
    assert stage == "3"
    assert "unknown DeepSpeed config 'zero9'" in error and "zero3_offload" in error


def test_ds_config_by_path_and_unknown_name(tmp_path):
    from aurora_ds.engine.dsconfig import resolve_ds_config

    assert resolve_ds_config("zero2").read_text() == (ROOT / "ds_configs" / "zero2.json").read_text()
    own = tmp_path / "mine.json"
    own.write_text("{}")
    assert resolve_ds_config(str(own)) == own
    with pytest.raises(FileNotFoundError, match=r"shipped configs: \['replicated', 'zero2', 'zero3'"):
        resolve_ds_config("zero9")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_ds_config(str(tmp_path / "gone.json"))
