"""Starting JAX's distributed runtime for multi-process (multi-host) training.

By default a run is one process and nothing is initialised. Otherwise every process calls `initialize` before
anything touches a JAX device, and then sees every device of every process (`jax.devices()`); training, data,
checkpoints and logs need nothing else (see README.md, "Multi-host").

Modes (`--distributed`):
  detect    (default) explicit if a coordinator flag is given, auto if the environment is a multi-process
            cluster job: a multi-host TPU slice (GKE sets TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES;
            multislice sets MEGASCALE_COORDINATOR_ADDRESS), a Slurm step of several tasks (`srun`: SLURM_NTASKS
            > 1 with SLURM_STEP_NODELIST) or an Open MPI job of several ranks (`mpirun`: OMPI_COMM_WORLD_SIZE
            > 1); otherwise one process and no initialisation.
  auto      `jax.distributed.initialize()` with JAX's cluster auto-detection (Cloud TPU VMs, GKE, Slurm,
            Open MPI); coordinator flags that are given override what is detected.
  explicit  `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`, all three required.
  off       one process, no initialisation; coordinator flags are refused.

The coordinator service (started by process 0) binds only to the address it is given: JAX's own default is
every interface (`[::]:PORT`), so `coordinator_bind_address` is always passed when the
address is known. When that address is a loopback one (all processes on one machine, as in the tests), the
CPU collectives (gloo) are also bound to it; gloo would otherwise listen on whatever address the machine's
hostname resolves to.
"""

import dataclasses
import ipaddress
import os
from collections.abc import Mapping

import jax
from absl import flags
from absl import logging

from icl_jax.runtime import errors

MODES = ("detect", "auto", "explicit", "off")


class DistributedFlagError(errors.UserError, ValueError):
  """The distributed flags are inconsistent; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `initialize` will do: `kwargs` for `jax.distributed.initialize`, or None for one process."""

  mode: str  # "single", "auto" or "explicit": the mode actually used.
  kwargs: dict | None
  reason: str


def cluster_from_environment(environ: Mapping[str, str] | None = None) -> str | None:
  """The environment variable that says this process is one of several of a cluster job, or None: a host of a
  multi-host TPU slice, a task of a multi-task Slurm step, a rank of a multi-rank Open MPI job. For those,
  `jax.distributed.initialize()` finds the coordinator, the process count and this process's id by itself.

  Only environment variables are read (no metadata server queries), so this is instant and safe anywhere.
  On a GCE TPU VM pod, where the topology lives in the metadata server, pass `--distributed=auto`.
  """
  environ = os.environ if environ is None else environ
  for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
    hosts = [h for h in environ.get(name, "").split(",") if h.strip()]
    if len(hosts) > 1:
      return name
  if environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "MEGASCALE_COORDINATOR_ADDRESS"
  # Inside `srun` (a job step), not merely inside an allocation: sbatch's batch script also has SLURM_NTASKS.
  if "SLURM_STEP_NODELIST" in environ and _count(environ.get("SLURM_NTASKS")) > 1:
    return "SLURM_NTASKS"
  if _count(environ.get("OMPI_COMM_WORLD_SIZE")) > 1:
    return "OMPI_COMM_WORLD_SIZE"
  return None


def _count(value: str | None) -> int:
  return int(value) if value and value.isdigit() else 0


def _check_address(address: str) -> None:
  host, sep, port = address.rpartition(":")
  if not sep or not host or host == "[]":
    raise DistributedFlagError(
      f"--coordinator_address={address!r} must be HOST:PORT, e.g. 10.0.0.1:8476 or "
      "127.0.0.1:8476 ([::1]:8476 for IPv6)."
    )
  if not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedFlagError(f"--coordinator_address={address!r}: the port {port!r} must be a number in 1..65535.")
  if host in ("0.0.0.0", "[::]", "::"):
    raise DistributedFlagError(
      f"--coordinator_address={address!r} is a wildcard address; give the address of "
      "process 0's host (the coordinator binds to exactly this address)."
    )


