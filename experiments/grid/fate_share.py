"""``python -m experiments.grid.fate_share PARENT_PID ARGS...``: ``hardneg ARGS...`` that dies with its parent.

The grid runs each cell as a ``hardneg fit`` child of a Ray worker. If the worker is killed
(SIGKILL of the grid, Ray shutting down after its driver died), an orphaned cell would keep
training and writing into the cell folder while the rerun grid starts the same cell again. On Linux
the child asks the kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``), set here
rather than in ``preexec_fn`` because a fork from the multi-threaded Ray worker may only call
async-signal-safe code. The parent pid is checked after the call, closing the race where the
parent died before it. Elsewhere the cell's ``flock`` still keeps a rerun from starting the cell
while the orphan lives.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
# A DDP cell: Lightning starts ranks 1.. by re-running this command line from rank 0 (LOCAL_RANK >= 1
# in their environment); their parent is rank 0, not the worker, so they die with rank 0.
RANK_ZERO_PID = "HARDNEG_FATE_SHARE_RANK_ZERO_PID"


def die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os._exit(128 + signal.SIGKILL)


def main(argv: list[str]) -> int:
    if not argv or not argv[0].isdigit():
        print("usage: python -m experiments.grid.fate_share PARENT_PID HARDNEG_ARGS...", file=sys.stderr)
        return 2
    parent = int(argv[0])
    if os.environ.get("LOCAL_RANK", "0") != "0" and os.environ.get(RANK_ZERO_PID):
        parent = int(os.environ[RANK_ZERO_PID])
    die_with_parent(parent)
    os.environ[RANK_ZERO_PID] = str(os.getpid())
    from experiments.cli import main as hardneg

    return hardneg(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
