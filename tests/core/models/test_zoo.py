"""The model zoo: shapes, parameter counts, starting behaviour, specs, and the fast CGE engine."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core import CGE
from core.engine import trace_model
from core.models import (ARCHS, ConvAutoencoder, DnCNN, FieldCorrector, Normalize, ResNet20, build_model,
                         count_params, from_spec, lenet5, model_spec, small_cnn, with_normalize)

# arch -> (small kwargs, one input sample's shape, the output sample's shape)
CASES = {
    "cnn": ({"depth": 2, "width": 4, "in_channels": 1, "num_classes": 3, "image_size": 8}, (1, 8, 8), (3,)),
    "lenet5": ({"in_channels": 1, "num_classes": 4}, (1, 28, 28), (4,)),
    "resnet20": ({"in_channels": 3, "num_classes": 5}, (3, 32, 32), (5,)),
    "dncnn": ({"in_channels": 1, "depth": 3, "width": 4}, (1, 6, 6), (1, 6, 6)),
    "autoencoder": ({"in_channels": 3, "width": 4, "latent_channels": 2}, (3, 8, 8), (3, 8, 8)),
    "corrector": ({"field_channels": 2, "cond_channels": 1, "width": 4}, (3, 6, 5), (2, 6, 5)),
}


def test_every_arch_has_a_case():
    assert set(CASES) == set(ARCHS)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_shape_contract(arch):
    kwargs, shape_in, shape_out = CASES[arch]
    model = build_model(arch, **kwargs).eval()
    assert model(torch.randn(2, *shape_in)).shape == (2, *shape_out)


def test_parameter_counts_match_the_paper_and_the_classification_app():
    assert [count_params(small_cnn(d, 18, 3)) for d in range(1, 6)] == [730, 3700, 6670, 9640, 12610]
    assert [count_params(small_cnn(d, 18, 1)) for d in range(1, 6)] == [406, 3376, 6346, 9316, 12286]
    assert count_params(build_model("cnn", depth=3, in_channels=1, image_size=28)) == 6346
    assert count_params(ResNet20()) == 269_722
    assert count_params(lenet5()) == 61_706
    assert count_params(DnCNN()) == 558_400                     # depth 17, width 64, RGB (Zhang et al. 2017)
    assert count_params(FieldCorrector()) == 2_618


def test_count_params_counts_only_trainable_parameters():
    model = small_cnn(1, 18, 1)
    model[-1].requires_grad_(False)                             # Linear(18, 10): 190 parameters
    assert count_params(model) == 406 - 190


def test_dncnn_starts_as_the_identity_and_learns_a_residual():
    torch.manual_seed(0)
    model = DnCNN(in_channels=3, depth=4, width=8)
    x = torch.rand(2, 3, 10, 12)
    assert torch.equal(model(x), x) and torch.equal(model.eval()(x), x)
    last = model.body[-1]
    assert isinstance(last, nn.Conv2d) and last.bias is None and not last.weight.any()
    with torch.no_grad():
        last.weight.normal_()
    assert torch.allclose(model(x), x - model.body(x))          # D(x) = x − R(x)


def test_corrector_starts_as_no_correction():
    torch.manual_seed(0)
    model = FieldCorrector(field_channels=2, cond_channels=2, width=6, depth=4, kernel_size=3)
    field, reynolds = torch.randn(3, 2, 8, 16), torch.full((3, 2, 8, 16), 500.0)
    out = model(torch.cat([field, reynolds], dim=1))            # [B, field + cond, H, W] -> [B, field, H, W]
    assert out.shape == (3, 2, 8, 16) and torch.equal(out, torch.zeros_like(out))
    with pytest.raises(ValueError, match="odd kernel_size"):
        FieldCorrector(kernel_size=4)


def test_autoencoder_latent_has_the_zo_ae_ds_size():
    ae = ConvAutoencoder().requires_grad_(False)                # CIFAR-10 defaults
    x = torch.rand(2, 3, 32, 32)
    z = ae.encode(x)
    assert z.shape == (2, 3, 8, 8) and z[0].numel() == 192 and ae.latent_shape(32, 32) == (3, 8, 8)
    y = ae.decode(z)
    assert y.shape == x.shape and float(y.min()) > 0 and float(y.max()) < 1      # sigmoid: pixels
    assert torch.equal(ae(x), y)
    small = ConvAutoencoder(in_channels=1, width=4, latent_channels=5, downsamples=1, bounded=False)
    assert small.encode(torch.rand(1, 1, 28, 28)).shape == (1, 5, 14, 14)
    with pytest.raises(ValueError, match="divisible by 4"):
        ae.latent_shape(30, 32)


def test_normalize_layer_standardises_each_channel():
    norm = Normalize((0.5, 0.25), (0.5, 2.0))
    x = torch.rand(2, 2, 3, 3)
    expected = torch.stack([(x[:, 0] - 0.5) / 0.5, (x[:, 1] - 0.25) / 2.0], dim=1)
    assert torch.allclose(norm(x), expected)
    assert set(norm.state_dict()) == {"mean", "std"} and not list(norm.parameters())
    assert norm.double()(x.double()).dtype == torch.float64
    with pytest.raises(ValueError, match="every std > 0"):
        Normalize([0.1, 0.2], [0.3])


def _save_and_load(tmp_path, spec, state_dict):
    path = tmp_path / "model.pt"
    torch.save({"model_spec": spec, "model": state_dict}, path)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_spec_round_trip_through_a_weights_only_checkpoint(arch, tmp_path):
    torch.manual_seed(0)
    kwargs, shape_in, _ = CASES[arch]
    model = build_model(arch, **kwargs)
    with torch.no_grad():                                       # move off the zero init / BN defaults
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.train()(torch.randn(4, *shape_in))                    # give BatchNorm running statistics
    spec = model_spec(model)
    assert spec == {"arch": arch, "kwargs": spec["kwargs"], "normalize": None}
    assert kwargs.items() <= spec["kwargs"].items()             # defaults filled in: self-describing
    ckpt = _save_and_load(tmp_path, spec, model.state_dict())
    rebuilt = from_spec(ckpt["model_spec"], ckpt["model"]).eval()
    x = torch.randn(3, *shape_in)
    assert torch.equal(rebuilt(x), model.eval()(x))
    assert model_spec(rebuilt) == spec


def test_spec_of_a_model_trained_on_normalised_data_rebuilds_it_for_pixels(tmp_path):
    torch.manual_seed(0)
    model = build_model("cnn", depth=2, width=4, in_channels=3, num_classes=3).eval()
    normalization = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}
    spec = model_spec(model, normalize=normalization)           # what Dataset.normalization gives
    assert spec["normalize"] == normalization
    ckpt = _save_and_load(tmp_path, spec, model.state_dict())   # the bare model's weights
    rebuilt = from_spec(ckpt["model_spec"], ckpt["model"]).eval()
    assert isinstance(rebuilt[0], Normalize)
    pixels = torch.rand(2, 3, 8, 8)
    standardised = (pixels - torch.tensor(normalization["mean"]).view(1, 3, 1, 1)) / torch.tensor(
        normalization["std"]).view(1, 3, 1, 1)
    assert torch.equal(rebuilt(pixels), model(standardised))
    assert model_spec(rebuilt) == spec


def test_spec_of_a_model_with_its_own_normalize_layer(tmp_path):
    torch.manual_seed(0)
    model = with_normalize(build_model("dncnn", in_channels=1, depth=3, width=4), ([0.1307], [0.3081]))
    with torch.no_grad():
        model[1].body[-1].weight.normal_()
    spec = model_spec(model)
    assert spec["normalize"] == {"mean": [0.1307], "std": [0.3081]}
    ckpt = _save_and_load(tmp_path, spec, model.state_dict())   # the whole model's weights
    rebuilt = from_spec(ckpt["model_spec"], ckpt["model"]).eval()
    x = torch.rand(2, 1, 6, 6)
    assert torch.equal(rebuilt(x), model.eval()(x))
    with pytest.raises(ValueError, match="normalise twice"):
        model_spec(model, normalize=([0.5], [0.5]))


def test_registry_errors_name_the_arch_and_what_is_allowed():
    with pytest.raises(ValueError, match=r"unknown model arch 'vgg'; available: autoencoder, cnn, corrector, "
                                         r"dncnn, lenet5, resnet20"):
        build_model("vgg")
    with pytest.raises(ValueError, match=r"bad arguments for model arch 'dncnn'.*'depht'.*"
                                         r"it takes: in_channels, depth, width"):
        build_model("dncnn", depht=3)
    with pytest.raises(ValueError, match=r"model arch 'cnn': depth='3' has the wrong type"):
        build_model("cnn", depth="3")
    with pytest.raises(ValueError, match=r"cnn depth=4 halves the image 4 times; 8×8 inputs allow at most "
                                         r"depth 3"):
        build_model("cnn", depth=4, image_size=8)
    with pytest.raises(ValueError, match="lenet5 needs images of at least 28×28"):
        build_model("lenet5", image_size=8)
    with pytest.raises(ValueError, match="a model spec is a dict with keys arch, kwargs, normalize"):
        from_spec({"arch": "cnn", "weights": 1})
    with pytest.raises(ValueError, match="built by core.models.build_model"):
        model_spec(small_cnn())                                 # built directly: no spec to give
    spec = model_spec(build_model("cnn", depth=2, width=4))
    with pytest.raises(ValueError, match=r"state dict does not fit model arch 'cnn': missing \['0.bias'"):
        from_spec(spec, {k: v for k, v in build_model("cnn", depth=2, width=4).state_dict().items()
                         if k != "0.bias"})
    with pytest.raises(ValueError, match="state dict does not fit model arch 'cnn'.*size mismatch"):
        from_spec(spec, build_model("cnn", depth=2, width=5).state_dict())


@pytest.mark.parametrize("arch", sorted(CASES))
def test_every_zoo_model_traces_with_torch_fx(arch):
    model = build_model(arch, **CASES[arch][0])
    assert trace_model(model) is not None
    channels = CASES[arch][1][0]
    assert trace_model(with_normalize(model, ([0.5] * channels, [0.25] * channels))) is not None


@pytest.mark.parametrize("arch", ["dncnn", "corrector"])
def test_fast_cge_engine_handles_the_denoiser_and_the_corrector(arch):
    """The fast engine's estimate equals the naive coordinate loop's (float64, forward differences)."""
    torch.manual_seed(0)
    kwargs, shape_in, shape_out = CASES[arch]
    model = build_model(arch, **kwargs).double()
    with torch.no_grad():                                       # a non-trivial last layer
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, *shape_in, dtype=torch.float64)
    target = torch.randn(2, *shape_out, dtype=torch.float64)
    fast = CGE(model, engine="fast")
    loss = fast.backward(F.mse_loss, x, target)
    assert fast.last_engine == "fast" and torch.isfinite(loss)
    g_fast = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    CGE(model, engine="naive").backward(F.mse_loss, x, target)
    g_naive = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert (g_fast - g_naive).norm() <= 1e-8 * g_naive.norm()
