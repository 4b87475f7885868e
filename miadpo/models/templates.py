"""Chat templates: how a user prompt is wrapped before the answer starts.

The answer is appended directly after ``render(prompt)`` and ends with the tokenizer's EOS token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class ChatTemplate:
    """A named single-turn chat format: system text, user and assistant prefixes, and the answer's end token."""

    name: str
    system: str
    user_prefix: str
    assistant_prefix: str
    # Token that ends an answer, when it is not the tokenizer's EOS (chat models with turn-end tokens).
    end_token: str | None = None

    def render(self, prompt: str) -> str:
        """Text that precedes the answer for a single-turn prompt."""
        return f"{self.system}{self.user_prefix}{prompt}{self.assistant_prefix}"

    def jinja(self, image_marker: str) -> str:
        """The template as a transformers chat template (``apply_chat_template``), rendering exactly what miadpo
        trains on: ``bos_token`` (when the tokenizer has one) + :meth:`render` of the user turn, each image content
        block as ``image_marker``; an assistant turn is its text + the end token (the template's, else EOS), as
        miadpo appends answers — tokenized apart from the prompt, as TRL and miadpo do; ``add_generation_prompt``
        ends with the assistant prefix. A system message is refused: the template carries its own system text."""
        def literal(text: str) -> str:
            return json.dumps(text, ensure_ascii=False)

        end = literal(self.end_token) if self.end_token else "eos_token"
        content = ("{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
                   "{%- for block in message['content'] -%}"
                   f"{{%- if block['type'] == 'image' -%}}{{{{ {literal(image_marker)} }}}}"
                   "{%- elif block['type'] == 'text' -%}{{ block['text'] }}{%- endif -%}"
                   "{%- endfor -%}{%- endif -%}")
        return (
            "{%- if bos_token -%}{{ bos_token }}{%- endif -%}"
            f"{{{{ {literal(self.system)} }}}}"
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}"
            f"{{{{ {literal(self.user_prefix)} }}}}{content}"
            "{%- elif message['role'] == 'assistant' -%}"
            f"{{{{ {literal(self.assistant_prefix)} }}}}{content}{{{{ {end} }}}}"
            "{%- else -%}"
            f"{{{{ raise_exception('the {self.name} template takes user and assistant messages only, not ' + "
            "message['role']) }}"
            "{%- endif -%}"
            "{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{ {literal(self.assistant_prefix)} }}}}{{%- endif -%}}"
        )


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
    # ChatML as Qwen2-VL / Qwen2.5-VL render a single user turn (default system prompt); answers end with <|im_end|>.
    "qwen2_vl": ChatTemplate("qwen2_vl", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
                             "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>"),
    # ChatML without a system turn (InternVL-HF, LLaVA-OneVision).
    "chatml": ChatTemplate("chatml", "", "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>"),
    # Qwen3-VL-Instruct: ChatML, no default system turn, no think block.
    "qwen3_vl": ChatTemplate("qwen3_vl", "", "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n",
                             "<|im_end|>"),
    # Qwen3.5 in non-thinking mode (enable_thinking=false): the generation prompt ends with an empty think block,
    # which is part of the prompt (never of the scored answer).
    "qwen3_5": ChatTemplate("qwen3_5", "", "<|im_start|>user\n",
                            "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", "<|im_end|>"),
    # Idefics3 / SmolVLM: "User:<prompt><end_of_utterance>\nAssistant:" after the tokenizer's BOS.
    "idefics3": ChatTemplate("idefics3", "", "User:", "<end_of_utterance>\nAssistant:", "<end_of_utterance>"),
    # InternLM-XComposer-2.5 (InternLM2 chat format, no system turn by default); answers end with [UNUSED_TOKEN_145].
    "internlm_xc25": ChatTemplate("internlm_xc25", "", "[UNUSED_TOKEN_146]user\n",
                                  "[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n", "[UNUSED_TOKEN_145]"),
    # Gemma 3 (instruction-tuned): turns of "user" and "model" after the tokenizer's BOS, no system turn by default;
    # answers end with <end_of_turn>.
    "gemma3": ChatTemplate("gemma3", "", "<start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n",
                           "<end_of_turn>"),
    # Gemma 4 (instruction-tuned, thinking off): "<|turn>user\n…<turn|>\n<|turn>model\n" after the tokenizer's BOS, no
    # system turn by default; answers end with <turn|>.
    "gemma4": ChatTemplate("gemma4", "", "<|turn>user\n", "<turn|>\n<|turn>model\n", "<turn|>"),
    # GLM-4.1V (zai-org/GLM-4.1V-9B-*): "[gMASK]<sop><|user|>\n<prompt><|assistant|>\n", no system turn by default.
    # GLM's chat template has no turn-end token: the next "<|user|>" ends an answer (one of the release's generation
    # stop ids), so answers end with it.
    "glm4_1v": ChatTemplate("glm4_1v", "[gMASK]<sop>", "<|user|>\n", "<|assistant|>\n", "<|user|>"),
    # GLM-4.5V / GLM-4.6V in non-thinking mode (enable_thinking=false): the user turn ends with "/nothink" and the
    # generation prompt with an empty think block, both in the prompt (never in the scored answer).
    "glm4_5v": ChatTemplate("glm4_5v", "[gMASK]<sop>", "<|user|>\n", "/nothink<|assistant|>\n<think></think>\n",
                            "<|user|>"),
    # No wrapping at all (tests, plain language modelling).
    "plain": ChatTemplate("plain", "", "", "\n"),
}


def get_template(name: str) -> ChatTemplate:
    """The template named ``name`` in ``TEMPLATES``; fails on an unknown name."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; known: {sorted(TEMPLATES)}") from None
