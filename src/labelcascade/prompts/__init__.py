"""Rendering a task (labels, descriptions, retrieved examples) and a text into prompts; no model code here."""

from labelcascade.prompts.render import (
    ANSWER_END,
    CONTENT_FREE,
    GEMMA_TURNS,
    ChatTurns,
    Prompt,
    PromptRenderer,
    chat_turns,
    clean_text,
    static_examples_that_fit,
)

__all__ = ["ANSWER_END", "CONTENT_FREE", "GEMMA_TURNS", "ChatTurns", "Prompt", "PromptRenderer", "chat_turns", "clean_text",
           "static_examples_that_fit"]
