"""Helpers for users' own test suites: `from softprompt.testing import build_tiny_checkpoint, ...`."""

from softprompt.engine.testing import *  # noqa: F401,F403
