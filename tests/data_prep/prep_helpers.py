"""The test corpus and file-tree helpers shared by the data_prep tests (imported, not a test)."""

from __future__ import annotations

import hashlib
import json
import random

import fsspec

VOCAB = 400
SEQ_LEN = 32
WINDOWS_PER_SHARD = 16

_WORDS = (
    "the of and a to in is you that it he was for on are as with his they at be this have from or "
    "one had by word but not what all were we when your can said there use each which she do how "
    "their if will up other about out many then them these so some her would make like him into "
    "time has look two more write go see number way could people my than first water been call"
).split()

# Documents that exercise what a lossless tokenizer must keep: CRLF, tabs, runs of blank lines
# and spaces, emoji and other non-ASCII, U+2581 (sentencepiece's own space mark), a line far over
# sentencepiece's 4192-byte sentence limit, and invalid UTF-8 (replaced by U+FFFD when read).
SPECIAL_FILES: dict[str, bytes] = {
    "crlf.txt": b"first line\r\nsecond line\r\n\r\n\tindented after a blank line\r\n",
    "emoji.md": "# Titre \U0001F600\n\nna\u00efve caf\u00e9 \u2014 \u4e2d\u6587 \U0001F389\u200d\n".encode(),
    "meta.txt": "a \u2581 literal \u2581\u2581 meta mark  \u2581\n".encode(),
    "tabs.py": b"def f(x):\n\tif x:\n\t\treturn x  \t# tab then spaces\n\n\n\treturn None\n",
    "blank_runs.txt": b"\n\n\n   \n\t\n",
    "invalid.txt": b"valid start \xff\xfe then \xc3 truncated and \xe2\x82 more\n",
    "long_line.txt": ("x = [" + ", ".join(str(i) for i in range(2500)) + "]\n").encode(),
}


def _prose(rng: random.Random) -> str:
    paragraphs = []
    for _ in range(rng.randint(1, 4)):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(20, 120))]
        paragraphs.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", " \U0001F642."]))
    return "\n\n".join(paragraphs) + "\n"


def _code(rng: random.Random) -> str:
    name = rng.choice(_WORDS)
    body = [f"def {name}_{rng.randint(0, 99)}(a, b={rng.randint(0, 9)}):"]
    for _ in range(rng.randint(2, 12)):
        indent = rng.choice(["    ", "\t", "        "])
        body.append(f"{indent}{rng.choice(_WORDS)} = a * {rng.randint(0, 999)} + b  # {rng.choice(_WORDS)}")
    body.append("    return a\n")
    return "\n".join(body) + ("\n" if rng.random() < 0.5 else "\n\n\n")


def corpus_files() -> dict[str, bytes]:
    """File name -> bytes of the test corpus (about 60 KB: prose, code, the special files, JSON lines)."""
    rng = random.Random(0)
    files = dict(SPECIAL_FILES)
    for i in range(40):
        files[f"prose/{i:03d}.txt"] = _prose(rng).encode()
        files[f"code/{i:03d}.py"] = _code(rng).encode()
    records = [{"text": _prose(rng), "id": i} for i in range(10)]
    # A surrogate pair escape (one emoji) and a lone surrogate, which has no UTF-8 form.
    records += [{"text": "caf\u00e9 \ud83d\ude00 json"}, {"text": "lone \ud800 surrogate"}]
    files["lines.jsonl"] = "".join(json.dumps(r) + "\n" for r in records).encode()
    return files


def expected_documents(files: dict[str, bytes]) -> dict[str, str]:
    """sha256 hex -> text of every document the corpus ``files`` should yield.

    Plain files read with invalid UTF-8 replaced by U+FFFD; JSON texts with lone surrogates
    replaced the same way.
    """
    texts = []
    for name, data in files.items():
        if name.endswith(".jsonl"):
            for line in data.decode().splitlines():
                text = json.loads(line)["text"]
                texts.append(text.encode("utf-8", "surrogatepass").decode("utf-8", "replace"))
        else:
            texts.append(data.decode("utf-8", "replace"))
    return {hashlib.sha256(t.encode()).hexdigest(): t for t in texts if t}


def write_files(root: str, files: dict[str, bytes]) -> None:
    """Write ``files`` under the fsspec URL ``root``."""
    fs, path = fsspec.core.url_to_fs(root)
    for name, data in files.items():
        fs.makedirs(f"{path}/{name}".rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(f"{path}/{name}", data)


def read_tree(root: str) -> dict[str, bytes]:
    """Relative path -> bytes of every file under the fsspec URL ``root``."""
    fs, path = fsspec.core.url_to_fs(root)
    path = path.rstrip("/")
    return {p[len(path) + 1:]: fs.cat_file(p) for p in sorted(fs.find(path))}
