"""The cascade: asks the fallback first, the LLM when unsure, and learns from the LLM's labels."""

from labelcascade.agent.cascade import Cascade

__all__ = ["Cascade"]
