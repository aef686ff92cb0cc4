"""infra/setup.sh picks the torch build from the driver, without a GPU, nvcc or a download.

The script runs in its dry-run mode with a PATH that holds only the shell tools it needs and, for
the GPU branch, a stub `nvidia-smi` that prints what a real one prints (a GPU list for `-L`, the
header with "CUDA Version: X.Y" otherwise). No nvcc, pip, uv or python is on that PATH, so the dry
run can neither compile nor download anything; the venv path is a temp dir, so no real venv is read.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SETUP = REPO / "infra" / "setup.sh"
TOOLS = ("bash", "cat", "cut", "dirname", "head", "sed", "sha256sum")

HEADER = """\
Sat Dec  5 03:30:00 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.90.07              Driver Version: 550.90.07      CUDA Version: {cuda}     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |
|=========================================+========================+======================|
|   0  NVIDIA H100 80GB HBM3          On  |   00000000:18:00.0 Off |                    0 |
| N/A   31C    P0             71W /  700W |       1MiB /  81559MiB |      0%      Default |
+-----------------------------------------+------------------------+----------------------+
"""


def fake_bin(tmp_path: Path, nvidia_smi: str | None) -> Path:
    """A bin folder with the shell tools setup.sh uses and, if given, `nvidia-smi` as that script."""
    bin_dir = Path(tempfile.mkdtemp(prefix="bin-", dir=tmp_path))
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    if nvidia_smi is not None:
        stub = bin_dir / "nvidia-smi"
        stub.write_text("#!" + shutil.which("bash") + "\n" + nvidia_smi)
        stub.chmod(0o755)
    return bin_dir


def gpu_stub(cuda: str | None) -> str:
    header = HEADER.format(cuda=cuda) if cuda else HEADER.replace("CUDA Version: {cuda}", "")
    return ('if [ "$1" = "-L" ]; then echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5f0c9e1a-0000)"; exit 0; fi\n'
            f"cat <<'EOF'\n{header}EOF\n")


def dry_run(tmp_path: Path, nvidia_smi: str | None, *args: str, **env: str) -> subprocess.CompletedProcess:
    bin_dir = fake_bin(tmp_path, nvidia_smi)
    run_env = {"PATH": str(bin_dir), "ORBITGEN_VENV": str(tmp_path / "venv"), "HOME": str(tmp_path), **env}
    return subprocess.run([str(bin_dir / "bash"), str(SETUP), *(args or ("--dry-run",))], capture_output=True,
                          text=True, timeout=30, env=run_env, cwd=tmp_path)


def plan(out: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


def test_gpu_branch_picks_the_drivers_cuda_line_without_nvcc(tmp_path):
    run = dry_run(tmp_path, gpu_stub("12.4"))
    assert run.returncode == 0, run.stderr
    p = plan(run.stdout)
    assert p["gpu"] == "1 (driver CUDA 12.4)"
    assert p["torch line"] == "cu124"
    assert p["torch"] == "pip install torch==2.6.0+cu124 --index-url https://download.pytorch.org/whl/cu124"
    # DeepSpeed's setup.py: no op compiled, and its nvcc-based op checks skipped.
    assert "DS_BUILD_OPS=0" in p["deepspeed"] and "DS_IGNORE_CUDA_DETECTION=1" in p["deepspeed"]
    assert "torch.cuda.is_available()" in p["check"]
    assert p["stamp"].endswith("torch=2.6.0+cu124 build=cu124 gpu=1")
    assert p["action"].startswith("install")


@pytest.mark.parametrize("cuda, line", [("13.0", "cu130"), ("12.9", "cu128"), ("12.8", "cu128"), ("12.6", "cu126"),
                                        ("12.5", "cu124"), ("12.2", "cu121"), ("12.0", "cu118"), ("11.8", "cu118")])
def test_the_newest_line_the_driver_runs(tmp_path, cuda, line):
    run = dry_run(tmp_path, gpu_stub(cuda), "--torch-args")
    assert run.returncode == 0, run.stderr
    spec, flag, url = run.stdout.split()
    assert spec.startswith("torch==") and spec.endswith(f"+{line}")
    assert (flag, url) == ("--index-url", f"https://download.pytorch.org/whl/{line}")


def test_a_driver_too_old_or_unreadable_fails_in_one_line(tmp_path):
    old = dry_run(tmp_path, gpu_stub("11.4"))
    assert old.returncode == 1 and old.stdout == ""
    assert len(old.stderr.strip().splitlines()) == 1 and "11.4" in old.stderr
    unread = dry_run(tmp_path, gpu_stub(None))
    assert unread.returncode == 1 and len(unread.stderr.strip().splitlines()) == 1
    assert "ORBITGEN_TORCH_CUDA" in unread.stderr


def test_cpu_branch_chooses_the_cpu_build(tmp_path):
    run = dry_run(tmp_path, None)
    assert run.returncode == 0, run.stderr
    p = plan(run.stdout)
    assert p["gpu"] == "0 (driver CUDA none)" and p["torch line"] == "cpu"
    assert p["torch"] == "pip install torch==2.13.0 numpy"   # the +cpu wheel through pip's find-links
    assert "check" not in p
    assert p["stamp"].endswith("torch=2.13.0 build=cpu gpu=0")


def test_nvidia_smi_without_a_gpu_is_the_cpu_branch(tmp_path):
    # A driver installed with no GPU attached: `nvidia-smi -L` fails.
    run = dry_run(tmp_path, 'echo "No devices were found"; exit 6\n')
    assert run.returncode == 0, run.stderr
    assert plan(run.stdout)["torch line"] == "cpu"


def test_a_cpu_venv_is_rebuilt_when_a_gpu_appears(tmp_path):
    cpu_stamp = plan(dry_run(tmp_path, None).stdout)["stamp"]
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".orbitgen-setup").write_text(cpu_stamp + "\n")
    same = dry_run(tmp_path, None, ORBITGEN_VENV=str(venv))
    assert plan(same.stdout)["action"] == "none (stamp matches)"
    gpu = dry_run(tmp_path, gpu_stub("12.8"), ORBITGEN_VENV=str(venv))
    assert plan(gpu.stdout)["action"] == f"install (stamp: {cpu_stamp})"


def test_environment_variable_also_selects_the_dry_run(tmp_path):
    run = dry_run(tmp_path, gpu_stub("13.0"), "", ORBITGEN_SETUP_DRY_RUN="1")
    assert run.returncode == 0, run.stderr
    assert plan(run.stdout)["torch line"] == "cu130"
