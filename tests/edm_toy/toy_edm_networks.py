"""A tiny network shaped like NVlabs EDM's DhariwalUNet inside an EDMPrecond wrapper, for tests.

Pickled nets refer to this module by name: put tests/edm_toy on sys.path (the training script's
--edm_repo does) to unpickle them, as NVlabs/edm must be for the real pickles.

It keeps EDM's dtype contract (training/networks.py):
- `EDMPrecond(use_fp16=True)` runs its UNet in float16 unless called with `force_fp32=True`, and asserts
  that the UNet returns the dtype it was given (`assert F_x.dtype == dtype`);
- the layers keep float32 parameters and cast them to the input's dtype (`self.weight.to(x.dtype)`),
  the noise/class embedding is computed from float32 inputs and cast to the activations' dtype.
One difference, on purpose: EDM switches to float16 only when `x.device.type == 'cuda'`; here the switch
does not depend on the device, so CPU tests exercise the float16 path.

`recording()` lists what the toy UNet saw on each call (input dtype, the dtype its first layer computed
in, output dtype, grad mode, whether its weights are trainable): tests use it to tell the student's passes
from the teacher's.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F

_LOG = None  # a list while `recording()` is active


@contextmanager
def recording():
    """Collect one dict per toy UNet call: input, output and weight dtypes, grad mode, trainable."""
    global _LOG
    previous, _LOG = _LOG, []
    try:
        yield _LOG
    finally:
        _LOG = previous


class ToyConv2d(torch.nn.Conv2d):
    """EDM's Conv2d casts its float32 weight and bias to the input's dtype."""

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv_forward(x, self.weight.to(x.dtype), bias)


class ToyLinear(torch.nn.Linear):
    """EDM's Linear: x @ W.to(x.dtype).T (+ b.to(x.dtype))."""

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class ToyBlock(torch.nn.Module):
    """conv + noise/class embedding, optional 2x down/up-sampling first."""

    def __init__(self, cin, cout, emb_channels, resample=None):
        super().__init__()
        self.resample = resample
        self.conv = ToyConv2d(cin, cout, 3, padding=1)
        self.affine = ToyLinear(emb_channels, cout)

    def forward(self, x, emb):
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
        elif self.resample == "up":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        params = self.affine(emb).to(x.dtype)  # EDM's UNetBlock: affine(emb) ... .to(x.dtype)
        return F.silu(self.conv(x) + params[:, :, None, None])


class ToyDhariwalUNet(torch.nn.Module):
    """enc/dec ModuleDicts named and ordered like DhariwalUNet's (one block per resolution)."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim, channels=8, emb_channels=16):
        super().__init__()
        r, h = img_resolution, img_resolution // 2
        c = channels
        self.label_dim = label_dim
        self.map_noise = ToyLinear(1, emb_channels)
        self.map_label = ToyLinear(label_dim, emb_channels, bias=False)
        self.enc = torch.nn.ModuleDict()
        self.enc[f"{r}x{r}_conv"] = ToyConv2d(in_channels, c, 3, padding=1)
        self.enc[f"{r}x{r}_block0"] = ToyBlock(c, c, emb_channels)
        self.enc[f"{h}x{h}_down"] = ToyBlock(c, c, emb_channels, "down")
        self.enc[f"{h}x{h}_block0"] = ToyBlock(c, 2 * c, emb_channels)
        self.dec = torch.nn.ModuleDict()
        self.dec[f"{h}x{h}_in0"] = ToyBlock(2 * c, 2 * c, emb_channels)
        self.dec[f"{h}x{h}_block0"] = ToyBlock(4 * c, 2 * c, emb_channels)  # + skip of enc 8x8_block0
        self.dec[f"{r}x{r}_up"] = ToyBlock(2 * c, c, emb_channels, "up")
        self.dec[f"{r}x{r}_block0"] = ToyBlock(2 * c, c, emb_channels)  # + skip of enc 16x16_block0
        self.out_conv = ToyConv2d(c, out_channels, 3, padding=1)

    def forward(self, x, noise_labels, class_labels):
        # the embedding from float32 noise and class labels, as DhariwalUNet's mapping network
        emb = F.silu(self.map_noise(noise_labels.reshape(-1, 1)) + self.map_label(class_labels))
        call = {"input": x.dtype, "weights": self.out_conv.weight.dtype, "grad": torch.is_grad_enabled(),
                "trainable": self.out_conv.weight.requires_grad}
        if _LOG is not None:  # appended first: a feature pass stops inside the encoder or decoder
            _LOG.append(call)
        skips = {}  # the last encoder output per resolution
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            call.setdefault("compute", x.dtype)  # the first layer's output: the dtype the UNet computes in
            skips[x.shape[-1]] = x
        for name, block in self.dec.items():
            if "_block" in name:
                x = torch.cat([x, skips.pop(x.shape[-1])], dim=1)
            x = block(x, emb)
        out = self.out_conv(F.silu(x))
        call["output"] = out.dtype
        return out


class ToyEDMPrecond(torch.nn.Module):
    """EDM preconditioning around the toy UNet: net(x, sigma, class_labels, force_fp32=False) = D(x; σ).

    use_fp16: run the UNet in float16 unless force_fp32 (on any device; EDM: on CUDA only).
    """

    def __init__(self, img_resolution=16, img_channels=3, label_dim=4, sigma_data=0.5, use_fp16=False):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16 = use_fp16
        self.sigma_min, self.sigma_max, self.sigma_data = 0.0, float("inf"), sigma_data
        self.model = ToyDhariwalUNet(img_resolution, img_channels, img_channels, label_dim)

    def forward(self, x, sigma, class_labels=None, force_fp32=False):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        use_fp16 = getattr(self, "use_fp16", False)  # toy pickles written before the flag existed
        dtype = torch.float16 if (use_fp16 and not force_fp32) else torch.float32
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        f_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels)
        assert f_x.dtype == dtype
        return c_skip * x + c_out * f_x.to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)
