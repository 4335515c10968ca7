"""launch/tpu.py, the Cloud TPU VM launcher, without a cloud.

Dry runs are checked command by command. The real mode runs against a fake `gcloud` (first on PATH) that logs
its arguments, runs `ssh --command` scripts with bash in a fake home directory and copies files for `scp`, so
the remote shell scripts (unpack, install, nohup launch, status, stop) really execute here.
"""

import importlib.util
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TPU = REPO / "launch" / "tpu.py"
ENV_NAMES = ("TPU_NAME", "TPU_ZONE", "TPU_TYPE", "TPU_RUNTIME", "GCP_PROJECT")
BASE = ["--name=icl-test", "--zone=us-central2-b"]
NASTY = """--config.task.note=it's a "b c"; $(touch pwned) `touch pwned2` \\ end"""


def _module():
  spec = importlib.util.spec_from_file_location("launch_tpu", TPU)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


FAKE_GCLOUD = """\
#!{python}
import json, os, shutil, subprocess, sys
argv = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps(argv) + "\\n")
fail = os.environ.get("FAKE_FAIL")
if fail and fail in " ".join(argv):
  sys.exit(7)
home = os.environ.get("FAKE_HOME")
if home is None:
  sys.exit("fake gcloud: a dry run must not run anything")
if argv[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
  sys.exit(subprocess.run(["bash", "-c", argv[argv.index("--command") + 1]], cwd=home).returncode)
if argv[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
  src, dst = [a for a in argv[4:] if not a.startswith("--")]
  src, dst = [os.path.join(home, p.split(":", 1)[1]) if ":" in p else p for p in (src, dst)]
  if os.path.isdir(src):
    shutil.copytree(src, os.path.join(dst, os.path.basename(src)), dirs_exist_ok=True)
  else:
    shutil.copy(src, dst)
"""

# `python3.11` on the workers: answers the ensurepip probe and makes a venv whose python is FAKE_PYTHON.
FAKE_SYSTEM_PYTHON = """\
#!/bin/sh
if [ "$1" = "-c" ]; then exit 0; fi
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin" && cp "$FAKE_VENV_PYTHON" "$3/bin/python" && chmod +x "$3/bin/python" && exit 0
fi
exit 1
"""

# The venv's python: logs its arguments; as the job, writes a result into --workdir/--root, prints a log line,
# and exits with FAKE_JOB_EXIT, or with FAKE_JOB_SLEEP waits for SIGTERM (then "saves" and exits 0).
FAKE_VENV_PYTHON = """\
#!{python}
import json, os, signal, sys, time
args = sys.argv[1:]
with open(os.path.join(os.environ["FAKE_HOME"], "python_calls.jsonl"), "a") as f:
  f.write(json.dumps({{"cwd": os.getcwd(), "args": args}}) + "\\n")
if args[:2] != ["-m", "icl_jax.main"] and args[:2] != ["-m", "icl_jax.sweep"]:
  sys.exit(0)
out = [a.split("=", 1)[1] for a in args if a.startswith(("--workdir=", "--root="))][0]
os.makedirs(out, exist_ok=True)
print("step 1 loss 0.5", flush=True)
def stop(*_):
  open(os.path.join(out, "saved_on_sigterm"), "w").close()
  sys.exit(0)
signal.signal(signal.SIGTERM, stop)
time.sleep(float(os.environ.get("FAKE_JOB_SLEEP", "0")))
open(os.path.join(out, "result.json"), "w").write("{{}}")
sys.exit(int(os.environ.get("FAKE_JOB_EXIT", "0")))
"""


@pytest.fixture
def fake(tmp_path):
  """A fake gcloud and worker; returns (env, paths)."""
  bin_dir, home = tmp_path / "bin", tmp_path / "home"
  bin_dir.mkdir()
  home.mkdir()
  for name, text in (("gcloud", FAKE_GCLOUD), ("python3.11", FAKE_SYSTEM_PYTHON), ("venv_python", FAKE_VENV_PYTHON)):
    path = bin_dir / name
    path.write_text(text.format(python=sys.executable) if "{python}" in text else text)
    path.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
  env.update(
    PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
    FAKE_LOG=str(tmp_path / "gcloud.jsonl"),
    FAKE_HOME=str(home),
    FAKE_VENV_PYTHON=str(bin_dir / "venv_python"),
  )
  return env, {"tmp": tmp_path, "home": home, "log": tmp_path / "gcloud.jsonl"}


