"""The one exception type that reaches the user as a single line (exit code 1).

Library code raises `PruneCliError` for anything the user can fix (bad file, mismatched base, bad option value);
the CLI layer turns it into one line on stderr. Everything else is a bug and shows a traceback only with --debug.
"""


class PruneCliError(Exception):
    """A user-facing runtime error: the message is shown as is, exit code 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised by the CLI as an interrupt so it cleans up exactly like Ctrl-C (exit 143 instead of 130).

    Here, not in the CLI layer, so library code that keeps finished work on an interrupt can record which it was."""


class PruneCliWarning(UserWarning):
    """Something the user should know that does not stop the command (e.g. a delta accepted for another base).

    Library code raises it with `warnings.warn`; the CLI layer prints it as one yellow line on stderr.
    """
