"""The one exception type the command-line entry points turn into a clear message and exit code 2."""


class UserError(Exception):
    """Bad input from the user (config, flags, run folders). ``str(e)`` says what is wrong and how to fix it."""
