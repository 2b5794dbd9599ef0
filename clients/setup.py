"""Builds the client distribution with ``tally.v1`` generated from the protos.

The protobuf code is not committed: every build (wheel, editable install, sdist) runs
``build_protos.generate`` first, and the wheel's grpcio/protobuf requirements follow the
generator's versions. The sdist carries a copy of ``protos/`` so it builds on its own.
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import build_protos  # noqa: E402


class BuildPy(build_py):
    """Generates ``tally/v1`` before the packages are collected."""

    def run(self) -> None:
        build_protos.generate(HERE)
        super().run()


class Sdist(sdist):
    """Adds the protos (outside this folder in the repository) to the source tree."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        protos = build_protos.proto_root()
        shutil.copytree(protos, Path(base_dir) / "protos", dirs_exist_ok=True)
        for extra in ("build_protos.py",):
            shutil.copyfile(HERE / extra, Path(base_dir) / extra)


if not (HERE / "tally" / "v1" / "credits_pb2.py").exists():
    build_protos.generate(HERE)
with (HERE / "pyproject.toml").open("rb") as f:
    base = tomllib.load(f)["tool"]["tally-client"]["dependencies"]

setup(
    install_requires=[*build_protos.runtime_requirements(HERE), *base],
    cmdclass={"build_py": BuildPy, "sdist": Sdist},
)
