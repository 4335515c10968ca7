"""Frozen evaluation sets: TFDS datasets built with numpy and read without TensorFlow.

  python -m icl_jax.datasets.build --data_dir=DIR   # DIR/linreg_eval/{isotropic,kappa100,noisy}/1.0.0

`load_prompts(DIR, setting)` reads a setting back as numpy arrays in index order and checks its content hash
(DIR may be gs://: its files are read through a local copy); `tfds.data_source("linreg_eval/SETTING",
data_dir=DIR, split="test")` gives the records themselves (in the files' hash-shuffled order, each with its
`index`). The settings are described in
linreg_eval/linreg_eval_dataset_builder.py.
"""

import atexit
import functools
import json
import pathlib
import shutil
import tempfile

import numpy as np
import tensorflow_datasets as tfds

from icl_jax.datasets.linreg_eval import linreg_eval_dataset_builder as linreg_eval
from icl_jax.runtime import config_fields
from icl_jax.runtime import errors
from icl_jax.runtime import storage

SETTINGS = tuple(config.name for config in linreg_eval.Builder.BUILDER_CONFIGS)
VERSION = str(linreg_eval.Builder.VERSION)


class DatasetError(errors.UserError, ValueError):
  """A built set whose files do not read back, or whose prompts are not the ones built or published; the message
  names the file and says how to rebuild."""


def directory(data_dir, setting: str) -> pathlib.Path:
  """Where `setting` of the current version lives under `data_dir`."""
  return pathlib.Path(data_dir) / linreg_eval.Builder.name / setting / VERSION


def _check_setting(setting: str) -> None:
  if setting not in SETTINGS:
    raise ValueError(f"linreg_eval setting {setting!r}: allowed values are {', '.join(map(repr, SETTINGS))}")


def build(data_dir, settings=SETTINGS) -> dict[str, str]:
  """Builds each setting under `data_dir` (keeping one already built), reads it back and checks it against
  the published hash (see `load_prompts`); returns the content hashes."""
  for setting in settings:
    _check_setting(setting)
  hashes = {}
  for setting in settings:
    linreg_eval.Builder(config=setting, data_dir=data_dir).download_and_prepare()
    hashes[setting] = linreg_eval.content_hash(*load_prompts(data_dir, setting))
  return hashes


def _build_command(data_dir, setting: str) -> str:
  return f"`python -m icl_jax.datasets.build --data_dir={data_dir} --settings={setting}`"


def _rebuild(data_dir, setting: str) -> str:
  return f"delete {directory(data_dir, setting)} and rebuild it with {_build_command(data_dir, setting)}"


def _builder(data_dir, setting: str):
  _check_setting(setting)
  path = directory(data_dir, setting)
  if not (path / "dataset_info.json").is_file():
    raise errors.MissingFileError(
      f"{path}: no linreg_eval {VERSION} set {setting!r} there; build it with {_build_command(data_dir, setting)}"
    )
  for name in ("dataset_info.json", "features.json", "metadata.json"):  # TFDS's own errors name no file.
    try:
      json.loads((path / name).read_text())
    except (OSError, ValueError) as e:
      raise DatasetError(f"{path / name} does not read back ({errors.one_line(e)}): {_rebuild(data_dir, setting)}")
  # From the files alone, as any reader would: the builder code is not needed to read.
  return tfds.builder_from_directory(path)


def _records(data_dir, setting: str, builder) -> list[dict]:
  """Every record of the set, as ArrayRecord reads them (their files' order)."""
  try:
    source = builder.as_data_source(linreg_eval.SPLIT)
    return source.__getitems__(list(range(len(source))))
  except (OSError, RuntimeError, ValueError) as e:  # ArrayRecord's messages name no file, but for a missing one.
    path = directory(data_dir, setting)
    files = ", ".join(p.name for p in sorted(path.glob("*.array_record*")))
    raise DatasetError(
      f"{path}: its records ({files or 'none'}) do not read back ({errors.one_line(e)}): {_rebuild(data_dir, setting)}"
    ) from e


def describe(data_dir, setting: str) -> dict:
  """A built setting's metadata (n_dims, n_points, kappa, noise_std, seed, content_sha256, ...) and its size
  `num_prompts`, without decoding any prompt."""
  builder = _builder(data_dir, setting)
  return {**builder.info.metadata, "num_prompts": builder.info.splits[linreg_eval.SPLIT].num_examples}


