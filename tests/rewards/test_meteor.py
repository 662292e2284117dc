"""The `meteor` reward and the WordNet set-up, on the real WordNet (no mocks).

WordNet must be installed (see `rewards/wordnet.py`); the set-up tests that build an nltk data folder run
in subprocesses so that this process's loaded `nltk.corpus.wordnet` and `nltk.data.path` stay untouched.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nltk.translate.meteor_score import meteor_score

from rewards.base import RewardInput
from rewards.meteor import Meteor, meteor_scores, tokenize
from rewards.wordnet import DEBIAN_WORDNET_DIR, LEXNAMES, build_nltk_data, ensure_wordnet, lexnames_text

REPO = Path(__file__).resolve().parents[2]
DEBIAN_DIR = Path(os.environ.get("DUALRL_WORDNET_DIR") or DEBIAN_WORDNET_DIR)
LEXNAMES_MAN = Path("/usr/share/man/man5/lexnames.5WN.gz")
needs_debian = pytest.mark.skipif(not (DEBIAN_DIR / "data.noun").is_file(), reason="no Debian WordNet database")


@pytest.fixture(scope="module", autouse=True)
def wordnet() -> str:
    return ensure_wordnet()


@pytest.fixture(scope="module")
def pooled() -> Meteor:
    """One worker pool for the module (starting it costs a few seconds); chunks of 8 so it is used."""
    meteor = Meteor(workers=2, chunk_size=8)
    yield meteor
    meteor.close()


def one(caption: str, *references: str) -> float | None:
    return meteor_scores([caption], [list(references)])[0]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A red Car, on the LEFT.") == ["a", "red", "car", "on", "the", "left"]


def test_synonyms_raise_the_score():
    with_synonym = one("a red car on the left", "a red auto at left")
    unrelated = one("a red car on the left", "a red banana at left")
    assert with_synonym == pytest.approx(0.7353, abs=1e-4)
    assert unrelated == pytest.approx(0.5011, abs=1e-4)


def test_env_example_matches_nltk():
    """The set-up check's example. nltk's WordNet stage sees stemmed leftovers ("automobil"), so car ~ automobile
    is not matched in either direction: the scores are those of the exact matches alone."""
    a, b = "a red car on the left", "a red automobile at left"
    assert one(b, a) == pytest.approx(0.433, abs=1e-3)
    assert one(b, a) == meteor_score([tokenize(a)], tokenize(b))
    assert one(a, b) == pytest.approx(one(a, "a red banana at left"))


def test_exact_match_scores_one_minus_the_fragmentation_penalty():
    # One chunk of 6 matches: penalty 0.5 * (1/6)^3, F-mean 1.
    assert one("a red car on the left", "A red car on the left.") == pytest.approx(1 - 0.5 / 6**3)


def test_best_reference_counts():
    good, bad = "a small dog near the table", "a blue chair"
    both = one("a small dog next to the table", bad, good)
    assert both == one("a small dog next to the table", good)
    assert both > one("a small dog next to the table", bad)


def test_no_references_is_none_and_empty_caption_is_zero():
    assert meteor_scores(["a dog", "a dog", "", "...", "a cat"], [[], ["", "  "], ["a dog"], ["a dog"], ["a cat"]]) == [
        None,
        None,
        0.0,
        0.0,
        pytest.approx(1 - 0.5 / 2**3),
    ]


def synthetic(n: int, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    words = "a the red large big small little car auto dog cat man person table chair left right on near of".split()

    def sentence() -> str:
        return " ".join(rng.choices(words, k=rng.randint(0, 9)))

    return [sentence() for _ in range(n)], [[sentence() for _ in range(rng.randint(0, 3))] for _ in range(n)]


def test_pool_equals_in_process(pooled: Meteor):
    captions, references = synthetic(50)
    expected = meteor_scores(captions, references)
    assert pooled.score(captions, references) == expected
    assert pooled._pool is not None  # the 50 captions went through the worker processes
    assert Meteor(workers=0).score(captions, references) == expected
    assert None in expected and 0.0 in expected


def test_plugin_scores_a_reward_input_in_caption_order(pooled: Meteor):
    captions = ["a red car", "a blue chair", "a dog on the left", "", "a cat", "a small table near a chair"] * 3
    references = [["a red auto"], ["a blue chair"], ["a dog at left"], ["x"], [], ["a table"]] * 3
    batch = RewardInput(
        captions=captions,
        caption_ids=[torch.tensor([1, 2, 3]) for _ in captions],
        region=torch.arange(len(captions)) // 2,
        images=torch.zeros(9, 3, 4, 4, dtype=torch.uint8),
        masks=torch.zeros(9, 4, 4, dtype=torch.bool),
        references=references,
        group_size=2,
    )
    assert len(batch) >= Meteor.IN_PROCESS_BELOW  # scored by the worker pool
    scores = pooled(batch)
    assert scores == meteor_scores(captions, references)
    assert scores[4] is None and scores[3] == 0.0 and scores[1] == pytest.approx(1 - 0.5 / 3**3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="workers"):
        Meteor(workers=-1)
    with pytest.raises(ValueError, match="reference lists"):
        Meteor(workers=0).score(["a"], [])


def test_lexnames_table():
    lines = [line.split("\t") for line in lexnames_text().splitlines()]
    assert len(lines) == 45 and lines[0] == ["00", "adj.all", "3"] and lines[44] == ["44", "adj.ppl", "3"]
    assert (
        ["03", "noun.Tops", "1"] in lines and ["43", "verb.weather", "2"] in lines and ["02", "adv.all", "4"] in lines
    )


@pytest.mark.skipif(not LEXNAMES_MAN.is_file(), reason="no lexnames(5WN) man page")
def test_lexnames_table_matches_the_man_page():
    table = re.findall(r"^(\d\d)\t(\S+)\s", gzip.decompress(LEXNAMES_MAN.read_bytes()).decode(), re.MULTILINE)
    assert [(f"{i:02d}", name) for i, name in enumerate(LEXNAMES)] == table


def debian_style_dir(tmp_path: Path) -> Path:
    """A WordNet database folder like Debian's (no `lexnames`), made of links to the real files."""
    source = tmp_path / "debian-wordnet"
    source.mkdir()
    for file in DEBIAN_DIR.iterdir():
        if file.is_file() and file.name != "lexnames":
            (source / file.name).symlink_to(file)
    return source


