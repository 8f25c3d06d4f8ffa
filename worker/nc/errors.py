"""How a solve can end other than with a result; shared by the UFM solver and training."""


class Stopped(Exception):
    """The caller's should_stop() returned True; the solve was abandoned."""


class Diverged(Exception):
    """The objective or its gradient became NaN or infinite."""
