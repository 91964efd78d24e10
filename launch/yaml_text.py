"""A small YAML writer for job specs (dicts, lists, strings, numbers, booleans).

The package does not depend on PyYAML (setup.py does not declare it), and the
only YAML we emit is `gcloud ai custom-jobs create --config` input built from
JSON-like data. Strings are written double-quoted with JSON escapes, which
YAML's double-quoted style reads the same way, so no value can be mistaken
for a number, boolean, null or comment.
"""

import json
import re

_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _scalar(value) -> str:
  if value is None:
    return "null"
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (int, float)):
    return repr(value)
  if isinstance(value, str):
    return json.dumps(value, ensure_ascii=False)
  raise TypeError(f"cannot write {type(value).__name__} as YAML: {value!r}")


def _key(key) -> str:
  key = str(key)
  return key if _PLAIN_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def _lines(value, indent: int):
  pad = " " * indent
  if isinstance(value, dict):
    if not value:
      yield pad + "{}"
    for key, item in value.items():
      if isinstance(item, (dict, list)) and item:
        yield f"{pad}{_key(key)}:"
        yield from _lines(item, indent + 2)
      else:
        yield f"{pad}{_key(key)}: {_inline(item)}"
  elif isinstance(value, list):
    if not value:
      yield pad + "[]"
    for item in value:
      if isinstance(item, (dict, list)) and item:
        # "- " then the item's first line; its other lines align under it.
        nested = list(_lines(item, indent + 2))
        yield f"{pad}- {nested[0].lstrip()}"
        yield from nested[1:]
      else:
        yield f"{pad}- {_inline(item)}"
  else:
    yield pad + _scalar(value)


def _inline(value) -> str:
  if isinstance(value, dict):
    return "{}"
  if isinstance(value, list):
    return "[]"
  return _scalar(value)


def dumps(value) -> str:
  """YAML text for JSON-like data (block style, keys in the given order)."""
  return "\n".join(_lines(value, 0)) + "\n"
