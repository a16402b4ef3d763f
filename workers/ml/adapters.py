"""Writing an adapter folder that plain PEFT loads, with the digest of every file."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    """{file name: sha256} of the files of an adapter folder."""
    return {f.name: file_sha256(f) for f in sorted(folder.iterdir()) if f.is_file()}


def save(model: Any, folder: Path, *, base_name: str) -> dict[str, str]:
    """Save the trained adapter to `folder` (written beside it, then renamed, so a
    reader never sees half a folder); returns {file name: sha256}."""
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    # The serving side looks the base up by name, not by this machine's cache path.
    for config in model.peft_config.values():
        config.base_model_name_or_path = base_name
    model.save_pretrained(tmp, safe_serialization=True)
    missing = [f for f in ADAPTER_FILES if not (tmp / f).is_file()]
    if missing:
        raise RuntimeError(f"PEFT did not write {missing}")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder_digests(folder)
