"""The warm pool: gVisor sandboxes booted ahead of demand, frozen, waiting for a create.

A create whose request fits a pooled sandbox (same image, runtime, resources and disk; no GPU,
no environment of its own; no devcontainer.json) takes it instead of creating and booting a
container: the service thaws it, gives it the workspace's host name, brings the firewall in
step (its policy is in force before anything else) and seeds the repository into it. A
pooled sandbox has run nothing but its image's init and Den's agent: no user's exec or agent
call ever reached it, so nothing of one user can be in another's.

``fit`` holds the pure rules (which request fits, what the budget allows); ``warm`` the pool
itself (making, freezing, claiming, shrinking under memory pressure).
"""
