"""moeprof's two exception types: one for the command line, one for the hook inside vLLM."""

from __future__ import annotations

REFUSAL_PREFIX = "moeprof: "
"""Starts the message of every :class:`HookRefusal`, so the reason can be found in engine output."""


class UserError(Exception):
    """Bad input or environment the user can fix; the message names the file, line and reason.

    The CLI turns it into a one-line message and a non-zero exit.
    """


class HookRefusal(RuntimeError):
    """The hook cannot log what was asked, so the engine must not start (or logging stops).

    Raised with the bare reason; the message gets :data:`REFUSAL_PREFIX` here, so that
    ``moeprof generate`` can pick the one-line reason out of a failed engine's output.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(REFUSAL_PREFIX + reason)
