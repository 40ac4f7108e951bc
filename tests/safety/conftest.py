"""A converted classifier shared by the safety tests (conversion takes well under a second)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    import torch
    torch.set_num_threads(1)
    from k2serve.safety.convert import converted_dir
    from k2serve.safety.model import ToxicityClassifier
    return ToxicityClassifier(converted_dir(tmp_path_factory.mktemp("safety-data")))
