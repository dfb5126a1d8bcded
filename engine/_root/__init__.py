"""softprompt: one frozen LM, many soft-prompted tasks. `from softprompt import Engine, Request, SamplingParams`."""

from softprompt.engine import *  # noqa: F401,F403
from softprompt.engine import __all__  # noqa: F401

__version__ = "0.1.0"
