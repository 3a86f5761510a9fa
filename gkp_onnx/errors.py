"""Errors the CLI turns into one-line messages and exit codes."""


class GkpError(Exception):
    """Bad input or an impossible request: the CLI prints one line and exits with code 2."""

    exit_code = 2


class ValidationFailed(GkpError):
    """The optimized model missed a fidelity threshold the user set: exit code 1."""

    exit_code = 1
