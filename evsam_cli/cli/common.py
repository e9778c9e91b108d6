"""What every command shares: consoles, the error edge, progress and small parsers.

Library code raises ``EvsamError`` subclasses; ``command`` turns them (and the OS errors a
user can cause, such as a missing or unwritable path) into one ``Error: ...`` line on stderr
and exit code 1. ``--debug`` or ``EVSAM_DEBUG=1`` lets the traceback through instead.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler

from ..errors import EvsamError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

_state = {"debug": False}


def set_debug(enabled: bool) -> None:
    _state["debug"] = enabled


def debug_enabled() -> bool:
    return _state["debug"] or os.environ.get("EVSAM_DEBUG", "") not in ("", "0", "false", "False")


def error(message: str) -> None:
    """Print the one-line error (markup-free, so paths with brackets print as they are)."""
    err_console.print(f"[bold red]Error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)


def escape(text: str) -> str:
    from rich.markup import escape as _escape

    return _escape(str(text))


def command(fn: F) -> F:
    """Decorator for command bodies: user errors -> ``Error:`` line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            error("interrupted")
            raise typer.Exit(130) from None
        except EvsamError as exc:
            if debug_enabled():
                raise
            error(str(exc))
            raise typer.Exit(1) from None
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
            if debug_enabled():
                raise
            where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
            error(f"{exc.strerror or exc}{where}")
            raise typer.Exit(1) from None
        except json.JSONDecodeError as exc:
            if debug_enabled():
                raise
            error(f"malformed JSON: {exc}")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def setup_logging(verbose: bool = False, *, main_process: bool = True) -> None:
    """Rich logging on the main process only; other ranks log warnings and errors."""
    level = logging.DEBUG if verbose else logging.INFO
    if not main_process:
        level = logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=err_console, show_path=False, rich_tracebacks=False)],
        force=True,
    )


def parse_floats(text: str, count: int | None, what: str) -> list[float]:
    """'1,2,3' -> [1.0, 2.0, 3.0]; ``typer.BadParameter`` naming ``what`` otherwise."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated numbers, got {text!r}") from None
    if count is not None and len(values) != count:
        raise typer.BadParameter(f"{what} needs {count} comma-separated numbers, got {text!r}")
    return values
