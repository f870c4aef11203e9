"""Build script for the one thing pyproject.toml cannot say: "every normswap package, plus ``normswap.recipes``".

The recipes stay at the top of the checkout (``recipes/``), where people look for them; ``[tool.setuptools.package-dir]``
in pyproject.toml maps that folder to ``normswap/recipes/`` in the wheel, so ``normswap finetune --recipe minilm``
works from an installed package. pyproject's ``packages.find`` cannot add a mapped package to what it finds, hence
this file; everything else (metadata, package data) lives in pyproject.toml.
"""

from setuptools import find_namespace_packages, setup

setup(packages=[*find_namespace_packages(include=["normswap*"]), "normswap.recipes"])
