"""The watchdog that runs each engine and dies with the router that started it.

    python guard.py ROUTER_PID GRACE_S -- ENGINE ARGV...

The router starts this file (with its own interpreter, stdlib only, so it starts in
milliseconds) as the leader of a new session and process group; it runs the engine as its
child in that group. vLLM's API server spawns EngineCore and workers that do not watch their
parent, so a parent-death signal on the API server alone would leave them running (holding
the port's model, the GPU memory and the CPU). When the router dies, even by SIGKILL, the
kernel sends this process SIGUSR1 (PR_SET_PDEATHSIG on Linux; elsewhere it polls its parent):
it SIGTERMs the whole group, waits GRACE_S, then SIGKILLs the group, itself included.

While the router lives, its own SIGTERM/SIGKILL to the group reaches the engine directly;
this process only waits and then leaves the way the engine did (the same signal or exit
code), so the router sees the engine's own exit status.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Where PR_SET_PDEATHSIG is missing, how often the parent is polled instead.
_POLL_S = 1.0


class _Orphaned(Exception):
    pass


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send sig to this process when its parent thread exits (Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _orphaned(signum: int, frame: object) -> None:
    raise _Orphaned


def _ignore(signum: int, frame: object) -> None:
    # A handler, not SIG_IGN: handlers reset to the default at exec, so the engine still
    # gets the router's SIGTERM/SIGINT with their normal meaning.
    pass


def _engine_preexec() -> None:
    # Should this watchdog itself be SIGKILLed, the API server goes too.
    set_parent_death_signal(signal.SIGKILL)


def _kill_group(grace: float, child: subprocess.Popen[bytes] | None) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(0, signal.SIGTERM)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(grace)
        # EngineCore may still be shutting down after the API server left.
        time.sleep(min(0.5, grace))
    os.killpg(0, signal.SIGKILL)  # this process too: nothing of the group stays


def _leave_like(returncode: int) -> int:
    """Exit the way the engine did: by the same signal, or with its exit code."""
    if returncode >= 0:
        return returncode
    sig = -returncode
    with contextlib.suppress(OSError, ValueError):  # SIGKILL's handler cannot be set
        signal.signal(sig, signal.SIG_DFL)
    with contextlib.suppress(OSError):
        os.kill(os.getpid(), sig)
        time.sleep(1.0)  # a fatal signal lands before this ends
    return 128 + sig


def main(argv: list[str]) -> int:
    try:
        router_pid, grace = int(argv[0]), float(argv[1])
        command = argv[argv.index("--") + 1:]
    except (IndexError, ValueError):
        print("usage: guard.py ROUTER_PID GRACE_S -- COMMAND...", file=sys.stderr)
        return 2
    if not command:
        print("guard.py: no engine command", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _ignore)
    child: subprocess.Popen[bytes] | None = None
    try:
        signal.signal(signal.SIGUSR1, _orphaned)
        by_signal = set_parent_death_signal(signal.SIGUSR1)
        # The router may have died between our fork and the prctl.
        if os.getppid() != router_pid:
            raise _Orphaned
        try:
            child = subprocess.Popen(command, preexec_fn=_engine_preexec)
        except OSError as exc:
            print(f"spillover guard: cannot run {command[0]}: {exc}", file=sys.stderr)
            return 127
        while True:
            try:
                return _leave_like(child.wait(None if by_signal else _POLL_S))
            except subprocess.TimeoutExpired:
                if os.getppid() != router_pid:
                    raise _Orphaned from None
    except _Orphaned:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        print(f"spillover guard: the router (pid {router_pid}) is gone; stopping the engine",
              file=sys.stderr, flush=True)
        _kill_group(grace, child)
        return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
