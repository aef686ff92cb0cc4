"""Job specs: every ready spec validates; a bad spec stops before anything starts, naming the field."""
from __future__ import annotations

import builtins
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.inputs import check_files
from jobs.spec import SPECS_DIR, JobSpec, SpecError, load_spec, parse_spec

GOOD = (SPECS_DIR / "quickstart.yaml").read_text()


@pytest.mark.parametrize("path", sorted(SPECS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_ready_specs_validate(path):
    spec = load_spec(path)
    assert spec.total_steps >= 1
    assert spec.train.batch % spec.scaling.num_workers == 0


def test_overrides_parse_yaml_values():
    spec = parse_spec(GOOD, ["train.steps=7", "scaling.num_workers=1", "model.ngf=8", "tracking.registry_model=null"])
    assert (spec.train.steps, spec.scaling.num_workers, spec.model["ngf"]) == (7, 1, 8)
    assert spec.tracking.registry_model is None
    # The spec's own values kept, the family's defaults filled in.
    assert (spec.model["nz"], spec.model["ndf"], spec.model["max_channels"]) == (64, 16, 512)


def test_kimg_when_steps_unset():
    spec = parse_spec(GOOD, ["train.steps=null", "train.kimg=3.2", "train.batch=32"])
    assert spec.total_steps == 100


@pytest.mark.parametrize("override, field, hint", [
    (["strategy.kind=horovod"], "strategy.kind", "'ddp' or 'deepspeed'"),
    (["train.batch=-4"], "train.batch", "greater than or equal to 1"),
    (["train.btach=4"], "train.btach", "unknown key"),
    (["family=gan9000"], "family", "allowed: "),
    (["model.ngf=0"], "model.ngf", "greater than 0"),
    (["model.depth=3"], "model.depth", "unknown key"),
    (["train.batch=33"], "train.batch", "divisible by scaling.num_workers"),
    (["eval.fid_extractor=inception"], "eval.inception_weights", "local file"),
    (["eval.metrics=[fid,lpips]"], "eval.metrics", "judged by fid"),
    (["eval.metrics=[]"], "eval.metrics", "an empty list"),
])
def test_bad_field_is_named(override, field, hint):
    with pytest.raises(SpecError) as err:
        parse_spec(GOOD, override)
    assert field in str(err.value) and hint in str(err.value)
    if field == "family":
        assert "dcgan" in str(err.value)


def test_a_missing_weights_file_is_named_by_the_drivers_check():
    """Validation reads no disk (the spec may run elsewhere); the driver's input check names the
    field and the path."""
    spec = parse_spec(GOOD, ["eval.fid_extractor=inception", "eval.inception_weights=/nonexistent/inception.pt"])
    with pytest.raises(SpecError) as err:
        check_files(spec)
    assert "eval.inception_weights" in str(err.value) and "/nonexistent/inception.pt" in str(err.value)


def test_validating_the_ready_specs_touches_no_disk(monkeypatch):
    texts = [p.read_text() for p in sorted(SPECS_DIR.glob("*.yaml"))]
    named = ["eval.fid_extractor=inception", "eval.inception_weights=/elsewhere/inception.pt",
             "eval.vgg_weights=/elsewhere/vgg16.pt"]
    for text in texts:
        parse_spec(text)   # imports every family once, before the disk is watched
    touched = []

    def watched(original):
        def call(*args, **kwargs):
            touched.append(str(args[0]) if args else "?")
            return original(*args, **kwargs)
        return call

    with monkeypatch.context() as m:
        for owner, name in [(Path, "is_file"), (Path, "exists"), (Path, "stat"), (Path, "open"),
                            (os.path, "isfile"), (os.path, "exists"), (os, "stat"), (builtins, "open")]:
            m.setattr(owner, name, watched(getattr(owner, name)))
        specs = [parse_spec(text) for text in texts] + [parse_spec(GOOD, named)]
    assert not touched, f"spec validation touched the disk: {touched}"
    assert len(specs) == len(texts) + 1
    assert specs[-1].eval.weight_files() == {"eval.inception_weights": "/elsewhere/inception.pt",
                                             "eval.vgg_weights": "/elsewhere/vgg16.pt"}


def test_a_worker_takes_the_checked_spec_without_the_cross_checks(monkeypatch):
    spec = parse_spec(GOOD)
    data = spec.model_dump(mode="json")
    monkeypatch.setattr(JobSpec, "make_family", lambda self: pytest.fail("a worker re-ran the cross-section checks"))
    assert JobSpec.from_checked(data) == spec
    with pytest.raises(pytest.fail.Exception):
        JobSpec.model_validate(data)   # what the driver runs: the checks, the family built


def test_eval_metrics_choose_among_the_familys():
    """Unset: every metric the family is judged by; set: those, and promotion must use one of them."""
    spec = load_spec(SPECS_DIR / "scbgan_rosetta.yaml", ["eval.metrics=null", "model.vision_aided=null"])
    assert spec.eval_metrics(spec.make_family()) == ("fid", "kid", "pr")
    spec = load_spec(SPECS_DIR / "scbgan_rosetta.yaml", ["eval.metrics=[fid]", "model.vision_aided=null"])
    assert spec.eval_metrics(spec.make_family()) == ("fid",)
    with pytest.raises(SpecError, match="tracking.promote_metric 'kid' is not computed"):
        load_spec(SPECS_DIR / "scbgan_rosetta.yaml", ["eval.metrics=[fid]", "tracking.promote_metric=kid",
                                                      "model.vision_aided=null"])


def test_several_bad_fields_stay_two_lines():
    """Which spec, then every bad field on one line: the error never grows with the spec."""
    with pytest.raises(SpecError) as err:
        parse_spec(GOOD, ["train.lr=-1", "train.batch=0", "strategy.kind=horovod"], source="s.yaml")
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and lines[0] == "s.yaml is not a valid job spec:"
    assert all(field in lines[1] for field in ("train.lr", "train.batch", "strategy.kind"))


def test_missing_section_and_not_a_mapping():
    with pytest.raises(SpecError, match="data"):
        parse_spec("name: x\nfamily: dcgan\n")
    with pytest.raises(SpecError, match="mapping"):
        parse_spec("- just\n- a list\n")


def test_cli_exit_code_2_names_the_field(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("kind: ddp", "kind: horovod"))
    cli = Path(sys.executable).parent / "orbitgen"
    out = subprocess.run([str(cli), "train", str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "strategy.kind" in out.stderr and "'ddp' or 'deepspeed'" in out.stderr
    assert "Traceback" not in out.stderr


def test_every_command_has_help():
    from click.testing import CliRunner

    from jobs.cli import main

    runner = CliRunner()
    for args in (["--help"], ["quickstart", "--help"], ["train", "--help"], ["data", "build", "--help"],
                 ["data", "inspect", "--help"], ["models", "list", "--help"], ["models", "show", "--help"],
                 ["models", "promote", "--help"], ["jobs", "submit", "--help"], ["jobs", "status", "--help"],
                 ["jobs", "logs", "--help"], ["jobs", "stop", "--help"]):
        res = runner.invoke(main, args)
        assert res.exit_code == 0 and "Usage:" in res.output, args
