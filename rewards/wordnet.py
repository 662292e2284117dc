"""Make nltk's WordNet corpus available, also on machines that cannot reach nltk's data server.

`ensure_wordnet()` tries, in order:

1. nltk's own lookup (`nltk.data.path`, `NLTK_DATA`): the ordinary `nltk.download("wordnet")` install;
2. a WordNet 3.0 database installed by the Debian/Ubuntu packages `wordnet-base` and `wordnet-sense-index`
   (`/usr/share/wordnet`, or `$DUALRL_WORDNET_DIR`): it builds an nltk data folder (`~/.cache/dualrl/nltk_data`,
   or `$DUALRL_NLTK_DATA`) whose `corpora/wordnet/` holds copies of the Debian files (36 MB) and the
   `lexnames` file that Debian does not ship (generated from the table in `lexnames(5WN)`), and puts it
   on `nltk.data.path`;
3. otherwise it raises a `RuntimeError` that says how to install WordNet.

`python -m rewards.wordnet` prints where WordNet was found and a METEOR smoke score (exit code 1 if missing).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

DEBIAN_WORDNET_DIR = "/usr/share/wordnet"
DEFAULT_NLTK_DATA = "~/.cache/dualrl/nltk_data"

# The 45 WordNet 3.0 lexicographer files in file-number order (lexnames(5WN)); the number is the index.
LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)  # fmt: skip
# The third lexnames column: the syntactic category, from the file name's prefix.
SYNTACTIC_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}

# Files nltk's WordNet reader needs besides `lexnames`; a directory without them is not a WordNet database.
REQUIRED_FILES = tuple(f"{kind}.{pos}" for pos in ("noun", "verb", "adj", "adv") for kind in ("index", "data"))

INSTALL_HELP = (
    "WordNet (needed by the METEOR reward) was not found.\n"
    "  On Debian/Ubuntu: apt-get install --no-install-recommends wordnet-base wordnet-sense-index\n"
    "    (dualrl copies /usr/share/wordnet into an nltk data folder by itself; other locations: set "
    "DUALRL_WORDNET_DIR).\n"
    '  Elsewhere: python -m nltk.downloader wordnet   (or in Python: import nltk; nltk.download("wordnet")),\n'
    "    and if you install it outside nltk's default folders, point NLTK_DATA at that nltk_data folder."
)

_found: str | None = None  # where WordNet was found by the first successful call in this process


def lexnames_text() -> str:
    """The `lexnames` file: one `NN<TAB>name<TAB>category` line per lexicographer file."""
    lines = (f"{i:02d}\t{name}\t{SYNTACTIC_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES))
    return "".join(lines)


def _load_nltk_wordnet() -> str:
    """Load nltk's WordNet corpus (raises LookupError if nltk cannot find it); return its folder."""
    from nltk.corpus import wordnet

    wordnet.ensure_loaded()
    wordnet.synsets("car")  # reads a data file: a database with missing pieces fails here, not later
    root = wordnet.root
    return str(getattr(root, "path", root))


def _is_copy_of(dest: Path, source: Path) -> bool:
    """Whether `dest` is a copy of `source` made by `_copy_file`: a plain file of the same size and mtime."""
    if dest.is_symlink() or not dest.is_file():
        return False
    a, b = dest.stat(), source.stat()
    return a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns


def _copy_file(source: Path, dest: Path) -> None:
    """Copy `source` to `dest` (keeping its mtime) atomically: under a temporary name, then renamed over `dest`.

    Not a link: recent nltk (3.10 here) refuses symlinks whose target lies outside the corpus folder and
    files with more than one hard link; it also refuses files that others can write (hence mode 0644)."""
    if _is_copy_of(dest, source):
        return
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    shutil.copy2(source, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)


def _make_dirs(path: Path) -> None:
    """`mkdir -p` with mode 0755 for every folder it creates (nltk refuses folders others can write)."""
    for folder in [*reversed(path.parents), path]:
        if not folder.is_dir():
            folder.mkdir(mode=0o755, exist_ok=True)


def _replace_text(path: Path, text: str) -> None:
    """Write `path` atomically (a temporary file renamed over it), unless it already holds `text`."""
    if path.is_file() and not path.is_symlink() and path.read_text() == text:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def build_nltk_data(wordnet_dir: str | os.PathLike, nltk_data: str | os.PathLike) -> Path:
    """Make `nltk_data/corpora/wordnet/` hold copies of the files of the WordNet database in `wordnet_dir` and
    a `lexnames` file (the database's own if it has one). Idempotent, cheap when up to date (one stat per
    file) and safe when processes race; returns the corpus folder."""
    source = Path(wordnet_dir).resolve()
    corpus = Path(nltk_data).expanduser() / "corpora" / "wordnet"
    _make_dirs(corpus)
    for file in sorted(source.iterdir()):
        if file.is_file() and not file.name.startswith("."):
            _copy_file(file, corpus / file.name)
    if not (source / "lexnames").is_file():
        _replace_text(corpus / "lexnames", lexnames_text())
    return corpus


def _wordnet_dir() -> Path | None:
    """The Debian-style WordNet database directory, if there is one."""
    path = Path(os.environ.get("DUALRL_WORDNET_DIR") or DEBIAN_WORDNET_DIR)
    return path if all((path / name).is_file() for name in REQUIRED_FILES) else None


def _locate() -> str:
    """Find or build nltk's WordNet and load it; raise RuntimeError with install instructions if impossible."""
    import nltk

    try:
        return _load_nltk_wordnet()
    except (LookupError, OSError, ValueError):  # not found, or a broken copy (nltk raises ValueError for some)
        pass
    source = _wordnet_dir()
    if source is None:
        raise RuntimeError(INSTALL_HELP)
    nltk_data = Path(os.environ.get("DUALRL_NLTK_DATA") or DEFAULT_NLTK_DATA).expanduser()
    build_nltk_data(source, nltk_data)
    if str(nltk_data) not in nltk.data.path:
        nltk.data.path.insert(0, str(nltk_data))
    try:
        return _load_nltk_wordnet()
    except (LookupError, OSError, ValueError) as e:
        raise RuntimeError(f"{INSTALL_HELP}\n(The database in {source} could not be loaded: {e})") from e


def ensure_wordnet() -> str:
    """Make `nltk.corpus.wordnet` loadable (and load it); return the corpus folder nltk reads it from.

    Cheap after the first success in a process. Raises RuntimeError with install instructions when no WordNet
    can be found."""
    global _found
    if _found is None:
        _found = _locate()
    return _found


def main() -> int:
    """CLI: say where WordNet is and print a METEOR smoke score that needs its synonyms."""
    try:
        where = ensure_wordnet()
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    from rewards.meteor import meteor_scores

    caption, reference = "a red car on the left", "a red auto at left"
    (score,) = meteor_scores([caption], [[reference]])
    print(f"WordNet: {where}")
    print(f"METEOR({caption!r} vs {reference!r}) = {score:.3f} (0.501 without the synonym car ~ auto)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
