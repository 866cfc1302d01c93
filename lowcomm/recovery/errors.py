"""The pipeline runtime's errors."""

from __future__ import annotations

from lowcomm.errors import LowcommError

__all__ = ["PipelineError", "StepAbortedError"]


class PipelineError(LowcommError):
    """The pipeline cannot go on: a lost stage could not be rebuilt (no replacement joined in
    time, no checkpoint of it), or the master is gone. The message says which."""


class StepAbortedError(LowcommError):
    """A pipeline step was aborted on this stage: a stage was lost (the master's membership moved)
    or failed. Latched by the runtime (``StagePeer.last_abort``), never raised to the caller: the
    step is voted down everywhere, the lost stages are rebuilt and the step is retried."""
