"""The package's Keras files are converted once into safetensors + JSON; nothing is
unpickled and TensorFlow is never imported when the classifier loads and runs."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest

from k2serve.safety import convert
from k2serve.safety.safe_pickle import load_tokenizer_state


def test_converts_once_into_the_data_dir(tmp_path):
    target = convert.converted_dir(tmp_path)
    assert sorted(os.listdir(target)) == ["manifest.json", "model.safetensors", "tokenizer.json"]
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["package"] == "toxic-comment-classifier"
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    assert convert.converted_dir(tmp_path) == target
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp  # not redone
    # No temporary directory is left beside it.
    assert os.listdir(target.parent) == [target.name]


def test_a_stale_conversion_is_redone(tmp_path):
    target = convert.converted_dir(tmp_path)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["weights_sha256"] = "0" * 64
    (target / "manifest.json").write_text(json.dumps(manifest))
    (target / "tokenizer.json").write_text("{}")
    convert.converted_dir(tmp_path)
    assert len(json.loads((target / "tokenizer.json").read_text())["words"]) == 19999


def test_loading_and_scoring_unpickle_nothing_and_import_no_tensorflow(tmp_path):
    target = convert.converted_dir(tmp_path)
    script = f"""
import pickle, sys
def refuse(*a, **k):
    raise AssertionError("unpickling at run time")
pickle.load = pickle.loads = refuse
pickle.Unpickler = refuse
from k2serve.safety.model import ToxicityClassifier
scores = ToxicityClassifier({str(target)!r}).score(["You are so dumb and stupid!"])[0].scores
assert scores["toxic"] > 0.9, scores
assert not any(m.split(".")[0] in ("tensorflow", "keras") for m in sys.modules)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_restricted_reader_runs_nothing_a_pickle_names(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        load_tokenizer_state(pickle.dumps(_Exploit(marker)))
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="expected a Keras Tokenizer"):
        load_tokenizer_state(pickle.dumps({"word_index": {}}))


def test_the_package_tokenizer_reads_as_plain_data():
    _, _, tokenizer = convert.package_files()
    spec = convert.tokenizer_json(tokenizer.read_bytes())
    assert spec["num_words"] == 20000 and spec["lower"] is True and spec["split"] == " "
    assert spec["words"][:6] == ["the", "to", "of", "and", "a", "you"]
