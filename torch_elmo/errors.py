"""The user-facing error type: every ElmoError message is one line naming the file, flag or line
at fault and what to do; the command line prints it as `elmo <command>: error: ...`, exit 2."""


class ElmoError(ValueError):
    """A user-facing error: its message is one line that names the file/key/line at fault."""
