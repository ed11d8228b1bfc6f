"""The one base class of every error a user can fix by changing what they typed.

The CLI (and each benchmark command) prints such an error as one line, ``error: ...``, and exits
with status 2; anything else is a bug and keeps its traceback. Every module that checks user input
raises a subclass of :class:`UserError` (config, spec grammar, search space, blocks, tasks, budgets,
benchmark options), so callers catch one class, never a hand-kept tuple.
"""

from __future__ import annotations


class UserError(ValueError):
    """Input the user must fix; the message is one line naming the problem and what would be
    valid. A ``ValueError`` too, so code that caught ``ValueError`` keeps working."""


class ConfigError(UserError):
    """A configuration the user must fix; the message is one line."""


class RunDirError(RuntimeError):
    """The run directory could not be written mid-run (disk full, file system gone read-only);
    the message says where the results already computed are kept."""
