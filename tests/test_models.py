from __future__ import annotations

import pytest
import torch

from deepfleet.errors import ModelError
from deepfleet.models import build_model, zoo_names
from tests.conftest import ZOO_SHAPES


def user_model(input_shape, num_classes):  # used through "tests.test_models:user_model"
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(torch.tensor(input_shape).prod()), num_classes))


def user_model_no_args():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))


def not_a_model(input_shape, num_classes):
    return "nope"


def test_lenet5_is_the_papers_431k_network() -> None:
    m = build_model("lenet5", input_shape=(1, 28, 28), num_classes=10)
    assert sum(p.numel() for p in m.parameters()) == 431_080


@pytest.mark.parametrize("name", sorted(ZOO_SHAPES))
def test_zoo_models_adapt_to_shape_and_classes(name: str) -> None:
    shape = ZOO_SHAPES[name]
    m = build_model(name, input_shape=shape, num_classes=5)
    assert m(torch.randn(3, *shape)).shape == (3, 5)


def test_deepear_is_deepears_2_3m_dnn_on_24_bands_by_8_frames() -> None:
    m = build_model("deepear", input_shape=(24, 8), num_classes=8)
    widths = [layer.out_features for layer in m.modules() if isinstance(layer, torch.nn.Linear)]
    assert widths == [1024, 1024, 1024, 8]
    # 2 x (1024 x 1024 + 1024) + (192 x 1024 + 1024) + (1024 x 8 + 8)
    assert sum(p.numel() for p in m.parameters()) == 2_305_032


def test_zoo_lists_all_six() -> None:
    assert zoo_names() == ["bilstm", "deepear", "deepsense", "lenet5", "mlp", "vgg"]


def test_user_model_gets_shape_and_classes_when_it_takes_them() -> None:
    m = build_model("tests.test_models:user_model", input_shape=(1, 4, 4), num_classes=3)
    assert m(torch.randn(2, 1, 4, 4)).shape == (2, 3)
    m = build_model("tests.test_models:user_model_no_args", input_shape=(1, 28, 28), num_classes=10)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    ("spec", "shape", "needle"),
    [
        ("resnet", (1, 28, 28), "unknown model 'resnet'"),
        ("no_such_module_xyz:f", (1, 28, 28), "cannot import module"),
        ("tests.test_models:missing", (1, 28, 28), "no callable 'missing'"),
        ("tests.test_models:not_a_model", (1, 28, 28), "not a torch.nn.Module"),
        ("lenet5", (1, 8, 8), "at least 16x16"),
        ("lenet5", (6, 64), "images shaped (C, H, W)"),
        ("deepsense", (1, 28, 28), "(C, T)"),
        ("deepsense", (4, 64), "not a multiple of 3"),
    ],
)
def test_bad_model_specs_name_the_problem(spec: str, shape: tuple[int, ...], needle: str) -> None:
    with pytest.raises(ModelError, match=None) as err:
        build_model(spec, input_shape=shape, num_classes=10)
    assert needle in str(err.value)