def _launch(args, env, cwd=None):
  return subprocess.run([sys.executable, str(TPU), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def _dry_env(fake):
  env, paths = fake
  env = dict(env)
  del env["FAKE_HOME"]  # The fake gcloud refuses to do anything: a dry run must not call it.
  return env, paths


def _commands(stdout):
  """The printed commands as argument lists (comment lines skipped); each must parse as shell words."""
  return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def _remote_script(argv):
  return argv[argv.index("--command") + 1]


def _job_argv(argv):
  """The job's argument list inside the launch script: ssh --command -> `nohup sh -c INNER` -> INNER's words."""
  words = shlex.split(_remote_script(argv))
  inner = words[words.index("sh") + 2]
  inner_words = shlex.split(inner)
  return inner_words[: inner_words.index(">>")]


def _gcloud_calls(paths):
  log = paths["log"]
  return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _find(commands, predicate, start=0):
  for i in range(start, len(commands)):
    if predicate(commands[i]):
      return i
  raise AssertionError(f"no matching command after index {start} in:\n" + "\n".join(map(shlex.join, commands)))


def _is(argv, *words):
  return argv[: len(words)] == list(words)


def test_all_dry_run_prints_the_whole_sequence_in_order(fake):
  env, paths = _dry_env(fake)
  bound = _module().jax_lower_bound()
  result = _launch(
    [
      "all",
      "--dry-run",
      *BASE,
      "--type=v4-8",
      "--project=my-project",
      "--workdir=runs/paper",
      "--config.train.num_steps=3",
      "--config.model.num_layers=4",
    ],
    env,
  )
  assert result.returncode == 0, result.stderr
  commands = _commands(result.stdout)
  gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]

  i = _find(commands, lambda c: _is(c, *gcloud, "create", "icl-test"))
  assert {
    "--zone=us-central2-b",
    "--accelerator-type=v4-8",
    "--version=tpu-ubuntu2204-base",
    "--project=my-project",
  } <= set(commands[i])
  i = _find(commands, lambda c: _is(c, "git", "-C", str(REPO), "archive") and c[-1] == "HEAD", i + 1)
  tarball = [a.split("=", 1)[1] for a in commands[i] if a.startswith("--output=")][0]
  i = _find(commands, lambda c: _is(c, *gcloud, "scp", tarball) and "--worker=all" in c, i + 1)
  i = _find(commands, lambda c: _is(c, *gcloud, "ssh", "icl-test") and "--worker=all" in c, i + 1)
  setup = _remote_script(commands[i])
  assert (
    shlex.join([".venv/bin/python", "-m", "pip", "install", "-q", "-r", "requirements.txt", f"jax[tpu]>={bound}"])
    in setup
  )
  assert bound == re.search(r"^jax>=(\S+)", (REPO / "requirements.txt").read_text(), re.M).group(1)
  i = _find(commands, lambda c: _is(c, *gcloud, "ssh", "icl-test") and "--worker=all" in c, i + 1)
  assert _job_argv(commands[i]) == [
    ".venv/bin/python",
    "-m",
    "icl_jax.main",
    "--config=configs/linreg.py",
    "--workdir=runs/paper",
    "--distributed=auto",
    "--config.train.num_steps=3",
    "--config.model.num_layers=4",
  ]
  assert "nohup" in _remote_script(commands[i])
  i = _find(commands, lambda c: _is(c, *gcloud, "ssh", "icl-test") and "--worker=0" in c, i + 1)  # --wait
  i = _find(
    commands,
    lambda c: _is(c, *gcloud, "scp", "--recurse", "icl-test:icl_jax/runs/paper", "runs") and "--worker=0" in c,
    i + 1,
  )
  i = _find(commands, lambda c: _is(c, *gcloud, "delete", "icl-test") and "--quiet" in c, i + 1)
  assert i == len(commands) - 1
  for command in commands:
    if command[0] == "gcloud" and command[1] == "compute":
      assert "--zone=us-central2-b" in command and "--project=my-project" in command
  assert not paths["log"].exists()  # Nothing ran.


def test_jax_bound_is_read_from_requirements(tmp_path):
  requirements = tmp_path / "requirements.txt"
  requirements.write_text("# jax>=0.1 in a comment\njaxlib>=0.2\nflax>=0.12\njax >= 9.8.7  # comment\n")
  assert _module().jax_lower_bound(requirements) == "9.8.7"


def test_missing_zone_is_an_error_naming_flag_and_variable(fake):
  env, paths = _dry_env(fake)
  result = _launch(["all", "--dry-run", "--name=icl-test", "--type=v4-8"], env)
  assert result.returncode == 2
  assert result.stdout == ""
  assert "--zone" in result.stderr and "TPU_ZONE" in result.stderr
  assert "TPU_NAME" not in result.stderr and "TPU_TYPE" not in result.stderr

  result = _launch(["all", "--dry-run"], env)
  assert result.returncode == 2 and result.stdout == ""
  for text in ("--name", "TPU_NAME", "--zone", "TPU_ZONE", "--type", "TPU_TYPE"):
    assert text in result.stderr

  result = _launch(["create", "--dry-run", *BASE, "--type=v9x-8"], env)  # No default runtime for this family.
  assert result.returncode == 2 and result.stdout == ""
  assert "--runtime" in result.stderr and "TPU_RUNTIME" in result.stderr
  assert not paths["log"].exists()


def test_environment_is_used_and_flags_override_it(fake):
  env, _ = _dry_env(fake)
  env.update(TPU_NAME="env-name", TPU_ZONE="europe-west4-a", TPU_TYPE="v5litepod-16", GCP_PROJECT="env-project")
  result = _launch(["create", "--dry-run"], env)
  assert result.returncode == 0, result.stderr
  [create] = _commands(result.stdout)
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "env-name"]
  assert {
    "--zone=europe-west4-a",
    "--accelerator-type=v5litepod-16",
    "--version=v2-alpha-tpuv5-lite",
    "--project=env-project",
  } <= set(create)

  env["TPU_RUNTIME"] = "env-runtime"
  result = _launch(
    ["create", "--dry-run", "--name=flag-name", "--zone=us-west4-a", "--type=v4-8", "--spot", "--project=flag-project"],
    env,
  )
  assert result.returncode == 0, result.stderr
  [create] = _commands(result.stdout)
  assert create[5] == "flag-name"
  assert {
    "--zone=us-west4-a",
    "--accelerator-type=v4-8",
    "--version=env-runtime",
    "--project=flag-project",
    "--spot",
  } <= set(create)
  assert not any("env-name" in a or "europe" in a or "env-project" in a for a in create)


