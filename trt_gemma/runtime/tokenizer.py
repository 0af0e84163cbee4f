"""Gemma's tokenizer and chat template with the `tokenizers` package only (no transformers in the core install).

The chat format is Gemma's own template (the `chat_template` in Google's tokenizer_config.json):
    <bos><start_of_turn>user\n{content | trim}<end_of_turn>\n<start_of_turn>model\n{content | trim}<end_of_turn>\n
    ... and, with add_generation_prompt, a final <start_of_turn>model\n
"assistant" is written as "model"; roles must alternate starting with the user. Gemma's template rejects a system
message; we fold it into the first user turn ("{system}\n\n{user}"), the usual convention for Gemma. The rendered
text already starts with <bos>, so encode_chat encodes it without adding another
(docs/tensorrt-llm-contract.md §6 "BOS").

Control tokens come only from templates (OpenAI's rule for its own chat format). Text (a prompt, a message's
content, a guard input, `features --text`) is encoded with special-token matching off, so "<end_of_turn>" typed
by a user is the characters "<", "end", ... and never id 107. A template is a list of parts: text (encoded as text)
and `Control` tokens (looked up by name). The text between two control tokens is encoded in one piece, as the
tokenizers package splits the whole rendered string at its special tokens, so for text without control-token
strings the ids are exactly what `tokenizer(rendered)` gives.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

from trt_gemma.errors import InputError
from trt_gemma.safe_io import read_json_object

_ROLE_NAMES = {"user": "user", "assistant": "model", "model": "model"}

# The same template as jinja, verbatim from Google's gemma-2 tokenizer_config.json: written into the tokenizers we
# train (embedded model, tests) so transformers' apply_chat_template renders what render_chat renders.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


@dataclass(frozen=True)
class Control:
    """A control token a template puts in, by its name ("<start_of_turn>")."""
    token: str


Part = Union[str, Control]


def looks_like_control(token: str) -> bool:
    """Added tokens that are control tokens although a tokenizer.json may not mark them special: Gemma 2's leaves
    <mask>, <2mass>, [@BOS@] and <unused0>..<unused98> unmarked. The rule is llama.cpp's `does_token_look_special`
    (ggml-org/llama.cpp convert_hf_to_gguf.py@a458664fc83b6513baea7adafcb0ef0626b006f8)."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _seal_controls(tok) -> frozenset[int]:
    """Mark every control token special, then switch special-token matching off for all text this tokenizer
    encodes (`encode_special_tokens`: the special tokens are then split like any other text). Returns their ids."""
    from tokenizers import AddedToken

    added = tok.get_added_tokens_decoder()
    controls = {i: t for i, t in added.items() if t.special or looks_like_control(t.content)}
    unmarked = [t for t in controls.values() if not t.special]
    if unmarked:  # re-adding an existing token keeps its id and takes the new flag
        tok.add_special_tokens([AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip,
                                           normalized=t.normalized, special=True) for t in unmarked])
    tok.encode_special_tokens = True
    return frozenset(controls)


def template_parts(template: str, controls: Sequence[str], **fields: str) -> list[Part]:
    """A trusted str.format template split at its control-token names; each text piece is filled with `fields`
    (their values stay text whatever they hold)."""
    pattern = "(" + "|".join(re.escape(c) for c in controls) + ")"
    return [Control(s) if s in controls else s.format(**fields) for s in re.split(pattern, template) if s]


def render_parts(parts: Sequence[Part]) -> str:
    """The text a template's parts stand for (for display and for comparing with other implementations)."""
    return "".join(p.token if isinstance(p, Control) else p for p in parts)


