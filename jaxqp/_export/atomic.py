"""Writing files atomically, and refusing paths no file can be written to (export layer: stdlib only).

Every file jaxqp writes (``jaxqp.save``, the exporters in ``jaxqp.deploy``, the plots and JSON of
``jaxqp.choose``) goes through :func:`check_writable` before any work, then through
:func:`replaced_atomically`: a temporary file beside the target, synced and renamed over it, so a
failure never leaves a half-written file or a stray temporary.

Example:
    >>> import os, tempfile
    >>> target = os.path.join(tempfile.mkdtemp(), "notes.txt")
    >>> with replaced_atomically(target) as tmp, open(tmp, "w") as f:
    ...     _ = f.write("done")
    >>> open(target).read()
    'done'
"""

from __future__ import annotations

import contextlib
import os
import secrets


def check_writable(where: str, path: str | os.PathLike, suffix: str = ".jaxqp") -> None:
    """Refuses, before any work, a ``path`` that no file can be written to: a folder, or a file in a missing folder.

    Args:
      where: the public function, for the message (``"jaxqp.save"``).
      path: the file about to be written.
      suffix: the file name ending suggested in the message.

    Raises:
      ValueError: naming the path and the fix.

    Example:
      >>> check_writable("jaxqp.save", ".")
      Traceback (most recent call last):
      ...
      ValueError: jaxqp.save: '.' is a folder; give a file path inside it, e.g. './model.jaxqp'
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{where}: {path!r} is a folder; give a file path inside it, e.g. "
                         f"{os.path.join(path, 'model' + suffix)!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{where}: the folder of {path!r} does not exist ({folder}); create it first "
                         "(os.makedirs(folder, exist_ok=True))")


@contextlib.contextmanager
def replaced_atomically(path: str | os.PathLike):
    """Yields a fresh temporary path beside ``path``: what is written there replaces ``path`` at the end.

    On success the file is synced to disk and renamed over ``path`` (atomically); on any error
    it is removed and ``path`` is untouched. The file gets the usual permissions (the umask's,
    read from an empty file created here), not a private temporary file's.

    Args:
      path: the file to replace.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".jaxqp-{os.getpid()}-{secrets.token_hex(8)}.tmp")
    try:
        with open(tmp, "xb"):  # created here, with the umask's permissions (writers may not keep them)
            pass
        mode = os.stat(tmp).st_mode & 0o777
        yield tmp
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
