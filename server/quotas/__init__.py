"""Per-user limits (issue 11 §2): what a user may hold (workspaces, CPUs, memory, disk,
snapshots) and run at once (execs, streams, terminals, SSH channels), and the API's rate
limits. The policy lives here; the entry points call it with a line or two."""
