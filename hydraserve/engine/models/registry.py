"""Architecture -> stage module class."""
from __future__ import annotations

from hydraserve.engine.config import Arch
from hydraserve.engine.models.base import StageModel
from hydraserve.engine.models.falcon import FalconStage
from hydraserve.engine.models.llama import LlamaStage
from hydraserve.engine.models.opt import OPTStage

STAGE_CLASSES: dict[Arch, type[StageModel]] = {
    Arch.LLAMA: LlamaStage,
    Arch.MISTRAL: LlamaStage,
    Arch.QWEN2: LlamaStage,
    Arch.OPT: OPTStage,
    Arch.FALCON: FalconStage,
}
