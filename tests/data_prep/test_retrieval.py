"""Retrieval jobs: document chunking, recall against exact search, same-document exclusion,
determinism, kill and resume, CPU search against the exact reference, and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep import DataPrepError
from data_prep.chunks import (
    DocumentChunker,
    EmbedConfig,
    EmbeddingsManifest,
    document_keys,
    embed_corpus,
    read_embedding_shard,
    stream_tokens,
)
from data_prep.corpus import CorpusConfig
from data_prep.embedding import HashedNgramEmbedder
import data_prep.faiss_index as faiss_index
from data_prep.faiss_index import (
    IndexConfig,
    Searcher,
    build_index,
    exact_top,
    load_index,
    recall_at,
    set_nprobe,
)
from data_prep.retrieval import NeighboursConfig, find_neighbours, search_excluding, window_chunks
from data_prep.shards import ShardsConfig, write_shards
from prep_helpers import SEQ_LEN, WINDOWS_PER_SHARD, read_tree
from slow_job import recorded, slow_command
from zarvan_dist.config import ConfigError
from zarvan_dist.data.neighbours import NeighbourReader
from zarvan_dist.data.reader import WindowReader

REPO = Path(__file__).resolve().parents[2]
M = 8  # corpus chunk length
C = 8  # window chunk length
K = 3


def _reference_chunks(stream: np.ndarray, m: int, bos: int) -> list[tuple[list[int], int]]:
    """Document-aligned chunks by a plain loop: (tokens, document ordinal)."""
    out, doc, cur = [], -1, []
    for t in stream.tolist():
        if t == bos:
            if cur:
                out.append((cur, doc))
            doc, cur = doc + 1, []
        elif len(cur) == m:
            out.append((cur, doc))
            cur = []
        cur.append(t)
    if cur:
        out.append((cur, doc))
    return out


def test_document_chunker_matches_a_plain_loop_for_any_blocks_and_resume_point():
    rng = np.random.default_rng(0)
    stream = rng.integers(2, 9, size=3000)
    stream[rng.random(3000) < 0.02] = 1
    stream[0] = 1
    want = _reference_chunks(stream, 5, 1)
    chunker = DocumentChunker(5, 1)
    got, cuts = [], np.sort(rng.choice(np.arange(1, 3000), 40, replace=False))
    for block in np.split(stream, cuts):
        got.append(chunker.feed(block))
    got.append(chunker.finish())
    rows = [(list(t[t >= 0]), int(d)) for b in got for t, d in zip(b.tokens, b.doc)]
    assert rows == want
    # a chunker started at a recorded chunk start goes on with the same chunks
    allc = [b for b in got if len(b)]
    start, doc, doc_start = (np.concatenate([b.start for b in allc]), np.concatenate([b.doc for b in allc]),
                             np.concatenate([b.doc_start for b in allc]))
    j = len(want) // 2
    resumed = DocumentChunker(5, 1, int(start[j]), int(doc[j]), int(doc_start[j]))
    parts = [resumed.feed(stream[start[j]:2000]), resumed.feed(stream[2000:]), resumed.finish()]
    assert [(list(t[t >= 0]), int(d)) for b in parts for t, d in zip(b.tokens, b.doc)] == want[j:]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer_path, corpus_dir):
    """A small dataset of three tasks (so three streams per split) with its embeddings (several shards),
    default index and neighbours."""
    root = tmp_path_factory.mktemp("retrieval")
    data = root / "data"
    write_shards(ShardsConfig(tokenizer=tokenizer_path, out=str(data), seq_len=SEQ_LEN, val_fraction=0.1,
                              windows_per_shard=WINDOWS_PER_SHARD, corpus=CorpusConfig(inputs=[str(corpus_dir)]),
                              num_tasks=3), progress=False)
    assert all(len(WindowReader(str(data)).manifest.streams(split)) == 3 for split in ("train", "val"))
    emb = embed_corpus(EmbedConfig(corpus=str(data), chunk_len=M, chunks_per_shard=700), progress=False)
    index = build_index(str(data / "retrieval"), IndexConfig(), progress=False)
    neighbours = find_neighbours(NeighboursConfig(dataset=str(data), chunk_len=C, k=K), progress=False)
    return {"data": data, "retrieval": data / "retrieval", "emb": emb, "index": index, "neighbours": neighbours}


def test_embed_covers_the_stream_in_document_chunks(built):
    reader = WindowReader(str(built["data"]))
    stream = np.concatenate(list(stream_tokens(reader, "train")))
    want = _reference_chunks(stream, M, reader.manifest.bos_id)
    root = str(built["retrieval"] / "embeddings")
    man = EmbeddingsManifest.load(root)
    assert man.chunks == len(want) and len(man.shards) > 1
    keys = document_keys(reader, "train")
    got = []
    for shard in man.shards:
        z = read_embedding_shard(root, shard, check=True)
        assert np.allclose(np.linalg.norm(z["embeddings"], axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(z["embeddings"], HashedNgramEmbedder().embed(z["tokens"]))
        np.testing.assert_array_equal(z["doc_key"], keys[z["doc"]])
        got += [(list(t[t >= 0]), int(d)) for t, d in zip(z["tokens"], z["doc"])]
    assert got == want


def test_recall_at_10_on_held_out_queries_at_default_settings(built):
    """Acceptance 1 (small corpus): val-split chunks, never indexed, against exact search."""
    assert built["index"].nlist > 1 and built["index"].kind == "ivf_flat"
    assert built["index"].recall_at_10 >= 0.9  # the job's own calibration figure
    reader = WindowReader(str(built["data"]))
    stream = np.concatenate(list(stream_tokens(reader, "val")))
    chunker = DocumentChunker(M, reader.manifest.bos_id)
    val = [chunker.feed(stream), chunker.finish()]
    queries = HashedNgramEmbedder().embed(np.concatenate([b.tokens for b in val]))
    assert len(queries) >= 100
    index, summary = load_index(str(built["retrieval"]))
    _, found = index.search(queries, 10)
    root = str(built["retrieval"] / "embeddings")
    exact_s, exact_i = exact_top(root, EmbeddingsManifest.load(root), queries, None, 40)
    recall = recall_at(found, exact_s, exact_i)
    assert recall >= 0.9, f"recall@10 {recall:.3f} at nprobe {summary['nprobe']} of {summary['nlist']}"
    # and the index is approximate: one list searched finds clearly less (the bound is not trivial)
    set_nprobe(index, 1)
    _, few = index.search(queries, 10)
    assert recall_at(few, exact_s, exact_i) < recall


def _corpus_rows(root: str) -> tuple[dict[tuple, set], np.ndarray]:
    """(chunk + continuation tokens) -> document keys of the corpus chunks with that text."""
    man = EmbeddingsManifest.load(root)
    z = [read_embedding_shard(root, s) for s in man.shards]
    tokens = np.concatenate([a["tokens"] for a in z])
    doc = np.concatenate([a["doc"] for a in z])
    keys = np.concatenate([a["doc_key"] for a in z])
    rows: dict[tuple, set] = {}
    for j in range(len(tokens)):
        cont = tokens[j + 1] if j + 1 < len(tokens) and doc[j + 1] == doc[j] else np.full(M, -1)
        rows.setdefault(tuple(tokens[j]) + tuple(cont), set()).add(int(keys[j]))
    return rows, keys


def test_no_neighbour_comes_from_the_query_chunks_own_document(built):
    """Acceptance 2: every stored neighbour is a corpus chunk (with its continuation) of another document."""
    reader = WindowReader(str(built["data"]))
    sidecar = NeighbourReader(str(built["retrieval"] / "neighbours"), dataset=str(built["data"]))
    rows, _ = _corpus_rows(str(built["retrieval"] / "embeddings"))
    bos = reader.manifest.bos_id
    checked = 0
    for split in ("train", "val"):
        keys = document_keys(reader, split)
        docs_before = 0
        stream_ends = {r.stop - 1 for r in reader.manifest.streams(split)}
        for i, (window, (ids, dist)) in enumerate(zip(reader.iter_windows(split), sidecar.iter_windows(split))):
            inputs = window[:-1].astype(np.int64)
            doc = docs_before + np.cumsum(inputs == bos) - 1
            # a stream's last token follows its last window's inputs: a BOS there starts a listed document
            docs_before += int((inputs == bos).sum()) + int(i in stream_ends and window[-1] == bos)
            assert ids.shape == (-(-SEQ_LEN // C), K, 2 * M)
            for c in range(ids.shape[0]):
                own = {int(keys[d]) for d in set(doc[c * C:(c + 1) * C].tolist())}
                for k in range(K):
                    if ids[c, k, 0] < 0:
                        assert np.isinf(dist[c, k])
                        continue
                    found = rows[tuple(ids[c, k].tolist())]
                    assert found - own, f"{split} window chunk {c}: neighbour {k} only exists in the query's document"
                    checked += 1
            assert np.all(np.diff(dist, axis=1) >= -1e-6)  # nearest first
            assert np.isfinite(dist).all()  # K found for every chunk (the corpus has other documents)
    assert checked > 1000


def test_train_chunks_would_find_themselves_without_the_exclusion(built):
    """The exclusion is what keeps a train chunk from retrieving itself (so the check above can fail)."""
    index, _ = load_index(str(built["retrieval"]))
    reader = WindowReader(str(built["data"]))
    window = next(reader.iter_windows("train", 3))[:-1].astype(np.int64)
    queries = HashedNgramEmbedder().embed(window_chunks(window[None], C)[0])
    _, keys = _corpus_rows(str(built["retrieval"] / "embeddings"))
    _, plain = index.search(queries, 1)
    doc_keys = document_keys(reader, "train")
    docs = np.cumsum(np.concatenate(list(stream_tokens(reader, "train")))[:4 * SEQ_LEN] == 1) - 1
    own = doc_keys[docs[3 * SEQ_LEN:4 * SEQ_LEN]]
    assert np.isin(keys[plain[:, 0]], own).any()
    excluded = own.reshape(-1, C)
    ids, _ = search_excluding(Searcher(index), queries, excluded, keys, K)
    assert not np.isin(keys[ids], own).any()


def test_faiss_search_matches_the_exact_reference_up_to_ties(built):
    """Acceptance 4 (CPU): the FAISS path (searching every list) and an exact numpy search give the same
    neighbours; where they differ the scores tie. A GPU index (faiss-gpu) is searched by the same code."""
    index, _ = load_index(str(built["retrieval"]))
    set_nprobe(index, index.nlist)
    root = str(built["retrieval"] / "embeddings")
    man = EmbeddingsManifest.load(root)
    rng = np.random.default_rng(1)
    queries = HashedNgramEmbedder().embed(rng.integers(4, 400, size=(200, C)))
    sims, ids = index.search(queries, 10)
    exact_s, exact_i = exact_top(root, man, queries, None, 10)
    np.testing.assert_allclose(sims, exact_s, atol=1e-5)
    differ = ids != exact_i
    assert differ.mean() < 0.5
    # a differing id has exactly the score the reference has at that rank: a tie
    x = np.concatenate([read_embedding_shard(root, s)["embeddings"] for s in man.shards])
    own = np.einsum("qd,qkd->qk", queries, x[ids])
    np.testing.assert_allclose(own[differ], exact_s[differ], atol=1e-5)


def _replicas(index, calls: list[int] | None = None, limit: int | None = None):
    """Two CPU copies of ``index`` behind a FAISS IndexReplicas: what index_cpu_to_all_gpus makes of it
    on a two-GPU machine, with the same nprobe plumbing (ParameterSpace reaching into the replicas).
    With ``calls``, each search's k is appended to it, and one past ``limit`` (k, or the copies' nprobe)
    fails as faiss-gpu would."""
    import faiss

    class Device(faiss.IndexReplicas):
        def search(self, x, k, **kwargs):
            if calls is not None:
                calls.append(k)
            nprobe = faiss.downcast_index(self.at(0)).nprobe
            if limit is not None and max(k, nprobe) > limit:
                raise RuntimeError(f"k {k} or nprobe {nprobe} past the device's limit {limit}")
            return super().search(x, k, **kwargs)

    replicas = Device()
    for copy in (faiss.clone_index(index) for _ in range(2)):
        set_nprobe(copy, 1)  # a GPU copy is made at another nprobe: the searcher must set it
        replicas.addIndex(copy)
    return replicas


class RecordingSearcher(Searcher):
    """A Searcher that records the k of every search asked of it."""

    asked: list[int]

    def search(self, queries, k):
        self.asked.append(k)
        return super().search(queries, k)


def test_a_device_searcher_sets_nprobe_inside_the_copies_and_finds_the_cpu_neighbours(built):
    """Acceptance 4 (the device path, on CPU): nprobe reaches every replica, searches within the device's
    k / nprobe limit run there and wider ones on the CPU form, and the neighbours equal the CPU searcher's."""
    import faiss

    index, summary = load_index(str(built["retrieval"]))
    _, keys = _corpus_rows(str(built["retrieval"] / "embeddings"))
    reader = WindowReader(str(built["data"]))
    windows = np.stack([w[:-1] for _, w in zip(range(6), reader.iter_windows("train", 0))]).astype(np.int64)
    queries = HashedNgramEmbedder().embed(window_chunks(windows, C).reshape(-1, C))
    # the documents of each query's first K + 16 results are excluded: every search must widen past them,
    # the first on the 'device', the wider ones on the CPU form
    _, first = index.search(queries, K + 16)
    excluded = keys[first]
    want = search_excluding(Searcher(index), queries, excluded, keys, K)
    limit, on_device = K + 16, []
    replicas = _replicas(index, on_device, limit)
    device = RecordingSearcher(index, "cpu", device_index=replicas, max_k=limit)
    device.asked = []
    inner = [faiss.downcast_index(replicas.at(i)).nprobe for i in range(replicas.count())]
    assert inner == [summary["nprobe"]] * 2 and summary["nprobe"] > 1
    got = search_excluding(device, queries, excluded, keys, K)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert on_device == [k for k in device.asked if k <= limit] and on_device  # the device took what it could
    assert max(device.asked) > limit  # and the CPU form the rest
    device.set_nprobe(index.nlist)  # past the limit: the CPU form searches every list, the copies stay capped
    assert faiss.downcast_index(replicas.at(0)).nprobe == limit and index.nprobe == index.nlist
    calls = len(on_device)
    device.search(queries, K)
    assert len(on_device) == calls


