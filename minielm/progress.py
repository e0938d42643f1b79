"""Live progress for long computations: one bar per pass over the layers.

    for layer in progress(range(L), "sweep"):
        ...

One rule, for the command line and the Python API alike: a bar shows when
`minielm.progress.enabled` is True and stderr is a terminal. The library
leaves it off (a script or notebook sees nothing unless it sets
`minielm.progress.enabled = True`); the `minielm` command turns it on unless
`--quiet`. Bars go to stderr only, never to stdout, and vanish when their
pass ends, so piped output stays clean. Disabled, `progress` returns its
iterable unchanged and costs nothing. (The library is tqdm.)
"""

from __future__ import annotations

import os
import sys
import time

enabled = False  # off for the library; `minielm` sets it unless --quiet


def shown(show: bool | None = None) -> bool:
    """Whether progress is to be drawn: `show` if given, else the module setting; never off a terminal."""
    return (enabled if show is None else show) and sys.stderr.isatty()


def progress(iterable, what: str, total: int | None = None, show: bool | None = None, unit: str = "layer"):
    """`iterable`, advancing a bar labelled `what` on stderr per item when shown (see the module's rule)."""
    if not shown(show):
        return iterable
    from tqdm import tqdm

    size = os.get_terminal_size(sys.stderr.fileno())  # a terminal that reports 0 × 0 gets 80 × 24: tqdm
    return tqdm(iterable, desc=what, total=total, file=sys.stderr, leave=False, unit=unit,  # draws no bar in 0 rows
                ncols=size.columns or 80, nrows=size.lines or 24, mininterval=0, miniters=1)  # every layer


class step:
    """`with step("loading weights"):` shows "… loading weights" on stderr while it runs, then its time.

    For the coarse steps of a command; bars of the passes inside draw over the line
    and the finished step is written again with its time.
    """

    def __init__(self, what: str, show: bool | None = None):
        self.what, self.show = what, shown(show)

    def __enter__(self):
        self.start = time.perf_counter()
        if self.show:
            print(f"… {self.what}", end="", file=sys.stderr, flush=True)
        return self

    def __exit__(self, kind, *_):
        if self.show:
            done = f"{time.perf_counter() - self.start:.2f} s" if kind is None else "failed"
            print(f"\r\x1b[K… {self.what} ({done})", file=sys.stderr, flush=True)  # \x1b[K: clear the line