def test_values_with_spaces_and_quotes_are_quoted(fake):
  env, _ = _dry_env(fake)
  result = _launch(["run", "--dry-run", *BASE, NASTY], env)
  assert result.returncode == 0, result.stderr
  [run] = _commands(result.stdout)
  assert _job_argv(run)[-1] == NASTY

  result = _launch(["setup", "--dry-run", *BASE, "--repo-url=https://example.com/a b'c.git"], env)
  assert result.returncode == 0, result.stderr
  [setup] = _commands(result.stdout)
  words = shlex.split(_remote_script(setup))
  assert "https://example.com/a b'c.git" in words

  for bad in (["--workdir=runs/a b"], ["--name=Bad Name"], ["--remote-dir=../x"], ["--not-an-override=1"]):
    result = _launch(["run", "--dry-run", *BASE, *bad], env)
    assert result.returncode == 2 and result.stdout == "", bad


def test_sweep_command_and_multi_host_warning(fake):
  env, _ = _dry_env(fake)
  result = _launch(
    ["run", "--dry-run", *BASE, "--type=v5litepod-16", "--sweep", "--root=gs://bucket/depth", "--config.seed=1"], env
  )
  assert result.returncode == 0, result.stderr
  [run] = _commands(result.stdout)
  assert "--worker=all" in run
  # The sweep joins the hosts like the main job.
  assert _job_argv(run) == [
    ".venv/bin/python",
    "-m",
    "icl_jax.sweep",
    "--config=configs/sweep_depth_kappa.py",
    "--root=gs://bucket/depth",
    "--distributed=auto",
    "--config.seed=1",
  ]

  result = _launch(
    [
      "run",
      "--dry-run",
      *BASE,
      "--type=v5litepod-16",
      "--sweep",
      "--root=gs://bucket/depth",
      "--distributed=auto",
      "--config=configs/sweep_depth_kappa.py:quick",
    ],
    env,
  )
  assert result.returncode == 0, result.stderr
  assert "warning" not in result.stderr
  [run] = _commands(result.stdout)
  assert _job_argv(run) == [
    ".venv/bin/python",
    "-m",
    "icl_jax.sweep",
    "--config=configs/sweep_depth_kappa.py:quick",
    "--root=gs://bucket/depth",
    "--distributed=auto",
  ]

  result = _launch(["fetch", "--dry-run", *BASE, "--type=v5litepod-16", "--sweep", "--root=gs://bucket/depth"], env)
  assert result.returncode == 0, result.stderr
  assert "warning" not in result.stderr
  commands = _commands(result.stdout)
  assert ["gcloud", "storage", "cp", "--recursive", "gs://bucket/depth", "."] in commands

  result = _launch(["all", "--dry-run", *BASE, "--type=v5litepod-16", "--sweep", "--root=gs://bucket/depth"], env)
  assert result.returncode == 0, result.stderr
  [install] = [c for c in _commands(result.stdout) if "--command" in c and "pip install" in _remote_script(c)]
  # gcsfs (etils.epath's gs:// backend) and google-cloud-storage (the workdir lock), as the gcs extra installs.
  assert f"'jax[tpu]>={_module().jax_lower_bound()}' -r requirements-gcs.txt" in _remote_script(install)

  result = _launch(["run", "--dry-run", *BASE, "--distributed=none", "--config=configs/linreg.py:quick"], env)
  [run] = _commands(result.stdout)
  assert _job_argv(run) == [
    ".venv/bin/python",
    "-m",
    "icl_jax.main",
    "--config=configs/linreg.py:quick",
    "--workdir=runs/paper",
  ]


