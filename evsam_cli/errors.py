"""Exceptions the library raises for problems a user can cause.

The CLI turns any ``EvsamError`` into one red ``Error: ...`` line and exit code 1; everything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self


class EvsamError(Exception):
    """Base class: a problem with the user's input, files or environment.

    Messages speak the library's parameter names (``lr must be positive``); ``params`` lists the
    names a message mentions, so that the command line can show each as the flag that sets it.
    """

    params: tuple[str, ...] = ()

    def naming(self, *params: str) -> Self:
        """This error, noting the parameter names its message mentions."""
        self.params = params
        return self


class UnknownModelError(EvsamError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(EvsamError):
    """A checkpoint file is missing, unreadable or does not fit the model."""


class DataError(EvsamError):
    """A dataset, image or JSON file is missing or malformed."""


class MissingDependencyError(EvsamError):
    """An optional extra (ultralytics, groundingdino, tensorrt, lvis ...) is not installed."""

    def __init__(self, package: str, extra: str, what: str) -> None:
        super().__init__(
            f"{what} needs {package}, which is not installed; install it with: pip install 'evsam[{extra}]'"
        )
        self.package = package
        self.extra = extra


class DeviceError(EvsamError):
    """The requested device or engine is not available (e.g. TensorRT without an NVIDIA GPU)."""


class SettingError(EvsamError, ValueError):
    """A setting is out of range or contradicts another; ``params`` are the settings it names."""

    def __init__(self, message: str, *params: str) -> None:
        super().__init__(message)
        self.params = params
