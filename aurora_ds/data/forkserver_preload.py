"""Imported once by the forkserver that loader workers are forked from (``workers.context``).

Importing the loader here puts torch and the decoders in the forkserver, so a worker starts
without importing them; registering the stack dump here gives every worker the handler from the
instant it exists. Nothing imported here may start a thread: the forkserver forks.
"""

import faulthandler

from . import loader  # noqa: F401  (preloaded for the workers)
from .workers import STACK_SIGNAL

faulthandler.register(STACK_SIGNAL, all_threads=True)
