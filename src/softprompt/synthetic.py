"""The embedded default task: product reviews generated from a fixed seed, so a fresh machine needs no data.

Each review mixes two or three opinion phrases about aspects of a product; its label is the
majority polarity. Mixed reviews ("great screen but the battery is awful, and it feels cheap")
make the task more than keyword spotting, yet a small encoder learns it within a couple of
minutes on a CPU.
"""

from __future__ import annotations

import random

PRODUCTS = ["phone", "laptop", "blender", "jacket", "camera", "headset", "backpack", "kettle", "monitor", "bike"]
ASPECTS = ["battery", "screen", "price", "design", "sound", "build quality", "delivery", "support", "size", "colour"]
POSITIVE = [
    "great",
    "excellent",
    "superb",
    "lovely",
    "impressive",
    "fantastic",
    "solid",
    "reliable",
    "brilliant",
    "perfect",
]
NEGATIVE = [
    "awful",
    "terrible",
    "poor",
    "disappointing",
    "flimsy",
    "useless",
    "dreadful",
    "broken",
    "cheap-feeling",
    "bad",
]
OPENERS = ["I bought this {product} last month.", "Got the {product} as a gift.", "This {product} arrived on time.", ""]
JOINERS = [", and ", ", but ", "; ", ", although "]
LABELS = ["negative", "positive"]


def _phrase(rng: random.Random, positive: bool) -> str:
    word = rng.choice(POSITIVE if positive else NEGATIVE)
    aspect = rng.choice(ASPECTS)
    return rng.choice([f"the {aspect} is {word}", f"{word} {aspect}", f"the {aspect} feels {word}"])


def review(rng: random.Random) -> dict:
    """One labelled review; the majority of its opinion phrases sets the label."""
    count = rng.choice([1, 3, 3])
    label = rng.randrange(2)
    majority = count // 2 + 1
    polarities = [label == 1] * majority + [label != 1] * (count - majority)
    rng.shuffle(polarities)
    body = _phrase(rng, polarities[0])
    for polarity in polarities[1:]:
        body += rng.choice(JOINERS) + _phrase(rng, polarity)
    opener = rng.choice(OPENERS).format(product=rng.choice(PRODUCTS))
    text = f"{opener} {body[0].upper()}{body[1:]}.".strip()
    return {"text": text, "label": LABELS[label]}


def generate(split: str, size: int, seed: int = 0) -> list[dict]:
    """Rows of one split; splits draw from separate streams so they never share a generator state."""
    rng = random.Random(f"{seed}-{split}")
    return [review(rng) for _ in range(size)]
