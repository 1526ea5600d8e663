"""Generation: decoding from the carried state equals re-reading the whole sequence, a saved state
continues exactly, the sampling settings do what they say, and ``python -m pretrain.generate`` end to
end on a hand-made checkpoint with a real tokenizer, with its refusals."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model

from data_prep.corpus import CorpusConfig
from data_prep.shards import ShardsConfig, write_shards
from data_prep.tokenizer import TokenizerConfig, train_tokenizer
from zarvan_dist.tokenizer import encode_documents, load_tokenizer
from pretrain.generate import TextStream, encode_prompts, main
from run_helpers import ROOT, trainer_env
from zarvan_dist import ARCHS, ModelConfig, build_model
from zarvan_dist.generation import Context, decode, generate, read, sample
from zarvan_dist.training.checkpoint import Checkpointer, save_config, write_json

BOS = 1


def reread_greedy(model, prompt: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens after ``prompt`` [T] by re-reading the whole sequence for every token, and the
    next-token logits [V] before each token and after the last."""
    seq, tokens, logits = prompt, [], []
    with torch.no_grad():
        for _ in range(steps + 1):
            last = model(seq[None], None, seq[None] == BOS).logits[0, -1]
            logits.append(last)
            tokens.append(int(last.argmax()))
            seq = torch.cat([seq, last.argmax()[None]])
    return tokens[:-1], logits


def prompt(length: int, bos_at: tuple[int, ...] = ()) -> torch.Tensor:
    """Random ids [length] with a BOS first and at ``bos_at``."""
    ids = torch.randint(4, 61, (length,))
    ids[[0, *bos_at]] = BOS
    return ids


# ---------------------------------------------------------------------------------------------
# decoding from the state


