"""Tool calls as OpenAI streams them, from a parser re-reading the text so far.

Per choice: content deltas while the text is plain content (held back where a call
might be starting), then per call a first delta with its index, id, type and name, then
its arguments in fragments. `finish()` sends whatever the final parse adds, so the
concatenated deltas equal the non-streaming answer on the same text."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Optional

from fastllm.serve.tool_parsers.base import ParsedOutput, ToolParser


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class CallFragment:
    """One call's piece of a delta: id/name only on its first fragment."""
    index: int
    arguments: str
    id: Optional[str] = None
    name: Optional[str] = None


@dataclass
class StreamDelta:
    content: str = ""
    calls: list = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.calls)


class ToolCallStreamer:
    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.text = ""
        self.content_sent = 0
        self.ids: list[str] = []              # per call whose first fragment went out
        self.arguments_sent: list[int] = []
        self.final: Optional[ParsedOutput] = None

    def feed(self, text: str) -> StreamDelta:
        """The delta that `text` (newly generated) lets out."""
        self.text += text
        return self._delta(self.parser.parse(self.text, final=False))

    def finish(self) -> StreamDelta:
        """The rest, once the text is complete; self.final is then the parse."""
        self.final = self.parser.parse(self.text, final=True)
        return self._delta(self.final)

    def _delta(self, parsed: ParsedOutput) -> StreamDelta:
        delta = StreamDelta()
        if parsed.content.startswith(self.text[:self.content_sent]):
            delta.content = parsed.content[self.content_sent:]
            self.content_sent = max(self.content_sent, len(parsed.content))
        for index, call in enumerate(parsed.calls):
            if index == len(self.ids):
                if call.name is None:
                    break                      # a later call cannot go before this one
                self.ids.append(new_call_id())
                self.arguments_sent.append(0)
                delta.calls.append(CallFragment(index, "", self.ids[index], call.name))
            fresh = call.arguments[self.arguments_sent[index]:]
            if fresh:
                self.arguments_sent[index] = len(call.arguments)
                delta.calls.append(CallFragment(index, fresh))
        return delta
