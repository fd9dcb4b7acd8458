"""Request validation for the HTTP API: JSON bodies -> checked Python values, or a RequestError.

Every message names the field and what it accepts, so a client can fix the request without reading code.
The checks here are the ones JSON adds (types, unknown fields, server limits); the pipeline and the
editing functions still run their own checks, and their ValueErrors are answered as 422 too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

# Seeds the page can carry in a URL and JavaScript can hold exactly (Number.MAX_SAFE_INTEGER).
MAX_SEED = 2**53 - 1


class RequestError(Exception):
    """A request the server refuses: HTTP status, a message naming the problem, and the field if there is one."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers

    def body(self) -> dict:
        return {"error": self.message, **({"field": self.field} if self.field else {})}


def invalid(field: str, message: str) -> RequestError:
    return RequestError(422, f"{field} {message}", field)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def integer(lo: int, hi: int) -> Callable[[str, Any], int]:
    def check(name: str, v: Any) -> int:
        if not _is_int(v) or not lo <= v <= hi:
            raise invalid(name, f"must be an integer in {lo}..{hi}, got {json.dumps(v)}")
        return v
    return check


def number(lo: float, hi: float) -> Callable[[str, Any], float]:
    def check(name: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            raise invalid(name, f"must be a number in {lo:g}..{hi:g}, got {json.dumps(v)}")
        return float(v)
    return check


def choice(options: list[str]) -> Callable[[str, Any], str]:
    def check(name: str, v: Any) -> str:
        if v not in options:
            raise invalid(name, f"must be one of {options}, got {json.dumps(v)}")
        return v
    return check


def classes(names: list[str], max_len: int) -> Callable[[str, Any], list[int]]:
    """A list of 1..max_len classes, each its index into ``names`` or its name -> the indices."""
    index = {n: i for i, n in enumerate(names)}

    def check(name: str, v: Any) -> list[int]:
        if isinstance(v, list) and 1 <= len(v) <= max_len:
            out = [x if _is_int(x) and 0 <= x < len(names) else index.get(x) if isinstance(x, str) else None for x in v]
            if None not in out:
                return out
        raise invalid(name, f"must be a list of 1..{max_len} integers in 0..{len(names) - 1} or class names "
                            f"(GET /api/info), got {json.dumps(v)[:80]}")
    return check


def one_class(names: list[str]) -> Callable[[str, Any], int]:
    """One class, its index into ``names`` or its name -> the index."""
    many = classes(names, 1)

    def check(name: str, v: Any) -> int:
        try:
            return many(name, [v])[0]
        except RequestError:
            raise invalid(name, f"must be an integer in 0..{len(names) - 1} or a class name (GET /api/info), "
                                f"got {json.dumps(v)[:80]}") from None
    return check


def text(max_len: int) -> Callable[[str, Any], str]:
    def check(name: str, v: Any) -> str:
        if not isinstance(v, str) or not v:
            raise invalid(name, f"must be a non-empty string (a base64 PNG or data: URL), got {json.dumps(v)[:40]}")
        if len(v) > max_len:
            raise invalid(name, f"is {len(v)} characters; the limit is {max_len}")
        return v
    return check


def text_list(lo: int, hi: int, max_len: int) -> Callable[[str, Any], list[str]]:
    """A list of lo..hi base64 images (``text``), each checked as ``name[i]``."""
    def check(name: str, v: Any) -> list[str]:
        if not isinstance(v, list) or not lo <= len(v) <= hi:
            got = f"{len(v)}" if isinstance(v, list) else json.dumps(v)[:40]
            raise invalid(name, f"must be a list of {lo}..{hi} images, got {got}; send each as a base64 PNG or data: URL")
        return [text(max_len)(f"{name}[{i}]", x) for i, x in enumerate(v)]
    return check


@dataclass(frozen=True)
class Field:
    """One JSON field: its check, and its default when absent or null (None: the model's default)."""

    check: Callable[[str, Any], Any]
    required: bool = False
    default: Any = None


def parse(body: Any, spec: dict[str, Field]) -> dict[str, Any]:
    """Check a decoded JSON body against ``spec``; unknown and missing fields are errors."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object with fields {sorted(spec)}, got {type(body).__name__}")
    unknown = sorted(set(body) - set(spec))
    if unknown:
        raise RequestError(422, f"unknown field {unknown[0]!r}; valid fields are {sorted(spec)}", unknown[0])
    out = {}
    for name, f in spec.items():
        value = body.get(name)
        if value is None:
            if f.required:
                raise invalid(name, "is required")
            out[name] = f.default
        else:
            out[name] = f.check(name, value)
    return out


def decode_json(raw: bytes) -> Any:
    """Bytes -> JSON value, or a 400 that says where the JSON broke."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError(400, "the body is not UTF-8 text; send JSON") from None
    except json.JSONDecodeError as e:
        raise RequestError(400, f"the body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise RequestError(400, "the body's JSON is nested too deeply") from None
    except ValueError:  # json's own limit: an integer of over 4300 digits (sys.get_int_max_str_digits)
        raise RequestError(400, "the body's JSON holds an integer with too many digits; send numbers within the "
                                "limits of GET /api/info") from None
