"""What the tools write reads as English: articles before the probe's colours, singular counts."""

from __future__ import annotations

import json
import re

from PIL import Image

from clipscale.data.probe import main as probe_main
from clipscale.data.shards import main as shards_main

ARTICLE = re.compile(r"\b(an?) (\w+)")


def test_probe_captions_take_an_before_a_vowel_and_a_before_a_consonant(tmp_path):
    probe_main(["--output", str(tmp_path / "probe"), "--per-type", "40"])
    texts = []
    for line in (tmp_path / "probe" / "probe.jsonl").read_text().splitlines():
        sample = json.loads(line)
        texts += [sample["caption"], *sample["foils"]]
    pairs = [match.groups() for text in texts for match in ARTICLE.finditer(text)]
    assert ("an", "orange") in pairs  # the vowel case occurs in this probe
    wrong = {
        (article, word) for article, word in pairs if (article == "an") != (word[0] in "aeiou")
    }
    assert wrong == set()


def test_shard_writer_counts_one_shard_in_the_singular(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "only.png")
    (tmp_path / "in" / "only.txt").write_text("a black square")
    shards_main(["--images", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    assert "wrote 1 sample in 1 shard to " in capsys.readouterr().out
