"""The SSH gateway (``gateway.py``), users' public keys (``keys.py``), the failure limit per
source address (``ratelimit.py``) and the gateway's pure rules (``target.py``).

asyncssh is imported here first, with the ``CryptographyDeprecationWarning`` its import
raises (its type hints name DSA classes) silenced for that import only: users and operators
saw a screenful of it before the output of every ``den`` command. Other warnings, and any
later ones from asyncssh, still show.
"""

import warnings

from cryptography.utils import CryptographyDeprecationWarning

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning,
                            module=r"asyncssh(\.|$)")
    import asyncssh  # noqa: F401
