"""Chat templates: how a user prompt is wrapped before the answer starts.

The answer is appended directly after ``render(prompt)`` and ends with the tokenizer's EOS token.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    system: str
    user_prefix: str
    assistant_prefix: str

    def render(self, prompt: str) -> str:
        """Text that precedes the answer for a single-turn prompt."""
        return f"{self.system}{self.user_prefix}{prompt}{self.assistant_prefix}"


_LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

TEMPLATES: dict[str, ChatTemplate] = {
    # LLaVA-1.5's training template (conv_vicuna_v1).
    "vicuna_v1": ChatTemplate("vicuna_v1", _LLAVA_SYSTEM + " ", "USER: ", " ASSISTANT:"),
    # The older template the reference generated with (conv_llava_v0), kept for fidelity experiments.
    "llava_v0": ChatTemplate("llava_v0", _LLAVA_SYSTEM, "###Human: ", "###Assistant:"),
    # The llava-hf chat template (no system prompt).
    "llava_hf": ChatTemplate("llava_hf", "", "USER: ", " ASSISTANT:"),
    # No wrapping at all (tests, plain language modelling).
    "plain": ChatTemplate("plain", "", "", "\n"),
}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; known: {sorted(TEMPLATES)}") from None
