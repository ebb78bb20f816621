"""LibriSpeech loader and the paper's speaker-unlearning protocol, on a small tree laid out like the real one."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from orthograd.data.audio import SpeechDataset
from orthograd.data.librispeech import (
    pick_speakers,
    scan_librispeech,
    shorter_than,
    speaker_unlearning_split,
)


def _fake_split(root, speakers, *, chapters=2, per_chapter=10, seconds=0.2):
    for s, speaker in enumerate(speakers):
        for c in range(chapters):
            chapter = str(100 + c)
            folder = root / speaker / chapter
            folder.mkdir(parents=True)
            lines = []
            for n in range(per_chapter):
                utt = f"{speaker}-{chapter}-{n:04d}"
                length = int(16_000 * seconds * (2 if n == 0 and s == 0 else 1))
                soundfile.write(folder / f"{utt}.flac", np.zeros(length, dtype=np.float32), 16_000)
                lines.append(f"{utt} WORDS OF SPEAKER {speaker} LINE {n}")
            (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("LibriSpeech")
    train_speakers = [str(19 + 7 * i) for i in range(8)]
    _fake_split(root / "train-clean-100", train_speakers)
    _fake_split(root / "test-clean", ["1089", "121"], chapters=1, per_chapter=5)
    return root


def test_scan_reads_every_utterance_with_its_transcript(tree):
    train = scan_librispeech(tree / "train-clean-100")
    assert len(train) == 8 * 2 * 10
    first = train[0]
    assert first.path.suffix == ".flac" and first.path.is_file()
    assert first.text == f"WORDS OF SPEAKER {first.speaker} LINE 0"
    with pytest.raises(FileNotFoundError, match="trans.txt"):
        scan_librispeech(tree / "missing")


def test_speaker_split_follows_the_paper_protocol(tree):
    train = scan_librispeech(tree / "train-clean-100")
    test = scan_librispeech(tree / "test-clean")
    speakers = pick_speakers(train, count=5, seed=3)
    assert len(set(speakers)) == 5 and speakers == pick_speakers(train, count=5, seed=3)
    for speaker in speakers:
        split = speaker_unlearning_split(train, test, speaker=speaker, seed=0)
        own = [u for u in train if u.speaker == speaker]
        assert len(split.speaker_heldout) == 2 == round(0.1 * len(own))
        assert len(split.unlearn) == len(own) - 2
        assert {u.speaker for u in split.unlearn + split.speaker_heldout} == {speaker}
        assert len(split.retain) == round(0.1 * (len(train) - len(own))) == 14
        assert speaker not in {u.speaker for u in split.retain}
        ids = [u.id for u in split.unlearn + split.speaker_heldout + split.retain]
        assert len(ids) == len(set(ids))
        assert split.test == test
    again = speaker_unlearning_split(train, test, speaker=speakers[0], seed=0)
    other_seed = speaker_unlearning_split(train, test, speaker=speakers[0], seed=1)
    assert again == speaker_unlearning_split(train, test, speaker=speakers[0], seed=0)
    assert other_seed.retain != again.retain


def test_long_utterances_are_filtered_and_flac_is_featurised(tree):
    train = scan_librispeech(tree / "train-clean-100")
    kept = shorter_than(train, 0.3)
    assert len(kept) == len(train) - 2  # the two 0.4 s recordings of the first speaker
    item = SpeechDataset([(kept[0].path, kept[0].text)], window_s=2.0)[0]
    assert item["input_features"].shape == (80, 200) and item["text"] == kept[0].text
