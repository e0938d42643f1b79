"""The `minielm` command (and `python -m minielm`): minielm/cli.py, imported here so that a Ctrl-C
while torch is still being imported (the first second or so) ends as one later does: one line on
stderr and exit status 130, not Python's traceback.

During the imports a Ctrl-C is only recorded, never raised: torch imports numpy from C++ and swallows
any exception there, a KeyboardInterrupt included, which left the command running on (exit 0) with a
half-imported numpy (an intact GGUF file was then blamed for "module 'numpy' has no attribute ...").
The imports finish whole, and a recorded Ctrl-C then ends the command."""

import signal
import sys
import threading


def main(argv=None) -> int:
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
