"""Errors that reach a user: one paragraph that names the file, track or chromosome
and says what to do. The CLI prints them without a traceback."""


class EdiceError(Exception):
    """A failure the user can act on; the message is shown as it is."""


class InputError(EdiceError, ValueError):
    """Bad input: a manifest, a source file, a store or an option that cannot be used."""
