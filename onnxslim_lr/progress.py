"""How long work reports what it is doing, without the library ever printing.

The pipeline (manager, data service, planner, timing) talks to one :class:`Progress` object
handed down through the options. The library never writes to a terminal itself: the base
class here does nothing at all (the Python API's default), and the CLI passes a subclass
that writes phase lines to stderr (also when stderr is a pipe) and a live bar on a terminal.

The calls, and what a front end is expected to do with them:

* ``phase(name, detail)``: a new phase has started (load, fold, calibrate, plan, verify,
  time, write). A front end prints one line with the elapsed time.
* ``steps(items, total, desc)``: iterate over the units of a phase (layers); a front end
  wraps it in a bar and prints ``desc i/N`` lines when not on a terminal.
* ``tick(detail)``: something is still happening inside one step (a decomposition finished,
  a timing round ran); a live bar refreshes its postfix so it never looks frozen.
* ``decision(node, text)``: what was decided for one layer and why (shown with ``-v``).
* ``warn(text)``: something the user should know that is not an error (shown unless ``-q``).
"""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


class Progress:
    """The silent reporter: every call is accepted and does nothing."""

    def phase(self, name: str, detail: str = "") -> None:
        """A new phase of the run has started."""

    def steps(self, items: Iterable[T], total: int, desc: str) -> Iterator[T]:
        """Iterate ``items`` (``total`` of them), reporting each step."""
        yield from items

    def tick(self, detail: str = "") -> None:
        """Work continues inside the current step."""

    def decision(self, node: str, text: str) -> None:
        """What was decided for one layer, and why."""

    def warn(self, text: str) -> None:
        """A warning worth the user's attention (not an error)."""


#: the shared silent instance (stateless, so sharing it is safe)
SILENT = Progress()
