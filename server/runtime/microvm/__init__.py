"""The microVM backend (``DEN_BACKEND=microvm``, docs/microvm.md): each workspace is a QEMU
``microvm`` guest with a kernel of its own, running Den's agent over a virtio-serial port.

* :mod:`.argv` builds QEMU's command line and a VM directory's file names (pure).
* :mod:`.disks` makes a VM's disks (a qcow2 overlay on the shared root filesystem, an ext4
  disk for ``/workspace``).
* :mod:`.process` starts, finds and ends QEMU processes.
* :mod:`.transport` is the agent's byte stream over the port's host socket.
* :mod:`.backend` is the runtime (server/runtime/base.py) on top of them.
"""
