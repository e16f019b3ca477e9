"""Imports every module that registers an extra analysis (see :mod:`moeprof.analysis.passes`)."""

from __future__ import annotations

import moeprof.analysis.crosslayer
import moeprof.analysis.ep
import moeprof.analysis.reuse
import moeprof.analysis.tokens  # noqa: F401
