"""Constraints the structured-output tests share. Strings and arrays are bounded so a
random-weight model (which rarely picks a closing quote by itself) finishes within the
test checkpoint's 256 positions. Strings are bounded by `pattern`, not maxLength:
xgrammar 0.2.9 turns a maxLength string into a character class that lets control
characters through (invalid JSON), which a random model finds."""

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z]{1,6}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "pattern": "^[a-z ]{0,5}$"},
                "zip": {"type": "string", "pattern": "^[0-9]{3}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z0-9]{1,3}$"},
                 "minItems": 1, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "tags", "active"],
    "additionalProperties": False,
}

ITEMS_SCHEMA = {
    "type": "array",
    "items": {"type": "object",
              "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9},
                             "kind": {"enum": ["a", "b"]}},
              "required": ["id", "kind"], "additionalProperties": False},
    "minItems": 1, "maxItems": 3,
}

PRICE_REGEX = r"[A-Z][a-z]{2,6} \d{1,3}(\.\d{2})?"
COLORS = ["red", "green", "blue", 'say "hi"\n']
