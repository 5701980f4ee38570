"""Text in, text out: the byte-level tokenizer, tokenizer.json files that fit or do not fit a model, the tokenizer an
artifact carries (hashed like every file), and the command line's `--prompt` / `--text` with their bad inputs.

Artifacts here are written directly (`write_artifact` with no plans): every check happens before a compiled step
would run, so nothing is compiled. tests/test_demo_model.py compiles the demo model and generates text with it.
"""

from __future__ import annotations

import json

import pytest
import torch

from dsv4c.compiler.cli import main
from dsv4c.compiler.pipeline import CompileOptions, compile_checkpoint
from dsv4c.model.checkpoint import write_synthetic
from dsv4c.model.demo import demo_checkpoint
from dsv4c.model.presets import tiny
from dsv4c.model.tokenizer import (BYTE_BOS_ID, BYTE_EOS_ID, TOKENIZER_NAME, TokenizerError,
                                   TextStream, byte_tokenizer, decode, encode, read_tokenizer, tokenizer_json)
from dsv4c.runtime.artifact import ArtifactError, artifact_tokenizer, load_artifact, write_artifact

TEXTS = ("def parse(text):\n    return text.split()\n", "", "tab\tand\r\nCRLF", "ünïcödé → ✓ 𝔘", "<|bos")


def test_byte_tokenizer_ids_are_the_bytes_after_bos_and_decode_back():
    tokenizer = byte_tokenizer()
    for text in TEXTS:
        ids = encode(tokenizer, text)
        assert ids == [BYTE_BOS_ID, *text.encode()]
        assert decode(tokenizer, ids) == text
    assert encode(tokenizer, "a<|eos|>") == [BYTE_BOS_ID, *b"a", BYTE_EOS_ID]  # specials in text are specials
    assert decode(tokenizer, [BYTE_BOS_ID, *b"a", BYTE_EOS_ID]) == "a"


def test_a_text_stream_holds_back_unfinished_characters_and_adds_up_to_the_text():
    tokenizer = byte_tokenizer()
    for text in TEXTS:
        stream = TextStream(tokenizer)
        pieces = [stream.push([token]) for token in encode(tokenizer, text)] + [stream.flush()]
        assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces[:-1])
    stream = TextStream(tokenizer)
    assert stream.push(list("→".encode())[:2]) == "" and stream.flush() == "\ufffd"  # cut off mid-character


def test_tokenizer_json_round_trip(tmp_path):
    path = tmp_path / TOKENIZER_NAME
    path.write_text(tokenizer_json(byte_tokenizer()))
    read = read_tokenizer(path, vocab_size=BYTE_EOS_ID + 1)
    for text in TEXTS:
        assert encode(read, text) == encode(byte_tokenizer(), text)


def test_a_tokenizer_that_does_not_fit_the_vocabulary_is_refused_naming_the_file(tmp_path):
    path = tmp_path / TOKENIZER_NAME
    path.write_text(tokenizer_json(byte_tokenizer()))
    with pytest.raises(TokenizerError, match=rf"{TOKENIZER_NAME}: holds token id 257 .*vocab_size is 256"):
        read_tokenizer(path, vocab_size=256)
    path.write_text("{not json")
    with pytest.raises(TokenizerError, match=f"{TOKENIZER_NAME}: not a tokenizer.json"):
        read_tokenizer(path, vocab_size=1024)


def test_the_demo_model_ships_the_byte_tokenizer():
    assert (demo_checkpoint() / TOKENIZER_NAME).read_text() == tokenizer_json(byte_tokenizer())


# ---- artifacts and the command line ---------------------------------------------------------------------
def _artifact(path, tokenizer_text: str | None, vocab_size: int = 320):
    """An artifact without plans (enough for every check made before a step runs), with a tokenizer or none."""
    fields = {"config": {"vocab_size": vocab_size}, "numerics": {}, "targets": [], "pass_log": [], "kernels": {}}
    extra = {} if tokenizer_text is None else {TOKENIZER_NAME: tokenizer_text.encode()}
    return write_artifact(path, fields, {}, {"placeholder": torch.zeros(1)}, extra)


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_an_artifact_carries_its_tokenizer_listed_and_hashed(tmp_path):
    art = _artifact(tmp_path / "art", tokenizer_json(byte_tokenizer()))
    manifest = load_artifact(art).manifest
    assert TOKENIZER_NAME in manifest["files"]
    assert encode(artifact_tokenizer(art), "x = 1") == encode(byte_tokenizer(), "x = 1")
    assert artifact_tokenizer(_artifact(tmp_path / "bare", None)) is None


