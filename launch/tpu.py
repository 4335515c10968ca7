#!/usr/bin/env python3
"""Cloud TPU VM launcher for icl_jax: create a TPU VM (one host or a pod slice), put the repository on every
worker, run training or a sweep on all workers at once, copy the results back, delete the VM.

    python launch/tpu.py all --name=icl --zone=us-central2-b --type=v4-8 --workdir=runs/paper
    python launch/tpu.py all --dry-run ...      # print every command, run nothing

Subcommands: create, setup, run, status, stop, fetch, delete, all (create -> setup -> run --wait -> fetch ->
delete, the VM deleted even when a step fails, unless --keep). With --queued, create and delete go through a
queued resource (`gcloud compute tpus queued-resources`, Google's recommended way to get pod slices and Spot
capacity): create queues the request and waits until it is ACTIVE. See launch/README.md.

Only the standard library; every command is an argument list (no shell on this side), and every user value
that reaches a remote shell is quoted with shlex. `--dry-run` prints the commands, one per line, shell-quoted
so that each can be pasted into a shell.
"""

import argparse
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO_ROOT / "requirements.txt"

# Runtime (software) version per accelerator family: https://cloud.google.com/tpu/docs/runtimes
DEFAULT_RUNTIMES = {
  "v2": "tpu-ubuntu2204-base",
  "v3": "tpu-ubuntu2204-base",
  "v4": "tpu-ubuntu2204-base",
  "v5litepod": "v2-alpha-tpuv5-lite",
  "v5p": "v2-alpha-tpuv5",
  "v6e": "v2-alpha-tpuv6e",
}

# flag dest -> (flag, environment variable, description). Flags override the environment.
PARAMETERS = {
  "name": ("--name", "TPU_NAME", "the TPU VM's name, e.g. icl-paper"),
  "zone": ("--zone", "TPU_ZONE", "the zone, e.g. us-central2-b (v4) or us-west4-a (v5e)"),
  "type": ("--type", "TPU_TYPE", "the accelerator type, e.g. v4-8 or v5litepod-16"),
  "runtime": ("--runtime", "TPU_RUNTIME", "the TPU software version, e.g. tpu-ubuntu2204-base"),
  "project": ("--project", "GCP_PROJECT", "the Google Cloud project (default: gcloud's configured project)"),
}
REQUIRED = {
  "create": ("name", "zone", "type", "runtime"),
  "all": ("name", "zone", "type", "runtime"),
}  # Every other subcommand: name and zone.

MAIN_CONFIG = "configs/linreg.py"
SWEEP_CONFIG = "configs/sweep_depth_kappa.py"
REMOTE_TARBALL = "icl_jax-src.tar.gz"  # In the remote home directory, removed once unpacked.
STATE = ".launch"  # Under the remote repository: job.pid, job.exit, job.log.
STATUS_MARK = "ICL_JAX_JOB"


class UsageError(Exception):
  """Bad or missing parameters: reported before any command runs."""


class StepError(Exception):
  """A command failed."""


# ---------------------------------------------------------------------------------------------------------------
# Parameters


def jax_lower_bound(requirements: pathlib.Path = REQUIREMENTS) -> str:
  """The X of the `jax>=X` line of requirements.txt (so jax[tpu] is installed at the same lower bound)."""
  for line in requirements.read_text().splitlines():
    match = re.match(r"\s*jax\s*>=\s*([0-9][^\s,;#]*)", line.split("#", 1)[0])
    if match:
      return match.group(1)
  raise UsageError(f"{requirements} has no 'jax>=VERSION' line to take jax[tpu]'s lower bound from.")