def plan(
  mode: str = "detect",
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  environ: Mapping[str, str] | None = None,
) -> Plan:
  """Validates the flags and decides what to do, without starting anything. Raises DistributedFlagError."""
  if mode not in MODES:
    raise DistributedFlagError(f"--distributed={mode!r}; allowed: {', '.join(MODES)}.")
  coordinator_address = coordinator_address or None
  given = {
    name: value
    for name, value in (
      ("--coordinator_address", coordinator_address),
      ("--num_processes", num_processes),
      ("--process_id", process_id),
    )
    if value is not None
  }
  if mode == "off":
    if given:
      raise DistributedFlagError(
        f"--distributed=off runs one process; drop {', '.join(given)}, or use --distributed=explicit."
      )
    return Plan("single", None, "--distributed=off")
  if mode == "detect":
    if given:
      mode = "explicit"
    elif (variable := cluster_from_environment(environ)) is not None:
      return Plan("auto", {}, f"multi-process cluster environment ({variable} is set)")
    else:
      return Plan("single", None, "no coordinator flags and no multi-host environment")
  if mode == "explicit":
    missing = [name for name in ("--coordinator_address", "--num_processes", "--process_id") if name not in given]
    if missing:
      raise DistributedFlagError(
        f"multi-process training with explicit coordinator flags needs "
        f"--coordinator_address=HOST:PORT, --num_processes=N and --process_id=I; missing: "
        f"{', '.join(missing)}."
      )
  if num_processes is not None and num_processes < 1:
    raise DistributedFlagError(f"--num_processes={num_processes} must be at least 1.")
  if process_id is not None and process_id < 0:
    raise DistributedFlagError(f"--process_id={process_id} must be at least 0.")
  if process_id is not None and num_processes is not None and process_id >= num_processes:
    raise DistributedFlagError(
      f"--process_id={process_id} is out of range for --num_processes={num_processes} "
      f"(process ids are 0..{num_processes - 1})."
    )
  kwargs = {}
  if coordinator_address is not None:
    _check_address(coordinator_address)
    # Bind the coordinator (process 0) to exactly this address, never to every interface.
    kwargs.update(coordinator_address=coordinator_address, coordinator_bind_address=coordinator_address)
  if num_processes is not None:
    kwargs["num_processes"] = num_processes
  if process_id is not None:
    kwargs["process_id"] = process_id
  if mode == "explicit":
    # Everything is given: no cluster auto-detection (which could query a metadata server or MPI).
    kwargs["cluster_detection_method"] = "deactivate"
    return Plan("explicit", kwargs, f"coordinator {coordinator_address}")
  return Plan("auto", kwargs, "--distributed=auto")


def loopback_host(address: str) -> str | None:
  """The host of HOST:PORT if it is a loopback address (127.0.0.0/8, ::1, localhost), else None."""
  host = address.rpartition(":")[0].strip("[]")
  if host == "localhost":
    return "127.0.0.1"
  try:
    return host if ipaddress.ip_address(host).is_loopback else None
  except ValueError:
    return None


# JAX has no public option for the address gloo listens on (its CPU backend takes the hostname's), so
# `_bind_cpu_collectives_to` re-registers the CPU backend through these private functions. Checked against jax
# 0.10.2 (requirements.txt's lower bound); tests/runtime/test_distributed.py fails as soon as a JAX release changes
# them, and at run time a changed JAX keeps its default binding, with a warning.
PRIVATE_GLOO_API_CHECKED = "0.10.2"


def gloo_internals():
  """JAX's private (make_gloo_tcp_collectives, make_cpu_client, register_backend_factory, distributed state);
  ImportError or AttributeError if a JAX release has moved them."""
  from jax._src import distributed as jax_distributed
  from jax._src import xla_bridge
  from jax._src.lib import _jax

  return (
    _jax.make_gloo_tcp_collectives,
    xla_bridge.make_cpu_client,
    xla_bridge.register_backend_factory,
    jax_distributed.global_state,
  )


def _bind_cpu_collectives_to(host: str) -> None:
  """Makes the CPU backend's gloo collectives listen on `host` instead of the hostname's address."""
  if jax.config.jax_cpu_collectives_implementation not in (None, "gloo"):
    return
  try:
    make_gloo, make_client, register_backend_factory, global_state = gloo_internals()
  except (ImportError, AttributeError) as e:
    logging.warning(
      "cannot bind the CPU collectives to %s (%s; checked with jax %s); they use the hostname's address.",
      host,
      e,
      PRIVATE_GLOO_API_CHECKED,
    )
    return

  def cpu_client():
    try:
      collectives = make_gloo(distributed_client=global_state.client, hostname=host)
    except TypeError as e:
      logging.warning("cannot bind the CPU collectives to %s (%s); they use the hostname's address.", host, e)
      return make_client()
    return make_client(collectives=collectives)

  try:
    register_backend_factory("cpu", cpu_client, priority=0, fail_quietly=False)
  except (RuntimeError, TypeError) as e:
    logging.warning("cannot bind the CPU collectives to %s (%s); they use the hostname's address.", host, e)


