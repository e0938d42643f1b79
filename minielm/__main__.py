"""The `minielm` command (and `python -m minielm`): minielm/cli.py, imported here so that a Ctrl-C
while torch is still being imported (the first second or so) ends as one later does: one line on
stderr and exit status 130, not Python's traceback."""

import sys


def main(argv=None) -> int:
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        print("minielm: interrupted", file=sys.stderr)
        return 130
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
