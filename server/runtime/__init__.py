"""Runtime backends: one protocol (base.py), one module per backend, registered here."""
