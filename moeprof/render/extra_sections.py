"""Imports every module that registers a terminal section for an extra analysis."""

from __future__ import annotations

import moeprof.render.crosslayer
import moeprof.render.ep
import moeprof.render.reuse
import moeprof.render.tokens  # noqa: F401
