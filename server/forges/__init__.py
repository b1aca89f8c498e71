"""Forge accounts, private clones, and pull requests pushed from a server-owned mirror."""
