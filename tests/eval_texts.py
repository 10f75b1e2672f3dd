"""Small text sets for MAUVE tests: English prose of the Python docs, and lines of digits."""

import random
import re
from pydoc_data.topics import topics


def english(num: int, seed: int) -> list[str]:
    """Short sentences of the Python reference manual (pydoc_data), a seeded shuffle."""
    sentences = sorted({s for text in topics.values()
                        for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
                        if 40 < len(s) < 120 and s[0].isupper()})
    random.Random(seed).shuffle(sentences)
    return sentences[:num]


def digits(num: int, seed: int) -> list[str]:
    """Lines of random numbers: a generator with nothing in common with English prose."""
    rng = random.Random(seed)
    return [" ".join(str(rng.randrange(10 ** rng.randint(1, 6))) for _ in range(rng.randint(5, 15)))
            for _ in range(num)]
