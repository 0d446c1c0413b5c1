"""Outputs people can look at: PNG grids of images, GIF / MP4 grids of videos."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image as PILImage


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float in [-1, 1] -> uint8 numpy, same shape."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (rows*(H+pad)+pad, nrow*(W+pad)+pad, 3) uint8."""
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    x = torch.full((rows * nrow, c, h + pad, w + pad), -1.0)
    x[:n, :, pad:, pad:] = images.detach().float().cpu()
    g = rearrange(x, "(r q) c h w -> (r h) (q w) c", q=nrow)  # (rows*(H+pad), nrow*(W+pad), C)
    g = torch.nn.functional.pad(g.permute(2, 0, 1), (0, pad, 0, pad), value=-1.0).permute(1, 2, 0)
    u = to_uint8(g)
    return np.repeat(u, 3, axis=-1) if c == 1 else u


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int, scale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = PILImage.fromarray(image_grid(images, nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), PILImage.NEAREST)
    img.save(path)
    return path


def save_video_grid(videos: torch.Tensor, path: str | Path, nrow: int, fps: int = 8, scale: int = 1) -> Path:
    """(N, T, C, H, W) in [-1, 1] -> an animated GIF (.gif) or MP4 (.mp4) grid."""
    import imageio.v3 as iio
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [image_grid(videos[:, t], nrow) for t in range(videos.shape[1])]
    if scale > 1:
        frames = [np.kron(f, np.ones((scale, scale, 1), dtype=np.uint8)) for f in frames]
    if path.suffix == ".gif":
        iio.imwrite(path, np.stack(frames), duration=1000 / fps, loop=0)
    else:
        import av
        h, w = frames[0].shape[:2]
        h2, w2 = h + h % 2, w + w % 2
        with av.open(str(path), "w") as out:
            stream = out.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = w2, h2, "yuv420p"
            for f in frames:
                f = np.pad(f, ((0, h2 - h), (0, w2 - w), (0, 0)))
                for pkt in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    out.mux(pkt)
            for pkt in stream.encode():
                out.mux(pkt)
    return path
