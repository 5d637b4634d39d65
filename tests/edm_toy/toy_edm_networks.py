"""A tiny network shaped like NVlabs EDM's DhariwalUNet inside an EDMPrecond wrapper, for tests.

Pickled nets refer to this module by name: put tests/edm_toy on sys.path (the training script's
--edm_repo does) to unpickle them, as NVlabs/edm must be for the real pickles.
"""

import torch
import torch.nn.functional as F


class ToyBlock(torch.nn.Module):
    """conv + noise/class embedding, optional 2x down/up-sampling first."""

    def __init__(self, cin, cout, emb_channels, resample=None):
        super().__init__()
        self.resample = resample
        self.conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = torch.nn.Linear(emb_channels, cout)

    def forward(self, x, emb):
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
        elif self.resample == "up":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return F.silu(self.conv(x) + self.affine(emb)[:, :, None, None])


class ToyDhariwalUNet(torch.nn.Module):
    """enc/dec ModuleDicts named and ordered like DhariwalUNet's (one block per resolution)."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim, channels=8, emb_channels=16):
        super().__init__()
        r, h = img_resolution, img_resolution // 2
        c = channels
        self.label_dim = label_dim
        self.map_noise = torch.nn.Linear(1, emb_channels)
        self.map_label = torch.nn.Linear(label_dim, emb_channels, bias=False)
        self.enc = torch.nn.ModuleDict()
        self.enc[f"{r}x{r}_conv"] = torch.nn.Conv2d(in_channels, c, 3, padding=1)
        self.enc[f"{r}x{r}_block0"] = ToyBlock(c, c, emb_channels)
        self.enc[f"{h}x{h}_down"] = ToyBlock(c, c, emb_channels, "down")
        self.enc[f"{h}x{h}_block0"] = ToyBlock(c, 2 * c, emb_channels)
        self.dec = torch.nn.ModuleDict()
        self.dec[f"{h}x{h}_in0"] = ToyBlock(2 * c, 2 * c, emb_channels)
        self.dec[f"{h}x{h}_block0"] = ToyBlock(4 * c, 2 * c, emb_channels)  # + skip of enc 8x8_block0
        self.dec[f"{r}x{r}_up"] = ToyBlock(2 * c, c, emb_channels, "up")
        self.dec[f"{r}x{r}_block0"] = ToyBlock(2 * c, c, emb_channels)  # + skip of enc 16x16_block0
        self.out_conv = torch.nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, x, noise_labels, class_labels):
        emb = F.silu(self.map_noise(noise_labels.reshape(-1, 1)) + self.map_label(class_labels))
        skips = {}  # the last encoder output per resolution
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips[x.shape[-1]] = x
        for name, block in self.dec.items():
            if "_block" in name:
                x = torch.cat([x, skips.pop(x.shape[-1])], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(x))


class ToyEDMPrecond(torch.nn.Module):
    """EDM preconditioning around the toy UNet: net(x, sigma, class_labels) = D(x; σ)."""

    def __init__(self, img_resolution=16, img_channels=3, label_dim=4, sigma_data=0.5):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.sigma_min, self.sigma_max, self.sigma_data = 0.0, float("inf"), sigma_data
        self.model = ToyDhariwalUNet(img_resolution, img_channels, img_channels, label_dim)

    def forward(self, x, sigma, class_labels=None, force_fp32=False):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        f_x = self.model(c_in * x, c_noise.flatten(), class_labels)
        return c_skip * x + c_out * f_x.to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)
