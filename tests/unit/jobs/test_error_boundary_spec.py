"""`strategy.deepspeed` may not switch on what makes DeepSpeed unpickle files: its universal-
checkpoint load reads with torch.load(weights_only=False), past models/safe_load.py."""
from __future__ import annotations

import pytest

from jobs.spec import SPECS_DIR, SpecError, load_spec

QS = str(SPECS_DIR / "quickstart.yaml")


@pytest.mark.parametrize("value", ["true", "1", "yes", "'latest'"])
def test_universal_checkpoint_load_is_refused_naming_the_key(value):
    with pytest.raises(SpecError, match=r"strategy\.deepspeed\.checkpoint\.load_universal is refused: .*unpickles"):
        load_spec(QS, ["strategy.kind=deepspeed", f"strategy.deepspeed={{checkpoint: {{load_universal: {value}}}}}"])


def test_harmless_deepspeed_options_still_pass():
    spec = load_spec(QS, ["strategy.kind=deepspeed", "strategy.deepspeed={checkpoint: {load_universal: false, "
                          "tag_validation: Fail}, steps_per_print: 5}"])
    assert spec.strategy.deepspeed["steps_per_print"] == 5