def initialize(
  mode: str = "detect",
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_count: int | None = None,
) -> Plan:
  """Starts JAX's distributed runtime as `mode` says (see the module docstring); call before any JAX work.

  Args:
    mode: one of MODES.
    coordinator_address: HOST:PORT of process 0's coordinator; process 0 binds its service to exactly this.
    num_processes: number of processes.
    process_id: this process's id in 0..num_processes-1.
    local_device_count: number of CPU devices this process exposes (`jax_num_cpu_devices`; for CPU runs and
      tests; no effect on accelerators). None leaves JAX's setting (or XLA_FLAGS) alone.

  Returns:
    The plan that was carried out.

  Raises:
    DistributedFlagError: inconsistent flags, raised before anything is started.
  """
  if local_device_count is not None and local_device_count < 1:
    raise DistributedFlagError(f"local_device_count={local_device_count} must be at least 1.")
  decided = plan(mode, coordinator_address, num_processes, process_id)
  if local_device_count is not None:
    jax.config.update("jax_num_cpu_devices", local_device_count)
  if (
    decided.mode == "auto"
    and "coordinator_bind_address" not in decided.kwargs
    and not os.environ.get("JAX_COORDINATOR_BIND_ADDRESS")
  ):
    logging.info(
      "--distributed=auto: process 0's coordinator will listen on every interface at the detected port "
      "(JAX's default); set JAX_COORDINATOR_BIND_ADDRESS=IP:PORT or --coordinator_address to restrict it."
    )
  if decided.kwargs is not None:
    try:
      jax.distributed.initialize(**decided.kwargs)
    except ValueError as e:
      if decided.mode != "auto":
        raise
      raise DistributedFlagError(
        f"--distributed=auto: JAX detected no cluster (Cloud TPU, GKE, Slurm, Open MPI) "
        f"that sets all of coordinator address, process count and id ({e}); give "
        "--coordinator_address=HOST:PORT --num_processes=N --process_id=I instead."
      ) from e
    if (host := loopback_host(decided.kwargs.get("coordinator_address", ""))) is not None:
      _bind_cpu_collectives_to(host)
  return decided


def define_flags() -> dict:
  """Defines --distributed and the coordinator flags (for icl_jax.main and icl_jax.sweep); returns them by name."""
  return {
    "distributed": flags.DEFINE_enum(
      "distributed",
      "detect",
      list(MODES),
      "Multi-process (multi-host) training. detect: explicit if --coordinator_address/--num_processes/"
      "--process_id is given, auto on a multi-host TPU environment (TPU_WORKER_HOSTNAMES etc.), else one "
      "process; auto: jax.distributed.initialize() with cluster auto-detection (Cloud TPU, GKE, Slurm, Open "
      "MPI); explicit: the three coordinator flags, all required; off: one process.",
    ),
    "coordinator_address": flags.DEFINE_string(
      "coordinator_address",
      None,
      "HOST:PORT of process 0, where it runs the coordinator service, bound to "
      "exactly this address (not to every interface). The same on every process.",
    ),
    "num_processes": flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address)."),
    "process_id": flags.DEFINE_integer(
      "process_id",
      None,
      "This process's id, 0..num_processes-1 (with --coordinator_address); process 0 writes the logs and files.",
    ),
  }


def initialize_from_flags(defined: dict) -> None:
  """Starts JAX's distributed runtime if the flags of `define_flags` or the environment ask for it."""
  started = initialize(
    defined["distributed"].value,
    defined["coordinator_address"].value,
    defined["num_processes"].value,
    defined["process_id"].value,
  )
  if started.kwargs is not None:
    logging.info(
      "JAX distributed runtime started (%s): process %d of %d, %d local / %d global devices.",
      started.reason,
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
    )
