"""Chat templating for /v1/chat/completions: messages in, prompt token ids out.

The template is `--chat-template FILE` when given, else the tokenizer's own (transformers reads the
model's chat_template.jinja, then tokenizer_config.json's `chat_template`); with neither, a chat
request is a 400 that says to pass --chat-template. Text content parts are joined into one string
per message (so templates that expect alternating roles keep working); image parts are refused, as
no served model can see them. A trailing assistant message is "response prefill": the template is
rendered without it, with the generation prompt, and its text is appended for the model to continue.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

logger = logging.getLogger("nlcli.chat_template")

NO_TEMPLATE_MESSAGE = (
    "This model has no chat template (neither chat_template.jinja nor tokenizer_config.json "
    "carries one). Restart `nl serve` with --chat-template FILE (a Jinja template), or use "
    "/v1/completions."
)


def load_chat_template(override: Optional[str], tokenizer: Any) -> Optional[str]:
    """The template text to use, or None; a missing --chat-template file fails at start-up."""
    if override:
        if not os.path.isfile(override):
            raise ValueError(f"--chat-template {override!r}: no such file (pass a Jinja template file).")
        with open(override, encoding="utf-8") as f:
            return f.read()
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: "default" is the chat one
        template = template.get("default") or next(iter(template.values()), None)
    return template or None


@dataclass
class ChatPrompt:
    text: str  # the rendered prompt, prefill included
    input_ids: list[int]
    prefill: str  # the trailing assistant text the model continues ("" when none)


def _flatten_content(role: str, content: Any) -> str:
    if content is None:
        return ""  # an assistant turn that only carries tool_calls
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            texts.append(part.get("text") or "")
        else:
            raise ValueError(f"Content parts of type {kind!r} are not supported by this server "
                             f"(only 'text'); found one in a {role!r} message.")
    return "\n".join(texts)


def to_template_messages(messages: list[dict]) -> list[dict]:
    """Reduce wire messages to what HF templates read: role, content string, tool fields."""
    out = []
    for m in messages:
        msg = {"role": m["role"], "content": _flatten_content(m["role"], m.get("content"))}
        for key in ("name", "tool_calls", "tool_call_id"):
            if m.get(key) is not None:
                msg[key] = m[key]
        out.append(msg)
    return out


class ChatTemplate:
    """Renders messages with one template; `template is None` makes every render a 400."""

    def __init__(self, tokenizer: Any, template: Optional[str]):
        self.tokenizer = tokenizer
        self.template = template

    def render(self, messages: list[dict], tools: Optional[list[dict]] = None,
               continue_final_message: Optional[bool] = None,
               template_kwargs: Optional[dict] = None) -> ChatPrompt:
        if self.template is None:
            raise ValueError(NO_TEMPLATE_MESSAGE)
        msgs = to_template_messages(messages)
        prefill = ""
        # A trailing assistant message is continued unless the client said not to.
        if msgs and msgs[-1]["role"] == "assistant" and continue_final_message is not False:
            prefill = msgs.pop()["content"]
        kwargs = dict(template_kwargs or {})
        for reserved in ("conversation", "chat_template", "tokenize", "add_generation_prompt", "tools"):
            kwargs.pop(reserved, None)
        try:
            text = self.tokenizer.apply_chat_template(
                msgs, chat_template=self.template, tools=tools, add_generation_prompt=True,
                tokenize=False, **kwargs)
        except Exception as e:  # jinja raises its own errors (e.g. "roles must alternate")
            raise ValueError(f"The chat template could not render these messages: {e}") from None
        text += prefill
        # Templates write their own special tokens (BOS included), so none are added here.
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise ValueError("The chat template rendered an empty prompt.")
        return ChatPrompt(text=text, input_ids=ids, prefill=prefill)
