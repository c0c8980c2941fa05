"""Checkpoints' own chat templates: finding them and rendering them as Hugging Face transformers does.

This module owns

* :class:`ChatTemplate` - a Jinja chat template plus the ``bos_token`` / ``eos_token`` it may
  refer to. :meth:`ChatTemplate.render` renders a conversation the way transformers'
  ``apply_chat_template(..., tokenize=False)`` does: an ``ImmutableSandboxedEnvironment`` with
  ``trim_blocks``, ``lstrip_blocks`` and the ``loopcontrols`` extension; the globals
  ``raise_exception``, ``strftime_now``, a restricted ``namespace`` and ``dict``; a ``tojson``
  filter that does not escape HTML or non-ASCII text; and the variables ``messages``,
  ``add_generation_prompt``, ``bos_token`` / ``eos_token`` (when set), ``tools=None``,
  ``documents=None`` and any extra keyword (``enable_thinking``, ...). A message's reasoning is
  passed under ``reasoning_content`` and ``thinking`` both, as transformers does.
* :func:`load_chat_template` - a checkpoint directory's template: ``chat_template.jinja`` wins,
  else ``chat_template`` of ``tokenizer_config.json`` (a string, or a list of ``{"name",
  "template"}`` entries: the one named "default", else the first).
* :func:`read_chat_template_file` - the file (or directory) a ``--chat-template`` flag names.
* :class:`ChatTemplateError` - every problem with a template: unreadable configuration, syntax
  errors, the template's own ``raise_exception``, sandbox violations, any other rendering failure.

Templates are compiled once per source text (a module-level cache).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import jinja2.utils

JINJA_NAME = "chat_template.jinja"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # transformers' names for a turn's reasoning


class ChatTemplateError(ValueError):
    """A chat template could not be loaded, compiled or rendered."""


class _TemplateRaised(jinja2.TemplateError):
    """What the template's own ``raise_exception(message)`` raises."""


@dataclass
class ChatTemplate:
    """A Jinja chat template and the special tokens it can refer to."""

    source: str
    bos_token: str | None = None
    eos_token: str | None = None

    def compile(self) -> jinja2.Template:
        """The compiled template (cached per source); ChatTemplateError on a syntax error."""
        return _compile(self.source)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text for ``messages`` (dicts with "role", "content", ...).

        ``extra`` becomes template variables (``enable_thinking=False``, ``tools=[...]``, ...);
        they override ``bos_token`` / ``eos_token`` as in transformers. Any failure is a
        ChatTemplateError.
        """
        template = self.compile()
        specials = {name: value for name, value in (("bos_token", self.bos_token), ("eos_token", self.eos_token))
                    if value is not None}
        context = {**specials, "tools": None, "documents": None, **_plain(extra)}
        context.update(messages=_with_reasoning_aliases(_plain(list(messages))),
                       add_generation_prompt=add_generation_prompt)
        try:
            return template.render(**context)
        except _TemplateRaised as err:
            raise ChatTemplateError(f"the chat template rejected the conversation: {err.message}") from None
        except jinja2.exceptions.SecurityError as err:
            raise ChatTemplateError(f"the chat template did something the sandbox forbids: {err}") from None
        except jinja2.TemplateError as err:
            raise ChatTemplateError(f"the chat template failed: {err}") from None
        except Exception as err:  # a template can provoke anything: TypeError, ZeroDivisionError, ...
            raise ChatTemplateError(f"the chat template failed: {type(err).__name__}: {err}") from None


# ---- the Jinja environment -------------------------------------------------------------------------
def _raise_exception(message: str) -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """JSON without Jinja's HTML escaping; non-ASCII characters kept by default."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _check_attribute_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"a chat template may not set the attribute {name!r} on a namespace")


class _Namespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore-prefixed attribute names."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's own signature, so `self=` works
        self, rest = args[0], args[1:]
        initial = dict(*rest, **kwargs)
        for name in initial:
            _check_attribute_name(name)
        jinja2.utils.Namespace.__init__(self, initial)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_attribute_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


