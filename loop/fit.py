"""Output that fits the width it is shown at, without cutting anything.

Off a terminal rich assumes 80 columns (or `COLUMNS`), and a table wider than
that is cropped or has its cells elided (`iter-…`): in a piped log, read later,
the numbers are simply gone. So a table is printed as a table only where it
fits whole; otherwise each row becomes `key: value` phrases. Phrases (a label
and its value, a figure and its unit) are the unit of layout here: they are
packed into lines and never broken across two.
"""

from __future__ import annotations

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text


def _text(cell) -> Text:
    if isinstance(cell, Text):
        return cell
    return Text.from_markup(cell) if isinstance(cell, str) else Text(str(cell))


def pack(phrases: list, width: int, sep: str = "  ", indent: int = 0) -> list[Text]:
    """Phrases joined into lines of at most `width` cells, each phrase whole.

    Continuation lines start with `indent` spaces; a phrase wider than a line
    gets a line of its own (the only case rich may still fold).
    """
    lines: list[Text] = []
    line: Text | None = None
    for phrase in map(_text, phrases):
        if line is not None and line.cell_len + len(sep) + phrase.cell_len <= width:
            line.append(sep)
            line.append_text(phrase)
            continue
        if line is not None:
            lines.append(line)
        line = Text(" " * indent if lines else "")
        line.append_text(phrase)
    if line is not None:
        lines.append(line)
    return lines


class Phrases:
    """A renderable of phrases packed to whatever width it is given (a panel, the terminal)."""

    def __init__(self, phrases: list, sep: str = "  ", indent: int = 0):
        self.phrases = [p for p in phrases if p]
        self.sep, self.indent = sep, indent

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from pack(self.phrases, options.max_width, self.sep, self.indent)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        widths = [_text(p).cell_len for p in self.phrases] or [0]
        return Measurement(max(widths), sum(widths) + len(self.sep) * (len(widths) - 1))


def fits(console: Console, table: Table) -> bool:
    """True when the table shows every cell whole at the console's width, no cell wrapped or elided."""
    # Measured unbounded: rich clamps a measurement to the width it is given, which would always "fit".
    natural = console.measure(table, options=console.options.update_width(1_000_000)).maximum
    return natural <= console.width


def row_lines(table: Table, width: int, name_column: int = 0) -> list[Text]:
    """Each row as its name, then `header: value` phrases (empty and '-' cells left out: nothing to read)."""
    headers = [_text(c.header).plain for c in table.columns]
    columns = [list(c.cells) for c in table.columns]
    lines: list[Text] = []
    for row in zip(*columns):
        phrases = [_text(row[name_column])]
        for i, cell in enumerate(row):
            value = _text(cell)
            if i == name_column or value.plain.strip() in ("", "-"):
                continue
            phrases.append(Text.assemble(f"{headers[i]}: ", value) if headers[i] else value)
        lines += pack(phrases, width, indent=4)
    return lines


def print_table(console: Console, table: Table, name_column: int = 0) -> None:
    """The table where it fits; otherwise its title, then one block of phrases per row."""
    if fits(console, table):
        console.print(table)
        return
    if table.title:
        console.print(_text(table.title), style="bold")
    for line in row_lines(table, console.width, name_column):
        console.print(line, highlight=False)
