"""The classifier's network in PyTorch, and scoring texts with it.

The package builds (toxic_classifier/model.py): Input(100) -> Embedding(20000, 50) ->
Bidirectional(LSTM(50, return_sequences=True)) -> GlobalMaxPooling1D -> Dense(50, relu) ->
Dropout -> Dense(6, sigmoid), fed by `pad_sequences(maxlen=100)`: zeros in front, and only
the last 100 word ids of a longer text. Dropout is inactive at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from k2serve.safety.labels import LABELS
from k2serve.safety.tokenizer import WordTokenizer

MAXLEN = 100  # the package's sequence length
WINDOW_STEP = 50  # long texts: windows of MAXLEN ids, half overlapping
BATCH = 256  # windows per forward pass


class ToxicityNet(nn.Module):
    def __init__(self, vocab: int = 20000, dim: int = 50, units: int = 50, hidden: int = 50,
                 labels: int = len(LABELS)):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, units, batch_first=True, bidirectional=True)
        self.hidden = nn.Linear(2 * units, hidden)
        self.output = nn.Linear(hidden, labels)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(batch, MAXLEN) word ids, 0-padded in front -> (batch, labels) probabilities."""
        states, _ = self.lstm(self.embedding(ids))
        pooled = states.amax(dim=1)  # GlobalMaxPooling1D over time, padding included
        return torch.sigmoid(self.output(torch.relu(self.hidden(pooled))))


def pad(ids: list[int]) -> list[int]:
    """Keras `pad_sequences(maxlen=MAXLEN)`: pre-padding, pre-truncation."""
    return [0] * (MAXLEN - len(ids)) + ids[-MAXLEN:]


def windows(ids: list[int]) -> list[list[int]]:
    """A text longer than MAXLEN ids is scored in overlapping windows (the package would see
    only its last MAXLEN ids, missing anything earlier). The last window is exactly what the
    package sees, so texts up to MAXLEN ids score exactly as the package scores them."""
    if len(ids) <= MAXLEN:
        return [pad(ids)]
    starts = list(range(0, len(ids) - MAXLEN, WINDOW_STEP)) + [len(ids) - MAXLEN]
    return [ids[s:s + MAXLEN] for s in starts]


@dataclass
class TextScore:
    scores: dict[str, float]  # label -> probability; max over windows for a long text
    words: int  # words the tokenizer split the text into (what usage counts)


class ToxicityClassifier:
    def __init__(self, directory: str | Path):
        directory = Path(directory)
        self.tokenizer = WordTokenizer.from_file(directory / "tokenizer.json")
        self.net = ToxicityNet(vocab=self.tokenizer.vocab_size)
        self.net.load_state_dict(load_file(str(directory / "model.safetensors")))
        self.net.eval()

    @torch.inference_mode()
    def score(self, texts: list[str], *, tail: bool = False) -> list[TextScore]:
        """Scores per text. `tail`: only each text's last MAXLEN ids (the package's view;
        one fixed-cost window, for checks that run again as a text grows)."""
        words = [self.tokenizer.words(t) for t in texts]
        ids = [self.tokenizer.ids(w) for w in words]
        per_text = [[pad(i)] if tail else windows(i) for i in ids]
        flat = [w for ws in per_text for w in ws]
        probs = []
        for start in range(0, len(flat), BATCH):  # bounded memory for long inputs
            probs += self.net(torch.tensor(flat[start:start + BATCH], dtype=torch.long)).tolist()
        results, row = [], 0
        for ws, w in zip(per_text, words):
            rows = probs[row:row + len(ws)]
            row += len(ws)
            results.append(TextScore({label: max(r[i] for r in rows)
                                      for i, label in enumerate(LABELS)}, len(w)))
        return results
