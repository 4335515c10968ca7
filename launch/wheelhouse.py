"""Wheels for an offline install: exactly what a target Python environment lacks to run icl_jax.

  python launch/wheelhouse.py --have=launch/images/gpu_cuda.txt --out=wheelhouse
  python launch/wheelhouse.py --have=FILE --out=DIR --python-version=3.11 --glibc=2.35   # another target

Compute nodes of many clusters, and the GPU machines launch/gpu_check.sh runs on, reach no package index.
This resolves requirements.txt for the target's Python and platform with pip's own resolver (pip download, into a
scratch directory), keeps the distributions that --have (one name or name==version per line, what
the target already has) does not name, downloads their wheels into --out and writes OUT/wheelhouse.json (each
wheel, its size, the target). A pinned version in --have constrains the resolution, so that what is fetched
works with what is there. A dependency published only as source is built here into a wheel, which must be pure
Python (py3-none-any) to travel. The wheels together must fit --max-mb (what may travel with a working tree).
On the target: `python -m pip install --no-index --no-deps --target DIR OUT/*.whl` and `PYTHONPATH=DIR`
(launch/gpu_check.sh does both). `--list-only` resolves and prints the wheels' names and versions, writing
nothing. Standard library only; it needs pip and the package index, here, not there.
"""

import argparse
import json
import pathlib
import re
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
# How pip says that a distribution has no wheel for the target: none at all, or none of the pinned version.
_NO_WHEEL = (
  re.compile(r"No matching distribution found for ([A-Za-z0-9_.\-]+)"),
  re.compile(r"The user requested \(constraint\) ([A-Za-z0-9_.\-]+==\S+)"),
)
# The oldest glibc a manylinux tag names (manylinux2014 is glibc 2.17).
_OLDEST_GLIBC = 17


def canonical(name: str) -> str:
  """A distribution's name as pip compares them (PEP 503)."""
  return re.sub(r"[-_.]+", "-", name).lower()


def read_have(path: pathlib.Path) -> dict[str, str | None]:
  """The target's distributions: canonical name -> pinned version (None where the list gives none)."""
  have = {}
  for number, line in enumerate(path.read_text().splitlines(), 1):
    line = line.split("#", 1)[0].strip()
    if not line:
      continue
    name, _, version = line.partition("==")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name.strip()):
      raise SystemExit(f"error: {path}:{number}: {line!r} is not NAME or NAME==VERSION")
    have[canonical(name.strip())] = version.strip() or None
  return have


def platform_tags(arch: str, glibc: str) -> list[str]:
  """Every manylinux tag a Linux of glibc `glibc` on `arch` runs (pip matches each tag exactly)."""
  major, minor = (int(p) for p in glibc.split("."))
  if major != 2 or minor < _OLDEST_GLIBC:
    raise SystemExit(f"error: --glibc={glibc}: need 2.{_OLDEST_GLIBC} or newer")
  tags = [f"manylinux_2_{n}_{arch}" for n in range(minor, _OLDEST_GLIBC - 1, -1)]
  return tags + [f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"]


def _target_flags(args) -> list[str]:
  flags = ["--only-binary=:all:", f"--python-version={args.python_version}", "--implementation=cp"]
  return flags + [f"--platform={tag}" for tag in platform_tags(args.arch, args.glibc)]


def _pip(*arguments: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "pip", *arguments], capture_output=True, text=True, check=False)


def _build_pure_wheel(name: str, out: pathlib.Path) -> pathlib.Path:
  """Builds `name` (published as source only) into a wheel in `out`; it must be pure Python to travel."""
  with tempfile.TemporaryDirectory() as scratch:
    built = _pip("wheel", "--no-deps", "--quiet", "--wheel-dir", scratch, name)
    wheels = list(pathlib.Path(scratch).glob("*.whl"))
    if built.returncode or len(wheels) != 1:
      raise SystemExit(
        f"error: {name} has no wheel for the target and could not be built here:\n{built.stderr[-2000:]}"
      )
    wheel = wheels[0]
    if not wheel.name.endswith("-none-any.whl") or "py3" not in wheel.name.split("-")[-3]:
      raise SystemExit(
        f"error: {name} has no wheel for the target, and the one built here ({wheel.name}) is not pure Python"
      )
    (out / wheel.name).write_bytes(wheel.read_bytes())
    return out / wheel.name


