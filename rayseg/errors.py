"""The one exception type for what the user got wrong."""


class UserError(Exception):
    """A bad command line, config, path or checkpoint: the CLI prints it as one line and exits 2."""
