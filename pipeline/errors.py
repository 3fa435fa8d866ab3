"""The one exception type that reaches the user as a single line."""


class PipelineError(Exception):
    """A problem the user can fix (bad config, missing file, hash mismatch).

    run.py prints str(err) as one line and exits non-zero; the message must say
    what to do.
    """
