"""What the programs share on the command line: flag parsing that turns a bad `--config.FIELD=VALUE` override
into one `error:` line naming the field and the closest valid ones, instead of a traceback."""

import difflib
import logging as std_logging
import os
import re
import sys
import threading

import ml_collections
from absl import app
from absl import flags
from absl import logging

from icl_jax import checkpointing
from icl_jax.analysis import evaluate
from icl_jax.runtime import config_files
from icl_jax.runtime import errors

# --config's help, the same in every program that trains or evaluates.
CONFIG_HELP = (
  "Experiment config file[:variant]: configs/linreg.py (Garg et al.'s paper run), configs/linreg.py:medium (12 "
  "layers at d = 8, about 20 minutes on a 2-core CPU) or configs/linreg.py:quick (laptop size); "
  "configs/linreg_ill_conditioned.py[:medium|:quick] (kappa = 100), configs/lstm.py[:medium|:quick], "
  "configs/lsa.py[:quick] (Ahn et al.). Override any field with --config.FIELD=VALUE. On a CPU, "
  "--jax_num_cpu_devices=2 splits each batch over two devices (--helpfull lists JAX's own flags)."
)


def override_errors(argv: list[str]) -> list[str]:
  """A line for each `--config.FIELD=...` of `argv` that names no field of the `--config=FILE[:VARIANT]` config."""
  config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if config_arg is None:
    return []
  path, _, variant = config_arg.partition(":")
  try:
    module = config_files.load_file(path)
    config = module.get_config(variant) if variant else module.get_config()
  except Exception:  # noqa: BLE001  (a broken config file is reported by the flag parser itself)
    return []
  fields = list(config_files.flatten(config_files.config_dict(config)))
  found = []
  for match in (re.match(r"--config\.([\w.]+)(=|$)", a) for a in argv):
    if match and match.group(1) not in fields and not any(f.startswith(match.group(1) + ".") for f in fields):
      close = _closest(match.group(1), fields)
      hint = f"; did you mean {' or '.join(f'--config.{c}' for c in close)}?" if close else ""
      found.append(f"--config.{match.group(1)}: {config_arg} has no field {match.group(1)!r}{hint}")
  return found


def _closest(path: str, fields: list[str]) -> list[str]:
  """Up to three fields like `path`: those of its section whose words' initials spell its last part ("lr" ->
  "learning_rate"), then the most similar spellings."""
  section, _, name = path.rpartition(".")
  initials = [
    f
    for f in fields
    if f.rpartition(".")[0] == section and "".join(w[0] for w in f.rpartition(".")[2].split("_") if w) == name
  ]
  similar = difflib.get_close_matches(path, fields, n=3, cutoff=0.5)
  return list(dict.fromkeys(initials + similar))[:3]


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with one `error:` line and exit code 1 for a bad flag or config override."""
  try:
    remaining = flags.FLAGS(argv)
    _check_config_files_loaded()
    return remaining
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    errors = override_errors(argv) or [str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__]
    for line in errors:
      print(f"error: {line}", file=sys.stderr)
    sys.exit(1)


def _check_config_files_loaded() -> None:
  """ml_collections defers a config file that fails to load (missing, or raising) to the first use of the
  flag's value, deep inside the program: touch every config flag now, for one `error:` line."""
  for name in list(flags.FLAGS):
    flag = flags.FLAGS[name]
    if name != flag.name or not type(flag).__module__.startswith("ml_collections.config_flags"):
      continue
    try:
      getattr(flag.value, "keys", None)  # A config that failed to load raises here; a field override's value not.
    except OSError as e:
      print(f"error: --{name}: {str(e).strip().splitlines()[-1].strip()}", file=sys.stderr)
      sys.exit(1)


def checked_config(config: ml_collections.ConfigDict, argv: list[str]) -> ml_collections.ConfigDict:
  """`config` once it validates (for one device), for programs that take no positional arguments; otherwise
  a usage error, or one `error:` line and exit code 1."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    evaluate.validate(config, num_devices=1)
  except errors.ConfigError as e:
    sys.exit(f"error: {e}")
  return config


def exit_with_error(error: Exception) -> None:
  """One `error:` line (also logged) and exit status 1, or the error's own `exit_status` (75 for a save abandoned
  after SIGTERM). After a failed checkpoint save or restore the process
  leaves at once (os._exit): Orbax's blocked save threads would otherwise keep the interpreter from ever
  exiting, and its asyncio threads print tracebacks while a failed restore unwinds or the interpreter shuts down
  (silenced from here on, so that the error line stays the last one)."""
  leave_at_once = isinstance(error, (checkpointing.CheckpointSaveError, checkpointing.CheckpointRestoreError))
  if leave_at_once:  # Orbax's threads die with the process: their last words would follow the error line.
    threading.excepthook = sys.unraisablehook = lambda *args: None
    std_logging.getLogger("asyncio").disabled = True
  if leave_at_once:
    logging.flush()
    sys.stderr.flush()
    # A thread may be printing at this moment: from here on everyone's stderr is /dev/null, and the error line
    # goes through a copy of the original descriptor, last.
    original_stderr = os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    os.write(original_stderr, f"error: {error}\n".encode())
    os._exit(getattr(error, "exit_status", 1))
  print(f"error: {error}", file=sys.stderr, flush=True)
  sys.exit(1)
