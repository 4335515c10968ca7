"""One prepared run on a GPU machine without network, in at most 9 minutes, its results in at most 8 files.

  bash launch/gpu_check.sh --wheelhouse=wheelhouse --out=OUT          # on the GPU machine
  bash launch/gpu_check.sh --tiny --wheelhouse=DIR --out=DIR          # the same steps at CPU size (CI)

Each step runs under its own wall-clock budget; a step past it is stopped, and the next one still runs:

  install   the wheelhouse (launch/wheelhouse.py) into --target with pip --no-index --no-deps, then every
            module of icl_jax imported: a missing dependency ends the run here, named, before any compute;
  check     python -m icl_jax.accelerator_check --size=short on configs/linreg.py (--tiny: --size=tiny on
            tests/tiny_config.py): tests on the GPU, step times and MFU, the evaluation's time, dtype curves;
  train     python -m icl_jax.reproduce --scale=paper --experiments=isotropic --seeds=0,1,2 (the seeds vmapped)
            into a scratch root, stopped by SIGTERM after --train-s seconds: it saves checkpoints, exits 75;
            (--tiny: --scale=quick --seeds=0);
  evaluate  the same command with --partial: each run evaluated at its checkpoint, ROOT/partial/ written
            (summaries, and a report of scale paper-partial that gives the fraction of the steps trained);
  pack      into --out: accelerator_check.json; gpu_check.json (each step's exit status, wall time and budget,
            the steps trained, every file's size); gpu_check.log (every step's output); report.tar.gz
            (ROOT/partial's report, figures and summaries, each run's config, provenance and metrics); and
            each run's saved model outputs, RUN.npz.

Exit status 0 when every step ended as planned (train: stopped by its SIGTERM, or finished), 1 otherwise.
Standard library only: it runs before the wheels are installed.
"""

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
EXIT_PREEMPTED = 75  # icl_jax.runtime.errors.EXIT_PREEMPTED: stopped by SIGTERM with a checkpoint.
# How long a SIGTERMed training may take to save its checkpoint and exit before it is killed.
STOP_GRACE_S = 60
# What the device machines bring back: files per call, bytes per file.
MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20

# Per size: the accelerator check's arguments, the reproduction's, and each step's budget in seconds.
PLANS = {
  "gpu": {
    "check": ["--config=configs/linreg.py", "--size=short"],
    "reproduce": ["--scale=paper", "--experiments=isotropic", "--seeds=0,1,2"],
    "budgets": {"install": 60, "check": 140, "train": 230, "evaluate": 110},
  },
  "tiny": {
    "check": ["--config=tests/tiny_config.py", "--size=tiny"],
    "reproduce": ["--scale=quick", "--experiments=isotropic", "--seeds=0"],
    "budgets": {"install": 60, "check": 240, "train": 30, "evaluate": 180},
  },
}

# Every library module of the package (the command lines' __main__ modules define flags, and import these),
# imported after the install: a missing dependency is found before any compute.
IMPORT_CHECK = (
  "import importlib, pkgutil, icl_jax\n"
  "names = [m.name for m in pkgutil.walk_packages(icl_jax.__path__, 'icl_jax.') if not m.name.endswith('__main__')]\n"
  "for name in names:\n"
  "  importlib.import_module(name)\n"
  "print('imported', len(names), 'modules of icl_jax')\n"
)


class Log:
  """Every step's output, in one file, with a line per step to this process's stdout."""

  def __init__(self, path: pathlib.Path):
    self.file = path.open("a")

  def say(self, text: str) -> None:
    line = f"[gpu_check {time.strftime('%H:%M:%S')}] {text}"
    print(line, flush=True)
    self.file.write(line + "\n")
    self.file.flush()


def run_step(log: Log, name: str, command: list[str], budget_s: float, env: dict, stop=signal.SIGKILL) -> dict:
  """Runs `command` in the repository with its output in the log; past `budget_s` sends `stop` (then SIGKILL
  after STOP_GRACE_S). Returns its exit status, wall time and budget."""
  log.say(f"{name}: {' '.join(c if len(c) < 200 else c[:60] + '...' for c in command)} (budget {budget_s:g} s)")
  start = time.perf_counter()
  process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log.file, stderr=subprocess.STDOUT)
  stopped = False
  try:
    status = process.wait(timeout=budget_s)
  except subprocess.TimeoutExpired:
    stopped = True
    process.send_signal(stop)
    try:
      status = process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
      process.kill()
      status = process.wait()
  result = {"exit_status": status, "wall_s": round(time.perf_counter() - start, 1), "budget_s": budget_s}
  result["stopped_at_budget"] = stopped
  log.say(f"{name}: exit status {status} after {result['wall_s']} s" + (" (stopped at its budget)" if stopped else ""))
  return result


def install(log: Log, wheelhouse: pathlib.Path, target: pathlib.Path, budget_s: float, env: dict) -> dict:
  """The wheelhouse's wheels into `target` (which must be empty), offline."""
  wheels = sorted(wheelhouse.glob("*.whl"))
  if target.exists() and any(target.iterdir()):
    raise SystemExit(f"error: --target={target} is not empty: an install must start from an empty directory")
  target.mkdir(parents=True, exist_ok=True)
  command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile"]
  command += ["--no-cache-dir", "--disable-pip-version-check", f"--target={target}", *map(str, wheels)]
  result = run_step(log, "install", command, budget_s, env) if wheels else {"exit_status": 0, "wall_s": 0.0}
  result["wheels"] = [w.name for w in wheels]
  return result


