"""`python -m reconcile` and the `xnat2bids` script: the CLI, with Ctrl-C during its imports
(~0.3 s) handled like Ctrl-C later: one line, exit 1."""

import sys


def run() -> None:
    try:
        from reconcile.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted.\n")
        sys.exit(1)
    main()


if __name__ == "__main__":
    run()
