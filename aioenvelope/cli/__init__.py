"""``aioenvelope``: the command line (``pip install 'aioenvelope[cli]'``).

``encrypt``, ``decrypt`` and ``reencrypt`` stream files, directory trees and pipes through
the library at constant memory; ``inspect`` prints a header as JSON; ``keygen`` makes a
raw AES key file; ``branch-key`` administers a hierarchical keyring's key store; ``demo``
runs the quickstart against an embedded KMS.

A package of its own so the top of the tree shows the library's layers alone. Its
modules: ``_main`` (commands and exit statuses), ``_args`` (the parser), ``_keys``
(keyrings and key files from flags), ``_paths`` and ``_io`` (inputs, outputs, files that
appear whole or not at all), ``_inspect``, ``_branch_key``. Only :func:`main` is public.
"""

from ._main import main

__all__ = ["main"]