def trained_steps(root: pathlib.Path) -> dict:
  """Each run's steps trained and configured, from the partial report (empty without one)."""
  report = root / "partial" / "report.json"
  if not report.exists():
    return {}
  runs = json.loads(report.read_text())["runs"]
  return {r["name"]: {"trained": r["trained_steps"], "of": r["num_steps"]} for r in runs if r["trained_steps"]}


def pack(root: pathlib.Path, check_dir: pathlib.Path, out: pathlib.Path) -> list[pathlib.Path]:
  """The files to bring back, written into `out`: the check's JSON, report.tar.gz, each run's RUN.npz."""
  files = []
  if (check_dir / "accelerator_check.json").exists():
    files.append(out / "accelerator_check.json")
    files[-1].write_bytes((check_dir / "accelerator_check.json").read_bytes())
  partial = root / "partial"
  with tarfile.open(out / "report.tar.gz", "w:gz") as tar:
    for name in ("REPORT.md", "report.json", "figures"):
      if (partial / name).exists():
        tar.add(partial / name, arcname=f"partial/{name}")
    for summary in sorted((partial / "summaries").glob("*.json")):
      tar.add(summary, arcname=f"partial/summaries/{summary.name}")
    for run in sorted(p for p in root.iterdir() if (p / "config.json").exists()):
      for name in ("config.json", "provenance.json", "metrics.jsonl"):
        if (run / name).exists():
          tar.add(run / name, arcname=f"runs/{run.name}/{name}")
  files.append(out / "report.tar.gz")
  for outputs in sorted((partial / "summaries").glob("*.npz")):
    files.append(out / outputs.name)
    files[-1].write_bytes(outputs.read_bytes())
  return files


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tiny", action="store_true", help="CPU sizes: the same steps in at most 3 minutes")
  parser.add_argument("--wheelhouse", type=pathlib.Path, required=True, help="wheels to install (wheelhouse.py)")
  parser.add_argument("--target", type=pathlib.Path, default=None, help="empty install directory (default: scratch)")
  parser.add_argument("--out", type=pathlib.Path, default=os.environ.get("OUT"), help="where the files go ($OUT)")
  parser.add_argument("--train-s", type=float, default=None, help="the training step's budget (default: the plan's)")
  args = parser.parse_args(argv)
  if args.out is None:
    parser.error("--out is required (or $OUT set)")
  if not args.wheelhouse.is_dir():
    parser.error(f"--wheelhouse={args.wheelhouse}: no such directory (build it with launch/wheelhouse.py)")
  plan = PLANS["tiny" if args.tiny else "gpu"]
  budgets = dict(plan["budgets"], **({"train": args.train_s} if args.train_s else {}))
  args.out.mkdir(parents=True, exist_ok=True)
  log = Log(args.out / "gpu_check.log")
  scratch = pathlib.Path(tempfile.mkdtemp(prefix="gpu_check_"))
  target = args.target or scratch / "site"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")])))
  env["PYTHONUNBUFFERED"] = "1"
  report = {"mode": "tiny" if args.tiny else "gpu", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  steps = report["steps"] = {}
  start = time.perf_counter()

  def step(name: str, result: dict) -> None:
    """Records a step's result, and the report so far: a call cut short still brings back what ran."""
    steps[name] = result
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")

  step("install", install(log, args.wheelhouse, target, budgets["install"], env))
  step("imports", run_step(log, "imports", [sys.executable, "-c", IMPORT_CHECK], budgets["install"], env))
  ok = steps["install"]["exit_status"] == 0 and steps["imports"]["exit_status"] == 0
  root, check_dir = scratch / "reproduction", scratch / "check"
  if ok:
    check = [sys.executable, "-m", "icl_jax.accelerator_check", *plan["check"], f"--out={check_dir}"]
    step("check", run_step(log, "check", check, budgets["check"], env))
    reproduce = [sys.executable, "-m", "icl_jax.reproduce", *plan["reproduce"], f"--root={root}"]
    step("train", run_step(log, "train", reproduce, budgets["train"], env, stop=signal.SIGTERM))
    step("evaluate", run_step(log, "evaluate", [*reproduce, "--partial"], budgets["evaluate"], env))
    ok = (
      steps["check"]["exit_status"] == 0
      and steps["train"]["exit_status"] in (0, EXIT_PREEMPTED)
      and steps["evaluate"]["exit_status"] == 0
    )
  root.mkdir(parents=True, exist_ok=True)
  files = pack(root, check_dir, args.out)
  report["trained_steps"] = trained_steps(root)
  report["wall_s"] = round(time.perf_counter() - start, 1)
  report["ok"] = ok
  report["files"] = {f.name: f.stat().st_size for f in files}  # Besides gpu_check.json and gpu_check.log.
  too_big = [f.name for f in files if f.stat().st_size > MAX_FILE_BYTES]
  report["within_limits"] = len(files) + 2 <= MAX_FILES and not too_big
  (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
  shutil.rmtree(scratch)  # Checkpoints and the scratch install: nothing of them comes back.
  log.say(
    f"{'ok' if ok else 'FAILED'} in {report['wall_s']} s; {len(files) + 2} files in {args.out}"
    + ("" if report["within_limits"] else f" (over the limits: {len(files) + 2} files, too big: {too_big})")
  )
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
