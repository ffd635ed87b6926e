# cffi's out-of-line build hooks in through setup(); everything else is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["native/build.py:ffibuilder"])
