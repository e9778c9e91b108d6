"""`--help` laid out so that every option name shows whole, in an 80-column terminal too.

typer's rich help puts names, negative names, types and help in one table of seven columns and,
when a terminal is too narrow for them, shortens every column, names included
(``--teacher-check…``). Here each option is one line of names and type, never wrapped or cut,
with its help beside it; when the longest names leave too little room for help beside them, the
help goes on the lines below, indented. Panels, usage and the command's own text look as before.
"""

from __future__ import annotations

import inspect
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand

# Help beside the names needs at least this many columns; otherwise it goes below them.
_MIN_HELP_WIDTH = 30


class EvsamCommand(TyperCommand):
    """A typer command whose ``--help`` never shortens an option name."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        console = Console(highlight=False)
        pieces = " ".join(self.collect_usage_pieces(ctx))
        console.print(Text.assemble(("Usage: ", "yellow"), (f"{ctx.command_path} {pieces}", "bold")))
        if self.help:
            console.print()
            console.print(Padding(Text.from_markup(inspect.cleandoc(self.help)), (0, 1)))
        console.print()
        for title, rows in _panels(self, ctx):
            console.print(_panel(title, rows, console.width))


def _panels(command: TyperCommand, ctx: Any) -> list[tuple[str, list[tuple[str, str]]]]:
    """(title, [(names, help)]) per help panel, in the order the parameters are declared."""
    panels: dict[str, list[tuple[str, str]]] = {}
    for param in command.get_params(ctx):
        if getattr(param, "hidden", False):
            continue
        record = param.get_help_record(ctx)
        default_title = "Arguments" if param.param_type_name == "argument" else "Options"
        if record is None:
            continue
        title = getattr(param, "rich_help_panel", None) or default_title
        panels.setdefault(title, []).append((record[0], record[1] or ""))
    order = ["Arguments", "Options"]
    return sorted(panels.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))


def _panel(title: str, rows: list[tuple[str, str]], width: int) -> Panel:
    inner = width - 4  # border and padding
    names_width = max(len(names) for names, _ in rows)
    body: RenderableType
    if inner - names_width - 2 >= _MIN_HELP_WIDTH:
        table = Table.grid(padding=(0, 2), expand=True)
        table.add_column(no_wrap=True, style="bold cyan", min_width=names_width)
        table.add_column(ratio=1, overflow="fold")
        for names, text in rows:  # Text, not str: "[default: 1]" is not rich markup
            table.add_row(Text(names), Text(text))
        body = table
    else:
        lines: list[RenderableType] = []
        for names, text in rows:
            lines.append(Text(names, style="bold cyan", no_wrap=True, overflow="ignore"))
            if text:
                lines.append(Padding(Text(text, overflow="fold"), (0, 0, 0, 4)))
        body = Group(*lines)
    return Panel(body, title=title, title_align="left", border_style="dim")
