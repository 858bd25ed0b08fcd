"""What the terminal shows: each step's name and time, Packer's current step, clear errors."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any


class Reporter:
    def __init__(self, quiet: bool = False) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.quiet = quiet
        self.started = time.monotonic()
        self._progress: Any = None
        self._task: Any = None

    @property
    def live(self) -> bool:
        return bool(self.console.is_terminal)

    def info(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, markup=False)

    def warn(self, text: str) -> None:
        self.console.print(f"[yellow]warning:[/yellow] {_escape(text)}")

    def error(self, text: str, hint: str | None = None) -> None:
        self.console.print(f"[bold red]error:[/bold red] {_escape(text)}")
        if hint:
            for line in hint.splitlines():
                self.console.print(f"  {_escape(line)}", style="dim")

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """One named step of the build: its name when it starts, its time when it ends."""
        t0 = time.monotonic()
        if not self.quiet:
            self.console.print(f"[bold cyan]==>[/bold cyan] {_escape(name)}")
        ok = False
        try:
            yield
            ok = True
        finally:
            self.stop_substeps()
            dt = time.monotonic() - t0
            if not self.quiet:
                mark = "[green]ok[/green]" if ok else "[red]failed[/red]"
                self.console.print(f"    {mark} {_escape(name)} [dim]({dt:.2f} s)[/dim]")

    def substep(self, text: str) -> None:
        """A step inside a long command (Packer's '==> ...' lines), shown with elapsed time."""
        if self.quiet:
            return
        if self.live:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            if self._progress is None:
                self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                          TimeElapsedColumn(), console=self.console,
                                          transient=False)
                self._progress.start()
            if self._task is not None:
                self._progress.update(self._task, completed=1, total=1)
                self._progress.stop_task(self._task)
            self._task = self._progress.add_task(f"    {_escape(text)}", total=None)
        else:
            elapsed = time.monotonic() - self.started
            self.console.print(f"    [{elapsed:6.1f}s] {_escape(text)}")

    def stop_substeps(self) -> None:
        if self._progress is not None:
            if self._task is not None:
                self._progress.update(self._task, completed=1, total=1)
            self._progress.stop()
            self._progress = None
            self._task = None


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Plain columns, two spaces apart, no trailing blanks: what every listing prints."""
    import io

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    grid = Table(box=None, pad_edge=False, padding=(0, 1), show_header=True,
                 header_style="")
    for h in headers:
        grid.add_column(Text(str(h)), no_wrap=True)
    for row in rows:
        grid.add_row(*(Text(str(c)) for c in row))
    out = io.StringIO()
    Console(file=out, width=100_000, color_system=None, force_terminal=False,
            legacy_windows=False).print(grid)
    return [line.rstrip() for line in out.getvalue().splitlines()]
