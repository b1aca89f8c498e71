"""Prebuilds: a repository and branch cloned, built and set up ahead of time, kept as a
memory snapshot that new workspaces fork from (docs/prebuilds.md)."""
