"""The ``inspect`` job: a dataset's totals, and one window decoded back to text."""

from __future__ import annotations

import numpy as np

from data_prep import DataPrepError
from zarvan_dist.data.manifest import SPLITS
from zarvan_dist.data.reader import WindowReader
from zarvan_dist.tokenizer import check_tokenizer, load_tokenizer


def describe_dataset(reader: WindowReader) -> str:
    """Manifest totals as text: format, tokenizer, per-split counts, corpus stats."""
    m = reader.manifest
    lines = [
        f"dataset     {reader.root}",
        f"format      version {m.version}" + (f", {m.tasks} task(s), a CRC-32 per window" if m.has_crc else ""),
        f"seq_len     {m.seq_len} (windows of {m.seq_len + 1} tokens, consecutive windows share one)",
        f"vocab       {m.vocab_size} ({m.dtype}); bos {m.bos_id} eos {m.eos_id} pad {m.pad_id} unk {m.unk_id}",
        f"tokenizer   {m.tokenizer.path} sha256 {m.tokenizer.sha256[:16]}... (from {m.tokenizer.source})",
        f"{'split':<8}{'documents':>12}{'tokens':>16}{'windows':>12}{'shards':>8}{'tail':>8}",
    ]
    for name in SPLITS:
        s = m.split(name)
        lines.append(f"{name:<8}{s.documents:>12,}{s.tokens:>16,}{s.windows:>12,}{len(s.shards):>8}{s.tail_tokens:>8}")
    c = m.corpus
    lines.append(f"corpus      {c.get('description', '')}")
    lines.append(
        f"            {c.get('files', 0)} files, {c.get('documents', 0)} documents; skipped {c.get('skipped', {})}; "
        f"{c.get('undecodable_sequences', 0)} undecodable byte sequences replaced in "
        f"{c.get('undecodable_documents', 0)} documents"
    )
    return "\n".join(lines)


def show_window(reader: WindowReader, split: str, window: int, ids: bool = False) -> str:
    """Window ``window`` of ``split``: where it lives, its text with ``<s>`` at each BOS, and its ids
    when ``ids`` is set."""
    m = reader.manifest
    if not 0 <= window < m.split(split).windows:
        raise DataPrepError(f"window {window} out of range: split {split} has {m.split(split).windows} windows")
    tokenizer = load_tokenizer(reader.url(m.tokenizer.path))
    check_tokenizer(tokenizer, m.vocab_size, m, reader.root)
    sp = tokenizer.processor
    shard, offset = m.locate(split, window)
    tokens = reader.read(split, window)
    text = []
    for segment in np.split(tokens, np.flatnonzero(tokens == m.bos_id)):
        if len(segment) and segment[0] == m.bos_id:
            text.append(sp.id_to_piece(m.bos_id))
            segment = segment[1:]
        text.append(sp.decode(segment.tolist()))
    lines = [f"window {window} of {split}: {shard.path} sample {offset}, {len(tokens)} tokens, "
             f"{int((tokens == m.bos_id).sum())} document starts"]
    if ids:
        lines.append(f"ids {tokens.tolist()}")
    lines.append("".join(text))
    return "\n".join(lines)
