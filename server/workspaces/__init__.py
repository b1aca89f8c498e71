"""Workspaces: the state machine, naming, and the service that alone changes state."""