def num_hosts(accelerator_type: str) -> int | None:
  """Hosts (VMs, JAX processes) of a slice, or None for an unknown family."""
  family, _, size = accelerator_type.rpartition("-")
  if not size.isdigit():
    return None
  size = int(size)
  if family in ("v2", "v3", "v4", "v5p"):  # Size counts TensorCores: 8 per host.
    return max(1, size // 8)
  if family in ("v5litepod", "v6e"):  # Size counts chips: up to 8 on one host, 4 per host beyond.
    return 1 if size <= 8 else size // 4
  return None


def resolve(args: argparse.Namespace, environ) -> None:
  """Fills the parameters from the environment where no flag gave them; checks them all before anything runs."""
  for dest, (_, variable, _) in PARAMETERS.items():
    if getattr(args, dest, None) in (None, ""):
      setattr(args, dest, environ.get(variable) or None)
  if args.runtime is None and args.type:
    args.runtime = DEFAULT_RUNTIMES.get(args.type.rpartition("-")[0])
  missing = [dest for dest in REQUIRED.get(args.command, ("name", "zone")) if not getattr(args, dest)]
  if missing:
    lines = []
    for dest in missing:
      flag, variable, description = PARAMETERS[dest]
      extra = ""
      if dest == "runtime" and args.type:
        extra = f"; no default for --type={args.type} (known: {', '.join(sorted(DEFAULT_RUNTIMES))})"
      lines.append(f"  {flag}=... or the environment variable {variable}: {description}{extra}")
    raise UsageError("missing required parameter" + ("s" if len(lines) > 1 else "") + ":\n" + "\n".join(lines))
  problems = []
  if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", args.name):
    problems.append(f"--name/TPU_NAME={args.name!r}: lower-case letters, digits and '-', starting with a letter")
  if not re.fullmatch(r"[a-z]+-[a-z]+[0-9]+-[a-z]", args.zone):
    problems.append(f"--zone/TPU_ZONE={args.zone!r} is not a zone like us-central2-b")
  if args.type and not re.fullmatch(r"[a-z0-9]+-[0-9]+", args.type):
    problems.append(f"--type/TPU_TYPE={args.type!r} is not an accelerator type like v4-8 or v5litepod-16")
  if args.project and not re.fullmatch(r"[a-z][-a-z0-9:.]{4,}[a-z0-9]", args.project):
    problems.append(f"--project/GCP_PROJECT={args.project!r} is not a project id")
  remote_dir = args.remote_dir.removeprefix("~/")
  if not remote_dir or not _is_plain_path(remote_dir):
    problems.append(f"--remote-dir={args.remote_dir!r}: letters, digits and ._-/ only")
  args.remote_dir = remote_dir
  for dest in ("workdir", "root"):
    value = getattr(args, dest, None)
    if value is not None and not (_is_plain_path(value.removeprefix("gs://")) and value.strip("/")):
      problems.append(
        f"--{dest}={value!r}: a path of letters, digits and ._-/ (or gs://BUCKET/PATH); it is "
        "used in remote copy commands"
      )
  if getattr(args, "python", None) and not re.fullmatch(r"python3\.[0-9]+", args.python):
    problems.append(f"--python={args.python!r} must be a command like python3.11 (an apt package of that name)")
  bad = [a for a in getattr(args, "overrides", []) if not re.match(r"--config\.[A-Za-z0-9_.]+=", a)]
  if bad:
    problems.append(f"unexpected arguments {bad}: only --config.FIELD=VALUE overrides are passed to the job")
  if getattr(args, "queued", False) and getattr(args, "preemptible", False):
    problems.append("--preemptible with --queued: a queued resource takes --spot for preemptible capacity")
  if problems:
    raise UsageError("\n".join(problems))
  if getattr(args, "overrides", []) and args.command not in ("run", "all"):
    raise UsageError(f"--config.FIELD=VALUE overrides are for run and all, not {args.command}")


def _is_plain_path(path: str) -> bool:
  return re.fullmatch(r"[A-Za-z0-9._/-]+", path) is not None and ".." not in path.split("/")


def check_job_directory(args: argparse.Namespace) -> None:
  """A job on a multi-host slice needs a workdir (or sweep root) that every host reaches: refuses a local one."""
  hosts = num_hosts(args.type) if args.type else None
  if hosts and hosts > 1 and args.command in ("run", "all") and not _job_dir(args).startswith("gs://"):
    flag = "--root" if args.sweep else "--workdir"
    raise UsageError(
      f"{flag}={_job_dir(args)} is local, but {args.type} has {hosts} hosts, each with its own disk: "
      f"their checkpoints and logs would not meet. Give {flag}=gs://BUCKET/PATH, a directory every "
      "host reaches (see launch/README.md)."
    )


def warnings(args: argparse.Namespace) -> list[str]:
  hosts = num_hosts(args.type) if args.type else None
  if not (hosts and hosts > 1 and hasattr(args, "sweep")):
    return []
  out = []
  if args.command in ("run", "all") and distributed_mode(args) in ("none", "off"):
    out.append(
      f"warning: {args.type} has {hosts} hosts but the job gets no --distributed=auto, so they do not "
      "join one JAX runtime."
    )
  return out


# ---------------------------------------------------------------------------------------------------------------
# Commands


def _gcloud(args: argparse.Namespace, *words: str) -> list[str]:
  """`gcloud compute tpus tpu-vm WORDS --zone=Z [--project=P]`."""
  command = ["gcloud", "compute", "tpus", "tpu-vm", *words, f"--zone={args.zone}"]
  if args.project:
    command.append(f"--project={args.project}")
  return command


def _ssh(args: argparse.Namespace, worker: str, script: str) -> list[str]:
  return _gcloud(args, "ssh", args.name, f"--worker={worker}") + ["--command", script]


def _script(*statements: str) -> str:
  """One shell line: statements joined by '; ' (a statement ending in '&' is its own separator)."""
  out = ""
  for statement in statements:
    if out:
      out += " " if out.endswith("&") else "; "
    out += statement
  return out


def _queued(args: argparse.Namespace, *words: str) -> list[str]:
  """`gcloud compute tpus queued-resources WORDS --zone=Z [--project=P]`."""
  command = ["gcloud", "compute", "tpus", "queued-resources", *words, f"--zone={args.zone}"]
  if args.project:
    command.append(f"--project={args.project}")
  return command


def create_command(args: argparse.Namespace) -> list[str]:
  if args.queued:  # The queued resource and its TPU VM (node) share the name, so ssh and scp find the node.
    command = _queued(args, "create", args.name) + [
      f"--node-id={args.name}",
      f"--accelerator-type={args.type}",
      f"--runtime-version={args.runtime}",
    ]
  else:
    command = _gcloud(args, "create", args.name) + [f"--accelerator-type={args.type}", f"--version={args.runtime}"]
  if args.spot:
    command.append("--spot")
  if args.preemptible:
    command.append("--preemptible")
  return command + list(args.create_arg)


def queued_state_command(args: argparse.Namespace) -> list[str]:
  return _queued(args, "describe", args.name) + ["--format=value(state.state)"]


def delete_command(args: argparse.Namespace) -> list[str]:
  if args.queued:  # --force also deletes the TPU VM the queued resource holds.
    return _queued(args, "delete", args.name) + ["--force", "--quiet"]
  return _gcloud(args, "delete", args.name) + ["--quiet"]


def setup_commands(args: argparse.Namespace) -> list[list[str]]:
  """Copies the repository to every worker (git archive of HEAD, or git clone of --repo-url) and installs it."""
  directory = shlex.quote(args.remote_dir)
  python = args.python
  install = [
    f"cd {directory}",
    f'if ! {python} -c "import ensurepip" >/dev/null 2>&1; then sudo apt-get update -qq && '
    f"sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {python} {python}-venv; fi",
    f"{python} -m venv .venv",
    ".venv/bin/python -m pip install -q --upgrade pip",
    shlex.join(
      [
        ".venv/bin/python",
        "-m",
        "pip",
        "install",
        "-q",
        "-r",
        "requirements.txt",
        f"jax[tpu]>={jax_lower_bound()}",
        *pip_extra(args),
      ]
    ),
    ".venv/bin/python -c \"import jax; print('jax', jax.__version__)\"",
  ]
  if args.repo_url:
    fetch = [
      f"if [ ! -d {directory}/.git ]; then git clone -q {shlex.quote(args.repo_url)} {directory}; fi",
      f"git -C {directory} fetch -q origin {shlex.quote(args.ref)}",
      f"git -C {directory} checkout -q --detach FETCH_HEAD",
    ]
    return [_ssh(args, "all", _script("set -e", *fetch, *install))]
  unpack = [f"mkdir -p {directory}", f"tar -xzf {REMOTE_TARBALL} -C {directory}", f"rm -f {REMOTE_TARBALL}"]
  return [
    ["git", "-C", str(REPO_ROOT), "archive", "--format=tar.gz", f"--output={args.tarball}", "HEAD"],
    _gcloud(args, "scp", args.tarball, f"{args.name}:{REMOTE_TARBALL}", "--worker=all"),
    _ssh(args, "all", _script("set -e", *unpack, *install)),
  ]


def pip_extra(args: argparse.Namespace) -> list[str]:
  """--pip-extra packages; with `all` and a gs:// workdir, requirements-gcs.txt too (gcsfs, etils.epath's gs://
  backend, and google-cloud-storage, for the workdir lock)."""
  extra = list(args.pip_extra)
  if hasattr(args, "sweep") and _job_dir(args).startswith("gs://"):
    extra += ["-r", "requirements-gcs.txt"]
  return extra


def _job_dir(args: argparse.Namespace) -> str:
  return args.root if args.sweep else args.workdir


def distributed_mode(args: argparse.Namespace) -> str:
  """--distributed, by default auto (for icl_jax.main and icl_jax.sweep alike)."""
  return args.distributed or "auto"


def job_argv(args: argparse.Namespace) -> list[str]:
  """The Python command every worker runs, from the remote repository directory."""
  if args.sweep:
    argv = [".venv/bin/python", "-m", "icl_jax.sweep", f"--config={args.config or SWEEP_CONFIG}", f"--root={args.root}"]
  else:
    argv = [
      ".venv/bin/python",
      "-m",
      "icl_jax.main",
      f"--config={args.config or MAIN_CONFIG}",
      f"--workdir={args.workdir}",
    ]
  mode = distributed_mode(args)
  if mode != "none":
    argv.append(f"--distributed={mode}")
  return argv + list(args.overrides)


def launch_command(args: argparse.Namespace) -> list[str]:
  """Starts the job in the background on every worker (nohup, output appended to .launch/job.log) and returns.

  The job's pid goes to .launch/job.pid and its exit status to .launch/job.exit when it ends; a second launch
  while a job runs is refused. With --command, that command runs in the foreground instead.
  """
  directory = shlex.quote(args.remote_dir)
  if args.command_line is not None:
    return _ssh(args, args.worker, _script(f"cd {directory}", args.command_line))
  job = shlex.join(job_argv(args))
  inner = _script(
    f"{job} >> {STATE}/job.log 2>&1 &", f"echo $! > {STATE}/job.pid", "wait $!", f"echo $? > {STATE}/job.exit"
  )
  script = _script(
    "set -e",
    f"cd {directory}",
    f"mkdir -p {STATE}",
    f'if [ -f {STATE}/job.pid ] && [ ! -f {STATE}/job.exit ] && kill -0 "$(cat {STATE}/job.pid)" 2>/dev/null; '
    f'then echo "$(hostname): a job is already running (pid $(cat {STATE}/job.pid)); stop it first '
    f'(launch/tpu.py stop)" >&2; exit 1; fi',
    f"rm -f {STATE}/job.pid {STATE}/job.exit",
    f'echo "=== $(date -u +%FT%TZ) $(hostname): "{shlex.quote(job)} >> {STATE}/job.log',
    f"nohup sh -c {shlex.quote(inner)} > /dev/null 2>&1 < /dev/null &",
    f"i=0; while [ ! -s {STATE}/job.pid ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done",
    f'echo "$(hostname): started pid $(cat {STATE}/job.pid), log {args.remote_dir}/{STATE}/job.log"',
  )
  return _ssh(args, "all", script)


def status_command(args: argparse.Namespace, lines: int = 5) -> list[str]:
  """Prints the end of worker 0's job log, then `ICL_JAX_JOB running|done CODE|lost|none`."""
  directory = shlex.quote(args.remote_dir)
  pid = f"{STATE}/job.pid"
  script = _script(
    f'cd {directory} 2>/dev/null || {{ echo "{STATUS_MARK} none"; exit 0; }}',
    f"tail -n {lines} {STATE}/job.log 2>/dev/null || true",
    f'if [ -f {STATE}/job.exit ]; then echo "{STATUS_MARK} done $(cat {STATE}/job.exit)"; '
    f'elif [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then echo "{STATUS_MARK} running"; '
    f'elif [ -f {pid} ]; then echo "{STATUS_MARK} lost"; else echo "{STATUS_MARK} none"; fi',
  )
  return _ssh(args, "0", script)


def stop_command(args: argparse.Namespace) -> list[str]:
  """SIGTERM to the job on every worker: the trainer saves a checkpoint and exits."""
  directory = shlex.quote(args.remote_dir)
  pid = f"{STATE}/job.pid"
  return _ssh(
    args,
    "all",
    _script(
      f"cd {directory}",
      f'if [ -f {pid} ] && [ ! -f {STATE}/job.exit ] && kill -TERM "$(cat {pid})" 2>/dev/null; then '
      f'echo "$(hostname): sent SIGTERM to pid $(cat {pid})"; else echo "$(hostname): no running job"; fi',
    ),
  )


def fetch_plan(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
  """(kind, command) pairs: 'mkdir' (made locally) or 'run'. Worker 0's log, then the job directory."""
  job_dir = _job_dir(args)
  base = job_dir.rstrip("/").rpartition("/")[2]
  if args.dest is not None:
    dest = args.dest
  elif job_dir.startswith(("gs://", "/")):
    dest = "."
  else:
    dest = os.path.dirname(job_dir.rstrip("/")) or "."
  local = os.path.join(dest, base)
  plan = [
    ("mkdir", ["mkdir", "-p", local]),
    (
      "run",
      _gcloud(
        args, "scp", f"{args.name}:{args.remote_dir}/{STATE}/job.log", os.path.join(local, "launch.log"), "--worker=0"
      ),
    ),
  ]
  if job_dir.startswith("gs://"):
    storage = ["gcloud", "storage", "cp", "--recursive", job_dir.rstrip("/"), dest]
    plan.append(("run", storage + ([f"--project={args.project}"] if args.project else [])))
  else:
    remote = job_dir if job_dir.startswith("/") else f"{args.remote_dir}/{job_dir}"
    plan.append(("run", _gcloud(args, "scp", "--recurse", f"{args.name}:{remote.rstrip('/')}", dest, "--worker=0")))
  return plan


# ---------------------------------------------------------------------------------------------------------------
# Running


class Runner:
  """Prints (dry run) or runs argument lists; every command is echoed shell-quoted."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def note(self, text: str) -> None:
    """A comment: on stdout as '# ...' in a dry run (still pasteable), on stderr otherwise."""
    if self.dry_run:
      print(f"# {text}", flush=True)
    else:
      print(f"[tpu.py] {text}", file=sys.stderr, flush=True)

  def run(self, argv: list[str], *, step: str, capture: bool = False) -> subprocess.CompletedProcess | None:
    line = shlex.join(argv)
    if self.dry_run:
      print(line, flush=True)
      return None
    print(f"+ {line}", file=sys.stderr, flush=True)
    try:
      result = subprocess.run(argv, text=True, capture_output=capture)
    except FileNotFoundError as e:
      raise StepError(f"{step}: {argv[0]} not found ({e}); install the Google Cloud SDK") from e
    if result.returncode != 0 and not capture:
      raise StepError(f"{step} failed (exit status {result.returncode})")
    return result

  def mkdir(self, argv: list[str]) -> None:
    if self.dry_run:
      print(shlex.join(argv), flush=True)
    else:
      print(f"+ {shlex.join(argv)}", file=sys.stderr, flush=True)
      os.makedirs(argv[-1], exist_ok=True)


QUEUED_WAITING = ("ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "CREATING")


def do_create(runner: Runner, args) -> None:
  runner.run(create_command(args), step="create")
  if args.queued:
    wait_for_queued_resource(runner, args)


def wait_for_queued_resource(runner: Runner, args) -> None:
  """Polls the queued resource every --queue-poll seconds until it is ACTIVE; any state other than a waiting
  one (FAILED, SUSPENDED, ...) or --queue-timeout hours without ACTIVE is an error."""
  if runner.dry_run:
    runner.note(f"then, every {args.queue_poll:g} s until it prints ACTIVE (at most {args.queue_timeout:g} h):")
    runner.run(queued_state_command(args), step="queue")
    return
  deadline = time.monotonic() + 3600 * args.queue_timeout
  while True:
    result = runner.run(queued_state_command(args), step="queue", capture=True)
    state = result.stdout.strip() if result.returncode == 0 else ""
    if state == "ACTIVE":
      runner.note(f"the queued resource {args.name} is ACTIVE.")
      return
    if state and state not in QUEUED_WAITING:
      raise StepError(f"the queued resource {args.name} is {state}, not ACTIVE")
    if time.monotonic() > deadline:
      raise StepError(f"the queued resource {args.name} is still {state or 'unknown'} after {args.queue_timeout:g} h")
    runner.note(f"the queued resource {args.name} is {state or 'not visible yet'}; waiting.")
    time.sleep(args.queue_poll)


def do_setup(runner: Runner, args) -> None:
  if not runner.dry_run and not args.repo_url:
    dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain"], capture_output=True, text=True)
    if dirty.stdout.strip():
      runner.note("warning: uncommitted changes and untracked files are not copied (git archive of HEAD).")
  for command in setup_commands(args):
    runner.run(command, step="setup")


def do_status(runner: Runner, args) -> tuple[str, int | None]:
  result = runner.run(status_command(args), step="status", capture=True)
  if result is None:
    return "dry-run", None
  lines = result.stdout.splitlines()
  marks = [line.split() for line in lines if line.startswith(STATUS_MARK)]
  for line in lines:
    if not line.startswith(STATUS_MARK):
      print(f"  {line}", file=sys.stderr)
  if result.returncode != 0 or not marks:
    if result.stderr:
      print(result.stderr.rstrip(), file=sys.stderr)
    return "unreachable", None
  state = marks[-1][1]
  code = int(marks[-1][2]) if state == "done" and len(marks[-1]) > 2 and marks[-1][2].lstrip("-").isdigit() else None
  return state, code


def wait_for_job(runner: Runner, args) -> None:
  """Polls worker 0 every --poll seconds until the job ends; raises StepError unless it exits with status 0."""
  if runner.dry_run:
    runner.note(f"then, every {args.poll:g} s until it prints '{STATUS_MARK} done STATUS':")
    runner.run(status_command(args), step="wait")
    return
  unreachable = lost = 0
  while True:
    state, code = do_status(runner, args)
    if state == "done":
      if code != 0:
        raise StepError(f"the job exited with status {code} (see {args.remote_dir}/{STATE}/job.log on worker 0)")
      runner.note("the job finished.")
      return
    if state == "none":
      raise StepError("no job found on worker 0")
    unreachable = unreachable + 1 if state == "unreachable" else 0
    lost = lost + 1 if state == "lost" else 0
    if unreachable >= args.max_unreachable:
      raise StepError(f"worker 0 did not answer {unreachable} times in a row (preempted?)")
    if lost >= 3:
      raise StepError("the job's process is gone without an exit status (killed, or the VM restarted)")
    time.sleep(args.poll if state == "running" or unreachable else min(args.poll, 5))


def do_run(runner: Runner, args, wait: bool) -> None:
  runner.run(launch_command(args), step="run")
  if args.command_line is None:
    if wait:
      wait_for_job(runner, args)
    else:
      runner.note(f"started; follow it with: python launch/tpu.py status --name={args.name} --zone={args.zone}")


def do_fetch(runner: Runner, args) -> None:
  """Every copy is tried; a failure is reported at the end (the log comes back even without results)."""
  errors = []
  for kind, command in fetch_plan(args):
    if kind == "mkdir":
      runner.mkdir(command)
      continue
    try:
      runner.run(command, step="fetch")
    except StepError as e:
      errors.append(str(e))
  if errors:
    raise StepError("; ".join(errors))


def do_all(runner: Runner, args) -> int:
  """create -> setup -> run (wait) -> fetch -> delete; the VM is deleted even when a step fails, unless --keep."""
  failures = []
  try:
    do_create(runner, args)
  except (StepError, KeyboardInterrupt) as e:
    runner.note(
      f"error: {e or 'interrupted'}. If a TPU VM was left behind, delete it with: {shlex.join(delete_command(args))}"
    )
    return 1
  try:
    launched = False
    try:
      do_setup(runner, args)
      launched = True
      do_run(runner, args, wait=True)
    except StepError as e:
      failures.append(str(e))
      runner.note(f"error: {e}")
    finally:
      if launched:  # Also after a failed or interrupted run: the log and any checkpoints come back.
        try:
          do_fetch(runner, args)
        except StepError as e:
          failures.append(str(e))
          runner.note(f"error: {e}")
  finally:
    if args.keep:
      runner.note(
        f"--keep: the TPU VM {args.name} is still running (and billed); delete it with: "
        f"{shlex.join(delete_command(args))}"
      )
    else:
      try:
        runner.run(delete_command(args), step="delete")
      except StepError as e:
        failures.append(str(e))
        runner.note(f"error: {e}. DELETE THE VM BY HAND, it is billed until then: {shlex.join(delete_command(args))}")
  return 1 if failures else 0


# ---------------------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  group = common.add_argument_group("TPU VM (flags override the environment variables)")
  for dest, (flag, variable, description) in PARAMETERS.items():
    group.add_argument(flag, dest=dest, metavar=variable, help=f"{description} [env {variable}]")
  common.add_argument(
    "--remote-dir", default="icl_jax", help="the repository's directory on the workers, relative to the home directory"
  )
  common.add_argument("--dry-run", action="store_true", help="print every command, one per line, run nothing")
  common.add_argument(
    "--queued",
    action="store_true",
    help="create (and delete) the TPU VM through a queued resource, `gcloud compute tpus "
    "queued-resources`: the request waits in Google's queue until capacity is free",
  )

  create = argparse.ArgumentParser(add_help=False)
  kind = create.add_mutually_exclusive_group()
  kind.add_argument("--spot", action="store_true", help="a Spot TPU VM: much cheaper, may be preempted any time")
  kind.add_argument("--preemptible", action="store_true", help="a preemptible TPU VM (the older, time-limited kind)")
  create.add_argument(
    "--queue-poll",
    type=float,
    default=60.0,
    help="with --queued: seconds between checks of the queued resource's state",
  )
  create.add_argument(
    "--queue-timeout",
    type=float,
    default=24.0,
    help="with --queued: hours to wait for the queued resource to become ACTIVE",
  )
  create.add_argument(
    "--create-arg",
    action="append",
    default=[],
    metavar="ARG",
    help="an extra flag for `gcloud compute tpus tpu-vm create`, e.g. --create-arg=--reserved (repeatable)",
  )

  setup = argparse.ArgumentParser(add_help=False)
  setup.add_argument("--repo-url", help="git clone this URL on the workers instead of copying `git archive HEAD`")
  setup.add_argument("--ref", default="HEAD", help="with --repo-url: the branch, tag or commit to check out")
  setup.add_argument(
    "--python",
    default="python3.11",
    help="the Python (>= 3.11) for the workers' virtual environment; installed with apt if missing "
    "(Ubuntu 22.04 images have 3.10)",
  )
  setup.add_argument(
    "--pip-extra",
    action="append",
    default=[],
    metavar="PACKAGE",
    help="another package to install on the workers (repeatable), e.g. gcsfs for gs:// paths; "
    "`all` adds gcsfs itself when the workdir or root is gs://...",
  )
  setup.add_argument(
    "--tarball",
    default=os.path.join(tempfile.gettempdir(), "icl_jax-src.tar.gz"),
    help="where the local `git archive` goes",
  )

  job = argparse.ArgumentParser(add_help=False)
  job.add_argument("--sweep", action="store_true", help="run (or fetch) the sweep, python -m icl_jax.sweep")
  job.add_argument(
    "--workdir",
    default="runs/paper",
    help="icl_jax.main's --workdir: relative to --remote-dir, absolute, or gs://BUCKET/PATH",
  )
  job.add_argument("--root", default="runs/sweep", help="with --sweep: icl_jax.sweep's --root (same forms)")

  run = argparse.ArgumentParser(add_help=False)
  run.add_argument("--config", help=f"the config file (default {MAIN_CONFIG}, with --sweep {SWEEP_CONFIG})")
  run.add_argument(
    "--distributed",
    choices=["auto", "detect", "off", "none"],
    help="passed to the job as --distributed=...: auto starts JAX's multi-host runtime "
    "(jax.distributed.initialize()) on every worker; none passes no such flag. Default: auto",
  )
  run.add_argument("--poll", type=float, default=300.0, help="with --wait: seconds between status checks")
  run.add_argument(
    "--max-unreachable", type=int, default=6, help="with --wait: give up after this many failed status checks in a row"
  )

  fetch = argparse.ArgumentParser(add_help=False)
  fetch.add_argument(
    "--dest",
    help="local directory that receives the workdir (default: the workdir's parent, e.g. runs/ for runs/paper)",
  )

  parser = argparse.ArgumentParser(
    prog="launch/tpu.py",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    allow_abbrev=False,
  )
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  add = lambda name, parents, text: sub.add_parser(
    name, parents=[common, *parents], help=text, description=text, allow_abbrev=False
  )
  add("create", [create], "create the TPU VM or pod slice")
  add("setup", [setup], "copy the repository to every worker and install it (with jax[tpu])")
  p = add("run", [job, run], "start the job on every worker (extra --config.FIELD=VALUE are passed through)")
  p.add_argument("--wait", action="store_true", help="wait until the job ends; fail if it fails")
  p.add_argument(
    "--command",
    dest="command_line",
    metavar="CMD",
    help="run CMD in the repository directory instead of the job (in the foreground)",
  )
  p.add_argument("--worker", default="all", help="with --command: the workers (all, 0, 1-3, ...)")
  add("status", [], "show the end of worker 0's job log and whether the job runs")
  add("stop", [], "send SIGTERM to the job on every worker (it saves a checkpoint and exits)")
  add("fetch", [job, fetch], "copy worker 0's job log and the workdir (or sweep root) back")
  add("delete", [], "delete the TPU VM")
  p = add("all", [create, setup, job, run, fetch], "create, setup, run --wait, fetch, delete (even after a failure)")
  p.add_argument("--keep", action="store_true", help="do not delete the VM at the end")
  return parser


def main(argv: list[str] | None = None, environ=None) -> int:
  parser = _parser()
  args, extra = parser.parse_known_args(argv)
  args.overrides = extra
  args.command_line = getattr(args, "command_line", None)
  try:
    resolve(args, os.environ if environ is None else environ)
    if hasattr(args, "sweep"):
      check_job_directory(args)
    for line in warnings(args):
      print(line, file=sys.stderr)
    runner = Runner(args.dry_run)
    if args.command == "all":
      return do_all(runner, args)
    if args.command == "create":
      do_create(runner, args)
    elif args.command == "setup":
      do_setup(runner, args)
    elif args.command == "run":
      do_run(runner, args, wait=args.wait)
    elif args.command == "status":
      state, code = do_status(runner, args)
      if state != "dry-run":
        print(f"{state}" + (f" (exit status {code})" if code is not None else ""))
        return 0 if state in ("running", "done") and code in (None, 0) else 1
    elif args.command == "stop":
      runner.run(stop_command(args), step="stop")
    elif args.command == "fetch":
      do_fetch(runner, args)
    elif args.command == "delete":
      runner.run(delete_command(args), step="delete")
    return 0
  except UsageError as e:
    print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
    return 2
  except StepError as e:
    print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"{parser.prog} {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
