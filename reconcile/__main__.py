"""`python -m reconcile` and the `xnat2bids` script: the CLI, with Ctrl-C or SIGTERM during its
imports (~0.3 s) handled like Ctrl-C later: one line, exit 1."""

import signal
import sys


def run() -> None:
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `main` keeps it so while it works
    try:
        from reconcile.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted.\n")
        sys.exit(1)
    try:
        main()
    finally:
        # The work is done and its exit status chosen: a signal now must not turn a completed run
        # into a death by signal (130, 143).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


if __name__ == "__main__":
    run()
