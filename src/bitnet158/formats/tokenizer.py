"""Tokenizer: Hugging Face `tokenizer.json` through the `tokenizers` library, no torch.

Adds what a runtime needs around `tokenizers.Tokenizer`: the BOS/EOS tokens (from
tokenizer_config.json, config.json, generation_config.json, or guessed from tokenizer.json
itself), chat templates rendered with jinja2 the way transformers renders them, and an
incremental decoder for streaming that never splits a UTF-8 character.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

from ..config import ModelConfig
from ..errors import FormatError, GenerationError

# BitNet b1.58 2B4T's chat format (its tokenizer_config.json chat_template): every turn is
# "Role: content<|eot_id|>" after one BOS, and the prompt for a reply ends "Assistant: ".
# Used when a checkpoint has no template; `eot_token` is <|eot_id|> when the vocabulary has it.
BITNET_CHAT_TEMPLATE = (
    "{%- set roles = {'system': 'System', 'user': 'User', 'assistant': 'Assistant'} -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first %}{{ bos_token }}{% endif -%}"
    "{%- if message['role'] not in roles -%}"
    "{{ raise_exception('unknown chat role ' ~ message['role']) }}"
    "{%- endif -%}"
    "{{ roles[message['role']] ~ ': ' ~ message['content'] ~ eot_token }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ 'Assistant: ' }}{% endif -%}"
)

# End-of-sequence token names, most specific first, for tokenizer.json files that come alone.
_EOS_GUESSES = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "</s>",
    "<eos>",
    "<|end|>",
)


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: must hold a JSON object")
    return data


def _template_text(value: Any) -> str | None:
    """chat_template as stored: a string, or a list of {"name", "template"} (use "default")."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {
            t.get("name"): t["template"]
            for t in value
            if isinstance(t, Mapping) and isinstance(t.get("template"), str)
            and isinstance(t.get("name"), (str, type(None)))
        }  # fmt: skip
        return named.get("default") or next(iter(named.values()), None)
    return None


def _token_of(backend: tokenizers.Tokenizer, token_id: Any) -> str | None:
    """The token of an id a config names, or None for an id outside the vocabulary (configs
    carry -1 and other ids the tokenizer does not have)."""
    size = backend.get_vocab_size(with_added_tokens=True)
    if isinstance(token_id, int) and not isinstance(token_id, bool) and 0 <= token_id < size:
        return backend.id_to_token(token_id)
    return None


def read_chat_template(directory: Path) -> str | None:
    """A checkpoint directory's chat template: chat_template.jinja (newer transformers save it
    apart), else tokenizer_config.json's `chat_template`, else None."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise FormatError(f"{jinja_file}: cannot read it as UTF-8 text ({exc})") from None
    config_file = directory / "tokenizer_config.json"
    return (
        _template_text(_read_json(config_file).get("chat_template"))
        if config_file.is_file()
        else None
    )


def _tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # As transformers: jinja's own tojson escapes HTML characters, which chat prompts must not.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


class _ChatSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """transformers' sandbox for chat templates, with `*` and `**` bounded: a template comes
    with the model file, and `'a' * 10**10` or `9**9**9` would exhaust memory or hang the
    process on every request (jinja2 documents intercepted_binops for this)."""

    intercepted_binops = frozenset(["*", "**"])
    max_result = 1_000_000  # items of a repeated string/list, bits of a power

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(left, int) and isinstance(right, int):
            if abs(left) > 1 and right * max(abs(left).bit_length(), 1) > self.max_result:
                raise jinja2.sandbox.SecurityError(f"{left} ** {right} is too large")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    if len(seq) * n > self.max_result:
                        raise jinja2.sandbox.SecurityError("a repeated sequence is too long")
        return super().call_binop(context, operator, left, right)


def compile_chat_template(template: str) -> jinja2.Template:
    """A chat template compiled as transformers compiles it, in jinja2's immutable sandbox."""
    if not isinstance(template, str):
        raise FormatError(f"the chat template is not text (got {type(template).__name__})")
    env = _ChatSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise FormatError(f"chat template line {exc.lineno}: {exc.message}") from None


