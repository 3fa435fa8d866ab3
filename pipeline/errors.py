"""The one exception type that reaches the user as a single line."""


class PipelineError(Exception):
    """A problem the user can fix (bad config, missing file, hash mismatch).

    run.py prints str(err) as one line and exits non-zero; the message must say
    what to do.
    """


class StageSkipped(Exception):
    """A stage that cannot apply to this model (e.g. Grad-CAM for a network without class
    scores): the runner logs why, records nothing, and goes on with the next stage."""