def test_the_neighbours_job_on_a_stand_in_device_writes_the_cpu_files(built, tmp_path, monkeypatch):
    """The neighbours job with its search on 'GPUs' (CPU replicas standing in) writes the CPU run's bytes."""
    import data_prep.retrieval as retrieval

    monkeypatch.setattr(retrieval, "resolve_device", lambda device: "cuda")
    calls = []
    monkeypatch.setattr(faiss_index, "to_device", lambda index, device: _replicas(index, calls, 2048))
    out = tmp_path / "nb"
    result = find_neighbours(NeighboursConfig(dataset=str(built["data"]), retrieval=str(built["retrieval"]),
                                              out=str(out), chunk_len=C, k=K), progress=False)
    assert result["device"] == "cuda" and calls
    assert read_tree(out) == read_tree(built["retrieval"] / "neighbours")


def _gpus() -> int:
    try:
        import faiss
    except ImportError:
        return 0
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


@pytest.mark.skipif(_gpus() == 0, reason="needs faiss-gpu and a CUDA device")
def test_gpu_and_cpu_neighbours_agree_up_to_ties(built, tmp_path):
    """Acceptance 4 on a GPU: the neighbours job on cuda finds the CPU job's neighbours; where the ids
    differ, the distances tie."""
    runs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        find_neighbours(NeighboursConfig(dataset=str(built["data"]), retrieval=str(built["retrieval"]), out=str(out),
                                         chunk_len=C, k=K, device=device), progress=False)
        runs[device] = NeighbourReader(str(out), dataset=str(built["data"]))
    for split in ("train", "val"):
        for (ids_c, dist_c), (ids_g, dist_g) in zip(runs["cpu"].iter_windows(split), runs["cuda"].iter_windows(split)):
            np.testing.assert_allclose(dist_g, dist_c, atol=1e-4)
            differ = (ids_g != ids_c).any(-1)
            assert differ.mean() < 0.1


