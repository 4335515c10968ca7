"""Installs icl_jax from a checkout into this Python environment without breaking the runtime's accelerator JAX.

Run by the first cell of every notebook in colabs/ (`python colabs/install.py CHECKOUT`); usable by hand the same
way. Standard library only, because it runs before anything is installed.

Colab (and most GPU/TPU images) ship a jax built for their accelerator: jax with the CUDA plugin on a GPU
runtime, jax with libtpu on a TPU runtime. A plain `pip install -e CHECKOUT` may replace it with the CPU build
from PyPI, after which the notebook silently trains on the CPU. So this script

1. detects the accelerator (TPU: a /dev/accel* or /dev/vfio device or a TPU environment variable; GPU: a
   working `nvidia-smi`; otherwise CPU) and the installed jax, jaxlib and accelerator plugin;
2. if that jax is recent enough for the checkout (the `jax>=` bound of its requirements.txt) and has the
   plugin the accelerator needs, installs the package with jax, jaxlib and the plugin pinned to what is
   installed (a pip constraints file), so they are kept;
3. otherwise installs the matching build first (`jax[tpu]`, `jax[cuda12]` or `jax[cuda13]` after the CUDA
   version `nvidia-smi` reports, or plain `jax` on CPU), then the package.

Exit status: 0 when jax was kept or newly installed, EXIT_JAX_REPLACED when a jax that was already installed was
replaced: a kernel that had imported the old one must restart (the notebooks' first cell does so).
"""

import dataclasses
import glob
import importlib.metadata
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

EXIT_JAX_REPLACED = 3
# The accelerator plugins, by the name pip knows them under; a jax with one of these installed runs there.
GPU_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin")
TPU_PLUGINS = ("libtpu", "libtpu-nightly")
PINNED = ("jax", "jaxlib") + GPU_PLUGINS + TPU_PLUGINS + ("jax-cuda12-pjrt", "jax-cuda13-pjrt")
TPU_VARIABLES = ("COLAB_TPU_ADDR", "TPU_NAME", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What to run: pip argument lists, in order, and whether they replace an installed jax."""
  accelerator: str  # "cpu", "gpu" or "tpu".
  reason: str  # One line for the user.
  pip_commands: tuple[tuple[str, ...], ...]
  replaces_jax: bool


def version_tuple(version: str) -> tuple[int, ...]:
  """The leading numeric release of a version string: "0.7.2" -> (0, 7, 2); "0.4.30.dev1+cuda" -> (0, 4, 30)."""
  release = re.match(r"\d+(\.\d+)*", version)
  if release is None:
    raise ValueError(f"not a version: {version!r}")
  return tuple(int(part) for part in release.group(0).split("."))


def jax_minimum(checkout: pathlib.Path) -> str:
  """The `jax>=` lower bound of the checkout's requirements.txt."""
  requirements = checkout / "requirements.txt"
  match = re.search(r"^jax>=([0-9.]+)", requirements.read_text(), flags=re.MULTILINE)
  if match is None:
    raise ValueError(f"{requirements} has no 'jax>=' line")
  return match.group(1)


def detect_accelerator(environ=os.environ) -> tuple[str, str]:
  """("tpu" | "gpu" | "cpu", the CUDA version nvidia-smi reports or "")."""
  if any(environ.get(name) for name in TPU_VARIABLES) or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return "tpu", ""
  if shutil.which("nvidia-smi"):
    probe = subprocess.run(["nvidia-smi"], capture_output=True, text=True, check=False)
    if probe.returncode == 0:
      cuda = re.search(r"CUDA Version:\s*([0-9.]+)", probe.stdout)
      return "gpu", cuda.group(1) if cuda else ""
  return "cpu", ""


def installed_versions() -> dict[str, str]:
  """Installed versions of jax, jaxlib and the accelerator plugins (absent ones left out)."""
  versions = {}
  for name in PINNED:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return versions


def plan(checkout: str, accelerator: str, cuda_version: str, versions: dict[str, str], minimum: str) -> Plan:
  """The pip commands that install `checkout` on `accelerator`, given the installed `versions`."""
  package = ("install", "-q", "-e", checkout)
  jax = versions.get("jax")
  plugins = {"cpu": (), "gpu": GPU_PLUGINS, "tpu": TPU_PLUGINS}[accelerator]
  has_plugin = accelerator == "cpu" or any(name in versions for name in plugins)
  if jax is not None and version_tuple(jax) >= version_tuple(minimum) and has_plugin:
    pins = tuple(f"{name}=={version}" for name, version in sorted(versions.items()))
    return Plan(accelerator, f"keeping the installed {', '.join(pins)} ({accelerator})",
                (package + ("-c", "{constraints}"),), replaces_jax=False)
  if accelerator == "gpu":
    extra = "cuda13" if cuda_version and version_tuple(cuda_version) >= (13,) else "cuda12"
    requirement = f"jax[{extra}]>={minimum}"
  elif accelerator == "tpu":
    requirement = f"jax[tpu]>={minimum}"
  else:
    requirement = f"jax>={minimum}"
  if jax is None:
    why = "no jax installed"
  elif version_tuple(jax) < version_tuple(minimum):
    why = f"jax {jax} is older than the {minimum} this checkout needs"
  else:
    why = f"jax {jax} has no {accelerator.upper()} plugin ({' or '.join(plugins)})"
  return Plan(accelerator, f"{why}: installing {requirement}",
              (("install", "-q", "-U", requirement), package), replaces_jax=jax is not None)


def main(argv: list[str]) -> int:
  if len(argv) != 2 or not (pathlib.Path(argv[1]) / "requirements.txt").is_file():
    print(f"usage: python {argv[0]} CHECKOUT (a directory with requirements.txt)", file=sys.stderr)
    return 2
  checkout = pathlib.Path(argv[1]).resolve()
  accelerator, cuda_version = detect_accelerator()
  versions = installed_versions()
  chosen = plan(str(checkout), accelerator, cuda_version, versions, jax_minimum(checkout))
  print(f"icl_jax install: {chosen.reason}", flush=True)
  with tempfile.TemporaryDirectory() as scratch:
    constraints = pathlib.Path(scratch) / "constraints.txt"
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in sorted(versions.items())))
    for arguments in chosen.pip_commands:
      command = [sys.executable, "-m", "pip"] + [a.replace("{constraints}", str(constraints)) for a in arguments]
      subprocess.run(command, check=True)
  after = installed_versions()
  print(f"icl_jax install: done, jax {after.get('jax')} for {accelerator}", flush=True)
  return EXIT_JAX_REPLACED if chosen.replaces_jax and after != versions else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
