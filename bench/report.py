"""How the scenarios summarise and show their numbers: percentiles, ratios, and rich tables with the server
(or variant) in the first column."""

from collections.abc import Iterable

from rich.table import Table

from llmchat.engine import cpu


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); nan for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def captioned(title: str) -> Table:
    """An empty table whose caption names this CPU's matrix capabilities, so figures from different machines
    are never compared blindly (at least as wide as that line, which would otherwise wrap)."""
    caption = f"CPU: {cpu.describe()}"
    return Table(title=title, caption=caption, min_width=len(caption) + 4)


def table(title: str, columns: Iterable[str]) -> Table:
    """The first column names the row and is left-aligned; the numbers after it are right-aligned."""
    result = captioned(title)
    for i, col in enumerate(columns):
        result.add_column(col, justify="left" if i == 0 else "right")
    return result
