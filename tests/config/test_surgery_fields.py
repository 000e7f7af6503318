"""Config fields of issue #18: grouped-query attention, q/k/v biases, norm eps, circuits that replace
the stream; each in its part (what a resume may change)."""

import pytest

from loopformer.config import ARCHITECTURE, BEHAVIOUR, load_config, part_of
from loopformer.errors import ConfigError

QUICKSTART = "configs/quickstart.yaml"


def test_parts():
    assert part_of("model.kv_heads") == part_of("model.qkv_bias") == ARCHITECTURE  # weight shapes change
    assert part_of("model.norm_eps") == part_of("model.rope_base") == BEHAVIOUR
    assert part_of("model.stages.0.circuits.X.kv_heads") == part_of("model.stages.0.circuits.X.output") == ARCHITECTURE


@pytest.mark.parametrize("overrides,message", [
    (["model.kv_heads=3"], r"model.kv_heads \(3\) must divide model.heads \(4\)"),
    (["model.stages.0.circuits.X.kv_heads=3"], r"circuits.X.kv_heads \(3\) must divide"),
    (["model.norm_eps=0"], r"model.norm_eps must be a finite number > 0"),
    (["model.stages.0.circuits.X.output=swap"], r"circuits.X.output: 'swap' is not one of residual, replace"),
    (["model.stages.0.circuits.X.output=replace"], r"output=replace: .* needs io: slice, state_norm: false"),
])
def test_bad_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(QUICKSTART, overrides)


def test_good_values():
    cfg = load_config(QUICKSTART, ["model.kv_heads=2", "model.qkv_bias=true", "model.norm_eps=1e-5",
                                   "model.stages.0.circuits.X.state_norm=false",
                                   "model.stages.0.circuits.X.output=replace"])
    assert cfg.model.kv_head_count == 2 and cfg.model.circuit("X").output == "replace"
    assert load_config("configs/plain_parity.yaml").model.stages == []


def test_a_run_written_before_these_fields_resumes(tmp_path):
    """A config.yaml without kv_heads / qkv_bias / norm_eps / output compares at their defaults."""
    import yaml

    from loopformer.runs.prepare import resume_changes

    cfg = load_config(QUICKSTART, [f"run.dir={tmp_path}", "run.name=old"])
    old = cfg.to_dict()
    for key in ("kv_heads", "qkv_bias", "norm_eps"):
        del old["model"][key]
    for c in old["model"]["stages"][0]["circuits"]:
        del c["kv_heads"], c["output"]
    (cfg.run_dir / "checkpoints" / "100").mkdir(parents=True)
    (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    assert resume_changes(cfg, cfg.run_dir) == []
