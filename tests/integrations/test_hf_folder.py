"""Compressed Hugging Face folders: save_compressed reloads through from_pretrained(trust_remote_code=True)
at the compressed size with the same logits; compress_hf_folder end to end; bad inputs refused."""

import json
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import maestro_lod as ml  # noqa: E402
from maestro_lod.cli import main  # noqa: E402
from maestro_lod.data.text import pydoc_corpus  # noqa: E402
from maestro_lod.engine.search import materialize  # noqa: E402
from maestro_lod.errors import ConfigError, MissingFileError, UsageError  # noqa: E402
from maestro_lod.integrations.hf_folder import (MODELING_FILE, RANKS_KEY, compress_hf_folder,  # noqa: E402
                                                load_compressed, save_compressed)

pytestmark = pytest.mark.usefixtures("one_thread", "modules_cache")

LENGTH = 32


@pytest.fixture
def modules_cache(tmp_path_factory, monkeypatch):
    """transformers copies remote code into a module cache: a temporary one here, not the user's."""
    from transformers import dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path_factory.mktemp("modules")))
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.fixture(scope="module")
def corpus():
    text = pydoc_corpus()
    symbols = sorted(set(text))
    vocab = {symbol: i for i, symbol in enumerate(["[UNK]"] + symbols)}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), "isolated")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]")
    ids = torch.tensor([vocab[c] for c in text])
    return tokenizer, ids


def build(kind, vocab):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=64,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                         eos_token_id=0, initializer_range=0.2)
        return transformers.GPT2LMHeadModel(config)
    if kind == "llama":
        config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab,
                                          max_position_embeddings=64, tie_word_embeddings=False,
                                          bos_token_id=0, eos_token_id=0, initializer_range=0.2)
        return transformers.LlamaForCausalLM(config)
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                     vocab_size=vocab, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(config)


def trained(kind, ids, steps=150):
    """A tiny causal LM trained briefly on the corpus. Its initial weights are large (initializer_range
    0.2), so the trained weights are not nearly low-rank and every removal of ranks costs loss."""
    model = build(kind, int(ids.max()) + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) // 2, (16,), generator=generator)
        windows = torch.stack([ids[s:s + LENGTH + 1] for s in starts.tolist()])
        loss = model(input_ids=windows[:, :-1], labels=windows[:, :-1]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def sources(corpus, tmp_path_factory):
    """save_pretrained folders (model + tokenizer) of a trained tiny GPT-2 and Llama."""
    tokenizer, ids = corpus
    folders = {}
    for kind in ("gpt2", "llama"):
        folder = tmp_path_factory.mktemp(f"source-{kind}")
        trained(kind, ids).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[kind] = folder
    return folders


AUTO = {"gpt2": transformers.AutoModelForCausalLM, "llama": transformers.AutoModelForCausalLM,
        "bert": transformers.AutoModelForMaskedLM}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------------------------ save_compressed
@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_save_compressed_reloads_at_its_ranks_with_the_same_logits(kind, tmp_path):
    model = ml.factorize(build(kind, 60).eval())
    layers = dict(ml.low_rank_layers(model))
    names = list(layers)
    ranks = {name: 3 + i % 4 for i, name in enumerate(names[:-1])}  # the last stays at full rank: saved dense
    ml.truncate_(model, ranks)
    layers[names[0]].active_rank = 2  # an active rank is the rank saved
    ids = torch.randint(0, 60, (2, 12))
    expected = logits(model, ids)

    folder = save_compressed(model, tmp_path / "compressed")
    config = json.loads((folder / "config.json").read_text())
    assert config[RANKS_KEY] == {**ranks, names[0]: 2}
    assert config["model_type"] == f"low_rank_{model.config.model_type}"
    assert (folder / "model.safetensors").is_file() and not (folder / "pytorch_model.bin").exists()
    assert "maestro" not in (folder / MODELING_FILE).read_text()

    reloaded = AUTO[kind].from_pretrained(str(folder), trust_remote_code=True, local_files_only=True).eval()
    assert type(reloaded).__name__ == f"LowRank{type(model).__name__}"
    for name, rank in config[RANKS_KEY].items():
        pair = reloaded.get_submodule(name)
        assert type(pair).__name__ == "LowRankLinear" and pair.down.weight.shape[0] == rank
    assert type(reloaded.get_submodule(names[-1])).__name__ in ("Linear", "Conv1D")  # merged: no smaller as a pair
    assert ml.count_params(reloaded) == ml.count_params(ml.export(model))
    assert ml.count_params(reloaded) < ml.count_params(build(kind, 60))
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(load_compressed(folder), ids), expected, atol=1e-5, rtol=0)
    head = reloaded.get_output_embeddings()
    if kind != "llama":  # tied output embeddings stay tied
        assert head.weight is reloaded.get_input_embeddings().weight


