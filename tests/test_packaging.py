"""The wheel ships what an installed normswap needs (issue 11 item 7): every recipe in the checkout's ``recipes/``
folder, found by name (``--recipe minilm``) from the installed package through importlib.resources, no checkout.

The wheel is built from a copy of the sources (so no ``build/`` folder appears in the checkout) and unpacked into a
folder that a separate Python process imports normswap from, from a working directory without ``recipes/``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from normswap.training.recipe import RECIPE_DIRS, RecipeError, resolve_recipe_path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))


def _modern_setuptools() -> bool:
    """Whether this environment can build without an isolated build env (faster, and no package index needed)."""
    try:
        return int(metadata.version("setuptools").split(".")[0]) >= 68
    except metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info")
    shutil.copytree(ROOT / "normswap", src / "normswap", ignore=ignore)
    shutil.copytree(ROOT / "recipes", src / "recipes", ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(out)]
    if _modern_setuptools():
        cmd.append("--no-build-isolation")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = out.glob("normswap-*.whl")
    return whl


def test_wheel_ships_every_recipe(wheel: Path) -> None:
    assert RECIPES, "the checkout has recipes/*.yaml"
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n.removeprefix("normswap/recipes/") for n in names if n.startswith("normswap/recipes/"))
    assert shipped == RECIPES
    for name in RECIPES:  # byte for byte the checkout's files
        assert zipfile.ZipFile(wheel).read(f"normswap/recipes/{name}") == (ROOT / "recipes" / name).read_bytes()
    assert "normswap/kernels/csrc/rms_norm.cpp" in names and "normswap/assets/macbeth.txt" in names
    assert not any(n.startswith("recipes/") for n in names), "recipes belong inside the package, not top level"


def test_installed_package_resolves_recipe_names(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a wheel's purelib content is the installed layout
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = (
        "import sys, normswap\n"
        "from normswap.training.recipe import load_recipe, resolve_recipe_path\n"
        "print(normswap.__file__)\n"
        f"for name in {[Path(n).stem for n in RECIPES]!r}:\n"
        "    print(resolve_recipe_path(name)); assert load_recipe(name).name == name\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    first, *paths = proc.stdout.split()
    assert Path(first).is_relative_to(site), "imported the unpacked wheel, not the checkout"
    assert [Path(p).name for p in paths] == RECIPES
    assert all(Path(p).parent == site / "normswap" / "recipes" for p in paths)


def test_checkout_names_resolve_and_unknown_names_list_them() -> None:
    for name in RECIPES:
        assert resolve_recipe_path(Path(name).stem).read_bytes() == (ROOT / "recipes" / name).read_bytes()
    assert ROOT / "recipes" in RECIPE_DIRS
    with pytest.raises(RecipeError, match="minilm"):
        resolve_recipe_path("no-such-recipe")
