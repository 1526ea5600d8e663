"""``python -m pretrain.export --format hf``: a transformers directory with the source's logits, greedy
``generate()`` tokens and tokenizer, for every arch; bad input is a clear error."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from data_prep.corpus import CorpusConfig  # noqa: E402
from data_prep.tokenizer import TokenizerConfig, train_tokenizer  # noqa: E402
from zarvan_dist.tokenizer import Tokenizer, encode_documents, load_tokenizer  # noqa: E402
from pretrain.export import main  # noqa: E402
from pretrain.generate import main as generate_main  # noqa: E402
from pretrain.train import Trainer  # noqa: E402
from run_helpers import ROOT, SEQ_LEN, run_config, trainer_env  # noqa: E402
from token_data import random_documents, write_token_dataset  # noqa: E402
from zarvan_dist.generation import generate  # noqa: E402
from zarvan_dist.hf import CACHE_KEY, ZarvanDistForCausalLM, register, write_hf  # noqa: E402
from zarvan_dist.models import ARCHS, build_model  # noqa: E402
from zarvan_dist.training.checkpoint import open_checkpoint  # noqa: E402
from zarvan_dist.training.config import load_run_config  # noqa: E402

VOCAB = 300  # a sentencepiece model with byte fallback has at least 260 pieces
# what a lossless tokenizer must give back: newlines, leading and repeated spaces, tabs, CRLF, non-ASCII,
# sentencepiece's own space mark U+2581 and text that looks like special tokens
TEXTS = ["plain words and more words", "  leading spaces,\ttabs\n\nand blank lines\n", "line\r\nCRLF\r\n",
         "trailing   ", "\n", " ", "caf\u00e9 \u4e2d\u6587 \U0001F600", "\u2581 literal \u2581\u2581 mark \u2581",
         "<s>looks</s> like <unk><pad> specials", ""]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register()


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> Tokenizer:
    """A sentencepiece model of VOCAB pieces trained the project's way on a little prose and code."""
    root = tmp_path_factory.mktemp("tok")
    rng = np.random.default_rng(0)
    words = "the of and a to in is you that it was for on are as with his they at be this have from".split()
    (root / "corpus").mkdir()
    for i in range(30):
        prose = " ".join(rng.choice(words, 60)) + ".\n\n"
        code = f"def f_{i}(a, b):\n    return a * {i} + b  # {rng.choice(words)}\n\tpass\n"
        (root / "corpus" / f"{i}.txt").write_text(prose + code)
    out = root / "tokenizer.model"
    train_tokenizer(TokenizerConfig(out=str(out), vocab_size=VOCAB, threads=1,
                                    corpus=CorpusConfig(inputs=[str(root / "corpus")])), progress=False)
    return load_tokenizer(str(out))


@pytest.fixture(scope="module")
def trained_run(tokenizer_model, tmp_path_factory):
    """A two-step zarvan run on random BOS-led documents whose dataset carries a real tokenizer."""
    tmp = tmp_path_factory.mktemp("export_hf")
    data = tmp / "data"
    rng = np.random.default_rng(0)
    write_token_dataset(data, {"train": random_documents(rng, 20, VOCAB, 20, 80),
                               "val": random_documents(rng, 4, VOCAB, 20, 40)}, SEQ_LEN, VOCAB, 10,
                        tokenizer=tokenizer_model.data)
    config = run_config(tmp, data, model={"vocab_size": VOCAB}, train={"steps": 2, "grad_accum": 1},
                        checkpoint={"every": 2, "keep": 1}, eval={"every": 2, "rows": 2, "steps": 1},
                        logging={"every": 1, "tensorboard": False, "progress": False})
    assert Trainer(load_run_config(config)).fit() == 0
    return tmp / "run"


@pytest.fixture
def tiny_export(tiny_config, tmp_path):
    """``tiny_export(arch, **overrides)``: a freshly initialised tiny model and its transformers directory."""
    def make(arch: str, **overrides):
        model = build_model(tiny_config(arch, **overrides)).eval()
        out = tmp_path / f"hf-{arch}"
        write_hf(model, out)
        return model, out
    return make


