"""The SSH gateway (``gateway.py``), users' public keys (``keys.py``), the failure limit per
source address (``ratelimit.py``) and the gateway's pure rules (``target.py``)."""