def _ran(paths, *words):
  return [c for c in _gcloud_calls(paths) if c[: len(words)] == list(words)]


def test_all_for_real_against_a_fake_gcloud(fake):
  env, paths = fake
  env["FAKE_JOB_EXIT"] = "0"
  local = paths["tmp"] / "local"
  local.mkdir()
  result = _launch(
    [
      "all",
      *BASE,
      "--type=v4-8",
      f"--tarball={paths['tmp'] / 'src.tar.gz'}",
      "--poll=0.05",
      "--workdir=runs/paper",
      NASTY,
    ],
    env,
    cwd=local,
  )
  assert result.returncode == 0, result.stderr
  calls = [c[3] if c[:3] == ["compute", "tpus", "tpu-vm"] else c[0] for c in _gcloud_calls(paths)]
  assert calls[:4] == ["create", "scp", "ssh", "ssh"] and calls[-3:] == ["scp", "scp", "delete"]
  assert set(calls[4:-3]) == {"ssh"}  # Status polls.
  home = paths["home"]
  assert (home / "icl_jax" / "requirements.txt").read_text() == (REPO / "requirements.txt").read_text()
  python_calls = [json.loads(line) for line in (home / "python_calls.jsonl").read_text().splitlines()]
  pip = [c["args"] for c in python_calls if c["args"][:3] == ["-m", "pip", "install"]]
  assert ["-m", "pip", "install", "-q", "-r", "requirements.txt", f"jax[tpu]>={_module().jax_lower_bound()}"] in pip
  [job] = [c for c in python_calls if "icl_jax.main" in c["args"]]
  assert job["cwd"] == str(home / "icl_jax")
  assert job["args"] == [
    "-m",
    "icl_jax.main",
    "--config=configs/linreg.py",
    "--workdir=runs/paper",
    "--distributed=auto",
    NASTY,
  ]  # Through three shells, verbatim.
  assert not (home / "icl_jax" / "pwned").exists() and not (home / "icl_jax" / "pwned2").exists()
  assert (local / "runs" / "paper" / "result.json").exists()
  assert "step 1 loss 0.5" in (local / "runs" / "paper" / "launch.log").read_text()


