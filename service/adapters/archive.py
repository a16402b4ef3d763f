"""The downloadable archive of one adapter version: a gzip'd tar whose members sit at
the top level (`tar xzf v3.tar.gz -C my-adapter` gives a folder PEFT loads)."""

from __future__ import annotations

import gzip
import hashlib
import tarfile
from pathlib import Path

# Order of members: what a loader needs first.
MEMBERS = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "manifest.json",
    "audit.json",
    "record.json",
)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def build(folder: Path, dest: Path, *, mtime: int) -> None:
    """Members of `folder` named in MEMBERS, with fixed owner and mode, into `dest`."""
    with (
        dest.open("wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=mtime) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name in MEMBERS:
            path = folder / name
            info = tarfile.TarInfo(name)
            info.size = path.stat().st_size
            info.mtime = mtime
            info.mode = 0o644
            info.uname = info.gname = "unlearn"
            with path.open("rb") as f:
                tar.addfile(info, f)
