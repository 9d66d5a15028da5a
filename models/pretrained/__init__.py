"""Checkpoints shipped with qmanifold (package data, read with :mod:`importlib.resources`).

``qmanifold sample`` without ``--checkpoint`` uses :data:`DEFAULT`. Each checkpoint's provenance
(command, data, steps, validation metrics, benchmark) is in ``PROVENANCE.md`` next to it and in
the ``provenance`` entry of the checkpoint itself.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from importlib import resources

__all__ = ["PRETRAINED", "DEFAULT", "pretrained_path", "available_pretrained"]

#: name -> (file, one-line description)
PRETRAINED = {
    "qm9-heavy": ("qm9_heavy_chiral_egnn.pt",
                  ("chiral_egnn (SE(3), stereo-aware), QM9 heavy atoms (H, C, N, O, F vocabulary), EDM training "
                   "split, quotient loss")),
}
#: the checkpoint ``qmanifold sample`` uses when no ``--checkpoint`` is given
DEFAULT = "qm9-heavy"


def available_pretrained() -> dict[str, str]:
    """``{name: description}`` of the shipped checkpoints."""
    return {k: v[1] for k, v in PRETRAINED.items()}


def pretrained_path(name: str = DEFAULT) -> str:
    """A file-system path of the shipped checkpoint ``name``.

    In an ordinary (or editable) install the package data already is a file; from a zipped install it
    is copied once to ``$XDG_CACHE_HOME/qmanifold/pretrained`` (atomically).

    Raises:
        KeyError: unknown name (the message lists the shipped ones).
        FileNotFoundError: the package was installed without its data files.
    """
    if name not in PRETRAINED:
        raise KeyError(f"no shipped checkpoint {name!r}; available: {sorted(PRETRAINED)}")
    res = resources.files(__name__) / PRETRAINED[name][0]
    if not res.is_file():
        raise FileNotFoundError(f"the shipped checkpoint {PRETRAINED[name][0]} is missing from this installation "
                                f"of qmanifold (installed without package data?); pass --checkpoint")
    if isinstance(res, pathlib.Path):
        return str(res)
    data = res.read_bytes()
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "qmanifold" / "pretrained"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{hashlib.sha256(data).hexdigest()[:16]}-{PRETRAINED[name][0]}"
    if not target.exists():
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return str(target)