def test_all_deletes_the_vm_when_a_step_fails_unless_keep(fake):
  env, paths = fake
  args = ["all", *BASE, "--type=v4-8", f"--tarball={paths['tmp'] / 'src.tar.gz'}", "--poll=0.05"]
  env["FAKE_FAIL"] = "pip install"  # Setup fails: nothing to fetch, the VM is deleted.
  result = _launch(args, env, cwd=paths["tmp"])
  assert result.returncode == 1
  assert "setup failed" in result.stderr
  calls = [c[3] for c in _gcloud_calls(paths)]
  assert calls == ["create", "scp", "ssh", "delete"]

  paths["log"].unlink()
  env.pop("FAKE_FAIL")
  env["FAKE_JOB_EXIT"] = "3"  # The job fails: its log is still fetched, then the VM is deleted.
  result = _launch(args, env, cwd=paths["tmp"])
  assert result.returncode == 1
  assert "exited with status 3" in result.stderr
  assert _ran(paths, "compute", "tpus", "tpu-vm", "delete")
  assert (paths["tmp"] / "runs" / "paper" / "launch.log").exists()

  paths["log"].unlink()
  result = _launch([*args, "--keep"], env, cwd=paths["tmp"])
  assert result.returncode == 1
  assert not _ran(paths, "compute", "tpus", "tpu-vm", "delete")
  assert "--keep" in result.stderr

  paths["log"].unlink()
  env["FAKE_FAIL"] = "create"  # Nothing was created: nothing else runs, the delete command is suggested.
  result = _launch(args, env, cwd=paths["tmp"])
  assert result.returncode == 1
  assert [c[3] for c in _gcloud_calls(paths)] == ["create"]
  assert "tpu-vm delete icl-test" in result.stderr


def test_run_status_stop_for_real_against_a_fake_gcloud(fake):
  env, paths = fake
  env["FAKE_JOB_SLEEP"] = "30"
  result = _launch(["setup", *BASE, f"--tarball={paths['tmp'] / 'src.tar.gz'}"], env)
  assert result.returncode == 0, result.stderr
  result = _launch(["run", *BASE], env)
  assert result.returncode == 0, result.stderr
  assert "started pid" in result.stdout
  result = _launch(["status", *BASE], env)
  assert result.returncode == 0 and result.stdout.strip() == "running", result.stderr
  result = _launch(["run", *BASE], env)  # A second job is refused while the first runs.
  assert result.returncode == 1 and "already running" in result.stderr
  result = _launch(["stop", *BASE], env)
  assert result.returncode == 0 and "sent SIGTERM" in result.stdout
  deadline = time.time() + 20
  while (state := _launch(["status", *BASE], env).stdout.strip()) == "running" and time.time() < deadline:
    time.sleep(0.1)
  assert state == "done (exit status 0)"
  assert (paths["home"] / "icl_jax" / "runs" / "paper" / "saved_on_sigterm").exists()


def test_ctrl_c_in_all_still_fetches_and_deletes(fake):
  env, paths = fake
  env["FAKE_JOB_SLEEP"] = "30"
  process = subprocess.Popen(
    [sys.executable, str(TPU), "all", *BASE, "--type=v4-8", "--poll=0.1", f"--tarball={paths['tmp'] / 'src.tar.gz'}"],
    env=env,
    cwd=paths["tmp"],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  pid_file = paths["home"] / "icl_jax" / ".launch" / "job.pid"
  deadline = time.time() + 20
  while not (pid_file.exists() and pid_file.read_text().strip()) and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(0.3)  # Polling.
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=30)
  subprocess.run(["kill", "-TERM", pid_file.read_text().strip()])  # The fake job, left running by design.
  assert process.returncode == 130, stderr
  assert _ran(paths, "compute", "tpus", "tpu-vm", "delete")
  assert (paths["tmp"] / "runs" / "paper" / "launch.log").exists()


