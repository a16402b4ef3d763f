"""Unlearning methods, one small file each, registered by name.

Importing this package imports every method module, so `REGISTRY` is complete."""

from workers.ml.methods import ga, graddiff, idk, npo, relabel, rmu, simnpo  # noqa: F401
from workers.ml.methods.base import REGISTRY, Method, References, build

__all__ = ["REGISTRY", "Method", "References", "build"]