@pytest.mark.parametrize("arch", ARCHS)
def test_decoding_from_the_state_equals_rereading_the_sequence(arch, tiny_config, one_thread):
    model = build_model(tiny_config(arch)).eval()
    long, short, other = prompt(23, bos_at=(11,)), prompt(6), prompt(23, bos_at=(17,))
    chunk, steps = 5, 8  # the long prompts take five prefill chunks, the BOS at 11 in the third
    # rows of different lengths (read one at a time) and of one length (read as one batch)
    for rows in ([long, short], [long, other]):
        context = read(model, None, rows, BOS, chunk)
        new, after = decode(model, context, steps, temperature=0, bos_id=BOS)
        assert after.lengths.tolist() == [len(r) + steps for r in rows]
        for row, ids in enumerate(rows):
            tokens, logits = reread_greedy(model, ids, steps)
            assert new[row].tolist() == tokens, f"row {row}"
            torch.testing.assert_close(context.logits[row], logits[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(after.logits[row], logits[-1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=30, top_p=0.9)],
                         ids=["greedy", "sampled"])
def test_a_saved_context_continues_as_one_run(arch, sampling, tiny_config, tmp_path, one_thread):
    model = build_model(tiny_config(arch)).eval()
    rows = [prompt(23, bos_at=(11,)), prompt(6)]

    def run(context: Context, steps: int, generator: torch.Generator):
        return decode(model, context, steps, bos_id=BOS, generator=generator, **sampling)

    whole, end = run(read(model, None, rows, BOS, 5), 12, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    first, middle = run(read(model, None, rows, BOS, 5), 5, generator)
    save_file({**middle.to_tensors(), "generator": generator.get_state()}, str(tmp_path / "state.safetensors"))

    saved = load_file(str(tmp_path / "state.safetensors"))
    resumed = Context.from_tensors(saved)
    resumed.check(model)
    generator = torch.Generator()
    generator.set_state(saved["generator"])
    rest, end_resumed = run(resumed, 7, generator)
    assert torch.cat([first, rest], 1).tolist() == whole.tolist()
    assert torch.equal(end_resumed.logits, end.logits)
    assert end_resumed.to_tensors().keys() == end.to_tensors().keys()
    for name, value in end.to_tensors().items():
        assert torch.equal(end_resumed.to_tensors()[name], value), name


def test_a_context_of_another_model_is_refused(tiny_config):
    context = read(build_model(tiny_config("zarvan")).eval(), None, [prompt(7)], BOS)
    with pytest.raises(ValueError, match="state does not fit"):
        context.check(build_model(tiny_config("nonattn")))
    with pytest.raises(ValueError, match="state does not fit"):
        context.check(build_model(tiny_config("zarvan", d_model=16)))
    with pytest.raises(ValueError, match="logits"):
        context.check(build_model(tiny_config("zarvan", vocab_size=60)))


# ---------------------------------------------------------------------------------------------
# sampling


def test_tiny_top_p_top_k_one_and_temperature_zero_are_greedy():
    logits = torch.randn(64, 61)
    generator = torch.Generator().manual_seed(0)
    best = logits.argmax(-1)
    assert torch.equal(sample(logits, 0.0), best)
    assert torch.equal(sample(logits, 1.0, top_p=1e-6, generator=generator), best)
    assert torch.equal(sample(logits, 2.0, top_k=1, generator=generator), best)
    assert not torch.equal(sample(logits, 1.0, generator=generator), best)  # plain sampling is not


def test_samples_stay_in_the_top_k_and_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4)
    generator = torch.Generator().manual_seed(0)

    def drawn(**settings) -> torch.Tensor:
        return torch.bincount(sample(logits, generator=generator, **settings), minlength=4) / len(logits)

    for settings, kept in [(dict(top_p=0.7), 2), (dict(top_p=0.8), 2), (dict(top_p=0.81), 3), (dict(top_k=3), 3),
                           (dict(top_k=3, top_p=0.7), 2), (dict(), 4)]:
        want = torch.zeros(4)
        want[:kept] = probs[:kept] / probs[:kept].sum()
        torch.testing.assert_close(drawn(**settings), want, atol=0.03, rtol=0, msg=str(settings))
    assert drawn(temperature=0.05)[0] == 1.0  # a cold softmax is nearly the argmax
    hot = drawn(temperature=10.0)
    assert (hot > 0.2).all()  # a hot one nearly uniform


def test_seeded_sampling_is_reproducible(tiny_config):
    model = build_model(tiny_config("zarvan")).eval()
    ids = prompt(9)[None]

    def draw(seed: int) -> list[int]:
        return generate(model, ids, 16, temperature=1.0, top_p=0.95, bos_id=BOS,
                        generator=torch.Generator().manual_seed(seed))[0].tolist()

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_bad_sampling_settings_are_refused():
    logits = torch.randn(1, 8)
    for settings, name in [(dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
                           (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")]:
        with pytest.raises(ValueError, match=name):
            sample(logits, **settings)


# ---------------------------------------------------------------------------------------------
# the command line, on a hand-made checkpoint of a dataset written by data_prep

TEXT = "the cat sat on a mat and the dog ran to the park while birds sang in trees".split()
VOCAB = 300


def write_corpus(root: Path, seed: int) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for i in range(6):
        lines = (" ".join(rng.choice(TEXT) for _ in range(12)) for _ in range(20))
        (root / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    return root


def model_config(arch: str = "zarvan", **overrides) -> ModelConfig:
    fields = dict(arch=arch, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, chunk_size=4, conv_kernel=4,
                  dilations=[1, 2], supervisor_chunk=4)
    return ModelConfig(**{**fields, **overrides})


def write_export(out: Path, cfg: ModelConfig) -> Path:
    """A directory in the layout ``pretrain.export`` writes, of a freshly initialised model."""
    out.mkdir(parents=True)
    save_model(build_model(cfg), str(out / "model.safetensors"))
    save_config(out / "config.yaml", {"model": cfg.to_dict()})
    write_json(out / "export.json", {"source": "", "step": 0})
    return out


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> dict:
    """A tokenizer, a dataset written with it and a run directory with one checkpoint of a tiny zarvan."""
    root = tmp_path_factory.mktemp("generate")
    corpus = write_corpus(root / "corpus", 0)
    train_tokenizer(TokenizerConfig(out=str(root / "tokenizer.model"), vocab_size=VOCAB,
                                    corpus=CorpusConfig(inputs=[str(corpus)]), threads=1), progress=False)
    write_shards(ShardsConfig(tokenizer=str(root / "tokenizer.model"), out=str(root / "data"), seq_len=16,
                              corpus=CorpusConfig(inputs=[str(corpus)]), val_fraction=0.2), progress=False)
    torch.manual_seed(0)
    cfg = model_config()
    model = build_model(cfg).eval()

    def write(tmp: Path) -> None:
        save_model(model, str(tmp / "model.safetensors"))
        save_config(tmp / "config.yaml", {"model": cfg.to_dict(), "data": {"dir": str(root / "data")}})
        write_json(tmp / "trainer.json", {"step": 1})

    Checkpointer(root / "run" / "checkpoints", keep=1).save(1, write)
    sp = spm.SentencePieceProcessor(model_file=str(root / "data" / "tokenizer.model"))
    return {"root": root, "run": root / "run", "model": model, "sp": sp,
            "tokenizer": load_tokenizer(str(root / "data" / "tokenizer.model"))}


def cli(*args: str) -> list[str]:
    return ["--device", "cpu", *args]


def greedy_text(run: dict, text: str, steps: int) -> str:
    ids = torch.tensor([[BOS, *run["sp"].encode(text)]])
    return run["sp"].decode(generate(run["model"], ids, steps, temperature=0, bos_id=BOS)[0].tolist())


class Writes(io.StringIO):
    """A stdout that counts its non-empty writes."""

    count = 0

    def write(self, text: str) -> int:
        self.count += bool(text)
        return super().write(text)


def test_one_prompt_is_printed_as_it_is_generated(cli_run, monkeypatch, one_thread):
    out = Writes()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(cli("--checkpoint", str(cli_run["run"]), "--prompt", "the cat sat on", "--greedy",
                    "--max-new-tokens", "12", "--prefill-chunk", "2")) == 0
    assert out.getvalue() == greedy_text(cli_run, "the cat sat on", 12) + "\n"
    assert out.count > 2  # piece by piece, not once at the end


def test_prompts_of_different_lengths_are_completed_and_labelled(cli_run, capsys, one_thread):
    texts = ["the dog", "a mat and the dog ran to the park while birds sang in trees"]
    assert main(cli("--checkpoint", str(cli_run["run"]), "--prompt", texts[0], "--prompt", texts[1], "--greedy",
                    "--max-new-tokens", "6", "--prefill-chunk", "4")) == 0
    labels = ["'the dog'", repr(texts[1][:40] + "...")]
    assert capsys.readouterr().out == "".join(f"--- [{i + 1}/2] prompt: {labels[i]} ---\n"
                                              f"{greedy_text(cli_run, text, 6)}\n" for i, text in enumerate(texts))


def read_state(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("sampling", [["--greedy"], ["--temperature", "1.0", "--top-k", "0", "--top-p", "0.9"]],
                         ids=["greedy", "sampled"])
def test_a_saved_state_resumes_as_one_run(cli_run, sampling, tmp_path, capsys, one_thread):
    run = cli("--checkpoint", str(cli_run["run"]), "--prompt", "the cat sat on a mat", "--prompt", "birds",
              "--prefill-chunk", "3", "--seed", "7", *sampling)
    assert main([*run, "--max-new-tokens", "10", "--save-state", str(tmp_path / "whole.st")]) == 0
    assert main([*run, "--max-new-tokens", "4", "--save-state", str(tmp_path / "first.st")]) == 0
    # no --seed: the generator goes on from the state file
    assert main(cli("--checkpoint", str(cli_run["run"]), "--load-state", str(tmp_path / "first.st"), *sampling,
                    "--max-new-tokens", "6", "--save-state", str(tmp_path / "resumed.st"))) == 0
    capsys.readouterr()
    meta, whole = read_state(tmp_path / "whole.st")
    meta_resumed, resumed = read_state(tmp_path / "resumed.st")
    assert meta == meta_resumed
    assert json.loads(meta["tokens"]) == [1 + len(cli_run["sp"].encode("the cat sat on a mat")) + 10,
                                          1 + len(cli_run["sp"].encode("birds")) + 10]
    assert whole.keys() == resumed.keys() and {"logits", "lengths", "generator"} <= whole.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


def test_text_given_with_a_state_is_appended_to_its_row(cli_run, tmp_path, capsys, one_thread):
    run = cli_run["run"]
    assert main(cli("--checkpoint", str(run), "--prompt", "the cat", "--max-new-tokens", "0",
                    "--save-state", str(tmp_path / "s.st"))) == 0
    assert main(cli("--checkpoint", str(run), "--load-state", str(tmp_path / "s.st"), "--prompt", " sat on",
                    "--greedy", "--max-new-tokens", "8")) == 0
    sp = cli_run["sp"]
    ids = torch.tensor([[BOS, *sp.encode("the cat"), *sp.encode(" sat on")]])
    want = sp.decode(generate(cli_run["model"], ids, 8, temperature=0, bos_id=BOS)[0].tolist())
    assert capsys.readouterr().out == "\n" + want + "\n"


def test_prompts_are_encoded_as_the_shards_encode_a_document(cli_run):
    """A literal U+2581 (sentencepiece's space mark) is spelled in bytes, as data_prep wrote it for training."""
    sp = cli_run["sp"]
    texts = ["a\u2581cat sat", "the dog"]
    tokens, lengths = encode_documents(sp, texts, "int64")
    want = np.split(tokens, np.cumsum(lengths)[:-1])
    got = encode_prompts(cli_run["tokenizer"], texts, continued=False)
    assert [g.tolist() for g in got] == [w.tolist() for w in want]
    assert got[0].tolist() != [BOS, *sp.encode(texts[0])]  # the plain encoding would differ
    assert [g.tolist() for g in encode_prompts(cli_run["tokenizer"], texts, continued=True)] == [w[1:].tolist() for w in want]


def test_the_command_reads_a_prompt_as_the_shards_hold_it(cli_run, tmp_path, capsys, one_thread):
    text = "a\u2581cat sat on"
    assert main(cli("--checkpoint", str(cli_run["run"]), "--prompt", text, "--max-new-tokens", "0",
                    "--save-state", str(tmp_path / "s.st"))) == 0
    capsys.readouterr()
    _, saved = read_state(tmp_path / "s.st")
    ids = torch.from_numpy(encode_documents(cli_run["sp"], [text], "int64")[0])
    assert saved["lengths"].tolist() == [len(ids)]
    assert torch.equal(saved["logits"], read(cli_run["model"], None, [ids], BOS).logits)


@pytest.mark.parametrize("arch", ["zarvan", "nonattn", "transformer"])
def test_a_long_context_saved_and_resumed_generates_as_one_run(arch, cli_run, tmp_path, capsys, one_thread):
    """Acceptance 4: a prompt of about 4k tokens (four prefill chunks of 1024, 16x the transformer's window)
    read once, its state saved after 5 generated tokens and resumed for 7 more, equals 12 tokens in one run."""
    rng = random.Random(5)
    text = " ".join(rng.choice(TEXT) for _ in range(3000))
    (tmp_path / "long.txt").write_text(text)
    sp = cli_run["sp"]
    assert len(sp.encode(text)) > 3072
    checkpoint = str(write_export(tmp_path / arch, model_config(arch, attn_window=256)))
    base = cli("--checkpoint", checkpoint, "--tokenizer", str(cli_run["root"] / "tokenizer.model"))
    sampled = ["--temperature", "1.0", "--top-k", "0", "--seed", "3"]
    assert main([*base, "--prompt-file", str(tmp_path / "long.txt"), *sampled, "--max-new-tokens", "12",
                 "--save-state", str(tmp_path / "whole.st")]) == 0
    whole_text = capsys.readouterr().out
    assert main([*base, "--prompt-file", str(tmp_path / "long.txt"), *sampled, "--max-new-tokens", "5",
                 "--save-state", str(tmp_path / "first.st")]) == 0
    first_text = capsys.readouterr().out
    assert main([*base, "--load-state", str(tmp_path / "first.st"), "--temperature", "1.0", "--top-k", "0",
                 "--max-new-tokens", "7", "--save-state", str(tmp_path / "resumed.st")]) == 0
    rest_text = capsys.readouterr().out
    _, whole = read_state(tmp_path / "whole.st")
    _, resumed = read_state(tmp_path / "resumed.st")
    assert int(whole["lengths"][0]) == len(sp.encode(text)) + 1 + 12
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    # the state after every generated token equals: the same tokens were drawn (texts decode per run)
    assert whole_text and first_text and rest_text


def test_text_stream_holds_back_incomplete_characters(cli_run):
    sp = cli_run["sp"]
    ids = sp.encode("the caf\u00e9 \u4e2d\u6587 \U0001F600 sat")  # beyond the vocabulary: byte pieces
    assert sum(sp.id_to_piece(i).startswith("<0x") for i in ids) >= 9
    stream = TextStream(cli_run["tokenizer"])
    parts = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(parts) == sp.decode(ids)
    assert not any("\ufffd" in p for p in parts)


def assert_error(capsys, *fragments: str) -> None:
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    for fragment in fragments:
        assert fragment in captured.err, captured.err


def test_bad_input_is_one_error_line(cli_run, tmp_path, capsys, one_thread):
    run, root = str(cli_run["run"]), cli_run["root"]
    assert main(cli("--checkpoint", str(tmp_path / "nowhere"), "--prompt", "the")) == 1
    assert_error(capsys, "checkpoint", "does not exist")
    assert main(cli("--checkpoint", run, "--prompt", "the", "--prompt", "")) == 1
    assert_error(capsys, "empty prompt (prompt 2)")
    assert main(cli("--checkpoint", run)) == 1
    assert_error(capsys, "no prompt")
    assert main(cli("--checkpoint", run, "--prompt", "the", "--top-p", "0")) == 1
    assert_error(capsys, "top_p")

    # tokenizers that do not fit: another vocabulary size; another tokenizer than the dataset's
    wide = write_export(tmp_path / "wide", model_config(vocab_size=VOCAB + 4))
    assert main(cli("--checkpoint", str(wide), "--tokenizer", str(root / "tokenizer.model"), "--prompt", "the")) == 1
    assert_error(capsys, f"has {VOCAB} pieces, the model's vocab_size is {VOCAB + 4}")
    other = tmp_path / "other.model"
    train_tokenizer(TokenizerConfig(out=str(other), vocab_size=VOCAB, seed=1,
                                    corpus=CorpusConfig(inputs=[str(write_corpus(tmp_path / "corpus", 1))])),
                    progress=False)
    assert main(cli("--checkpoint", run, "--tokenizer", str(other), "--prompt", "the")) == 1
    assert_error(capsys, "is not the one the dataset")
    assert main(cli("--checkpoint", str(wide), "--prompt", "the")) == 1  # an export that names no dataset
    assert_error(capsys, "no tokenizer", "give --tokenizer")

    # state files: of another model, of another tokenizer, not a state, a batch of another size
    assert main(cli("--checkpoint", run, "--prompt", "the", "--max-new-tokens", "2",
                    "--save-state", str(tmp_path / "zarvan.st"))) == 0
    capsys.readouterr()
    nonattn = write_export(tmp_path / "nonattn", model_config("nonattn"))
    tokenizer = ["--tokenizer", str(root / "tokenizer.model")]
    assert main(cli("--checkpoint", str(nonattn), *tokenizer, "--load-state", str(tmp_path / "zarvan.st"))) == 1
    assert_error(capsys, "is the state of another model (zarvan of")
    same = write_export(tmp_path / "same", model_config())
    assert main(cli("--checkpoint", str(same), *tokenizer, "--load-state", str(tmp_path / "zarvan.st"))) == 1
    assert_error(capsys, "was saved with checkpoint")
    garbage = tmp_path / "garbage.st"
    garbage.write_bytes(b"not a state file at all")
    assert main(cli("--checkpoint", run, "--load-state", str(garbage))) == 1
    assert_error(capsys, "is not a safetensors file")
    assert main(cli("--checkpoint", run, "--load-state", str(tmp_path / "zarvan.st"),
                    "--prompt", "a", "--prompt", "b")) == 1
    assert_error(capsys, "2 prompts given to continue a state of 1 rows")
    assert main(cli("--checkpoint", run, "--load-state", str(tmp_path / "missing.st"))) == 1
    assert_error(capsys, "does not exist")


def test_the_module_runs(cli_run, tmp_path):
    args = cli("--checkpoint", str(cli_run["run"]), "--prompt", "the cat", "--greedy", "--max-new-tokens", "5")
    done = subprocess.run([sys.executable, "-m", "pretrain.generate", *args], cwd=ROOT, env=trainer_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == greedy_text(cli_run, "the cat", 5) + "\n"
    assert "generated 5 per row" in done.stderr