def _run(args: list[str], tmp_path: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep", "retrieval", *args, "--quiet"], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True,
                          timeout=300)


def test_same_inputs_give_identical_files(built, tmp_path):
    """Acceptance 3: embeddings, index and neighbour shards are byte-identical on a second run."""
    data = str(built["data"])
    again = tmp_path / "again"
    embed_corpus(EmbedConfig(corpus=data, out=str(again / "embeddings"), chunk_len=M, chunks_per_shard=700),
                 progress=False)
    assert read_tree(again / "embeddings") == read_tree(built["retrieval"] / "embeddings")
    build_index(str(again), IndexConfig(), progress=False)
    first = json.loads((built["retrieval"] / "index" / "index.json").read_text())
    second = json.loads((again / "index" / "index.json").read_text())
    assert first["index_sha256"] == second["index_sha256"]
    find_neighbours(NeighboursConfig(dataset=data, retrieval=str(built["retrieval"]), out=str(again / "nb"),
                                     chunk_len=C, k=K), progress=False)
    assert read_tree(again / "nb") == read_tree(built["retrieval"] / "neighbours")


def _kill_after_first_shard(cmd: list[str], journal: Path, tmp_path: Path) -> None:
    # the job sleeps 30 s after each journaled shard (or part): the kill lands after the first
    proc = subprocess.Popen(slow_command(30, ["retrieval", *cmd, "--quiet"]), cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if journal.exists() and recorded(json.loads(journal.read_text())):
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_killed_jobs_resume_to_the_same_bytes(built, tmp_path):
    """Acceptance 3: embed, index and neighbours each SIGKILLed after their first shard (or index part),
    run again, end identical to the uninterrupted run."""
    data = str(built["data"])
    out = tmp_path / "r"
    embed = ["embed", data, "--out", str(out / "embeddings"), "--chunk-len", str(M), "--chunks-per-shard", "700"]
    _kill_after_first_shard(embed, out / "embeddings" / "progress.json", tmp_path)
    assert not (out / "embeddings" / "embeddings.json").exists()
    res = _run(embed, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "1 of" in res.stdout  # one shard kept from the killed run
    assert read_tree(out / "embeddings") == read_tree(built["retrieval"] / "embeddings")

    index = ["index", str(out)]
    _kill_after_first_shard(index, out / "index" / "progress.json", tmp_path)
    assert not (out / "index" / "index.json").exists()
    kept = {f: (out / "index" / f).stat().st_mtime_ns for f in ("trained.faiss", "parts/part-000000.faiss")}
    res = _run(index, tmp_path)
    assert res.returncode == 0, res.stderr
    assert {f: (out / "index" / f).stat().st_mtime_ns for f in kept} == kept  # not trained or added again
    assert json.loads((out / "index" / "index.json").read_text())["index_sha256"] == built["index"].index_sha256

    nb = ["neighbours", data, "--retrieval", str(built["retrieval"]), "--out", str(out / "nb"),
          "--chunk-len", str(C), "--k", str(K)]
    _kill_after_first_shard(nb, out / "nb" / "progress.json", tmp_path)
    assert not (out / "nb" / "neighbours.json").exists()
    res = _run(nb, tmp_path)
    assert res.returncode == 0, res.stderr
    assert read_tree(out / "nb") == read_tree(built["retrieval"] / "neighbours")


INDEX_CONFIGS = sorted((REPO / "configs" / "retrieval").glob("*.yaml"))


def _copy_embeddings(built, out: Path) -> None:
    (out / "embeddings").mkdir(parents=True)
    for f in (built["retrieval"] / "embeddings").iterdir():
        (out / "embeddings" / f.name).write_bytes(f.read_bytes())


@pytest.mark.parametrize("path", INDEX_CONFIGS, ids=lambda p: p.stem)
def test_index_configs_parse_and_build(built, tmp_path, path):
    assert INDEX_CONFIGS
    cfg = IndexConfig.from_file(str(path))
    _copy_embeddings(built, tmp_path)
    s = build_index(str(tmp_path), cfg, progress=False)
    assert s.ntotal == built["emb"]["chunks"] and s.kind == cfg.kind
    assert s.recall_at_10 >= cfg.target_recall or s.nprobe == s.nlist
    index, _ = load_index(str(tmp_path))
    _, ids = index.search(HashedNgramEmbedder().embed(np.array([[5, 6, 7, 8]])), 5)
    assert (ids >= 0).all()


def test_flat_index_is_exact(built, tmp_path):
    _copy_embeddings(built, tmp_path)
    s = build_index(str(tmp_path), IndexConfig(kind="flat"), progress=False)
    assert s.ntotal == built["emb"]["chunks"] and s.nprobe is None
    assert s.recall_at_10 == pytest.approx(1.0)


def test_cli_help_and_clear_errors(built, tmp_path):
    for job in ("embed", "index", "neighbours"):
        res = subprocess.run([sys.executable, "-m", "data_prep", "retrieval", job, "--help"], cwd=REPO,
                             capture_output=True, text=True)
        assert res.returncode == 0 and "usage" in res.stdout
    res = _run(["index", str(tmp_path / "nothing")], tmp_path)
    assert res.returncode == 1 and "embeddings.json" in res.stderr and "retrieval embed" in res.stderr
    res = _run(["neighbours", str(built["data"]), "--retrieval", str(tmp_path / "nothing")], tmp_path)
    assert res.returncode == 1 and "nothing" in res.stderr
    res = _run(["embed", str(built["data"]), "--embedder", "bogus"], tmp_path)
    assert res.returncode == 1 and "--embedder" in res.stderr
    with pytest.raises(ConfigError, match="target_recall"):
        IndexConfig(target_recall=1.5)
    # another configuration in an existing output is refused, and nothing is lost
    with pytest.raises(DataPrepError, match="--overwrite"):
        find_neighbours(NeighboursConfig(dataset=str(built["data"]), chunk_len=C, k=K + 1), progress=False)
    assert (built["retrieval"] / "neighbours" / "neighbours.json").exists()


def test_index_job_resumes_from_its_trained_index_and_parts(built, tmp_path):
    """Acceptance 3 for the index job: a run cut short (no merged index, its last part lost) is finished by
    the next run from the saved trained index and intact parts, and ends with the same index."""
    _copy_embeddings(built, tmp_path)
    first = build_index(str(tmp_path), IndexConfig(), progress=False)
    index_dir = tmp_path / "index"
    parts = sorted((index_dir / "parts").iterdir())
    assert len(parts) == len(EmbeddingsManifest.load(str(tmp_path / "embeddings")).shards) > 1
    trained_mtime = (index_dir / "trained.faiss").stat().st_mtime_ns
    kept_mtime = parts[0].stat().st_mtime_ns
    for f in (index_dir / "index.faiss", index_dir / "index.json", parts[-1]):
        f.unlink()
    again = build_index(str(tmp_path), IndexConfig(), progress=False)
    assert again.index_sha256 == first.index_sha256 == built["index"].index_sha256
    assert (index_dir / "trained.faiss").stat().st_mtime_ns == trained_mtime  # not trained again
    assert parts[0].stat().st_mtime_ns == kept_mtime  # intact parts kept
    assert parts[-1].exists()
