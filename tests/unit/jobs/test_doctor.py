"""`orbitgen doctor`: every check of the environment a spec will run in, passing on a
runnable local spec and failing, with a fix, on each thing that would stop a job; nothing made."""
from __future__ import annotations

import os

from click.testing import CliRunner

from jobs.cli import main


def doctor(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, ["doctor", *args], env=env, catch_exceptions=False)


def lines_of(output: str) -> dict[str, str]:
    return {line.split()[1]: line for line in output.splitlines() if line.strip().startswith(("ok", "FAIL"))}


def test_a_runnable_spec_passes_and_nothing_is_made(tmp_path):
    result = doctor("--set", f"workdir={tmp_path / 'work'}", "--set", "scaling.num_workers=1")
    assert result.exit_code == 0, result.output
    assert set(lines_of(result.output)) == {"ray", "gpus", "tracking", "storage", "data", "files"}
    assert all(line.strip().startswith("ok") for line in lines_of(result.output).values())
    assert not (tmp_path / "work").exists()


def test_each_problem_is_named_with_a_fix(tmp_path):
    cpus = os.cpu_count() or 1
    result = doctor("jobs/specs/scbgan_rosetta.yaml", "--set", f"workdir={tmp_path}",
                    "--set", "tracking.uri=http://127.0.0.1:1", "--set", "checkpoint.storage=s3://orbitgen/runs",
                    "--set", f"scaling.num_workers={2 * cpus}", "--set", f"train.batch={8 * cpus}",
                    "--set", "scaling.use_gpu=true",
                    env={"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "RAY_ADDRESS": ""})
    assert result.exit_code == 1
    found = lines_of(result.output)
    assert all(found[name].strip().startswith("FAIL") for name in ("ray", "gpus", "tracking", "storage", "data", "files"))
    assert result.output.count("fix:") == 6 and "6 problem(s) found" in result.output
    assert "model.vision_aided.weights.clip_vitb32" in found["files"]
    assert "(set them with --set KEY=PATH): model.vision_aided.weights." in found["files"] and ":;" not in found["files"]
    assert f"{{CPU: {cpus}}}" in found["ray"] and f"--set scaling.num_workers={cpus} " in result.output and "http://127.0.0.1:1" in found["tracking"]
    assert list(tmp_path.iterdir()) == []


def test_the_data_fix_fits_the_problem(tmp_path):
    """Nothing at data.train: build or point elsewhere. A set of other images: match the spec to it."""
    from data_shards.synthetic import crater_field
    from data_shards.writer import write_shards

    base = ["--set", f"workdir={tmp_path / 'work'}", "--set", "scaling.num_workers=1"]
    missing = doctor(*base, "--set", f"data.train={tmp_path / 'nothing'}").output
    assert lines_of(missing)["data"].strip().startswith("FAIL")
    assert "orbitgen data build" in fix_of("data", missing) and "channels" not in fix_of("data", missing)
    write_shards(crater_field(8, 16, 1, 0), str(tmp_path / "r16"), layout="synthetic:craters", resolution=16,
                 channels=1, source="test", shard_samples=8, progress=False)
    other = doctor(*base, "--set", f"data.train={tmp_path / 'r16'}", "--set", "data.resolution=32").output
    assert "set data.channels/resolution to match it" in fix_of("data", other)


def fix_of(name: str, output: str) -> str:
    """The `fix:` line under check `name` in doctor's output ("" when it has none)."""
    lines = output.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith(("ok", "FAIL")) and line.split()[1] == name)
    return lines[at + 1] if at + 1 < len(lines) and "fix:" in lines[at + 1] else ""
