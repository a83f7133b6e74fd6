"""The text a router sees for a request.

Chat: the last user turn, which states the task, preceded by up to CONTEXT_CHARS of the turns
before it (most recent first, each as "role: text"), so that a follow-up such as "and now in
French?" is routed with what it refers to, while a long conversation does not drown the
question being asked. Text completions: the prompt. Both are capped at MAX_CHARS (the end is
kept: that is where a prompt's question usually is). The outcome tables used for training hold
single-turn prompts, which this gives back unchanged.
"""

from __future__ import annotations

from typing import Any

CONTEXT_CHARS = 600
MAX_CHARS = 4000


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content
                         if isinstance(p, dict) and p.get("type") == "text")
    return ""


def routing_text(body: dict[str, Any]) -> str:
    """The routing text of a chat or text-completion request body (already validated)."""
    if "messages" not in body:
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt and isinstance(prompt[0], str) else ""
        return str(prompt or "")[-MAX_CHARS:]
    messages = body["messages"]
    last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last is None:
        return _text(messages[-1].get("content"))[-MAX_CHARS:]
    question = _text(messages[last].get("content"))
    context: list[str] = []
    budget = CONTEXT_CHARS
    for message in reversed(messages[:last]):
        if budget <= 0:
            break
        line = f"{message.get('role')}: {_text(message.get('content'))}"[-budget:]
        context.insert(0, line)
        budget -= len(line)
    return "\n".join([*context, question])[-MAX_CHARS:] if context else question[-MAX_CHARS:]
