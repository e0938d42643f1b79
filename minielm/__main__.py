"""The `minielm` command (and `python -m minielm`): minielm/cli.py, imported here so that a Ctrl-C
while torch is still being imported (the first second or so) ends as one later does: one line on
stderr and exit status 130, not Python's traceback.

During the imports a Ctrl-C is only recorded, never raised: torch imports numpy from C++ and swallows
any exception there, a KeyboardInterrupt included, which left the command running on (exit 0) with a
half-imported numpy (an intact GGUF file was then blamed for "module 'numpy' has no attribute ...").
The imports finish whole, and a recorded Ctrl-C then ends the command.

Before those imports the command also sets THREAD_DEFAULTS, its OpenMP settings, in its own
environment where the user set none: OpenMP reads them once, when torch loads it."""

import os
import signal
import sys
import threading

# OpenMP settings of the `minielm` command, each applied unless the user's environment sets it. With GNU
# OpenMP's defaults a waiting thread spins (300000 turns) before it sleeps: on cores that another process
# keeps busy, torch's threads spin against it and the command takes several times longer; with
# OMP_WAIT_POLICY=PASSIVE they sleep at once. tools/bench_threads.py measures each setting idle and beside
# one busy process; tools/README.md ("Threads") has the figures and the rule that picks this value
# ({} keeps torch's own defaults).
THREAD_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def set_thread_defaults(environ=os.environ) -> None:
    """THREAD_DEFAULTS into `environ` where unset, before torch is imported (afterwards they would do
    nothing: a program that imported torch and then calls main() keeps its own settings)."""
    if "torch" in sys.modules:
        return
    for name, value in THREAD_DEFAULTS.items():
        environ.setdefault(name, value)


def main(argv=None) -> int:
    set_thread_defaults()
    received = []
    # Only the main thread may set a handler; a SIGINT ignored by whoever started us stays ignored.
    recording = (threading.current_thread() is threading.main_thread()
                 and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN)
    callers = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum)) if recording else None
    try:
        from .cli import main as run
    except KeyboardInterrupt:  # raised where no handler could be set
        received.append(signal.SIGINT)
    finally:
        if recording:
            signal.signal(signal.SIGINT, callers)
    if received:
        print("minielm: interrupted", file=sys.stderr)
        return 130
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