@needs_debian
def test_ensure_wordnet_builds_a_data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DUALRL_WORDNET_DIR", str(debian_style_dir(tmp_path)))
    monkeypatch.setenv("DUALRL_NLTK_DATA", str(tmp_path / "nltk_data"))
    (tmp_path / "empty").mkdir()
    result = run_python(
        "import json, nltk, rewards.wordnet as w\n"
        f"nltk.data.path[:] = [{str(tmp_path / 'empty')!r}]\n"  # nltk's own lookup finds nothing
        "first = w.ensure_wordnet(); w._found = None\n"
        "from rewards.meteor import meteor_scores\n"
        "print(json.dumps([first, w.ensure_wordnet(), meteor_scores(['a car'], [['a auto']])[0]]))"
    )
    assert result.returncode == 0, result.stderr
    first, second, score = json.loads(result.stdout)
    corpus = tmp_path / "nltk_data" / "corpora" / "wordnet"
    assert first == second == str(corpus)
    assert score == pytest.approx(1 - 0.5 / 2**3)  # "car" matched "auto" through WordNet
    assert (corpus / "lexnames").read_text() == lexnames_text()

    before = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in corpus.iterdir()}
    assert build_nltk_data(tmp_path / "debian-wordnet", tmp_path / "nltk_data") == corpus
    assert {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in corpus.iterdir()} == before  # nothing rewritten


def test_missing_wordnet_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DUALRL_WORDNET_DIR", str(tmp_path))
    monkeypatch.setenv("DUALRL_NLTK_DATA", str(tmp_path / "nltk_data"))
    result = run_python(
        f"import sys, nltk, rewards.wordnet as w; nltk.data.path[:] = [{str(tmp_path)!r}]; sys.exit(w.main())"
    )
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert "apt-get install --no-install-recommends wordnet-base wordnet-sense-index" in message
    assert "python -m nltk.downloader wordnet" in message and 'nltk.download("wordnet")' in message
    assert "NLTK_DATA" in message
