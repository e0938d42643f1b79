"""Resident memory of the running process, for the child processes of benchmarks and tests.

A child script starts with CHILD_PRELUDE, which puts this folder on its path and imports
`status_mb`; it imports nothing else, so a child may measure before importing torch.
"""

from pathlib import Path

CHILD_PRELUDE = f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); " \
                "from proc_memory import status_mb\n"


def status_mb(key: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MB, from /proc. (getrusage's ru_maxrss is
    carried across exec from the forked parent on Linux, so a child would report its parent's peak.)"""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024
