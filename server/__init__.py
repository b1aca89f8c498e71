"""Den: persistent dev workspaces, isolated with gVisor."""

__version__ = "0.1.0"
