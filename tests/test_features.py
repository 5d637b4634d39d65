# Teacher-feature extraction (hooks, pooling, tuple outputs, early stop, hook removal,
# layer selectors enc:K/dec:K/bottleneck/input) on tiny random diffusers UNets and an EDM-style net.
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel, UNet2DModel

from tfd_utils import FeatureExtractor, resolve_layers, unet_units


def tiny_unet(sample_size=16):
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
    ).eval()


def tiny_adm_unet():
    """The ADM layout of the openai consistency-models ImageNet-64 conversion, at toy width."""
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=3,
        block_out_channels=(8, 16, 16, 16),
        attention_head_dim=8,
        norm_num_groups=8,
        down_block_types=("ResnetDownsampleBlock2D",) + ("AttnDownBlock2D",) * 3,
        up_block_types=("AttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
        resnet_time_scale_shift="scale_shift",
        upsample_type="resnet",
        downsample_type="resnet",
        num_class_embeds=10,
        norm_eps=1e-5,
    ).eval()


def tiny_sdxl_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        attention_head_dim=(2, 4, 4),
        norm_num_groups=8,
        use_linear_projection=True,
        cross_attention_dim=24,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16,
    ).eval()


def sdxl_forward(unet, batch):
    g = torch.Generator().manual_seed(1)
    cond = {"text_embeds": torch.randn(batch, 16, generator=g), "time_ids": torch.randn(batch, 6, generator=g)}
    ctx = torch.randn(batch, 5, 24, generator=g)
    return lambda x: unet(x, 999, encoder_hidden_states=ctx, added_cond_kwargs=cond)


def call_counter(module):
    counts = {"n": 0}

    def pre_hook(mod, args):
        counts["n"] += 1

    handle = module.register_forward_pre_hook(pre_hook)
    return counts, handle


def capture(model, names, fn, x):
    """Outputs of the named modules in one full forward, without the extractor."""
    modules, out, handles = dict(model.named_modules()), {}, []
    for name in names:
        handles.append(modules[name].register_forward_hook(lambda m, a, o, name=name: out.__setitem__(name, o)))
    with torch.no_grad():
        fn(x)
    for h in handles:
        h.remove()
    return out


def no_hooks_left(model):
    return all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in model.modules())


