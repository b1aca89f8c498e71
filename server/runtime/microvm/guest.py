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
# SIGTERM, waits for them to exit at most $1 seconds, then syncs. Builtins only in the scan
# (no fork per process: forks are slow under emulation).
STOP_SCRIPT = r"""
self=$$
others() {
    out=
    for d in /proc/[0-9]*; do
        p=${d#/proc/}
        [ "$p" = 1 ] || [ "$p" = 2 ] || [ "$p" = "$self" ] && continue
        read -r st < "$d/stat" 2>/dev/null || continue
        comm=${st#*(}; comm=${comm%)*}
        rest=${st##*) }; set -- $rest
        [ "$2" = 2 ] || [ "$2" = "$self" ] || [ "$1" = Z ] || [ "$comm" = AGENT ] && continue
        out="$out $p"
    done
}
others
[ -n "$out" ] && kill -TERM $out 2>/dev/null
end=$((SECONDS + $1))
while others; [ -n "$out" ] && [ "$SECONDS" -lt "$end" ]; do sleep 0.05; done
sync
""".replace("AGENT", AGENT_COMM)


def stop_request(grace_s: float) -> ExecRequest:
    """The exec that ends the guest's processes (SIGTERM, ``grace_s`` to exit) and syncs its
    disks. Bounded: the host's wait is the grace plus a margin for the sync."""
    grace = max(0, int(grace_s))
    return ExecRequest(argv=["bash", "-c", STOP_SCRIPT, "den-stop", str(grace)], user="root",
                       cwd="/", timeout_s=grace + SYNC_MARGIN_S)


SYNC_MARGIN_S = 10.0