def counting_forward(hf: ZarvanDistForCausalLM) -> list[int]:
    """The lengths of the windows the wrapped model reads, appended as it reads them."""
    lengths, forward = [], hf.model.forward
    hf.model.forward = lambda ids, *args: (lengths.append(ids.shape[1]), forward(ids, *args))[1]
    return lengths


@pytest.mark.parametrize("arch", [*ARCHS, "zarvan-tied"])
def test_hf_export_round_trips_the_logits(arch, tiny_export, one_thread):
    arch, tied = arch.removesuffix("-tied"), arch.endswith("-tied")
    model, out = tiny_export(arch, tie_embeddings=tied)
    hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert isinstance(hf, ZarvanDistForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    native = open_checkpoint(out).load_model()
    for m in (hf.model, native):  # a tied head is stored once and tied again on loading
        assert (m.head.weight is getattr(m.embed, "weight", None)) == tied
    ids = torch.randint(0, 61, (2, 13))
    with torch.no_grad():
        want = model(ids).logits
        got = hf(ids, labels=ids)
        torch.testing.assert_close(got.logits, want, rtol=0, atol=1e-6)
        assert torch.equal(native(ids).logits, want)
        loss = torch.nn.functional.cross_entropy(want[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        torch.testing.assert_close(got.loss, loss, rtol=1e-6, atol=1e-6)
        if model.streams:  # a second window read after the cache continues the first
            first = hf(ids[:, :7])
            cache = getattr(first, CACHE_KEY)  # the cache is updated in place
            second = hf(ids[:, 7:], **{CACHE_KEY: cache})
            assert cache.get_seq_length() == 13
            carried = model(ids[:, 7:], model(ids[:, :7]).state).logits
            torch.testing.assert_close(second.logits, carried, rtol=0, atol=1e-6)


REMOTE = """
import json, sys, torch
sys.modules["data_prep"] = sys.modules["pretrain"] = None  # an export needs neither job: importing one fails
from transformers import AutoModelForCausalLM, AutoTokenizer
hf = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = tok(sys.argv[2], return_tensors="pt")["input_ids"]
print(json.dumps({"classes": [type(hf).__module__, type(tok).__module__], "ids": ids[0].tolist(),
                  "logits": hf(ids).logits.tolist()}))
"""


def test_trust_remote_code_loads_the_copied_module(tokenizer_model, tiny_config, tmp_path, one_thread):
    """In a process that never imported zarvan_dist.hf and cannot import data_prep or pretrain: the Auto
    classes load out/hf.py's classes, which need the zarvan_dist library alone."""
    model = build_model(tiny_config("transformer", vocab_size=VOCAB, tie_embeddings=True)).eval()
    write_hf(model, tmp_path / "hf", tokenizer=tokenizer_model)
    text = "  the cat\n"
    done = subprocess.run([sys.executable, "-c", REMOTE, str(tmp_path / "hf"), text], cwd=ROOT,
                          env={**trainer_env(tmp_path), "HF_MODULES_CACHE": str(tmp_path / "modules")},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert all(m.startswith("transformers_modules.") and m.endswith(".hf") for m in result["classes"])
    sp = load_tokenizer(str(tmp_path / "hf" / "tokenizer.model")).processor
    ids = encode_documents(sp, [text], "int64")[0]
    assert result["ids"] == ids.tolist()
    with torch.no_grad():
        want = model(torch.from_numpy(ids)[None]).logits
    torch.testing.assert_close(torch.tensor(result["logits"]), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_matches_zarvan_generate(arch, tiny_export, one_thread):
    model, out = tiny_export(arch)
    hf = AutoModelForCausalLM.from_pretrained(out)
    prompt = torch.randint(0, 61, (2, 6))
    want = generate(model, prompt, 10, temperature=0)
    lengths = counting_forward(hf)
    got = hf.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(got[:, :6], prompt) and torch.equal(got[:, 6:], want)
    # a streaming model reads the prompt once, then one token per step with its state carried
    assert lengths == ([6] + [1] * 9 if model.streams else list(range(6, 16)))


@pytest.mark.parametrize("arch", ["zarvan", "transformer", "slam"])
def test_left_padded_batch_generates_each_prompt_as_alone(arch, tiny_export, one_thread):
    model, out = tiny_export(arch)
    hf = AutoModelForCausalLM.from_pretrained(out)
    hf.generation_config.pad_token_id = 3
    long, short = torch.tensor([[9, 10, 11, 12, 13, 14, 15]]), torch.tensor([[19, 20, 21, 22]])
    batch = torch.cat([long, torch.cat([torch.full((1, 3), 3), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    got = hf.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got[0, 7:], generate(model, long, 6, temperature=0)[0])
    assert torch.equal(got[1, 7:], generate(model, short, 6, temperature=0)[0])
    with pytest.raises(ValueError, match="only left padding"):
        hf(batch, attention_mask=mask.flip(1))


def test_tokenizer_encodes_like_the_shards_and_decodes_losslessly(tokenizer_model, tiny_config, tmp_path, one_thread):
    model = build_model(tiny_config("zarvan", vocab_size=VOCAB))
    write_hf(model, tmp_path / "hf", tokenizer=tokenizer_model)
    sp = load_tokenizer(str(tmp_path / "hf" / "tokenizer.model")).processor
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")  # trust_remote_code: see the test above
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == encode_documents(sp, [text], "int64")[0].tolist()  # BOS first, as in the shards
        assert tok.decode(ids, skip_special_tokens=True) == text == sp.decode(ids)
    batch = tok(["a b c", "a"], return_tensors="pt", padding=True)
    assert batch["input_ids"][1, 0] == sp.pad_id() and batch["attention_mask"][1, 0] == 0  # left padding
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 3)


def test_export_cli_writes_a_transformers_directory_with_the_tokenizer(trained_run, tmp_path, capsys, one_thread):
    out = tmp_path / "hf"
    assert main([str(trained_run), str(out), "--format", "hf"]) == 0
    assert {p.name for p in out.iterdir()} >= {"config.json", "generation_config.json", "model.safetensors", "hf.py",
                                               "tokenizer.model", "tokenizer_config.json"}
    assert not (out / "export.json").exists()  # not a native export
    config = json.loads((out / "config.json").read_text())
    assert config["zarvan_export"]["step"] == 2
    assert config["zarvan_export"]["tokenizer"].endswith("data/tokenizer.model")
    assert (out / "tokenizer.model").read_bytes() == (trained_run.parent / "data" / "tokenizer.model").read_bytes()
    source = open_checkpoint(trained_run).load_model()
    hf = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(["the cat", "  and\n\tmore of it"], return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = torch.cat([torch.tensor([[1]]), torch.randint(4, VOCAB, (1, 20)), torch.tensor([[1, 5, 6]])], 1)
        want = source(plain, None, plain == 1).logits  # a document starts at each BOS, as in training
        torch.testing.assert_close(hf(plain).logits, want, rtol=0, atol=1e-6)
        assert torch.equal(open_checkpoint(out).load_model()(plain, None, plain == 1).logits, want)
    hf.generation_config.eos_token_id = None  # zarvan_dist's generate does not stop at EOS
    got = hf.generate(**ids, max_new_tokens=8, do_sample=False)
    for row, text in enumerate(["the cat", "  and\n\tmore of it"]):
        want = generate(source, torch.tensor([tok(text)["input_ids"]]), 8, temperature=0, bos_id=1)
        assert torch.equal(got[row, ids["input_ids"].shape[1]:], want[0])
        # and the command line's greedy completion is the text of transformers' tokens
        capsys.readouterr()
        assert generate_main(["--checkpoint", str(trained_run), "--prompt", text, "--greedy", "--max-new-tokens", "8",
                              "--device", "cpu"]) == 0
        assert capsys.readouterr().out == tok.decode(got[row, ids["input_ids"].shape[1]:]) + "\n"


def test_native_stays_the_default_and_overwrite_replaces_an_export(trained_run, tmp_path, one_thread):
    out = tmp_path / "export"
    native = {"model.safetensors", "config.yaml", "export.json"}
    assert main([str(trained_run), str(out)]) == 0
    assert {p.name for p in out.iterdir()} == native
    assert main([str(trained_run), str(out), "--format", "hf", "--overwrite"]) == 0
    assert (out / "config.json").is_file() and not (out / "config.yaml").exists()
    assert main([str(trained_run), str(out), "--overwrite"]) == 0  # and back
    assert {p.name for p in out.iterdir()} == native
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary directory left


def test_bad_input_is_a_clear_error(trained_run, token_dataset, tmp_path, capsys):
    def error(*args: str) -> str:
        assert main([*map(str, args)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ")
        return err

    assert f"checkpoint {tmp_path / 'nothing'} does not exist" in error(tmp_path / "nothing", tmp_path / "out")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert "is not empty; pass --overwrite" in error(trained_run, busy, "--format", "hf")
    assert "holds no export" in error(trained_run, busy, "--format", "hf", "--overwrite")
    assert (busy / "notes.txt").read_text() == "mine"
    fake = token_dataset / "tokenizer.model"  # the synthetic dataset's: not a sentencepiece model
    assert "not a sentencepiece model" in error(trained_run, tmp_path / "out", "--format", "hf", "--tokenizer", fake)
    assert "a tokenizer goes with --format hf" in error(trained_run, tmp_path / "out", "--tokenizer", "t.model")
    missing = trained_run.parent / "data" / "missing.model"
    assert f"tokenizer {missing} does not exist" in error(trained_run, tmp_path / "out", "--format", "hf",
                                                          "--tokenizer", missing)
    other = tmp_path / "other.model"  # the model's vocabulary size, but not the dataset's tokenizer
    (tmp_path / "corpus").mkdir()
    for i in range(20):
        (tmp_path / "corpus" / f"{i}.txt").write_text(f"DEF G_{i}(X):\n    RETURN X * {i}  # THE END OF A LINE\n" * 9)
    train_tokenizer(TokenizerConfig(out=str(other), vocab_size=VOCAB, threads=1,
                                    corpus=CorpusConfig(inputs=[str(tmp_path / "corpus")])), progress=False)
    assert "is not the one the dataset" in error(trained_run, tmp_path / "out", "--format", "hf", "--tokenizer", other)
    data = trained_run.parent / "data"
    data.rename(data.with_name("gone"))
    try:  # the run's dataset is not where the run read it
        assert "no manifest" in error(trained_run, tmp_path / "out", "--format", "hf")
        # with the tokenizer named, the export goes on, saying that it could not check it
        assert main([str(trained_run), str(tmp_path / "moved"), "--format", "hf", "--tokenizer",
                     str(data.with_name("gone") / "tokenizer.model")]) == 0
        assert "is not checked against it" in capsys.readouterr().err
        assert main([str(trained_run), str(tmp_path / "bare")]) == 0  # a native export needs no tokenizer
    finally:
        data.with_name("gone").rename(data)
    assert "is an export already" in error(tmp_path / "bare", tmp_path / "again")
    assert not (tmp_path / "out").exists()


NO_TRANSFORMERS = """
import sys
sys.modules["transformers"] = None  # as if it were not installed
from pretrain.export import main
sys.exit(main(sys.argv[1:]))
"""


def test_transformers_stays_optional(trained_run, tmp_path):
    """Without transformers the native export works and --format hf says what to install."""
    def export(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", NO_TRANSFORMERS, str(trained_run), *args], cwd=ROOT,
                              env=trainer_env(tmp_path), capture_output=True, text=True, timeout=300)

    done = export(str(tmp_path / "native"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "native" / "model.safetensors").is_file()
    done = export(str(tmp_path / "hf"), "--format", "hf")
    assert done.returncode == 1 and "--format hf needs transformers (pip install 'zarvan-dist[hf]')" in done.stderr
    assert not (tmp_path / "hf").exists()
