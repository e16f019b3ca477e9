"""Imports every module that registers an extra analysis (see :mod:`moeprof.analysis.passes`)."""

from __future__ import annotations

