"""The one error hierarchy of welore_core.

Every error says what was expected, what was received and how to fix it. The command line
prints `error: <message>` and exits 2; the service maps `code` to an HTTP status.
"""


class WeloreError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""

    code = "welore_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(WeloreError):
    code = "invalid_argument"


class ModelNotFound(WeloreError):
    code = "model_not_found"


class DataNotFound(WeloreError):
    code = "data_not_found"


class InvalidData(WeloreError):
    code = "invalid_data"


class UnsupportedModel(WeloreError):
    code = "unsupported_model"


class CorruptCheckpoint(WeloreError):
    code = "corrupt_checkpoint"


class NonFiniteWeights(WeloreError):
    code = "non_finite_weights"


class OutputExists(WeloreError):
    code = "output_exists"


class Cancelled(WeloreError):
    """Raised inside long work when the caller's `should_stop` returned True."""

    code = "cancelled"