def resolve(args, have: dict[str, str | None], scratch: pathlib.Path) -> list[pathlib.Path]:
  """The wheels of every distribution the requirements need on the target, resolved and downloaded by pip
  into SCRATCH/all (pip's dry run cannot resolve for another Python's Requires-Python, its download can)."""
  constraints, built_dir, fetched = scratch / "constraints.txt", scratch / "built", scratch / "all"
  constraints.write_text("".join(f"{n}=={v}\n" for n, v in sorted(have.items()) if v))
  built_dir.mkdir()
  built = set()
  while True:
    result = _pip(
      "download",
      f"--dest={fetched}",
      f"--find-links={built_dir}",
      f"--constraint={constraints}",
      *_target_flags(args),
      "-r",
      str(args.requirements),
    )
    if result.returncode == 0:
      return sorted(fetched.glob("*.whl"))
    said = result.stdout + result.stderr  # Without --quiet: the lines that name a conflict's cause.
    missing = next((m.group(1) for pattern in _NO_WHEEL if (m := pattern.search(said))), None)
    if not missing or canonical(missing.split("==")[0]) in built:
      raise SystemExit(f"error: pip could not resolve {args.requirements} for the target:\n{result.stderr[-3000:]}")
    built.add(canonical(missing.split("==")[0]))
    _build_pure_wheel(missing, built_dir)


def wheel_name(wheel: pathlib.Path) -> tuple[str, str]:
  """(canonical distribution name, version) of a wheel file."""
  name, version = wheel.name.split("-")[:2]
  return canonical(name), version


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--have", type=pathlib.Path, required=True, help="the target's distributions, one per line")
  parser.add_argument("--out", type=pathlib.Path, help="the wheelhouse directory (required unless --list-only)")
  parser.add_argument("--python-version", default="3.12", help="the target's Python, e.g. 3.12")
  parser.add_argument("--arch", default="x86_64", help="the target's machine, e.g. x86_64, aarch64")
  parser.add_argument("--glibc", default="2.39", help="the target's glibc (ldd --version), e.g. 2.39")
  parser.add_argument("--requirements", type=pathlib.Path, default=REPO / "requirements.txt")
  parser.add_argument("--max-mb", type=float, default=64.0, help="fail if the wheels take more (MiB)")
  parser.add_argument(
    "--list-only", action="store_true", help="print NAME==VERSION of each needed wheel; write nothing"
  )
  args = parser.parse_args(argv)
  for path in (args.have, args.requirements):
    if not path.is_file():
      parser.error(f"{path}: no such file")
  if args.out is None and not args.list_only:
    parser.error("--out is required (or --list-only)")
  have = read_have(args.have)
  with tempfile.TemporaryDirectory() as scratch:
    needed = [w for w in resolve(args, have, pathlib.Path(scratch)) if wheel_name(w)[0] not in have]
    if args.list_only:
      print("".join(f"{n}=={v}\n" for n, v in sorted(wheel_name(w) for w in needed)), end="")
      return 0
    args.out.mkdir(parents=True, exist_ok=True)
    stray = [w.name for w in args.out.glob("*.whl") if w.name not in {n.name for n in needed}]
    if stray:
      raise SystemExit(
        f"error: {args.out} holds wheels this resolution does not need ({', '.join(stray)}): use an empty directory"
      )
    for wheel in needed:
      (args.out / wheel.name).write_bytes(wheel.read_bytes())
  wheels = sorted(args.out.glob("*.whl"))
  total = sum(w.stat().st_size for w in wheels)
  manifest = {
    "target": {"python_version": args.python_version, "arch": args.arch, "glibc": args.glibc},
    "have": str(args.have),
    "requirements": str(args.requirements),
    "wheels": [{"file": w.name, "bytes": w.stat().st_size} for w in wheels],
    "total_bytes": total,
  }
  (args.out / "wheelhouse.json").write_text(json.dumps(manifest, indent=1) + "\n")
  print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB, in {args.out}")
  if total > args.max_mb * 2**20:
    largest = ", ".join(
      f"{w.name} {w.stat().st_size / 2**20:.1f} MiB" for w in sorted(wheels, key=lambda w: -w.stat().st_size)[:3]
    )
    print(
      f"error: the wheels take {total / 2**20:.1f} MiB, over --max-mb={args.max_mb:g} (largest: {largest})",
      file=sys.stderr,
    )
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
