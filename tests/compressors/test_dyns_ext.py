"""DyNS-Ext: dynamic network surgery on the input-to-hidden and hidden-to-hidden matrices of
LSTM and GRU layers (``dns`` with ``recurrent``), and the sparse storage of what it pruned."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deepfleet.api import export_artifact
from deepfleet.compressors import DNSConfig, make_compressor, run_pipeline
from deepfleet.compressors._sparse import SurgeryWeights, recurrent_weight_names
from deepfleet.data import Dataset
from deepfleet.device_agent.runtime import Model
from deepfleet.errors import ConfigError
from deepfleet.models import build_model
from tests.conftest import TinyGRU, quick_context


def _sequences(channels: int, steps: int, n: int = 96) -> Dataset:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, channels, steps)).astype(np.float32)
    y = (X[:, 0].mean(1) > 0).astype(np.int64) + 2 * (X[:, 1].mean(1) > 0)
    t = n // 3
    return Dataset(name="seq", X_train=X[:t], y_train=y[:t], X_val=X[t:2 * t], y_val=y[t:2 * t],
                   X_test=X[2 * t:], y_test=y[2 * t:], num_classes=4, fingerprint="seq")


def _bilstm() -> tuple[nn.Module, Dataset]:
    torch.manual_seed(0)
    data = _sequences(6, 6)
    return build_model("bilstm", input_shape=(6, 6), num_classes=4).eval(), data


def _gru() -> tuple[nn.Module, Dataset]:
    torch.manual_seed(0)
    return TinyGRU(channels=6).eval(), _sequences(6, 12)


@pytest.mark.parametrize("make", [_bilstm, _gru], ids=["bilstm", "gru"])
def test_dyns_ext_prunes_every_recurrent_matrix(make) -> None:
    model, data = make()
    names = recurrent_weight_names(model)
    assert any("weight_ih" in n for n in names) and any("weight_hh" in n for n in names)
    if isinstance(model, TinyGRU):
        assert len(names) == 4  # 2 layers x (ih, hh)
    else:
        assert len(names) == 8 and any(n.endswith("_reverse") for n in names)  # 2 layers x 2 directions
    res = run_pipeline(model, data, [make_compressor("dns", {"target": 0.2, "update_every": 2})], ctx=quick_context())
    params = dict(res.model.named_parameters())
    kept = {n: float((params[n] != 0).float().mean()) for n in names}
    assert all(0 < k < 0.9 for k in kept.values()), kept  # every matrix was cut, none emptied
    rows = {r["weight"]: r for r in res.steps[0]["info"]["layers"]}
    assert sum(r["nonzero"] for r in rows.values()) <= round(0.2 * sum(r["params"] for r in rows.values()))
    assert set(names) <= res.sparse
    ex, art = export_artifact(res.model, model="m", data=data, seed=0, compressor={"methods": ["dns"]},
                              val_accuracy=0.0, sparse=res.sparse)
    rnn = next(o for o in ex.graph["ops"] if o["op"] == "rnn")
    encodings = {ex.graph["tensors"][ref]["encoding"] for role, ref in rnn["weights"].items() if "_w_" in role}
    assert encodings == {"sparse"}  # stored as their nonzeros
    with torch.no_grad():
        ref = res.model(torch.as_tensor(data.X_test)).numpy()
    out = Model(ex.graph, ex.arrays).run(data.X_test)
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5


def test_without_recurrent_the_recurrent_matrices_stay_dense() -> None:
    model, data = _gru()
    res = run_pipeline(model, data, [make_compressor("dns", {"target": 0.2, "recurrent": False, "update_every": 2})],
                       ctx=quick_context())
    params = dict(res.model.named_parameters())
    for n in recurrent_weight_names(model):
        assert bool((params[n] != 0).all()) and n not in res.sparse
    assert float((params["fc.weight"] != 0).float().mean()) < 0.9
    assert res.steps[0]["info"]["dense_recurrent"] == sorted(recurrent_weight_names(model))


def test_surgery_splices_a_cut_recurrent_weight_back_when_it_grows() -> None:
    model, _ = _gru()
    names = recurrent_weight_names(model)
    cfg = DNSConfig(target=0.5, margin=0.1, anneal=0.0, update_every=1)
    surgery = SurgeryWeights(model, cfg, total_steps=10, names=names)
    surgery.after_step()  # the first update cuts to half
    w, mask = surgery.w[names[1]], surgery.mask[names[1]]
    cut = torch.nonzero(~mask)[0]
    assert not mask[tuple(cut)]
    with torch.no_grad():  # the straight-through gradient made the cut weight large
        w[tuple(cut)] = 100.0
    surgery.after_step()
    assert surgery.mask[names[1]][tuple(cut)]  # spliced back


def test_recurrent_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError, match="dns: recurrent must be true or false, but got 'no'"):
        make_compressor("dns", {"recurrent": "no"})
