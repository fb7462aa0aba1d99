"""Model loading: `embedded`, offline errors, and loads from several threads at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from modules.models import load_model


def test_threads_can_load_at_the_same_time():
    """The sweep's thread runner loads one model per member concurrently."""
    with ThreadPoolExecutor(4) as pool:
        models = list(pool.map(lambda _: load_model("embedded", device="cpu")[0], range(4)))
    first = models[0].state_dict()
    for other in models[1:]:
        assert all(torch.equal(first[k], v) for k, v in other.state_dict().items())


def test_unknown_hub_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        load_model("some-org/some-model")
