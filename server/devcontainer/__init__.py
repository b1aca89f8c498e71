"""Workspaces built from a repository's devcontainer.json (docs/devcontainer.md)."""
