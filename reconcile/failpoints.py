"""Failpoints: named places where a test can make the running process die on the spot.

A test hook in the spirit of etcd's gofail: `hit(name)` does nothing unless the environment
variable XNAT2BIDS_FAILPOINT equals `name`, in which case the process SIGKILLs itself, exactly
as a power cut or the OOM killer would stop it. The crash tests (tests/reliability) use it to
stop `xnat2bids apply` deterministically at each step of a commit; users never set it.
"""

from __future__ import annotations

import os
import signal

ENV = "XNAT2BIDS_FAILPOINT"


def hit(name: str) -> None:
    """Die by SIGKILL here if XNAT2BIDS_FAILPOINT names this point; otherwise return at once."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
