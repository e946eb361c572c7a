"""Chat templates that take tools, written for these tests in the shapes Qwen2.5 (Hermes
tags) and Llama 3.1 (JSON calls, ipython results) use: tools as JSON in the system
turn, earlier calls from `message.tool_calls`, results from role "tool"."""

HERMES_TOOLS = (
    "{%- if tools %}<|im_start|>system\n"
    "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif -%}"
    "You may call functions. Signatures:\n<tools>\n"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n"
    "Answer with <tool_call>\n{\"name\": ..., \"arguments\": ...}\n</tool_call><|im_end|>\n"
    "{%- elif messages[0]['role'] == 'system' %}"
    "<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}\n<|im_start|>assistant"
    "{%- if message.content %}\n{{ message.content }}{%- endif %}"
    "{%- for call in message.tool_calls %}\n<tool_call>\n"
    "{\"name\": \"{{ call.function.name }}\", \"arguments\": {{ call.function.arguments | tojson }}}"
    "\n</tool_call>{%- endfor %}<|im_end|>"
    "{%- elif message.role == 'tool' %}\n<|im_start|>user\n<tool_response>\n{{ message.content }}"
    "\n</tool_response><|im_end|>"
    "{%- else %}\n<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}\n<|im_start|>assistant\n{%- endif %}"
)

LLAMA3_TOOLS = (
    "{{- bos_token }}"
    "{%- if tools is not none %}<|start_header_id|>system<|end_header_id|>\n\n"
    "Environment: ipython\nCall a function with {\"name\": function name, \"parameters\": "
    "arguments}.\n\n{%- for t in tools %}{{ t | tojson(indent=4) }}\n\n{%- endfor %}<|eot_id|>"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls is defined %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{%- set call = message.tool_calls[0].function %}"
    "{\"name\": \"{{ call.name }}\", \"parameters\": {{ call.arguments | tojson }}}<|eom_id|>"
    "{%- elif message.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n"
    "{{ message.content }}<|eot_id|>"
    "{%- else %}<|start_header_id|>{{ message.role }}<|end_header_id|>\n\n"
    "{{ message.content | trim }}<|eot_id|>{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{%- endif %}"
)

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city, now or in some days.",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "minLength": 1},
                                  "days": {"type": "integer", "minimum": 0, "maximum": 7},
                                  "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}

SEARCH_TOOL = {"type": "function", "function": {
    "name": "search", "description": "Search the web.",
    "parameters": {"type": "object",
                   "properties": {"query": {"type": "string"},
                                  "tags": {"type": "array", "items": {"type": "string"},
                                           "maxItems": 3}},
                   "required": ["query"]}}}

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris in 2 days?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2, "unit": "c"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
    {"role": "user", "content": "And in Lyon?"},
]

# Bounded versions for a random-weight model under a grammar: every string, array and
# number has a limit, so an output always closes within a few hundred tokens. Free
# strings are ASCII patterns: under maxLength alone a random model's byte tokens can make
# invalid UTF-8 (decoded as U+FFFD, which then counts past the length).
BOUNDED_TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string", "pattern": "^[A-Za-z ]{1,8}$"},
                                      "days": {"type": "integer", "minimum": 0, "maximum": 7},
                                      "unit": {"type": "string", "enum": ["c", "f"]}},
                       "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web.",
        "parameters": {"type": "object",
                       "properties": {"query": {"type": "string", "pattern": "^[a-z0-9 ]{0,10}$"},
                                      "tags": {"type": "array", "maxItems": 2,
                                               "items": {"type": "string", "enum": ["news", "maps"]}},
                                      "exact": {"type": "boolean"}},
                       "required": ["query", "tags", "exact"], "additionalProperties": False}}},
]
