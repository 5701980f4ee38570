"""Text <-> token ids through a `tokenizer.json` (Hugging Face `tokenizers`), as DeepSeek's release ships one.

A checkpoint or artifact folder may hold a `tokenizer.json` beside its config. `read_tokenizer` loads one and
checks it fits the model: every id it can produce must be below `vocab_size`. The demo model's tokenizer is
byte-level (`byte_tokenizer`): ids 0..255 are the bytes themselves, then `<|bos|>` (256) and `<|eos|>` (257);
encoding prepends `<|bos|>`, and a special's text inside the input is that special, as in DeepSeek's tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

TOKENIZER_NAME = "tokenizer.json"
BOS, EOS = "<|bos|>", "<|eos|>"
BYTE_TOKENS = 256
BYTE_BOS_ID, BYTE_EOS_ID = BYTE_TOKENS, BYTE_TOKENS + 1


class TokenizerError(ValueError):
    """A tokenizer.json that cannot be read, or that does not fit the model; the message names the file."""


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte value (what the ByteLevel pre-tokenizer maps byte b to)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(BYTE_TOKENS):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(BYTE_TOKENS + extra)
            extra += 1
    return [chars[byte] for byte in range(BYTE_TOKENS)]


def byte_tokenizer() -> Tokenizer:
    """The byte-level tokenizer: token id b is byte b (0..255), then `<|bos|>` 256 and `<|eos|>` 257;
    `encode` prepends `<|bos|>`; decoding skips the specials and joins the bytes as UTF-8."""
    vocab = {char: byte for byte, char in enumerate(_byte_chars())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(BOS, special=True), AddedToken(EOS, special=True)])
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, BYTE_BOS_ID)])
    if (tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)) != (BYTE_BOS_ID, BYTE_EOS_ID):
        raise AssertionError("byte tokenizer: the specials did not land right after the 256 bytes")
    return tokenizer


def read_tokenizer(path: str | Path, vocab_size: int) -> Tokenizer:
    """The tokenizer in `path` (a tokenizer.json), refused with a TokenizerError naming the file when it is not
    one `tokenizers` can read or when it holds ids at or above the model's `vocab_size`."""
    path = Path(path)
    try:
        tokenizer = Tokenizer.from_str(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{path}: cannot read ({err})") from None
    except Exception as err:  # tokenizers raises its own Exception subclass for a malformed file
        raise TokenizerError(f"{path}: not a tokenizer.json the tokenizers library can read ({err})") from None
    largest = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    if largest >= vocab_size:
        raise TokenizerError(f"{path}: holds token id {largest} ({tokenizer.id_to_token(largest)!r}); the model's "
                             f"vocab_size is {vocab_size}, so ids must lie in [0, {vocab_size})")
    return tokenizer


def folder_tokenizer(folder: str | Path, vocab_size: int) -> Tokenizer | None:
    """The tokenizer.json in a checkpoint `folder` (read and checked by `read_tokenizer`), or None without one."""
    path = Path(folder) / TOKENIZER_NAME
    return read_tokenizer(path, vocab_size) if path.is_file() else None


def tokenizer_json(tokenizer: Tokenizer) -> str:
    """The tokenizer as the text of a tokenizer.json (stable: keys sorted, two-space indent)."""
    return json.dumps(json.loads(tokenizer.to_str()), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids of `text`, with the tokenizer's own specials (the byte tokenizer's leading `<|bos|>`)."""
    return tokenizer.encode(text).ids


def decode(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """The text of `ids`, special tokens left out."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)


class TextStream:
    """Text as token ids arrive, for streaming output: `push(ids)` returns the text the new ids add, holding back
    a trailing U+FFFD (a multi-byte UTF-8 character whose bytes have not all come yet) until it completes;
    `flush()` returns whatever is held back. The concatenated pieces equal `decode` of all the ids."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer, self._ids, self._shown = tokenizer, [], 0

    def push(self, ids: Sequence[int]) -> str:
        self._ids.extend(ids)
        stable = decode(self._tokenizer, self._ids).rstrip("\ufffd")
        piece, self._shown = stable[self._shown:], max(self._shown, len(stable))
        return piece

    def flush(self) -> str:
        text = decode(self._tokenizer, self._ids)
        piece, self._shown = text[self._shown:], len(text)
        return piece
