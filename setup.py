"""Build script. The package is pure Python today; setuptools reads the metadata from pyproject.toml."""

from setuptools import setup

setup()
