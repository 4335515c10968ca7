"""Helpers shared by several test modules (tests never import each other)."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

from icl_jax import checkpointing
from icl_jax import config_checks
from icl_jax import models
from icl_jax import optim
from icl_jax import train
from icl_jax import train_step

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
  with pytest.raises(config_checks.ConfigError) as info:
    config_checks.validate(config, num_devices=8)
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
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[offset + 12:offset + 12 + length])
      events.append(event)
      offset += 12 + length + 4
  return events
