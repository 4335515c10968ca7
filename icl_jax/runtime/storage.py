"""Where runs live: a local directory or Cloud Storage (gs://bucket/path), through one path type.

Every file under a workdir, sweep root or reproduction root is reached through `path(...)`: a local path is a
`pathlib.Path`, a gs:// one an `etils.epath.Path` (the path type Orbax uses; the same methods, reaching Cloud
Storage through gcsfs: `pip install -e ".[gcs]"`). A Cloud TPU pod's hosts share no disk, so a pod run's
workdir must be a bucket every host reaches.

Cloud Storage is not a file system; the three differences that matter here, and how this module meets them:
- An object is uploaded whole or not at all, but cannot be appended to (gcsfs's "a" mode silently rewrites the
  object with the new bytes alone) and has no atomic rename: `write_text_atomically` renames on a local disk and
  uploads directly to gs://; metrics.jsonl is re-uploaded whole (run_logs.MetricsLog).
- No hard links: `create_exclusively` creates an object only if none exists (a precondition on generation 0),
  which is what the workdir lock needs.
- Libraries that write only local files (tensorboardX: its own gs:// writer needs credentials it cannot get from
  gcsfs, and fails) write into a `LocalMirror`, which uploads what they wrote.

tests/e2e/test_gcs.py runs all of it against a local Cloud Storage emulator (tests/helpers.py: gcs_emulator).
"""

import contextlib
import functools
import io
import os
import pathlib
import shutil
import tempfile
import time

from etils import epath

Path = pathlib.Path | epath.Path
REMOTE_PREFIX = "gs://"


def path(value: "str | os.PathLike") -> Path:
  """`value` as a path: a gs:// one as an epath.Path, a local one as an absolute pathlib.Path (the same from any
  working directory)."""
  if is_remote(value):
    return epath.Path(value)
  return pathlib.Path(value).expanduser().absolute()


def is_remote(value: "str | os.PathLike") -> bool:
  return os.fspath(value).startswith(REMOTE_PREFIX)


def write_text_atomically(target: Path, text: str | bytes) -> None:
  """Replaces `target` with `text` (or bytes) so that a reader, or a crash at any moment, sees the old file or
  the new one.

  Locally: written next to it, then renamed over it. On Cloud Storage an upload is already all or nothing (and a
  rename there is a copy), so it is uploaded in place. Raises OSError as the writes do; a failed local write
  leaves no partial file behind.
  """
  data = text.encode() if isinstance(text, str) else text
  if is_remote(target):
    target.write_bytes(data)
    return
  partial = target.with_name(target.name + ".partial")
  try:
    partial.write_bytes(data)
    partial.replace(target)
  finally:
    partial.unlink(missing_ok=True)


def save_figure(figure, target: Path, **savefig_kwargs) -> None:
  """Saves a matplotlib figure to `target` (its format from the suffix), local or remote."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format=target.suffix.lstrip("."), **savefig_kwargs)
  target.write_bytes(buffer.getvalue())


def read_png(source: Path):
  """A PNG file as an [H, W, C] float array in [0, 1] (matplotlib's reading), local or remote."""
  from matplotlib import image  # Deferred: only the evaluation's TensorBoard summary needs it.

  return image.imread(io.BytesIO(source.read_bytes()), format="png")


class LocalMirror:
  """A local directory standing for `target`, for libraries that write only local files.

  For a local `target`, `local` is `target` itself and `sync` does nothing. For a gs:// one, `local` is a fresh
  temporary directory; `sync()` uploads each file written there (whole: event files are small) and `close()`
  syncs once more and removes it. `min_interval_s` spaces the uploads of a frequently called `sync` (every
  logged step): a file that grows is uploaded again in full each time.
  """

  def __init__(self, target: Path, min_interval_s: float = 0.0):
    self._target, self._min_interval_s = target, min_interval_s
    self._remote = is_remote(target)
    self._last_sync = -float("inf")
    self.local = pathlib.Path(tempfile.mkdtemp(prefix="icl_jax_mirror_")) if self._remote else target

  def sync(self, force: bool = False) -> None:
    now = time.monotonic()
    if not self._remote or (not force and now - self._last_sync < self._min_interval_s):
      return
    self._last_sync = now
    for file in self.local.rglob("*"):
      if file.is_file():
        destination = self._target / file.relative_to(self.local)
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(file.read_bytes())

  def close(self) -> None:
    if self._remote:
      try:
        self.sync(force=True)
      finally:
        shutil.rmtree(self.local, ignore_errors=True)

  def __enter__(self) -> "LocalMirror":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


@functools.cache
def _client():
  from google.cloud import storage as gcs  # Installed with gcsfs; only gs:// paths need it.

  return gcs.Client()


def _blob(target: Path):
  bucket, _, name = os.fspath(target)[len(REMOTE_PREFIX) :].partition("/")
  return _client().bucket(bucket).blob(name)


def create_exclusively(target: Path, text: str) -> bool:
  """Creates `target` holding `text` if nothing is there, atomically: of two processes calling it together,
  exactly one gets True. Locally a file written aside and hard-linked into place; on Cloud Storage an upload
  conditional on the object not existing."""
  if is_remote(target):
    from google.api_core import exceptions  # Installed with google-cloud-storage.

    try:
      _blob(target).upload_from_string(text, if_generation_match=0)
    except exceptions.PreconditionFailed:
      return False
    except exceptions.GoogleAPIError as e:  # No such bucket, no permission: as a file system would say it.
      raise OSError(f"{target}: {getattr(e, 'message', e)}") from e
    return True
  staged = target.with_name(f"{target.name}.{os.getpid()}.new")
  staged.write_text(text)
  try:
    os.link(staged, target)  # Atomic, and fails if `target` exists.
  except FileExistsError:
    return False
  finally:
    staged.unlink(missing_ok=True)
  return True


def remove_if_unchanged(target: Path, text: str) -> bool:
  """Removes `target` if it still holds `text` (read a moment ago); of several processes removing the same
  stale file, exactly one gets True. Locally compared, then renamed aside (one renamer wins); on Cloud Storage
  a delete conditional on the generation whose content is `text`."""
  if is_remote(target):
    from google.api_core import exceptions

    blob = _blob(target)
    try:
      blob.reload()
      if blob.download_as_text(if_generation_match=blob.generation) != text:
        return False
      blob.delete(if_generation_match=blob.generation)
    except (exceptions.NotFound, exceptions.PreconditionFailed):
      return False
    return True
  aside = target.with_name(f"{target.name}.stale-{os.getpid()}")
  with contextlib.suppress(FileNotFoundError):
    if target.read_text() != text:
      return False
    target.rename(aside)
    aside.unlink(missing_ok=True)
    return True
  return False
