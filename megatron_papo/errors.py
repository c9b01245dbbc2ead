"""Errors that the command line reports as ONE line (what, where, the fix) instead of a traceback.

``cli.main`` maps them to exit codes (see README "Exit codes"): :class:`~megatron_papo.config.base.ConfigError`,
:class:`DataError` and :class:`CheckpointError` exit 2; :class:`DivergedError` exits 3. ``--debug`` (or
``MEGATRON_PAPO_DEBUG=1``) shows the traceback as well.
"""

from __future__ import annotations


class DataError(ValueError):
    """A dataset problem: the message names the file, the row and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message names the path and the fix."""


class DivergedError(RuntimeError):
    """Training stopped because too many consecutive steps had a non-finite loss or grad norm."""