def test_local_sweep_dry_run_prints_one_process_per_shard_then_the_report():
  script = pathlib.Path(__file__).resolve().parents[2] / "launch" / "local_sweep.sh"
  result = subprocess.run(
    [
      "bash",
      str(script),
      "-n",
      "3",
      "--dry-run",
      "configs/sweep_depth_kappa.py:quick",
      "r",
      "--config.train.num_steps=5",
    ],
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert [line.split("--shard=")[1].split()[0] for line in lines[:3]] == ["0/3", "1/3", "2/3"]
  assert "--stage=report" in lines[3] and all("--config.train.num_steps=5" in line for line in lines)
  bad = subprocess.run(["bash", str(script), "-n", "0", "c", "r"], capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2 and "-n must be a positive integer" in bad.stderr


@pytest.mark.parametrize(
  "command, flag",
  [
    (["all", "--workdir=runs/paper"], "--workdir"),
    (["run", "--workdir=/home/me/paper"], "--workdir"),
    (["run", "--sweep", "--root=runs/depth"], "--root"),
  ],
)
def test_a_local_job_directory_on_a_multi_host_slice_is_refused(fake, command, flag):
  """Each host of a pod slice has its own disk: a local workdir or root is an error naming the flag, before
  any command runs (a dry run prints nothing)."""
  env, _ = _dry_env(fake)
  result = _launch([command[0], "--dry-run", *BASE, "--type=v4-32", *command[1:]], env)
  assert result.returncode == 2 and result.stdout == ""
  assert f"error: {flag}=" in result.stderr and "4 hosts" in result.stderr and "gs://BUCKET/PATH" in result.stderr
  # One host: a local workdir is fine.
  assert _launch([command[0], "--dry-run", *BASE, "--type=v4-8", *command[1:]], env).returncode == 0


def test_queued_resource_dry_run_prints_the_gcloud_commands(fake):
  """--queued: create queues the request (the node named like it), waits for ACTIVE, and delete --force removes
  both; the rest (ssh, scp) addresses the node as usual."""
  env, _ = _dry_env(fake)
  result = _launch(
    ["all", "--dry-run", *BASE, "--type=v5litepod-16", "--queued", "--spot", "--workdir=gs://bucket/run"], env
  )
  assert result.returncode == 0, result.stderr
  commands = _commands(result.stdout)
  queued = [c for c in commands if c[:4] == ["gcloud", "compute", "tpus", "queued-resources"]]
  assert [c[4] for c in queued] == ["create", "describe", "delete"]
  create, describe, delete = queued
  name = create[5]
  assert {f"--node-id={name}", "--accelerator-type=v5litepod-16", "--spot"} <= set(create)
  assert any(a.startswith("--runtime-version=") for a in create)
  assert "--format=value(state.state)" in describe and {"--force", "--quiet"} <= set(delete)
  assert (
    commands.index(create)
    < commands.index(describe)
    < min(i for i, c in enumerate(commands) if "ssh" in c or "scp" in c)
  )
  assert commands[-1] == delete
  assert "ACTIVE" in result.stdout
  result = _launch(["create", "--dry-run", *BASE, "--type=v4-8", "--queued", "--preemptible"], env)
  assert result.returncode == 2 and "--spot" in result.stderr


def test_queued_resource_waits_until_active():
  """create polls describe (answering WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE here) and returns at ACTIVE;
  FAILED is an error."""
  module = _module()
  runner = module.Runner(dry_run=False)
  answers = iter(["WAITING_FOR_RESOURCES\n", "PROVISIONING\n", "ACTIVE\n"])
  calls = []

  def run(argv, *, step, capture=False):
    calls.append(argv)
    return subprocess.CompletedProcess(argv, 0, next(answers) if "describe" in argv else "", "")

  runner.run = run
  args = module._parser().parse_args(
    ["create", "--name=icl", "--zone=us-central2-b", "--type=v4-8", "--queued", "--queue-poll=0"]
  )
  module.resolve(args, {})
  module.do_create(runner, args)
  assert [c[4] for c in calls] == ["create", "describe", "describe", "describe"]
  answers = iter(["FAILED\n"])
  with pytest.raises(module.StepError, match="FAILED"):
    module.wait_for_queued_resource(runner, args)
