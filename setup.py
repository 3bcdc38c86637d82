"""Packaging that pyproject.toml cannot say: the repository's configs/ folder ships inside the package
as ldm/configs/, so `--config sd15` finds it from an installed wheel too (ldm.config_io.config_dir)."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["ldm", "ldm.*"]), "ldm.configs"],
    package_dir={"ldm.configs": "configs"},
)
