"""Output paths are checked before any work starts: one rule for the library and the CLI.
Torch-free."""

from __future__ import annotations

from pathlib import Path

from .errors import OutputExists


def check_output(path: str | Path, overwrite: bool = False, flag: str = "--out") -> Path:
    """Refuse `path` when it is a file, or a non-empty directory and not `overwrite`."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputExists(f"{path} exists and is not a directory; choose another {flag}")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExists(f"{path} already exists and is not empty; choose another {flag} or pass "
                           "--overwrite to replace it")
    return path


def check_outputs(paths: dict[str, str | Path | None], overwrite: bool = False) -> None:
    """Check every output {flag: path} (None: not asked for) up front; two flags may not name
    the same directory."""
    seen: dict[Path, str] = {}
    for flag, path in paths.items():
        if path is None:
            continue
        resolved = Path(path).expanduser().resolve()
        if resolved in seen:
            raise OutputExists(f"{seen[resolved]} and {flag} name the same directory {path}; give each its own")
        seen[resolved] = flag
        check_output(path, overwrite, flag)