class _DictFactory:
    """``dict(...)`` and ``dict.fromkeys(...)`` for templates, without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, keys: Any, value: Any = None) -> dict:
        return dict.fromkeys(keys, value)


@lru_cache(maxsize=1)
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace,
                       dict=_DictFactory())
    return env


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(f"chat template syntax error at line {err.lineno}: {err.message}") from None
    except jinja2.TemplateError as err:
        raise ChatTemplateError(f"chat template does not compile: {err}") from None


def _plain(value: Any) -> Any:
    """A copy made of plain JSON-like types, so the sandbox never sees a rich object's methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for kind, to_base in ((str, str.__str__), (int, int.__int__), (float, float.__float__)):
        if isinstance(value, kind):  # subclasses (enums, ...) back to the base type
            return to_base(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _with_reasoning_aliases(messages: list[Any]) -> list[Any]:
    """Messages whose reasoning (under any of transformers' names) is under all of the usual keys."""
    out = []
    for message in messages:
        if isinstance(message, dict):
            reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


# ---- finding templates -----------------------------------------------------------------------------
def _read_tokenizer_config(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when the file is absent; ChatTemplateError when it is not valid."""
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ChatTemplateError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ChatTemplateError(f"{path} must hold a JSON object, not {type(config).__name__}")
    return config


def _config_template(config: dict[str, Any], path: Path) -> str | None:
    """``chat_template`` of a tokenizer config: a string, or the "default" (else first) named entry."""
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(
            isinstance(e, dict) and isinstance(e.get("template"), str) for e in value):
        chosen = next((e for e in value if e.get("name") == "default"), value[0])
        return chosen["template"]
    raise ChatTemplateError(f"{path}: chat_template must be a string or a non-empty list of "
                            f'{{"name": ..., "template": ...}} objects, got {json.dumps(value)[:80]}')


def _config_token(config: dict[str, Any] | None, key: str, path: Path) -> str | None:
    """A special token of a tokenizer config: a string or an AddedToken-like dict with "content"."""
    value = None if config is None else config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise ChatTemplateError(f"{path}: {key} must be a string or an object with a string 'content', "
                            f"got {json.dumps(config.get(key))[:80]}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ChatTemplateError(f"{path} is not UTF-8 text: {err}") from None


def _from_config_file(path: Path, jinja_source: str | None = None) -> ChatTemplate | None:
    """The template of a tokenizer_config.json (``jinja_source`` taking precedence), None if neither has one."""
    config = _read_tokenizer_config(path)
    source = jinja_source if jinja_source is not None else (None if config is None else _config_template(config, path))
    if source is None:
        return None
    return ChatTemplate(source, _config_token(config, "bos_token", path), _config_token(config, "eos_token", path))


def load_chat_template(directory: str | Path) -> ChatTemplate | None:
    """The chat template of a checkpoint / tokenizer directory, or None if it has none.

    ``chat_template.jinja`` wins over ``chat_template`` in ``tokenizer_config.json``;
    ``bos_token`` / ``eos_token`` come from ``tokenizer_config.json``. A missing directory or
    missing files give None; a corrupt ``tokenizer_config.json`` or fields of the wrong type raise
    ChatTemplateError naming the file. The template is compiled when first rendered.
    """
    d = Path(directory)
    if not d.is_dir():
        return None
    jinja_path = d / JINJA_NAME
    jinja_source = _read_text(jinja_path) if jinja_path.is_file() else None
    return _from_config_file(d / TOKENIZER_CONFIG_NAME, jinja_source)


def read_chat_template_file(path: str | Path) -> ChatTemplate:
    """The template a ``--chat-template PATH`` flag names, compiled now so syntax errors show at load time.

    ``path`` is a Jinja file (any name not ending in .json; no special tokens: the caller fills
    them in from its tokenizer), a ``tokenizer_config.json``-style file, or a directory (as
    :func:`load_chat_template`). FileNotFoundError naming ``path`` when it does not exist;
    ChatTemplateError when it holds no template or the template does not compile.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"chat template not found: {p}")
    if p.is_dir():
        template = load_chat_template(p)
        where = f"{p} (no {JINJA_NAME}, no chat_template in {TOKENIZER_CONFIG_NAME})"
    elif p.suffix == ".json":
        template = _from_config_file(p)
        where = f"{p} (no chat_template field)"
    else:
        template = ChatTemplate(_read_text(p))
        where = str(p)
    if template is None:
        raise ChatTemplateError(f"no chat template in {where}")
    try:
        template.compile()
    except ChatTemplateError as err:
        raise ChatTemplateError(f"{p}: {err}") from None
    return template
