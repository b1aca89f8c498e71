"""The host side of Den's in-workspace agent (docs/agent.md): frames, sessions, operations."""
