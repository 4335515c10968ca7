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
import socket
import tempfile
import threading
import time

from etils import epath

from icl_jax.runtime import errors

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
        self.discard()

  def discard(self) -> None:
    """Removes the local directory of a gs:// target without uploading it (when the upload cannot finish)."""
    if self._remote:
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


# How long a write may take while a run ends on an error (often the storage's own): the lock's removal, the last
# upload of TensorBoard's events. Past it the run ends without them (a stale lock is taken over by the next run).
CLEANUP_TIMEOUT_S = 5.0
# How long each client may take to write, read back and delete the preflight's object. A reachable bucket answers
# in well under a second; a client without credentials or without a route retries until it is stopped.
PREFLIGHT_TIMEOUT_S = 10.0


class StorageError(errors.UserError, OSError):
  """A gs:// path that a client of the run cannot write; the message names the path, client, cause and fix."""


def _credentials_found() -> bool:
  """Whether Google's default credentials have a source here: a file, an emulator, or a test token (a GCE or
  Cloud TPU VM's metadata server is only found by asking it, which the preflight's deadline bounds)."""
  explicit = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
  config_dir = os.environ.get("CLOUDSDK_CONFIG") or os.path.join(os.path.expanduser("~"), ".config", "gcloud")
  return bool(
    (explicit and os.path.isfile(explicit))
    or os.path.isfile(os.path.join(config_dir, "application_default_credentials.json"))
    or os.environ.get("GOOGLE_AUTH_TOKEN_FOR_TESTING")
  )


_FIXES = {
  "no credentials": "run `gcloud auth application-default login` (or set GOOGLE_APPLICATION_CREDENTIALS to a "
  "service account's key file); for a local emulator set STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL",
  "permission denied": "grant this account a role that writes objects in the bucket (roles/storage.objectAdmin)",
  "no route": "check that this machine reaches Cloud Storage (or the emulator that STORAGE_EMULATOR_HOST and "
  "TENSORSTORE_GCS_HTTP_URL name)",
  "no such bucket": "create the bucket, or correct the path",
}


def _cause(error: BaseException) -> str:
  text = f"{type(error).__name__} {error}".lower()
  if isinstance(error, TimeoutError) or "deadline" in text or "timed out" in text or "timeout" in text:
    return "no credentials" if not _credentials_found() else "no route"
  if "403" in text or "permission" in text or "forbidden" in text:
    return "permission denied"
  if "401" in text or "credential" in text or "unauthenticated" in text or "unauthorized" in text:
    return "no credentials"
  if "404" in text or "not found" in text or "nosuchbucket" in text:
    return "no such bucket"
  return "no route"


def within(seconds: float, fn) -> None:
  """fn() in a daemon thread, waited for at most `seconds`: TimeoutError if it is still running then."""
  failure = []

  def run():
    try:
      fn()
    except BaseException as e:  # noqa: BLE001  (handed to the caller)
      failure.append(e)

  thread = threading.Thread(target=run, daemon=True, name="icl_jax-preflight")
  thread.start()
  thread.join(seconds)
  if thread.is_alive():
    raise TimeoutError(f"no answer within {seconds:g} s")
  if failure:
    raise failure[0]


def _probe_name() -> str:
  """The preflight's object, one per process: the hosts of a pod check the same workdir at once."""
  return f".icl_jax_preflight-{socket.gethostname()}-{os.getpid()}"


def _gcsfs_round_trip(target: Path) -> None:
  probe = target / _probe_name()
  probe.write_bytes(b"icl_jax")
  if probe.read_bytes() != b"icl_jax":
    raise OSError(f"{probe} read back other bytes than were written")
  probe.unlink()


def _tensorstore_round_trip(target: Path) -> None:
  import tensorstore as ts  # Installed with Orbax, which writes a run's arrays through it.

  bucket, _, prefix = os.fspath(target)[len(REMOTE_PREFIX) :].partition("/")
  store = ts.KvStore.open({"driver": "gcs", "bucket": bucket, "path": prefix.rstrip("/") + "/"}).result()
  name = _probe_name()
  store.write(name, b"icl_jax").result()
  if store.read(name).result().value != b"icl_jax":
    raise OSError("read back other bytes than were written")
  store.delete_range(ts.KvStore.KeyRange(name, name + "\0")).result()


_CLIENTS = {"gcsfs": _gcsfs_round_trip, "TensorStore": _tensorstore_round_trip}


def preflight(target: "str | os.PathLike", timeout_s: float = PREFLIGHT_TIMEOUT_S) -> None:
  """For a gs:// `target`: writes, reads back and deletes one small object through each client a run uses
  (gcsfs for files, TensorStore for Orbax's arrays), each within `timeout_s`.
  StorageError naming the path, the client, the cause and the fix if one fails; a local path passes."""
  if not is_remote(target):
    return
  for client, round_trip in _CLIENTS.items():
    try:
      within(timeout_s, lambda: round_trip(path(target)))
    except Exception as e:  # noqa: BLE001  (every client failure is the same error for the user)
      cause = _cause(e)
      raise StorageError(
        f"{os.fspath(target)}: {client} cannot write there ({cause}: {errors.one_line(e)}); fix: {_FIXES[cause]}"
      ) from None
