"""Snapshots of workspaces: create, list, restore, fork and delete."""