class Tokenizer:
    """Text <-> token ids, special tokens, chat templates and streaming decode for one model."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
        add_bos_token: bool | None = None,
        extra_eos_ids: Iterable[int] = (),
    ) -> None:
        self.backend = tokenizer
        self.bos_token = bos_token if bos_token is not None else self._guess_bos()
        self.eos_token = eos_token if eos_token is not None else self._guess_eos()
        self.chat_template = chat_template
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        # tokenizer_config's add_bos_token, when given, says whether sequences start with BOS
        self.add_bos_token = (
            self.bos_token_id is not None if add_bos_token is None else add_bos_token
        )
        eos = [self.eos_token_id, *extra_eos_ids]
        self.eos_token_ids = list(dict.fromkeys(int(i) for i in eos if i is not None))
        self._template: jinja2.Template | None = None

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def from_json(
        cls,
        text: str,
        chat_template: str | None = None,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> Tokenizer:
        """From the text of a tokenizer.json (special tokens guessed unless given)."""
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise FormatError(f"tokenizer.json: cannot load it ({exc})") from None
        return cls(backend, bos_token=bos_token, eos_token=eos_token, chat_template=chat_template)

    @classmethod
    def for_model(
        cls, tokenizer_json: str, chat_template: str | None, config: ModelConfig, where: str = ""
    ) -> Tokenizer:
        """A model's tokenizer, with BOS/EOS taken from its config where it names them."""
        try:
            backend = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise FormatError(
                f"{where or 'tokenizer.json'}: the tokenizer cannot be loaded ({exc})"
            ) from None
        bos = _token_of(backend, config.bos_token_id)
        eos = _token_of(backend, config.eos_token_ids[0]) if config.eos_token_ids else None
        return cls(backend, bos_token=bos, eos_token=eos, chat_template=chat_template,
                   extra_eos_ids=config.eos_token_ids)  # fmt: skip

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """From a tokenizer.json file or a checkpoint directory holding one.

        In a directory, tokenizer_config.json (bos/eos tokens, add_bos_token, chat_template),
        chat_template.jinja, config.json and generation_config.json (token ids) are read too.
        """
        path = Path(path)
        directory = path if path.is_dir() else path.parent
        tok_file = directory / "tokenizer.json" if path.is_dir() else path
        if not tok_file.is_file():
            raise FormatError(f"{tok_file}: no such file (bitnet158 reads tokenizer.json)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as exc:
            raise FormatError(f"{tok_file}: cannot load it ({exc})") from None

        def optional(name: str) -> dict[str, Any]:
            return _read_json(directory / name) if (directory / name).is_file() else {}

        tok_cfg, model_cfg, gen_cfg = (
            optional("tokenizer_config.json"),
            optional("config.json"),
            optional("generation_config.json"),
        )
        template = read_chat_template(directory)

        def by_id(key: str) -> str | None:
            for cfg in (gen_cfg, model_cfg):
                value = cfg.get(key)
                value = value[0] if isinstance(value, list) and value else value
                if _token_of(backend, value) is not None:
                    return _token_of(backend, value)
            return None

        extra_eos = []
        for cfg in (model_cfg, gen_cfg):
            value = cfg.get("eos_token_id")
            extra_eos += value if isinstance(value, list) else [value] if value is not None else []
        add_bos = tok_cfg.get("add_bos_token")
        return cls(
            backend,
            bos_token=_token_text(tok_cfg.get("bos_token")) or by_id("bos_token_id"),
            eos_token=_token_text(tok_cfg.get("eos_token")) or by_id("eos_token_id"),
            chat_template=template,
            add_bos_token=add_bos if isinstance(add_bos, bool) else None,
            extra_eos_ids=[i for i in extra_eos if isinstance(i, int)],
        )

    def _special_tokens(self) -> list[str]:
        return [t.content for t in self.backend.get_added_tokens_decoder().values() if t.special]

    def _guess_bos(self) -> str | None:
        """The special token tokenizer.json's post-processor puts first, if it is a template."""
        # The post-processor alone: serializing the whole tokenizer (to_str) walks the vocabulary
        # up to its largest id, and a file with an id near 2^32 made tokenizers abort the
        # process on a 4 GiB allocation.
        processor = self.backend.post_processor
        if processor is None:
            return None
        try:
            post = json.loads(processor.__getstate__())
        except (ValueError, TypeError):
            return None
        processors = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
        for proc in processors:
            if proc.get("type") == "TemplateProcessing" and proc.get("single"):
                first = proc["single"][0]
                if "SpecialToken" in first:
                    return first["SpecialToken"]["id"]
        return None

    def _guess_eos(self) -> str | None:
        specials = set(self._special_tokens())
        return next((t for t in _EOS_GUESSES if t in specials), None)

    # --- ids and text ----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; with add_bos, start with the model's BOS (never twice).

        Special tokens written in the text (e.g. by a chat template) become their ids.
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
        bos = self.bos_token_id
        if add_bos and self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of token ids (an incomplete UTF-8 character at the end shows as U+FFFD)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # --- chat -------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The prompt text of a conversation, rendered with the model's chat template.

        Without a template, BitNet b1.58 2B4T's format is used. Extra keyword arguments are
        template variables, as in transformers.
        """
        if self._template is None:
            self._template = compile_chat_template(self.chat_template or BITNET_CHAT_TEMPLATE)
        eot = "<|eot_id|>" if self.token_to_id("<|eot_id|>") is not None else self.eos_token
        variables = {
            "tools": None,
            "documents": None,
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "eot_token": eot or "",
            **kwargs,
        }
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except Exception as exc:  # the template is the model file's code: whatever it raises
            # (raise_exception(), 1/0, a sandbox refusal, a type error) is the file's fault
            what = "" if isinstance(exc, jinja2.exceptions.TemplateError) else f"{type(exc).__name__}: "  # fmt: skip
            raise GenerationError(f"chat template: {what}{exc}") from None

    # --- streaming --------------------------------------------------------------------------

    def stream(self, ids: Iterable[int], skip_special_tokens: bool = False) -> Iterable[str]:
        """Text deltas of a stream of token ids; their concatenation is `decode(all ids)`."""
        decoder = IncrementalDecoder(self, skip_special_tokens)
        for token_id in ids:
            delta = decoder.push(token_id)
            if delta:
                yield delta
        tail = decoder.flush()
        if tail:
            yield tail


class IncrementalDecoder:
    """Turns token ids, one at a time, into text deltas that never split a UTF-8 character.

    Each step decodes a short window: the ids of the last emitted delta (so a decoder that
    strips or adds a leading space sees the context) plus the new ones. A result ending in
    U+FFFD is an incomplete UTF-8 sequence (a byte-level or byte-fallback token carrying part
    of a character): it is held back until later tokens complete it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the window
        self.read = 0  # end of what has been emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the new text, or "" while a character is incomplete."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end of the stream (it may contain U+FFFD)."""
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(before) :]