def test_compressed_folder_refuses_to_load_without_trust_remote_code(tmp_path):
    model = ml.factorize(build("gpt2", 60))
    ml.truncate_(model, {name: 4 for name, _ in ml.low_rank_layers(model)})
    folder = save_compressed(model, tmp_path / "compressed")
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)


def test_reloaded_model_saves_again_with_save_pretrained(tmp_path):
    model = ml.factorize(build("llama", 60))
    ml.truncate_(model, {name: 4 for name, _ in ml.low_rank_layers(model)})
    folder = save_compressed(model, tmp_path / "compressed")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True)
    reloaded.save_pretrained(tmp_path / "again")
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "again"), trust_remote_code=True)
    ids = torch.randint(0, 60, (1, 10))
    torch.testing.assert_close(logits(again.eval(), ids), logits(reloaded.eval(), ids), atol=0, rtol=0)
    assert ml.count_params(again) == ml.count_params(reloaded)


def test_save_compressed_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(ConfigError, match="PreTrainedModel"):
        save_compressed(torch.nn.Linear(3, 3), tmp_path / "x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    model = ml.factorize(build("gpt2", 60))
    with pytest.raises(UsageError, match="not empty"):
        save_compressed(model, busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    save_compressed(model, busy, overwrite=True)
    assert not (busy / "keep.txt").exists() and (busy / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


# ------------------------------------------------------------------------------------ compress_hf_folder
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_compress_hf_folder_to_params_fraction(kind, sources, tmp_path):
    out = tmp_path / "out"
    result = compress_hf_folder(sources[kind], out, targets=("params=0.6",), seq_len=LENGTH,
                                calibration_tokens=1024, eval_tokens=2048)
    (path, point), = result.chosen
    assert path == out / "params-0.6" and (out / "front.json").is_file()
    dense = result.front.dense_params
    assert dense == result.dense_params
    feasible = [p for p in result.front.points if p.params <= 0.6 * dense]
    assert point is min(feasible, key=lambda p: p.calibration_loss)  # the most accurate point within the budget
    assert 0.5 < point.params / dense <= 0.6  # which, on these models, lies just under it

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True,
                                                                 local_files_only=True).eval()
    assert ml.count_params(reloaded) == point.params == point.exported["params"]
    ids = torch.randint(0, reloaded.config.vocab_size, (2, LENGTH))
    torch.testing.assert_close(logits(reloaded, ids), logits(materialize(result.model, point), ids), atol=1e-5, rtol=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)  # reads config.json too
    source = transformers.AutoTokenizer.from_pretrained(str(sources[kind]))
    assert tokenizer("def f(x):")["input_ids"] == source("def f(x):")["input_ids"]

    saved = json.loads((out / "front.json").read_text())
    assert saved["metadata"]["targets"] == {"params-0.6": point.index}
    assert saved["metadata"]["init"] == "whitened" and saved["metadata"]["text"] == "pydoc-text"
    entry = saved["points"][point.index]
    assert entry["exported"] == {"folders": ["params-0.6"], "params": point.params}
    assert result.dense_perplexity < entry["perplexity"] < 10 * result.dense_perplexity
    assert entry["perplexity"] == pytest.approx(point.perplexity)


def test_compress_hf_folder_takes_tokens_without_a_tokenizer(corpus, tmp_path):
    _, ids = corpus
    folder = tmp_path / "source"
    build("gpt2", int(ids.max()) + 1).save_pretrained(folder)
    result = compress_hf_folder(folder, tmp_path / "out", tokens=ids[:20000], targets=("macs=0.8", "params=0.9"),
                                init="svd", seq_len=LENGTH, calibration_tokens=256, eval_tokens=512)
    assert [p.name for p, _ in result.chosen] == ["macs-0.8", "params-0.9"]
    assert result.front.cost == "macs" and result.metadata["text"] == "tokens"
    for path, point in result.chosen:
        assert point.macs <= 0.8 * result.front.dense_macs or point.params <= 0.9 * result.front.dense_params
        assert not (path / "tokenizer.json").exists()
        assert ml.count_params(load_compressed(path)) == point.params


# ------------------------------------------------------------------------------------ bad inputs
def one_line(error):
    return "\n" not in str(error.value)


def test_not_a_save_pretrained_folder(tmp_path):
    with pytest.raises(MissingFileError, match="no folder"):
        compress_hf_folder(tmp_path / "missing", tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="not a save_pretrained folder") as error:
        compress_hf_folder(empty, tmp_path / "out")
    assert one_line(error) and str(empty) in str(error.value)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        compress_hf_folder(empty, tmp_path / "out")
    (empty / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="no weights"):
        compress_hf_folder(empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_architecture(tmp_path):
    folder = tmp_path / "source"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    for model_type, why in (("no-such-model", "not an architecture this transformers knows"),
                            ("vit", "has no causal language model class")):
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
        with pytest.raises(ConfigError, match=why) as error:
            compress_hf_folder(folder, tmp_path / "out")
        assert one_line(error) and repr(model_type) in str(error.value)
    assert not (tmp_path / "out").exists()


def test_no_tokenizer_for_the_text(tmp_path):
    folder = tmp_path / "source"
    build("gpt2", 60).save_pretrained(folder)
    with pytest.raises(ConfigError, match="has no tokenizer") as error:
        compress_hf_folder(folder, tmp_path / "out")
    assert one_line(error) and str(folder) in str(error.value)
    with pytest.raises(ConfigError, match="outside the model's vocabulary of 60"):
        compress_hf_folder(folder, tmp_path / "out", tokens=torch.arange(100))
    assert not (tmp_path / "out").exists()


def test_nan_weights(tmp_path):
    folder = tmp_path / "source"
    model = build("llama", 60)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(folder)
    with pytest.raises(ConfigError, match=r"'model.layers.1.mlp.up_proj.weight' holds NaN") as error:
        compress_hf_folder(folder, tmp_path / "out", tokens=torch.randint(0, 60, (5000,)), seq_len=LENGTH)
    assert one_line(error) and str(folder) in str(error.value)
    assert not (tmp_path / "out").exists()


def test_bad_targets_and_existing_outputs(sources, tmp_path):
    with pytest.raises(ConfigError, match="params=FRACTION or macs=FRACTION"):
        compress_hf_folder(sources["gpt2"], tmp_path / "out", targets=("latency=0.5",))
    with pytest.raises(ConfigError, match="unknown target"):
        compress_hf_folder(sources["gpt2"], tmp_path / "out", targets=("size=0.5",))
    with pytest.raises(ConfigError, match="target params=0.01 is unreachable"):  # refused before the search
        compress_hf_folder(sources["gpt2"], tmp_path / "out", targets=("params=0.01",), seq_len=LENGTH,
                           calibration_tokens=128, eval_tokens=128)
    for options, message in ((dict(init="random"), "starts from 'svd' or 'whitened'"),
                             (dict(step=0), "step=0 must be a fraction"),
                             (dict(text="x.txt", tokens=torch.arange(10)), "not both"),
                             (dict(text=tmp_path / "missing.txt"), "no text file"),
                             (dict(seq_len=0), "seq_len=0 must be a positive int")):
        with pytest.raises(ConfigError, match=message):
            compress_hf_folder(sources["gpt2"], tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()
    (tmp_path / "out" / "params-0.6").mkdir(parents=True)
    with pytest.raises(UsageError, match="already exist"):
        compress_hf_folder(sources["gpt2"], tmp_path / "out")
    with pytest.raises(ConfigError, match="already a compressed folder"):
        model = ml.factorize(build("gpt2", 60))
        compress_hf_folder(save_compressed(model, tmp_path / "compressed"), tmp_path / "out2")


def test_the_compress_command_writes_reloadable_folders(sources, tmp_path):
    out = tmp_path / "cli"
    text = tmp_path / "text.txt"
    text.write_text(pydoc_corpus()[:60_000])
    code = main(["compress", "--hf", str(sources["gpt2"]), "--text", str(text), "--target", "params=0.6",
                 "--seq-len", str(LENGTH), "--out", str(out), "--quiet"])
    assert code == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out / "params-0.6"), trust_remote_code=True,
                                                                 local_files_only=True)
    source = transformers.AutoModelForCausalLM.from_pretrained(str(sources["gpt2"]), local_files_only=True)
    assert ml.count_params(reloaded) <= 0.6 * ml.count_params(source)


def test_the_compress_command_refuses_hf_with_a_run_or_without_out(sources, tmp_path, capsys):
    assert main(["compress", "--hf", str(sources["gpt2"])]) == 2
    assert "--hf needs --out" in capsys.readouterr().err
    assert main(["compress", str(tmp_path), "--hf", str(sources["gpt2"]), "--out", str(tmp_path / "o")]) == 2
    assert "RUN_DIR cannot be given" in capsys.readouterr().err
