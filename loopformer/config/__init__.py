"""Typed run configuration: `schema` (the sections, each validating itself), `load` (YAML, overrides,
differences between configs). The registered choices its fields name live in `loopformer.variants`."""

from loopformer.config.load import (
    ARCHITECTURE,
    BEHAVIOUR,
    SCHEDULE,
    SETTING,
    TASK,
    Change,
    circuit_label,
    config_changes,
    config_from_dict,
    load_config,
    parse_overrides,
    part_of,
)
from loopformer.config.schema import (
    CircuitArch,
    CircuitBehaviour,
    CircuitConfig,
    Config,
    DataConfig,
    EvalConfig,
    HaltingConfig,
    LoopSchedule,
    MeshConfig,
    MixtureEntry,
    ModelConfig,
    RouterConfig,
    RunConfig,
    StageConfig,
    TrainConfig,
    mlp_hidden,
)
from loopformer.variants.loops import LoopDistribution

__all__ = [
    "ARCHITECTURE", "BEHAVIOUR", "SCHEDULE", "SETTING", "TASK", "Change", "CircuitArch", "CircuitBehaviour",
    "CircuitConfig", "Config", "DataConfig", "EvalConfig", "HaltingConfig", "LoopDistribution", "LoopSchedule",
    "MeshConfig", "MixtureEntry", "ModelConfig", "RouterConfig", "RunConfig", "StageConfig", "TrainConfig", "circuit_label",
    "config_changes", "config_from_dict", "load_config", "mlp_hidden", "parse_overrides", "part_of",
]
