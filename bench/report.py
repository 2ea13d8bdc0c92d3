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


# The levers llmchat ran with (dtype, forward pass), once a run has read them from its /health.
levers: str | None = None


def captioned(title: str) -> Table:
    """An empty table whose caption names this CPU's matrix capabilities and llmchat's levers, so figures from
    different machines or settings are never compared blindly (at least as wide as its lines, which would
    otherwise wrap)."""
    lines = [f"CPU: {cpu.describe()}", *([f"llmchat: {levers}"] if levers else [])]
    return Table(title=title, caption="\n".join(lines), min_width=max(map(len, lines)) + 4)


def table(title: str, columns: Iterable[str]) -> Table:
    """The first column names the row and is left-aligned; the numbers after it are right-aligned."""
    result = captioned(title)
    for i, col in enumerate(columns):
        result.add_column(col, justify="left" if i == 0 else "right")
    return result
