# A tiny class-conditional teacher (diffusers UNet2DModel with class embeddings) and small labelled images,
# built in code for the ImageNet-64 script's tests.
import numpy as np
import torch

NUM_CLASSES, PER_CLASS, RES = 4, 12, 16


def tiny_teacher(num_class_embeds=5):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=RES, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8, num_class_embeds=num_class_embeds,
    )


def class_images():
    """4 visually distinct classes (a dominant colour channel; class 3 also a dark top half) × 12 noisy images."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for c in range(NUM_CLASSES):
        for _ in range(PER_CLASS):
            a = np.full((RES, RES, 3), 20.0)
            a[..., c % 3] = 220
            if c == 3:
                a[: RES // 2] = 40
            a += rng.normal(0, 15, a.shape)
            images.append(a.clip(0, 255).astype(np.uint8))
            labels.append(c)
    return images, labels
