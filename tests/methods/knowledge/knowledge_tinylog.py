"""A hand-written interaction log small enough to check generated prompts word by word."""

import pandas as pd

from recalign.data.dataset import RecDataset

TITLES = {
    "i1": "Alien (1979)",
    "i2": "Heat (1995)",
    "i3": "Toy Story (1995)",
    "i4": "Usual Suspects, The (1995)",
    "i5": "Fargo (1996)",
    "i6": "Babe (1995)",
    "i7": "Casablanca (1942)",
}
# user, item, timestamp, rating -- u1 has 5 events (train targets at positions 1, 2), u2 has 4 (train: 1)
LOG = [
    ("u1", "i1", 1, 5),
    ("u1", "i2", 2, 3),
    ("u1", "i3", 3, 4),
    ("u1", "i4", 4, 2),
    ("u1", "i5", 5, 1),
    ("u2", "i3", 1, 4),
    ("u2", "i6", 2, 5),
    ("u2", "i1", 3, 3),
    ("u2", "i2", 4, 2),
    ("u3", "i7", 1, 4),
    ("u3", "i6", 2, 4),
    ("u3", "i5", 3, 4),
]


def make_tiny() -> RecDataset:
    inter = pd.DataFrame(LOG, columns=["user", "item", "timestamp", "rating"])
    items = pd.DataFrame({"item": list(TITLES), "title": list(TITLES.values())})
    return RecDataset.from_frames("ml-tiny", inter, items)