def load_prompts(data_dir, setting: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The prompts of a built setting, prompt i at row i: xs [B, N, D], ys [B, N], ws [B, D], float32.

  Raises DatasetError, naming the file, when its files do not read back, or when the decoded prompts do not
  hash to the content hash recorded in metadata.json at build time (the files changed since), or to the hash
  published for this version in the builder's source (not the published set, e.g. built where numpy draws
  other normals). A gs:// `data_dir` is read through a local copy of the setting's files (ArrayRecord reads
  local files only; 1280 prompts are a few MB), made once per process; its errors name both.
  """
  if not storage.is_remote(data_dir):
    return _load_local(data_dir, setting)
  _check_setting(setting)
  copy = _local_copy(str(data_dir), setting)
  if not (directory(copy, setting) / "dataset_info.json").is_file():
    raise errors.MissingFileError(
      f"{data_dir}: no linreg_eval {VERSION} set {setting!r} there; build it locally with "
      f"`python -m icl_jax.datasets.build --data_dir=DIR --settings={setting}` and copy it "
      f"there: `gcloud storage cp --recursive DIR/{linreg_eval.Builder.name} {data_dir}`"
    )
  try:
    return _load_local(copy, setting)
  except (FileNotFoundError, DatasetError) as e:
    raise type(e)(f"{data_dir} (read through its local copy {copy}): {e}") from e


@functools.cache
def _local_copy(data_dir: str, setting: str) -> pathlib.Path:
  """A fresh local data_dir holding the files of `setting` under the gs:// `data_dir` (none if it has no such
  set), removed when the process exits."""
  remote = storage.path(data_dir) / linreg_eval.Builder.name / setting / VERSION
  root = pathlib.Path(tempfile.mkdtemp(prefix="icl_jax_linreg_eval_"))
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  local = directory(root, setting)
  local.mkdir(parents=True)
  for item in remote.iterdir() if remote.is_dir() else ():
    if item.is_file():
      (local / item.name).write_bytes(item.read_bytes())
  return root


def _load_local(data_dir, setting: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The set read once per process while its files stay the same (names, sizes and modification times)."""
  path = directory(data_dir, setting)
  files = (
    tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file()))
    if path.is_dir()
    else ()
  )
  prompts, actual = _read_local(str(data_dir), setting, files)
  published = linreg_eval.PUBLISHED_SHA256[VERSION][setting]
  if actual != published:
    raise DatasetError(
      f"{path}: the prompts hash to {actual}, not to linreg_eval {VERSION} {setting!r}'s "
      f"published {published} ({linreg_eval.__file__}): this is not the published set."
    )
  return prompts


@functools.lru_cache(maxsize=8)
def _read_local(data_dir: str, setting: str, files: tuple) -> tuple[tuple[np.ndarray, ...], str]:
  """The prompts, checked against the hash recorded at build time, and their content hash."""
  del files  # Only part of the cache key.
  builder = _builder(data_dir, setting)
  records = _records(data_dir, setting, builder)
  # The files hold records in a hash-shuffled order; each carries its index.
  order = np.argsort([record["index"] for record in records])
  path = directory(data_dir, setting)
  if [records[i]["index"] for i in order] != list(range(len(records))):
    raise DatasetError(f"{path}: the record indices are not 0..{len(records) - 1}: {_rebuild(data_dir, setting)}")
  xs_BxNxD, ys_BxN, ws_BxD = (np.stack([records[i][key] for i in order]) for key in ("xs", "ys", "w"))
  actual = linreg_eval.content_hash(xs_BxNxD, ys_BxN, ws_BxD)
  recorded = builder.info.metadata.get("content_sha256")
  if actual != recorded:
    raise DatasetError(
      f"{path / 'metadata.json'} records content_sha256 {recorded}, but the prompts in {path} "
      f"hash to {actual}: the files changed after the build; {_rebuild(data_dir, setting)}"
    )
  for array in (xs_BxNxD, ys_BxN, ws_BxD):
    array.setflags(write=False)  # Shared by every reader of the cache.
  return (xs_BxNxD, ys_BxN, ws_BxD), actual


def config_errors(config) -> list[str]:
  """Problems with the frozen evaluation set named by config.eval.dataset_dir and dataset_setting: it must
  be built, read back whole with its hashes, be of the task's d and n, and hold at least eval.num_prompts
  prompts."""
  directory_, setting = config.eval.get("dataset_dir"), config.eval.get("dataset_setting")
  if not isinstance(directory_, str):
    return [f"config.eval.dataset_dir = {directory_!r}: must be a directory, or '' for fresh prompts"]
  if not directory_:
    return []
  if setting not in SETTINGS:
    return [f"config.eval.dataset_setting = {setting!r}: allowed values are {', '.join(map(repr, SETTINGS))}"]
  try:
    xs_BxNxD, _, _ = load_prompts(directory_, setting)
  except (FileNotFoundError, DatasetError) as e:
    return [f"config.eval.dataset_dir = {directory_!r}: {e}"]
  info = dict(zip(("num_prompts", "n_points", "n_dims"), xs_BxNxD.shape))
  found = []
  where = f"the set {setting!r} in {directory(directory_, setting)} (config.eval.dataset_setting, dataset_dir)"
  for field in ("n_dims", "n_points"):
    value = config.task.get(field)
    if value != info[field]:
      found.append(f"config.task.{field} = {value!r} differs from the {field} = {info[field]} of {where}")
  prompts = config.eval.get("num_prompts")
  if config_fields.is_int(prompts) and prompts > info["num_prompts"]:
    found.append(
      f"config.eval.num_prompts = {prompts} exceeds the {info['num_prompts']} prompts of {where}: "
      f"allowed values are 1..{info['num_prompts']}"
    )
  return found
