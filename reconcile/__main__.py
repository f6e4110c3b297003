"""`python -m reconcile` and the `xnat2bids` script: the CLI, with Ctrl-C or SIGTERM during its
imports (~0.3 s) handled like Ctrl-C later: one line, exit 1."""

import os
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
    except SystemExit as done:
        # The work is done and its status chosen: a signal during the shutdown (threads joined,
        # caches saved) ends the process at once with that status, never as a death by signal.
        status = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)

        def finish(signum: int, frame: object) -> None:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # a closed pipe: nothing more to say
                    pass
            os._exit(status)

        signal.signal(signal.SIGINT, finish)
        signal.signal(signal.SIGTERM, finish)
        raise


if __name__ == "__main__":
    run()
