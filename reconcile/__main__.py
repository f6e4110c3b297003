"""`python -m reconcile` and the `xnat2bids` script: the CLI, with Ctrl-C or SIGTERM during its
imports (~0.3 s) handled like Ctrl-C later: one line, exit 1."""

import atexit
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
        # The work is done and its status chosen. A signal from now on ends the process at once
        # with that status; and the process ends here, after the exit handlers (caches saved),
        # without the interpreter's shutdown, where a late SIGTERM meets the default action and
        # an interrupt caught inside a lazy import's exec() re-kills it with SIGINT (CPython 3.11).
        status = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)

        def finish(signum: int, frame: object) -> None:
            _flush()
            os._exit(status)

        signal.signal(signal.SIGINT, finish)
        signal.signal(signal.SIGTERM, finish)
        try:
            atexit._run_exitfuncs()
        except BaseException:  # an exit handler's failure: the status stands
            pass
        _flush()
        os._exit(status)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed pipe: nothing more to say
            pass


if __name__ == "__main__":
    run()
