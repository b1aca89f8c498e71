"""Network isolation: per-workspace egress policy, enforced by host firewall rules on a
bridge network Den manages (docs/security.md, "Network isolation")."""