class GemmaTokenizer:
    def __init__(self, tokenizer, special: dict[str, str], source: str = "tokenizer.json"):
        self._tok = tokenizer
        self.source = source
        self.control_ids = _seal_controls(tokenizer)
        self.bos_token = special.get("bos_token") or "<bos>"
        self.eos_token = special.get("eos_token") or "<eos>"
        self.bos_id = self._require_id(self.bos_token)
        self.eos_id = self._require_id(self.eos_token)
        self.end_of_turn_id = self._tok.token_to_id("<end_of_turn>")
        self.start_of_turn_id = self._tok.token_to_id("<start_of_turn>")

    @classmethod
    def from_dir(cls, path: str | Path) -> "GemmaTokenizer":
        from tokenizers import Tokenizer

        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            hint = " (only tokenizer.model is present)" if (path / "tokenizer.model").exists() else ""
            raise InputError(f"{tj} not found{hint}",
                             fix="copy tokenizer.json from the Hugging Face model dir next to the checkpoint")
        try:
            tok = Tokenizer.from_file(str(tj))
        except Exception as e:  # the tokenizers package raises plain Exception subclasses on a bad file
            raise InputError(f"{tj} could not be read: {e}", fix="re-download tokenizer.json") from e
        return cls(tok, _special_tokens(path), source=str(tj))

    def _require_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise InputError(f"{self.source}: special token {token!r} is not in the vocabulary",
                             fix="use the tokenizer files of the model the checkpoint was converted from")
        return tid

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """<eos> and <end_of_turn>: instruction-tuned Gemma ends its turn with <end_of_turn> (checkpoint §6)."""
        ids = [self.eos_id, self.end_of_turn_id]
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Text as text: control-token strings in it are not control tokens (module docstring)."""
        return self.encode_parts([text], add_bos)

    def encode_parts(self, parts: Sequence[Part], add_bos: bool = False) -> list[int]:
        """A template's parts: each `Control` is its id, each run of text between them is encoded as text."""
        runs: list[Part] = []
        for p in parts:
            if isinstance(p, str) and runs and isinstance(runs[-1], str):
                runs[-1] += p
            elif p != "":
                runs.append(p)
        # encode_batch releases the GIL while it works (encode does not): a long prompt tokenized on a server's
        # worker thread then leaves the event loop free (measured: 0.7 s prompt, 30 ms longest loop stall vs 0.7 s)
        texts = iter(self._tok.encode_batch([p for p in runs if isinstance(p, str)], add_special_tokens=False))
        ids = [self.bos_id] if add_bos else []
        for p in runs:
            ids.extend(next(texts).ids if isinstance(p, str) else [self.control_id(p.token)])
        return ids

    def control_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None or tid not in self.control_ids:
            raise InputError(f"{self.source}: the template's control token {token!r} is not a special token of "
                             "this tokenizer", fix="use the tokenizer files of a Gemma 2 model")
        return tid

    def decode(self, ids, skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def chat_parts(self, messages: list[dict], add_generation_prompt: bool = True) -> list[Part]:
        turns = _fold_system(_check_messages(messages))
        start, end = Control("<start_of_turn>"), Control("<end_of_turn>")
        out: list[Part] = [Control(self.bos_token)]
        for i, (role, content) in enumerate(turns):
            if (role == "user") != (i % 2 == 0):
                raise InputError(f"chat message {i} has role {role!r}: roles must alternate user/assistant/user/...",
                                 fix="start with a user message (after an optional system one) and alternate")
            out += [start, f"{role}\n{content.strip()}", end, "\n"]
        if add_generation_prompt:
            out += [start, "model\n"]
        return out

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return render_parts(self.chat_parts(messages, add_generation_prompt))

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode_parts(self.chat_parts(messages, add_generation_prompt))

    def incremental_decoder(self) -> "IncrementalDecoder":
        return IncrementalDecoder(self)


def _special_tokens(path: Path) -> dict[str, str]:
    """bos/eos token names from tokenizer_config.json, then special_tokens_map.json for what it lacks; entries may
    be dicts ({"content": ...})."""
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later files win
        f = path / name
        if not f.is_file():
            continue
        d = read_json_object(f, fix=f"re-download {name}")  # capped, and never through a link out of the folder
        for k in ("bos_token", "eos_token"):
            v = d.get(k)
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str) and v:
                found[k] = v
    return found


def _check_messages(messages) -> list[tuple[str, str]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("chat messages must be a non-empty list of {role, content}", fix="pass at least one message")
    out = []
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in (*_ROLE_NAMES, "system") or not isinstance(content, str):
            raise InputError(f"chat message {i} must be {{'role': user|assistant|system, 'content': str}}, got {m!r}",
                             fix="use the roles user, assistant (or model) and system with text content")
        if role == "system" and i != 0:
            raise InputError(f"chat message {i}: a system message is only allowed first",
                             fix="move the system message to the start")
        out.append((role, content))
    return out


def _fold_system(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Gemma has no system role: prepend its text to the first user turn (alone, it becomes that user turn)."""
    if turns[0][0] != "system":
        return [(_ROLE_NAMES[r], c) for r, c in turns]
    system, rest = turns[0][1], turns[1:]
    if rest and rest[0][0] == "user":
        rest = [("user", f"{system.strip()}\n\n{rest[0][1].strip()}")] + rest[1:]
    else:
        rest = [("user", system)] + rest
    return [(_ROLE_NAMES[r], c) for r, c in rest]


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces. Decodes a short window of recent tokens and emits only text
    that is complete: a piece ending in U+FFFD (a multi-byte character split across tokens) is held back until the
    next token completes it. Decoding from an earlier offset keeps SentencePiece's leading-space handling right
    (the approach of vLLM's detokenize_incrementally)."""

    def __init__(self, tokenizer: GemmaTokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens before this index have been emitted

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        new_text = self._tok.decode(self._ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character is emitted as U+FFFD)."""
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        new_text = self._tok.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text):]
