"""The lab's error class: one line a user can act on (what failed and what to do)."""


class LabError(Exception):
    """The lab could not be built or run (missing privilege, tool, or a failed step)."""
