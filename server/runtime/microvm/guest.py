"""What the backend asks of a running guest through its agent. Pure: commands as data.

At stop the guest's processes get SIGTERM first, as ``docker stop`` gives a container's: the
agent is PID 1 and serves the host's channel, so it and its own helpers are spared (a
SIGTERM to PID 1 would end the guest's kernel before its page cache reached the disks).
Then the page cache is synced and QEMU is told to end (process.end).
"""

from __future__ import annotations

from server.runtime.base import ExecRequest

AGENT_COMM = "den-agent"  # the agent's processes (PID 1 and its ``serve``) in the guest

# bash, run as root by the agent. Lists every user process except PID 1, the agent's own,
# this shell and its children (kernel threads: their parent is kthreadd, pid 2), sends them
# SIGTERM, syncs (what was written before the stop is safe even if the rest runs out of
# time), waits at most $1 seconds for those processes to exit (not for new ones: the
# agent restarts the image's init when it exits), then syncs again. Builtins only in the
# scans (no fork per process: forks are slow under emulation).
STOP_SCRIPT = r"""
grace=$1 self=$$
out=
for d in /proc/[0-9]*; do
    p=${d#/proc/}
    [ "$p" = 1 ] || [ "$p" = 2 ] || [ "$p" = "$self" ] && continue
    read -r st 2>/dev/null < "$d/stat" || continue
    comm=${st#*(}; comm=${comm%)*}
    rest=${st##*) }; set -- $rest
    [ "$2" = 2 ] || [ "$2" = "$self" ] || [ "$1" = Z ] || [ "$comm" = AGENT ] && continue
    out="$out $p"
done
[ -n "$out" ] && kill -TERM $out 2>/dev/null
sync
end=$((SECONDS + grace))
while [ "$SECONDS" -lt "$end" ]; do
    alive=
    for p in $out; do
        read -r st 2>/dev/null < "/proc/$p/stat" || continue
        rest=${st##*) }; set -- $rest
        [ "$1" = Z ] || { alive=1; break; }
    done
    [ -z "$alive" ] && break
    sleep 0.05
done
sync
""".replace("AGENT", AGENT_COMM)


def stop_request(grace_s: float) -> ExecRequest:
    """The exec that ends the guest's processes (SIGTERM, ``grace_s`` to exit) and syncs its
    disks. Bounded: the host's wait is the grace plus a margin for the sync."""
    grace = max(0, int(grace_s))
    return ExecRequest(argv=["bash", "-c", STOP_SCRIPT, "den-stop", str(grace)], user="root",
                       cwd="/", timeout_s=grace + SYNC_MARGIN_S)


SYNC_MARGIN_S = 10.0
