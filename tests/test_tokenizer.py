"""Tests for unmask.tokenizer: round trips, special tokens, pieces, save/load, chat template, errors."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unmask.errors import UnmaskError
from unmask.tokenizer import CHATML_TEMPLATE, SPECIAL_TOKENS, Tokenizer, train_tokenizer

SNIPPETS = [
    'def add(a, b):\n    """Add two numbers."""\n    return a + b\n',
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "    def norm(self):\n        if self.x > 0:\n            return (self.x**2 + self.y**2) ** 0.5\n"
    "        return 0\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'even')\n    else:\n        print(i)\n",
    "import os\n\n\ndef main():\n    path = os.path.join('a', 'b')\n"
    "    with open(path) as f:\n        return f.read()\n",
    "# Größe und café: naïve Unicode, 日本語のコメント 🎉\nvalue = 1234567\n",
]
CORPUS = SNIPPETS * 20
VOCAB = 400

texts = st.text(st.characters(codec="utf-8"), max_size=80)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(CORPUS, VOCAB)


def test_special_tokens_have_fixed_ids(tok):
    for k, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_id(token) == k
    assert (tok.eos_id, tok.mask_id, tok.pad_id) == (0, 1, 2)
    assert (tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id) == (3, 4, 5)
    assert tok.stop_ids == {tok.eos_id, tok.token_id("<|im_end|>")}
    assert set(range(len(SPECIAL_TOKENS))) <= tok.special_ids
    assert len(SPECIAL_TOKENS) + 256 < tok.vocab_size <= VOCAB


def test_training_is_deterministic(tok):
    again = train_tokenizer(CORPUS, VOCAB)
    assert again.backend.get_vocab() == tok.backend.get_vocab()


def test_vocab_below_byte_alphabet_is_refused():
    with pytest.raises(UnmaskError, match="vocab_size"):
        train_tokenizer(CORPUS, 100)


@settings(max_examples=300, deadline=None)
@given(texts)
def test_round_trip_any_text(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert "".join(tok.pieces(ids)) == text
    assert not set(ids) & tok.special_ids


def test_round_trip_unseen_scripts(tok):
    text = "Ελληνικά, русский, عربى, 한국어, \x00\x7f\u200b\ufeff, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \r\n\t 👩‍👩‍👧"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([text, "x", ""]) == [tok.encode(text), tok.encode("x"), []]


def test_special_strings_in_text_stay_text(tok):
    text = "a <|mask|> b <|endoftext|><|im_end|>"
    ids = tok.encode(text)
    assert not set(ids) & tok.special_ids
    assert tok.decode(ids) == text
    assert tok.encode_batch([text]) == [ids]
    assert tok.encode("<|mask|>", allow_special=True) == [tok.mask_id]


def test_indentation_runs_are_single_tokens(tok):
    for width in (4, 8):
        assert len(tok.encode("\n" + " " * width)) == 1
        # a newline keeps the next line's indentation: no piece mixes it with the code after it
        ids = tok.encode("\n" + " " * width + "return x")
        pieces = tok.pieces(ids)
        assert "".join(pieces[:-2]) == "\n" + " " * width and pieces[-2:] == ["return", " x"]


def test_pre_tokenizer_keeps_whitespace_runs_apart_and_groups_digits(tok):
    code = "".join(SNIPPETS) + "\n\n\t\t  x=123456789  "
    spans = [code[a:b] for _, (a, b) in tok.backend.pre_tokenizer.pre_tokenize_str(code)]
    assert "".join(spans) == code
    for p in spans:
        if p.isspace():  # newlines then indentation, or a run of spaces/tabs alone
            assert p.lstrip("\r\n") == "" or not set(p.lstrip("\r\n")) & {"\r", "\n"}
        else:  # a word, number or symbol takes at most one leading space and no newline
            assert not p.startswith("  ") and "\n" not in p
    digits = [p.lstrip(" ") for p in spans if p.strip().isdigit()]
    assert max(len(d) for d in digits) <= 3
    assert "".join(digits).endswith("123456789")


def test_pieces_give_multibyte_characters_to_the_completing_token(tok):
    text = "x = '世界 🎉 café'"
    ids = tok.encode(text)
    pieces = tok.pieces(ids)
    assert "" in pieces  # some character really is split over several tokens here
    for k in range(len(ids)):
        done = b"".join(tok.token_bytes(i) for i in ids[: k + 1]).decode("utf-8", errors="ignore")
        assert "".join(pieces[: k + 1]) == done


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_pieces_join_to_decode_for_any_ids(tok, data):
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=30))
    for skip in (True, False):
        pieces = tok.pieces(ids, skip_special=skip)
        assert len(pieces) == len(ids)
        assert "".join(pieces) == tok.decode(ids, skip_special=skip)


def test_decode_skips_specials(tok):
    ids = tok.encode("ab")
    canvas = [tok.mask_id, *ids, tok.eos_id, tok.pad_id]
    assert tok.decode(canvas) == "ab"
    assert tok.decode(canvas, skip_special=False) == "<|mask|>ab<|endoftext|><|pad|>"


@settings(max_examples=50, deadline=None)
@given(texts)
def test_save_load_gives_same_ids(tok, tmp_path_factory, text):
    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    loaded = Tokenizer.from_dir(d)
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(tok.encode(text)) == text
    for name in ("eos_id", "mask_id", "pad_id", "fim_prefix_id", "fim_suffix_id", "fim_middle_id",
                 "stop_ids", "special_ids", "vocab_size", "chat_template"):
        assert getattr(loaded, name) == getattr(tok, name)


def test_from_dir_reads_hf_style_config_and_overrides(tok, tmp_path):
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    plain = Tokenizer.from_dir(tmp_path)  # no config: unmask's own token names are found in the vocab
    assert (plain.eos_id, plain.mask_id, plain.pad_id) == (tok.eos_id, tok.mask_id, tok.pad_id)
    config = {
        "eos_token": {"content": "<|im_end|>", "special": True},
        "pad_token": "<|endoftext|>",
        "mask_token": None,
        "chat_template": [{"name": "default", "template": "{{ messages[0]['content'] }}"}],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.eos_id == tok.token_id("<|im_end|>") and loaded.pad_id == tok.eos_id
    assert loaded.mask_id == tok.mask_id  # null in the config: falls back to the vocabulary's <|mask|>
    assert loaded.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey"
    explicit = Tokenizer.from_dir(tmp_path, mask=5, eos="<|endoftext|>", stop=[7])
    assert (explicit.mask_id, explicit.eos_id, explicit.stop_ids) == (5, 0, {0, 7})
    with pytest.raises(UnmaskError, match="not in the vocabulary"):
        Tokenizer.from_dir(tmp_path, mask="<|no_such_token|>")
    with pytest.raises(UnmaskError, match="outside the vocabulary"):
        Tokenizer.from_dir(tmp_path, mask=10**9)


def chatml(messages, add_generation_prompt):
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@pytest.mark.parametrize("gen", [True, False])
def test_chatml_rendering(tok, gen):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f():\n  pass"}]
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.apply_chat_template(messages, add_generation_prompt=gen) == chatml(messages, gen)


def test_encode_chat_keeps_contents_plain(tok):
    messages = [
        {"role": "user", "content": "say <|im_end|> and <|mask|>"},
        {"role": "assistant", "content": "ok"},
    ]
    ids = tok.encode_chat(messages)
    im_end = tok.token_id("<|im_end|>")
    assert ids.count(im_end) == len(messages) and tok.mask_id not in ids
    assert ids.count(tok.token_id("<|im_start|>")) == len(messages) + 1
    assert tok.decode(ids, skip_special=False) == tok.apply_chat_template(messages)


def test_encode_chat_follows_the_template(tok):
    messages = [{"role": "system", "content": "<|mask|>"}, {"role": "user", "content": "hi"}]
    # Drops system messages, repeats the user's content: both are encoded as plain text.
    template = "{% for m in messages if m.role != 'system' %}<|im_start|>{{ m.content * 2 }}{% endfor %}"
    custom = Tokenizer(tok.backend, chat_template=template)
    ids = custom.encode_chat(messages)
    assert ids == [tok.token_id("<|im_start|>"), *tok.encode("hi"), *tok.encode("hi")]


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ raise_exception.__globals__['os'].system('true') }}",
    "{{ messages.append({'role': 'x', 'content': 'y'}) }}",
])
def test_template_sandbox_refuses_escapes(tok, template):
    evil = Tokenizer(tok.backend, eos=0, chat_template=template)
    with pytest.raises(UnmaskError, match="SecurityError"):
        evil.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_raise_exception_and_syntax_errors(tok):
    strict = Tokenizer(tok.backend, chat_template="{{ raise_exception('no system role') }}")
    with pytest.raises(UnmaskError, match="no system role"):
        strict.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(UnmaskError, match="does not parse"):
        Tokenizer(tok.backend, chat_template="{% for %}")


@pytest.mark.parametrize("messages", [
    [],
    "hello",
    [{"content": "no role"}],
    [{"role": "user"}],
    [{"role": "user", "content": 3}],
    [{"role": None, "content": "x"}],
    [{"role": "user<|im_end|>", "content": "x"}],
    ["not a dict"],
])
def test_bad_messages(tok, messages):
    with pytest.raises(UnmaskError, match="message"):
        tok.apply_chat_template(messages)
    with pytest.raises(UnmaskError, match="message"):
        tok.encode_chat(messages)


def test_from_dir_errors_name_the_file(tok, tmp_path):
    with pytest.raises(UnmaskError, match="not found"):
        Tokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(UnmaskError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(UnmaskError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    tok.save(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    for bad in ["{ not json", "[1, 2]", json.dumps({"eos_token": 5}), json.dumps({"chat_template": 3}),
                json.dumps({"stop_tokens": "<|im_end|>"})]:
        config_file.write_text(bad)
        with pytest.raises(UnmaskError, match="tokenizer_config.json") as info:
            Tokenizer.from_dir(tmp_path)
        assert "\n" not in str(info.value)
