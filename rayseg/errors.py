"""The two exception types the `rayseg` command turns into one line. Anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """A bad command line, config, path or checkpoint: the CLI prints it as one line and exits 2."""


class EnvError(Exception):
    """The environment failed in a known way (Ray cannot start, no usable GPU, storage refusing credentials):
    one sentence saying what happened and what to try; the CLI exits 1."""
