"""The cascade: asks the fallback first, the LLM when unsure, and learns from the LLM's labels."""

from labelcascade.agent.calibration import Calibration, DevSet, choose_policy
from labelcascade.agent.cascade import Cascade, LLMProgress
from labelcascade.agent.engine_slot import EngineSlot
from labelcascade.agent.learning import Learner, Retraining
from labelcascade.agent.policy import Policy

__all__ = ["Calibration", "Cascade", "DevSet", "EngineSlot", "Learner", "LLMProgress", "Policy", "Retraining", "choose_policy"]
