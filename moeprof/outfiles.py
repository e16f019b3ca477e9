"""Files moeprof writes for the user: never clobbered without ``--force``, never left half-written.

Every command that writes a file (prompts, markdown notes, plots, ``timing.json``,
``outputs.jsonl``) goes through here, so the refusal reads the same everywhere and a failing
write (a full disk) leaves the old file in place: data goes to a temporary file in the same
directory, which replaces the target only once it is complete.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from moeprof.errors import UserError


def umask() -> int:
    """The process's file mode creation mask (read by setting it, then setting it back): what a
    temporary file made with owner-only permissions is given so it ends up as a plain ``open``
    would have made it."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def refuse_existing(path: Path, force: bool) -> None:
    """Raise :class:`UserError` if ``path`` exists and the user did not pass ``--force``."""
    if path.exists() and not force:
        raise UserError(f"{path}: already exists (use --force to overwrite)")


@contextlib.contextmanager
def replacing(path: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it atomically becomes ``path``.

    On any error the temporary file is removed and ``path`` is left as it was; an ``OSError``
    becomes one :class:`UserError` line naming ``path``.
    """
    refuse_existing(path, force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent
        )
        os.close(fd)
        os.chmod(tmp_name, 0o666 & ~umask())  # mkstemp makes 0600; a plain open would not
    except OSError as e:
        raise UserError(f"{path}: cannot write: {e.strerror or e}") from e
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: cannot write: {e.strerror or e}") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_new(path: Path, data: str | bytes, *, force: bool) -> None:
    """Write ``data`` (text as UTF-8) to ``path``, refusing to clobber unless ``force``."""
    with replacing(path, force=force) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
