"""How the command line loads models: names, import paths, specs and weights-only checkpoints."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from torch import nn

import cli_models
from fcconv.cli._loading import as_fcn_source, build_model, load_checkpoint, load_model
from fcconv.errors import FcconvError

if TYPE_CHECKING:
    from click.testing import Result


@pytest.fixture(autouse=True)
def _models_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def test_import_path_factory_is_seeded_and_in_eval_mode() -> None:
    a = load_model("cli_models:factory", seed=3)
    b = load_model("cli_models:factory", seed=3)
    assert isinstance(a.module, nn.Sequential) and not a.module.training
    assert a.structure == "cli_models:factory"
    for pa, pb in zip(a.module.parameters(), b.module.parameters()):
        assert torch.equal(pa, pb)


def test_factory_kwargs() -> None:
    model = load_model("cli_models:factory", kwargs="channels=3, classes=5").module
    assert model[0].in_channels == 3 and model[-1].out_features == 5
    assert load_model("cli_models:needs_width", kwargs="width=6").module.in_features == 6


def test_module_attribute_is_accepted() -> None:
    assert load_model("cli_models:MODULE_INSTANCE").module.in_features == 4


def test_module_in_the_current_folder_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "here_models.py").write_text("import torch\ndef make():\n    return torch.nn.Linear(3, 1)\n")
    monkeypatch.chdir(tmp_path)
    assert load_model("here_models:make").module.in_features == 3


def test_torchvision_name_resolves_without_download() -> None:
    pytest.importorskip("torchvision")
    loaded = load_model("torchvision:squeezenet1_1", kwargs="num_classes=7")
    assert type(loaded.module).__name__ == "SqueezeNet"
    assert not loaded.module.training
    out = loaded.module(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 7)


@pytest.mark.parametrize(
    ("reference", "start"),
    [
        ("torchvision:resnet181", "Unknown torchvision model 'resnet181'. Did you mean torchvision:resnet18"),
        ("resnet18", "Unknown model 'resnet18'"),
        ("no_such_module_xyz:factory", "Cannot import 'no_such_module_xyz'"),
        ("cli_models:nope", "Module 'cli_models' has no attribute 'nope'"),
        ("cli_models:not_a_module", "cli_models:not_a_module() returned a int"),
        ("cli_models:NOT_CALLABLE", "cli_models:NOT_CALLABLE is a int"),
        ("cli_models:needs_width", "Calling cli_models:needs_width() failed"),
        ("cli_models:broken", "Calling cli_models:broken() failed: RuntimeError: the factory is broken"),
        ("cli_models:factory; import os", "Cannot read the model"),
        ("missing.pt", "Checkpoint file 'missing.pt' not found"),
    ],
)
def test_bad_references(reference: str, start: str) -> None:
    with pytest.raises(FcconvError) as info:
        load_model(reference)
    assert str(info.value).startswith(start)


def test_checkpoint_fills_the_factory_model(tmp_path: Path) -> None:
    source = cli_models.factory()
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    loaded = load_model(str(path), factory="cli_models:factory")
    for a, b in zip(loaded.module.state_dict().values(), source.state_dict().values()):
        assert torch.equal(a, b)
    assert loaded.structure == "cli_models:factory"
    # Also under a usual key, e.g. {"state_dict": ...}.
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    assert torch.equal(load_model(str(path), factory="cli_models:factory").module[0].weight, source[0].weight)


def test_checkpoint_errors(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(cli_models.factory().state_dict(), path)
    with pytest.raises(FcconvError, match="holds weights only .* pass --factory"):
        load_model(str(path))
    with pytest.raises(FcconvError, match="do not fit the model from cli_models:factory: .*wrong shape"):
        load_model(str(path), factory="cli_models:factory", kwargs="classes=4")
    with pytest.raises(FcconvError, match="do not fit .* missing keys"):
        load_model(str(path), factory="cli_models:conv_layer")
    torch.save(nn.Linear(2, 2), path)  # a pickled module: never unpickled
    with pytest.raises(FcconvError, match="is not a weights-only checkpoint"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(FcconvError, match="not a PyTorch checkpoint, or a corrupt one"):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(FcconvError, match="not a PyTorch checkpoint, or a corrupt one"):
        load_checkpoint(path)
    torch.save([1, 2], path)
    with pytest.raises(FcconvError, match="holds a list but no state dict"):
        load_model(str(path), factory="cli_models:factory")


def test_as_fcn_source_wraps_only_a_bare_linear() -> None:
    linear = nn.Linear(12, 2)
    wrapped = as_fcn_source(linear)
    assert isinstance(wrapped, nn.Sequential) and wrapped[1] is linear
    x = torch.randn(2, 3, 2, 2)
    assert torch.equal(wrapped(x), linear(x.flatten(1)))
    model = cli_models.factory()
    assert as_fcn_source(model) is model


def test_build_model_refuses_kwargs_on_a_spec() -> None:
    with pytest.raises(FcconvError, match="^A layer spec takes no --kwargs"):
        build_model("Linear(4, 2)", kwargs="bias=False")


# --------------------------------------------------------------------------------------------
# timm:NAME, driven through the real entry point


def _fcconv(*args: str) -> Result:
    from click.testing import CliRunner

    from fcconv.cli import app

    return CliRunner().invoke(app, list(args), prog_name="fcconv")


def _one_line_error(result: Result, start: str) -> None:
    assert result.exit_code == 1, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {start}"), result.stderr


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test: timm models must be built offline."""
    import socket

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_timm_name_converts_and_verifies_offline(tmp_path: Path, no_network: None) -> None:
    pytest.importorskip("timm")
    out = tmp_path / "fcn.pt"
    result = _fcconv("convert", "timm:test_resnet", "--kwargs", "num_classes=3", "--input", "3,64,64",
                     "--to", "fcn", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "timm:test_resnet --to fcn" in result.output and "outputs 3" in result.output
    saved = torch.load(out, weights_only=True)
    assert saved["structure"] == "timm:test_resnet" and saved["kwargs"] == "num_classes=3"
    # verify rebuilds the FCN from the recorded timm name and compares it with a fresh build.
    result = _fcconv("verify", "timm:test_resnet", str(out), "--kwargs", "num_classes=3")
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("on (3, 64, 64): equivalent")


def test_timm_name_is_seeded_random_weights_in_eval_mode() -> None:
    pytest.importorskip("timm")
    a, b = load_model("timm:test_resnet", seed=1), load_model("timm:test_resnet", seed=1)
    c = load_model("timm:test_resnet", seed=2)
    assert type(a.module).__name__ == "ResNet" and not a.module.training
    assert a.structure == "timm:test_resnet"
    assert torch.equal(a.module.conv1[0].weight, b.module.conv1[0].weight)
    assert not torch.equal(a.module.conv1[0].weight, c.module.conv1[0].weight)


@pytest.mark.parametrize(
    ("args", "start"),
    [
        (["timm:resnet181"], "Unknown timm model 'resnet181'. Did you mean timm:resnet18,"),
        (["timm:hf-hub:timm/resnet18.a1_in1k"], "Unknown timm model 'hf-hub:timm/resnet18.a1_in1k'."),
        (["timm:resnet18.no_such_tag"], "timm could not build 'resnet18.no_such_tag': RuntimeError: Invalid"),
        (["timm:test_resnet", "--kwargs", "nonsense=1"],
         "timm:test_resnet does not take --kwargs {'nonsense': 1}: "),
        (["resnet10t"], "Unknown model 'resnet10t': expected torchvision:NAME"),
    ],
)
def test_timm_bad_names(args: list[str], start: str, tmp_path: Path, no_network: None) -> None:
    pytest.importorskip("timm")
    result = _fcconv("convert", *args, "--input", "3,64,64", "--to", "fcn", "-o", str(tmp_path / "x.pt"))
    _one_line_error(result, start)
    if args == ["resnet10t"]:
        assert result.stderr.strip().endswith("Did you mean timm:resnet10t?")
    assert not list(tmp_path.iterdir())


def test_timm_missing_names_the_models_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    result = _fcconv("convert", "timm:resnet18", "--input", "3,224,224", "--to", "fcn",
                     "-o", str(tmp_path / "x.pt"))
    _one_line_error(result, "timm:resnet18 needs timm, which is not installed. "
                            "Install it with pip install 'fcconv[models]'.")