# ----------------------------------------------------------------------------------------------
# diffusers UNet2DModel: shapes, pooling, tuple outputs, early stop, hook removal, input selector.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", [1, 2, 4])
def test_shapes_and_pooling_match_independent_capture(pool):
    unet = tiny_unet()
    fn = lambda x: unet(x, 10)  # noqa: E731
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    layers = ["down_blocks.0", "down_blocks.1.attentions.0", "mid_block", "up_blocks.0"]
    with FeatureExtractor(unet, layers, pool_size=pool) as fx:
        feats = fx(fn, x)
    assert list(feats) == layers
    ref = capture(unet, layers, fn, x)
    assert isinstance(ref["down_blocks.0"], tuple)  # down blocks return (hidden, residuals)
    for name in layers:
        out = ref[name][0] if isinstance(ref[name], tuple) else ref[name]
        expected = (F.avg_pool2d(out, pool) if pool > 1 else out).flatten(1)
        assert feats[name].shape == expected.shape == (3, out.shape[1] * (out.shape[2] // pool) ** 2)
        torch.testing.assert_close(feats[name], expected, rtol=1e-5, atol=1e-6)


def test_map_smaller_than_pool_is_pooled_over_its_extent():
    unet = tiny_unet(sample_size=8)
    x = torch.randn(2, 3, 8, 8)
    with FeatureExtractor(unet, ["mid_block"], pool_size=8) as fx:  # mid block map is 4×4
        feat = fx(lambda s: unet(s, 10), x)["mid_block"]
    ref = capture(unet, ["mid_block"], lambda s: unet(s, 10), x)["mid_block"]
    torch.testing.assert_close(feat, ref.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)


def test_forward_stops_after_deepest_selected_module():
    unet = tiny_unet()
    modules = dict(unet.named_modules())
    later = {name: call_counter(modules[name]) for name in ("mid_block", "up_blocks.0", "up_blocks.1", "conv_out")}
    x = torch.randn(2, 3, 16, 16)
    with FeatureExtractor(unet, ["down_blocks.1", "down_blocks.0"], pool_size=4) as fx:
        out = fx(lambda s: unet(s, 10), x)
    assert set(out) == {"down_blocks.0", "down_blocks.1"}
    assert all(counts["n"] == 0 for counts, _ in later.values())
    with FeatureExtractor(unet, ["up_blocks.0"], pool_size=4) as fx:
        fx(lambda s: unet(s, 10), x)
    assert later["mid_block"][0]["n"] == 1 and later["up_blocks.0"][0]["n"] == 1
    assert later["up_blocks.1"][0]["n"] == 0 and later["conv_out"][0]["n"] == 0
    # stop_early=False: the whole forward runs
    with FeatureExtractor(unet, ["down_blocks.0"], pool_size=4, stop_early=False) as fx:
        fx(lambda s: unet(s, 10), x)
    assert later["conv_out"][0]["n"] == 1
    for _, handle in later.values():
        handle.remove()
    assert no_hooks_left(unet)


def test_hooks_removed_on_exit_also_when_forward_raises():
    unet = tiny_unet()
    with FeatureExtractor(unet, ["mid_block", "up_blocks.1"]) as fx:
        assert sum(len(m._forward_hooks) for m in unet.modules()) == 2
        fx(lambda s: unet(s, 10), torch.randn(1, 3, 16, 16))
    assert no_hooks_left(unet)

    def broken(sample):
        unet(sample, 10, class_labels=torch.zeros(1, dtype=torch.long))  # no class embedding: raises

    with pytest.raises(ValueError):
        with FeatureExtractor(unet, ["mid_block"]) as fx:
            fx(broken, torch.randn(1, 3, 16, 16))
    assert no_hooks_left(unet)
    with pytest.raises(ZeroDivisionError):
        with FeatureExtractor(unet, ["down_blocks.0"]) as fx:
            1 / 0
    assert no_hooks_left(unet)


def test_extractor_outside_context_is_an_error():
    unet = tiny_unet()
    fx = FeatureExtractor(unet, ["mid_block"])
    with pytest.raises(RuntimeError, match="context manager"):
        fx(lambda s: unet(s, 10), torch.randn(1, 3, 16, 16))


def test_layer_that_does_not_run_is_reported():
    unet = tiny_unet()
    with FeatureExtractor(unet, ["mid_block", "conv_out"]) as fx:
        with pytest.raises(RuntimeError, match="did not run"):
            fx(lambda s: unet.conv_in(s), torch.randn(1, 3, 16, 16))


def test_input_selector():
    unet = tiny_unet()
    counts, handle = call_counter(unet.conv_in)
    x = torch.randn(2, 3, 16, 16)
    with FeatureExtractor(unet, ["input"], pool_size=4) as fx:
        feats = fx(lambda s: unet(s, 10), x)
    assert counts["n"] == 0  # only the sample itself is needed: the teacher does not run
    torch.testing.assert_close(feats["input"], F.avg_pool2d(x, 4).flatten(1))
    with FeatureExtractor(unet, ["input", "down_blocks.0"], pool_size=2) as fx:
        feats = fx(lambda s: unet(s, 10), x)
    assert counts["n"] == 1 and list(feats) == ["input", "down_blocks.0"]
    torch.testing.assert_close(feats["input"], F.avg_pool2d(x, 2).flatten(1))
    handle.remove()


def test_gradient_flows_to_the_input_through_hooked_features():
    unet = tiny_unet()
    unet.requires_grad_(False)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    with FeatureExtractor(unet, ["down_blocks.1", "mid_block"], pool_size=2) as fx:
        feats = fx(lambda s: unet(s, 10), x)
    (feats["down_blocks.1"].square().sum() + feats["mid_block"].sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # each sample's features depend on that sample only (no cross-talk in the batch)
    x2 = torch.randn(2, 3, 16, 16, requires_grad=True)
    with FeatureExtractor(unet, ["mid_block"]) as fx:
        fx(lambda s: unet(s, 10), x2)["mid_block"][0].sum().backward()
    assert x2.grad[0].abs().sum() > 0 and x2.grad[1].abs().sum() == 0


# ----------------------------------------------------------------------------------------------
# UNet2DConditionModel (SDXL-like, text_time added conditioning): the SDXL recipe's layers.
# ----------------------------------------------------------------------------------------------


def test_sdxl_like_unet_recipe_layers_and_early_stop():
    unet = tiny_sdxl_unet()
    layers = ["down_blocks.2", "mid_block", "up_blocks.0"]
    fn = sdxl_forward(unet, 2)
    x = torch.randn(2, 4, 16, 16)
    counts, handle = call_counter(unet.up_blocks[1])
    with FeatureExtractor(unet, layers, pool_size=2) as fx:
        feats = fx(fn, x)
    assert counts["n"] == 0
    handle.remove()
    ref = capture(unet, layers, fn, x)
    for name in layers:
        out = ref[name][0] if isinstance(ref[name], tuple) else ref[name]
        torch.testing.assert_close(feats[name], F.avg_pool2d(out, 2).flatten(1), rtol=1e-5, atol=1e-6)
    assert feats["down_blocks.2"].shape == (2, 32 * 2 * 2)  # 4×4 map pooled by 2
    assert feats["up_blocks.0"].shape == (2, 32 * 4 * 4)  # up_blocks.0 upsamples to 8×8
    assert no_hooks_left(unet)
    enc, dec = unet_units(unet)
    assert enc[0] == "conv_in" and dec[0].startswith("mid_block")


# ----------------------------------------------------------------------------------------------
# enc:K / dec:K / bottleneck on the ADM layout (diffusers) and on an NVlabs-EDM-style network.
# ----------------------------------------------------------------------------------------------

PAPER_LAYERS = ["enc:6", "enc:11", "bottleneck", "dec:7", "dec:12"]


def test_adm_unet_units_and_paper_layers():
    unet = tiny_adm_unet()
    enc, dec = unet_units(unet)
    assert len(enc) == 16 and len(dec) == 21
    assert resolve_layers(unet, PAPER_LAYERS) == [
        "down_blocks.1.attentions.1",  # 32x32_block1 (at 64 px)
        "down_blocks.2.attentions.2",  # 16x16_block2
        "down_blocks.3.attentions.2",  # 8x8_block2
        "up_blocks.1.attentions.0",  # 16x16_block0
        "up_blocks.2.attentions.0",  # 32x32_block0
    ]
    assert enc[:5] == ["conv_in", "down_blocks.0.resnets.0", "down_blocks.0.resnets.1", "down_blocks.0.resnets.2",
                       "down_blocks.0.downsamplers.0"]
    assert dec[:3] == ["mid_block.attentions.0", "mid_block.resnets.1", "up_blocks.0.attentions.0"]
    assert dec[6] == "up_blocks.0.upsamplers.0" and dec[-1] == "up_blocks.3.resnets.3"


def test_adm_units_are_in_forward_order_and_paper_layers_have_the_right_resolution():
    unet = tiny_adm_unet()
    enc, dec = unet_units(unet)
    modules = dict(unet.named_modules())
    order, handles = [], []
    for name in enc + dec:
        handles.append(modules[name].register_forward_hook(lambda m, a, o, name=name: order.append(name)))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        unet(x, 10, class_labels=torch.tensor([3]))
    for h in handles:
        h.remove()
    assert order == enc + dec  # every unit runs exactly once, in this order
    with FeatureExtractor(unet, PAPER_LAYERS, pool_size=1) as fx:
        feats = fx(lambda s: unet(s, 10, class_labels=torch.tensor([3])), x)
    # 32 px: enc:6 at 16², enc:11 at 8², bottleneck 4², dec:7 8², dec:12 16² (64 px: 32/16/8/16/32)
    assert [f.shape[1] for f in feats.values()] == [16 * 16**2, 16 * 8**2, 16 * 4**2, 16 * 8**2, 16 * 16**2]
    counts, handle = call_counter(unet.up_blocks[2].attentions[1])
    with FeatureExtractor(unet, ["dec:12"]) as fx:
        fx(lambda s: unet(s, 10, class_labels=torch.tensor([3])), x)
    assert counts["n"] == 0
    handle.remove()


class ToyUNetBlock(torch.nn.Module):
    def __init__(self, cin, cout, up=False, down=False):
        super().__init__()
        self.in_channels, self.up, self.down = cin, up, down
        self.conv = torch.nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x, emb):
        if self.up:
            x = F.interpolate(x, scale_factor=2)
        if self.down:
            x = F.avg_pool2d(x, 2)
        return self.conv(x) + emb[:, :1, None, None]


class ToyDhariwalUNet(torch.nn.Module):
    """The key layout and forward of NVlabs EDM's DhariwalUNet, with tiny conv blocks."""

    def __init__(self, img_resolution=32, channels=4, channel_mult=(1, 2, 2, 2), num_blocks=3):
        super().__init__()
        self.map_noise = torch.nn.Linear(1, 4)
        self.enc, self.dec = torch.nn.ModuleDict(), torch.nn.ModuleDict()
        cout, skips = channels, []
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cout = channels * mult
                self.enc[f"{res}x{res}_conv"] = torch.nn.Conv2d(3, cout, 3, padding=1)
            else:
                self.enc[f"{res}x{res}_down"] = ToyUNetBlock(cout, cout, down=True)
            skips.append(cout)
            for idx in range(num_blocks):
                cin, cout = cout, channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = ToyUNetBlock(cin, cout)
                skips.append(cout)
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = ToyUNetBlock(cout, cout)
                self.dec[f"{res}x{res}_in1"] = ToyUNetBlock(cout, cout)
            else:
                self.dec[f"{res}x{res}_up"] = ToyUNetBlock(cout, cout, up=True)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = ToyUNetBlock(cin, cout)
        self.out_conv = torch.nn.Conv2d(cout, 3, 3, padding=1)

    def forward(self, x, noise_labels):
        emb = self.map_noise(noise_labels.reshape(-1, 1))
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, ToyUNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(x)


class ToyEDMPrecond(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = ToyDhariwalUNet()

    def forward(self, x, sigma):
        return self.model(x / (1 + sigma**2).sqrt().view(-1, 1, 1, 1), sigma.log() / 4)


def test_edm_style_network_selectors():
    net = ToyEDMPrecond().eval()
    enc, dec = unet_units(net)
    assert len(enc) == 16 and len(dec) == 21
    assert resolve_layers(net, PAPER_LAYERS) == [
        "model.enc.16x16_block1",  # 32x32_block1 at 64 px (this toy is 32 px)
        "model.enc.8x8_block2",
        "model.enc.4x4_block2",
        "model.dec.8x8_block0",
        "model.dec.16x16_block0",
    ]
    assert dec[:2] == ["model.dec.4x4_in0", "model.dec.4x4_in1"] and dec[6] == "model.dec.8x8_up"
    x, sigma = torch.randn(2, 3, 32, 32), torch.full((2,), 0.1)
    counts, handle = call_counter(net.model.dec["16x16_block1"])
    out_counts, out_handle = call_counter(net.model.out_conv)
    with FeatureExtractor(net, PAPER_LAYERS, pool_size=4) as fx:
        feats = fx(lambda s: net(s, sigma), x)
    assert counts["n"] == 0 and out_counts["n"] == 0
    ref = capture(net, resolve_layers(net, PAPER_LAYERS), lambda s: net(s, sigma), x)
    for sel, name in zip(PAPER_LAYERS, resolve_layers(net, PAPER_LAYERS)):
        torch.testing.assert_close(feats[sel], F.avg_pool2d(ref[name], 4).flatten(1))
    handle.remove()
    out_handle.remove()
    assert no_hooks_left(net)


# ----------------------------------------------------------------------------------------------
# Helpful errors.
# ----------------------------------------------------------------------------------------------


def test_unknown_layer_lists_valid_selectors_and_suggests_close_names():
    unet = tiny_adm_unet()
    with pytest.raises(ValueError) as err:
        FeatureExtractor(unet, ["down_block.1"])
    msg = str(err.value)
    assert "'down_block.1'" in msg and "Did you mean" in msg and "down_blocks.1" in msg
    for valid in ("input", "enc:0..enc:15", "dec:0..dec:20", "bottleneck", "mid_block", "conv_in"):
        assert valid in msg
    with pytest.raises(ValueError, match="enc:0..enc:15"):
        resolve_layers(unet, ["enc:99"])
    with pytest.raises(ValueError, match="dec:0..dec:20"):
        resolve_layers(unet, ["dec:21"])
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers(unet, ["enc:x"])
    with pytest.raises(ValueError, match="at least one layer"):
        FeatureExtractor(unet, [])


def test_unit_selectors_on_a_model_without_units_are_unknown():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    with pytest.raises(ValueError, match="Unknown teacher layer 'bottleneck'"):
        resolve_layers(net, ["bottleneck"])
    with pytest.raises(ValueError, match="Unknown teacher layer 'enc:1'"):
        resolve_layers(net, ["enc:1"])
    assert resolve_layers(net, ["0", "input"]) == ["0", "input"]
