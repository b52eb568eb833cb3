"""Whole weight files before any weights load: a truncated or damaged safetensors file is named up front.

A ``.safetensors`` file is ``<8-byte little-endian header length N> <N bytes of JSON header> <data>``; the header
gives every tensor's ``data_offsets`` [begin, end) into the data. A file is whole when it is exactly
``8 + N + max(end)`` bytes long. Reading the headers only (a few kB per file) finds an interrupted download or
copy in milliseconds, where loading would fail deep inside the library with "incomplete metadata, file not
fully covered" and no file name (the format: https://github.com/huggingface/safetensors#format).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit on the header


def safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file at ``path`` is not whole (one line naming it), or None if it is."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"{path}: {size} bytes, too short for a safetensors file (an interrupted download or copy?)"
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                return (f"{path} is truncated or not a safetensors file: {size} bytes, but its header alone claims "
                        f"{8 + length} (an interrupted download or copy?)")
            header = json.loads(handle.read(length))
    except OSError as error:
        return f"{path}: cannot be read ({error.strerror or error})"
    except (ValueError, UnicodeDecodeError):
        return f"{path}: its header is not valid JSON: a damaged safetensors file"
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return (f"{path} is truncated: {size} bytes, its header says {expected} (an interrupted download or copy?); "
                "download or copy it again")
    return None


def weight_file_problems(model_path) -> list[str]:
    """One line per damaged ``*.safetensors`` file below the model folder ``model_path`` (any depth)."""
    folder = Path(model_path)
    if not folder.is_dir():
        return []
    return [problem for file in sorted(folder.rglob("*.safetensors")) if (problem := safetensors_problem(file))]