def test_a_tampered_tokenizer_is_refused(tmp_path, capsys):
    art = _artifact(tmp_path / "art", tokenizer_json(byte_tokenizer()))
    tampered = json.loads((art / TOKENIZER_NAME).read_text())
    tampered["model"]["vocab"]["d"], tampered["model"]["vocab"]["e"] = 101, 100  # swaps two bytes' ids
    (art / TOKENIZER_NAME).write_text(json.dumps(tampered, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    for read in (artifact_tokenizer, load_artifact):
        with pytest.raises(ArtifactError, match=f"'{TOKENIZER_NAME}' (has .* bytes|does not match its sha256)"):
            read(art)
    code, out, err = _run(["generate", str(art), "--prompt", "def"], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("dsv4c generate: error: artifact") and TOKENIZER_NAME in err


def test_prompt_on_an_artifact_without_a_tokenizer_is_one_line(tmp_path, capsys):
    art = _artifact(tmp_path / "art", None)
    code, out, err = _run(["generate", str(art), "--prompt", "def parse("], capsys)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"dsv4c generate: error: --prompt: {art} carries no {TOKENIZER_NAME}, so it "
                                        "cannot turn text into tokens; give token ids with --prompt-ids"]


def test_prompt_and_prompt_ids_are_one_or_the_other(tmp_path, capsys):
    art = _artifact(tmp_path / "art", None)
    code, _, err = _run(["generate", str(art), "--prompt", "x", "--prompt-ids", "1 2"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not allowed with argument" in err


def test_text_that_the_model_cannot_take_is_one_line(tmp_path, capsys):
    """A checkpoint whose tokenizer.json holds ids beyond its vocabulary: score --text and compile refuse it."""
    ckpt = write_synthetic(tiny().replace(vocab_size=200), tmp_path / "ckpt")
    (ckpt / TOKENIZER_NAME).write_text(tokenizer_json(byte_tokenizer()))
    text = tmp_path / "t.py"
    text.write_text("print('hi')\n")
    code, out, err = _run(["score", str(ckpt), "--text", str(text)], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert f"{TOKENIZER_NAME}: holds token id 257" in err and "vocab_size is 200" in err
    with pytest.raises(TokenizerError, match="vocab_size is 200"):
        compile_checkpoint(ckpt, tmp_path / "art", CompileOptions())
    assert not (tmp_path / "art").exists()
    (ckpt / TOKENIZER_NAME).unlink()
    code, _, err = _run(["score", str(ckpt), "--text", str(text)], capsys)
    assert code == 2 and err.strip().splitlines() == [f"dsv4c score: error: --text: {ckpt} carries no "
                                                      f"{TOKENIZER_NAME}, so it cannot turn text into tokens; give "
                                                      "token ids with --token-ids"]


def test_score_text_on_the_demo_checkpoint_prints_perplexity_per_byte(tmp_path, capsys):
    ckpt = demo_checkpoint()
    text = tmp_path / "t.py"
    text.write_text("import os\n\n\ndef main():\n    return os.getcwd()\n")
    code, out, err = _run(["score", str(ckpt), "--text", str(text), "--numerics", "plain", "--dtype", "fp32"], capsys)
    assert code == 0, err
    tokens, per_byte = out.strip().splitlines()
    assert tokens.startswith(f"tokens {1 + len(text.read_bytes())}  predicted {len(text.read_bytes())}")
    assert per_byte.startswith(f"text {len(text.read_bytes())} bytes  perplexity per byte ")
    assert float(per_byte.split()[-1]) == pytest.approx(float(tokens.split()[-1]), rel=1e-4)
