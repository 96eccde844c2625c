"""Tables for the terminal whose cells fold instead of ending in an ellipsis.

Rich cuts a cell that does not fit to `http://127.0.0.1:50…` by default; an address, a path or a run id is only
useful whole, so every table here folds long cells onto more lines instead.
"""

from __future__ import annotations

from typing import Any

from rich.table import Column, Table


class FoldingTable(Table):
    """`rich.table.Table` with `overflow="fold"` as every column's default."""

    def add_column(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("overflow", "fold")
        super().add_column(*args, **kwargs)

    def add_row(self, *renderables: Any, **kwargs: Any) -> None:
        # Columns made implicitly by a row longer than the header fold too.
        while len(self.columns) < len(renderables):
            self.columns.append(Column(_index=len(self.columns), overflow="fold"))
        super().add_row(*renderables, **kwargs)
