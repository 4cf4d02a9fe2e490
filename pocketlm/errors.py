"""The one error base class: what a user gave (a file, a field, a flag) was wrong, and the message says
where and what was expected. The CLI prints these as one line (`--debug` shows the traceback); any
other exception is a bug and keeps its traceback. Subclasses ValueError so `except ValueError` in
callers' code keeps working."""


class PocketLMError(ValueError):
    pass


class InputError(PocketLMError):
    """A value given to a library function is out of range or of the wrong kind."""
