"""A microVM left halted by a Den that died mid-operation: its QEMU runs but its CPUs are
stopped (QMP ``stop``, as a snapshot's copy of a running VM does: its disks must not change
while they are copied). Nothing else would let the guest run again, and its agent would not
answer (504) until a restart. Blocking; reconcile calls it off the event loop, for a
workspace no operation holds.

A QEMU stopped for a memory save is not touched: a migration that is under way or completed
is what reconcile's ``settle_checkpoint`` decides on (a guest that ran after its memory was
saved would not match its disks).
"""

from __future__ import annotations

from server.runtime.microvm.argv import VmFiles
from server.runtime.microvm.qmp import Qmp

# query-migrate statuses of a save that reconcile's settle decides on, never resumed here.
MIGRATING = frozenset({"setup", "active", "device", "pre-switchover", "postcopy-active",
                       "completed", "wait-unplug"})


def cont_if_halted(files: VmFiles) -> bool:
    """``cont`` a VM whose CPUs are stopped with no memory save under way or done; True when
    it was halted so (and now runs)."""
    with Qmp(files.qmp) as qmp:
        if qmp.execute("query-status").get("status") != "paused":
            return False
        if qmp.execute("query-migrate").get("status") in MIGRATING:
            return False
        qmp.execute("cont")
    return True
