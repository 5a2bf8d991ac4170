"""Named exceptions: the CLI prints them as plain messages, without a traceback."""


class ConveyorError(Exception):
    """A problem a person can act on; the message says what, where and what to do."""


class ConfigError(ConveyorError):
    """conveyor.toml is missing, unreadable or has invalid keys or values (all listed)."""


class DataError(ConveyorError):
    """A dataset file cannot be trained; the message lists every bad line."""


class WorkspaceError(ConveyorError):
    """The workspace folder is missing or not a conveyor workspace."""


class PlanError(ConveyorError):
    """A job cannot be planned, for example because it would train 0 steps."""


class CheckpointError(ConveyorError):
    """A checkpoint cannot be written, read or verified."""


class NonFiniteError(ConveyorError):
    """Training produced a loss, gradient norm or weight that is inf or nan: the job stops at its last good
    checkpoint (nothing non-finite is ever checkpointed), as when it runs out of memory."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class StoredDataError(DataError):
    """A job's stored copy (data/<sha256>.jsonl) is missing or no longer holds the bytes the job was added with;
    the job does not train until the original is added again."""

    @staticmethod
    def names(fingerprint: str) -> str:
        """How the message names the copy: a failed job whose reason holds this stopped for that copy."""
        return f"the stored copy data/{fingerprint}.jsonl"
