"""Live progress for long computations: one bar per pass over the layers.

    for layer in progress(range(L), "sweep"):
        ...

A bar shows only when progress is enabled (`minielm.progress.enabled`, or a
function's `progress=` argument) and stderr is a terminal; it never writes to
stdout. Disabled, `progress` returns its iterable unchanged.
"""

from __future__ import annotations

import sys

enabled = False  # module-level default; the command line turns it on unless --quiet


def progress(iterable, what: str, total: int | None = None, show: bool | None = None):
    """`iterable`, advancing a bar labelled `what` on stderr per item when shown."""
    show = enabled if show is None else show
    if not show or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=what, total=total, file=sys.stderr, leave=False, unit="layer")
