"""Which process a recorded PID is: the servers Conveyor starts (the stack's parts, the local Prefect server) are
recorded with their PID and an identity of that process, so that a PID reused after a reboot, or by another program,
is never taken for them (and never stopped).

The identity is the boot's id and the process's start in clock ticks since that boot (`/proc`), not its start as a
wall-clock time: psutil's `create_time()` is the boot time plus those ticks, and the boot time Linux reports moves
whenever the clock is set (NTP correcting it after a boot, a VM resumed, `date -s`). A jump of more than a second
made every recorded part look gone: `status` said down, and `down` forgot parts that kept running. Where `/proc`
has no such fields (not Linux), the wall-clock start time is the identity, as before.
"""

from __future__ import annotations

from pathlib import Path

import psutil

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# `starttime`, field 22 of /proc/PID/stat; the fields are read from field 3 on (after the command, in parentheses).
START_TICKS_INDEX = 22 - 3
WALL_CLOCK_SLACK_S = 1.0


def identity(pid: int) -> str | None:
    """`boot-id:start-ticks` of a running process (`wall:SECONDS` where /proc lacks them); None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # the command may hold spaces and parentheses
        return f"{BOOT_ID.read_text().strip()}:{int(fields[START_TICKS_INDEX])}"
    except FileNotFoundError:
        if not Path("/proc/self/stat").is_file():  # no /proc: not Linux
            return _wall_clock(pid)
        return None
    except (OSError, ValueError, IndexError):
        return _wall_clock(pid)


def _wall_clock(pid: int) -> str | None:
    try:
        return f"wall:{psutil.Process(pid).create_time():.3f}"
    except psutil.Error:
        return None


def same_process(pid: int, recorded: str) -> bool:
    """Whether `pid` is still the process whose `identity` was `recorded` (and not a zombie)."""
    now = identity(pid)
    if now is None:
        return False
    if now.startswith("wall:") and recorded.startswith("wall:"):
        matches = abs(float(now[5:]) - float(recorded[5:])) <= WALL_CLOCK_SLACK_S
    else:
        matches = now == recorded
    try:
        return matches and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
