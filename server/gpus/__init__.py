"""GPUs: the host's inventory (inventory.py), exclusive allocation recorded with the state
change (allocation.py), and the container configuration of an allocation (container.py)."""
