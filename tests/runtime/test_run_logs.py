"""What a run writes besides checkpoints: here, how the storage libraries' logs are kept readable."""

import logging

from icl_jax.runtime import run_logs


def test_a_storage_warning_repeated_at_every_file_operation_is_logged_once(caplog):
  run_logs.quiet_orbax()
  run_logs.quiet_orbax()  # Twice, as two programs in one process would: still one filter.
  gcsfs = logging.getLogger("gcsfs")
  assert sum(isinstance(f, run_logs.OnceFilter) for f in gcsfs.filters) == 1
  with caplog.at_level(logging.WARNING, logger="gcsfs"):
    for _ in range(5):
      gcsfs.warning("Could not determine bucket type for bucket name %s: %s", "b", "no credentials")
    gcsfs.warning("Could not determine bucket type for bucket name %s: %s", "other", "no credentials")
    gcsfs.info("an INFO line per file read")
  messages = [r.getMessage() for r in caplog.records if r.name == "gcsfs"]
  assert messages == [
    "Could not determine bucket type for bucket name b: no credentials",
    "Could not determine bucket type for bucket name other: no credentials",
  ]
