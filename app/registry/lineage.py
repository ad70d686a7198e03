"""Lineage facts recorded on registered versions: which code and which data made a model.

Used by training jobs (tags ``matih.code_version``, ``matih.dataset_sha256``) and shown in
model cards, so that a version can be traced back to a commit and an exact training frame.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the running code when it is a checkout (``git:<sha>``, ``+dirty``
    when it has local changes), else the installed package version (``matih-ml <version>``)."""
    from app import __version__

    try:
        sha = subprocess.run(
            ["git", "-C", str(_REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(_REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"matih-ml {__version__}"
    if len(sha) != 40:
        return f"matih-ml {__version__}"
    return f"git:{sha}{'+dirty' if dirty else ''}"


def frame_sha256(frame) -> str:
    """A stable fingerprint of a pandas DataFrame: column names, dtypes and every value.

    Two frames with the same content give the same digest in any process (row hashes come
    from ``pandas.util.hash_pandas_object``, which does not depend on the Python hash seed)."""
    import pandas as pd

    digest = hashlib.sha256()
    digest.update(repr([(str(c), str(t)) for c, t in frame.dtypes.items()]).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()
