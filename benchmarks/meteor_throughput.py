"""METEOR reward throughput: in-process (serial) against the `Meteor` plugin's worker pool.

    python benchmarks/meteor_throughput.py [--captions 2000] [--workers 2 4] [--chunk-size 64] [--repeats 3]

Scores the same synthetic region captions (a fixed seed; 1-3 references each; a small vocabulary with
WordNet synonyms that nltk's METEOR matches, e.g. car ~ auto, sofa ~ couch) serially in this process and
with the pool at each worker count, prints captions/s (best of `--repeats`, pool start-up timed apart) and
the speed-up over serial, and checks that every run gives exactly the serial scores.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable

from rewards.meteor import Meteor, meteor_scores

ARTICLES = ["a", "the", "one"]
COLOURS = ["red", "blue", "green", "white", "black", "yellow"]
SIZES = ["small", "big", "tiny", "large"]
# Synonym pairs that nltk's METEOR matches through WordNet (their Porter stems are the words themselves).
NOUNS = [("car", "auto"), ("sofa", "couch"), ("kid", "child"), ("cab", "taxi"), ("rock", "stone"), ("dog", "dog")]
PLACES = [("near", "close to"), ("below", "under"), ("on", "on"), ("behind", "behind")]
LANDMARKS = ["the table", "the left", "the right", "the window", "the tree", "the door"]


def region_caption(rng: random.Random, synonym: bool) -> str:
    """A caption like "a small red car near the table"; `synonym` takes the second word of each pair."""
    noun, place = rng.choice(NOUNS)[synonym], rng.choice(PLACES)[synonym]
    words = [rng.choice(ARTICLES), rng.choice(SIZES) if rng.random() < 0.5 else "", rng.choice(COLOURS), noun]
    return " ".join(w for w in [*words, place, rng.choice(LANDMARKS)] if w)


def synthetic(n: int, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """`n` captions with 1-3 references each."""
    rng = random.Random(seed)
    captions = [region_caption(rng, synonym=False) for _ in range(n)]
    references = [[region_caption(rng, synonym=rng.random() < 0.5) for _ in range(rng.randint(1, 3))] for _ in range(n)]
    return captions, references


def best_time(fn: Callable[[], list], repeats: int) -> tuple[float, list]:
    """The fastest of `repeats` runs of `fn` (seconds) and its result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    captions, references = synthetic(args.captions)
    meteor_scores(captions[:10], references[:10])  # WordNet loaded and warm before timing
    print(f"{args.captions} captions, {sum(map(len, references))} references, {os.cpu_count()} CPUs")
    serial_s, expected = best_time(lambda: meteor_scores(captions, references), args.repeats)
    serial_rate = args.captions / serial_s
    print(f"in-process      {serial_rate:8.0f} captions/s  1.00x")
    for workers in args.workers:
        meteor = Meteor(workers=workers, chunk_size=args.chunk_size)
        start = time.perf_counter()
        meteor.score(captions, references)  # starts the pool
        first_s = time.perf_counter() - start
        pool_s, scores = best_time(lambda m=meteor: m.score(captions, references), args.repeats)
        meteor.close()
        assert scores == expected, f"workers={workers}: scores differ from the in-process ones"
        rate = args.captions / pool_s
        print(f"pool workers={workers} {rate:8.0f} captions/s  {rate / serial_rate:.2f}x  (first call {first_s:.1f} s)")
    print("scores identical to in-process: yes")


if __name__ == "__main__":
    main()
