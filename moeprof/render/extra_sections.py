"""Imports every module that registers a terminal section for an extra analysis."""

from __future__ import annotations
