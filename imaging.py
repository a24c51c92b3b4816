"""Image pre-processing: transformers' CLIPImageProcessor / SiglipImageProcessor (PIL path) in numpy, and LLaVA-1.5's
pad-to-square, configured from a checkpoint's preprocessor_config.json."""
from __future__ import annotations

import os

import numpy as np
import torch

from files import read_json

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(img):
    """A PIL image as 8-bit RGB. 16-bit greyscale (modes I;16*, and I as PNG decoders give it) is scaled,
    round(v / 257), where PIL's convert("RGB") would clip every value above 255."""
    from PIL import Image
    if img.mode.startswith("I"):
        v = np.asarray(img).astype(np.int64).clip(0, 65535)
        img = Image.fromarray(((v * 255 + 32767) // 65535).astype(np.uint8))
    return img.convert("RGB")


def _hw(v, square: bool):
    """preprocessor size spec -> ("shortest", n) or ("exact", (h, w))."""
    if isinstance(v, dict):
        if "shortest_edge" in v:
            return ("shortest", int(v["shortest_edge"]))
        return ("exact", (int(v["height"]), int(v["width"])))
    return ("exact", (int(v), int(v))) if square else ("shortest", int(v))


class ImageProcessor:
    """CLIPImageProcessor / SiglipImageProcessor (PIL path) in numpy. pad_to_square: LLaVA-1.5 `image_aspect_ratio:
    pad` (expand2square with the mean colour) before the CLIP pipeline."""

    def __init__(self, size=("shortest", 336), crop_size=(336, 336), do_center_crop=True, image_mean=OPENAI_CLIP_MEAN,
                 image_std=OPENAI_CLIP_STD, resample=3, rescale_factor=1 / 255, do_normalize=True,
                 pad_to_square=False):
        self.size, self.crop_size, self.do_center_crop = size, crop_size, do_center_crop
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.resample, self.rescale_factor, self.do_normalize = int(resample), rescale_factor, do_normalize
        self.pad_to_square = pad_to_square

    @classmethod
    def clip(cls, image_size=336, pad_to_square=False):
        return cls(("shortest", image_size), (image_size, image_size), pad_to_square=pad_to_square)

    @classmethod
    def siglip(cls, image_size=384):
        return cls(("exact", (image_size, image_size)), None, False, (0.5,) * 3, (0.5,) * 3)

    @classmethod
    def for_checkpoint(cls, model_dir: str, vision_tower: str | None = None,
                       aspect: str | None = None) -> "ImageProcessor":
        """The pre-processing a LLaVA checkpoint was trained with: preprocessor_config.json from the model folder
        (llava-hf) or the CLIP folder (original layout), padded to a square unless `aspect` is "crop" or the
        original config.json names another image_aspect_ratio (LLaVA-1.5, Liu et al. 2024, pads)."""
        src = model_dir if os.path.exists(os.path.join(str(model_dir), "preprocessor_config.json")) else vision_tower
        if src is None:
            raise FileNotFoundError(f"{model_dir}/preprocessor_config.json does not exist and no vision tower "
                                    "folder was given")
        if aspect is None:
            ratio = read_json(os.path.join(str(model_dir), "config.json"), {}).get("image_aspect_ratio")
            aspect = "crop" if ratio not in (None, "pad") else "pad"
        if aspect not in ("pad", "crop"):
            raise ValueError(f"image aspect {aspect!r}; expected 'pad' or 'crop'")
        return cls.from_dir(src, pad_to_square=aspect == "pad")

    def describe(self) -> dict:
        """The resolved pre-processing, JSON-able (recorded in a run's config.json)."""
        return {"pad_to_square": bool(self.pad_to_square), "size": list(self.size),
                "crop_size": list(self.crop_size) if self.do_center_crop and self.crop_size else None,
                "image_mean": [float(x) for x in self.image_mean], "image_std": [float(x) for x in self.image_std]}

    @classmethod
    def from_dir(cls, path: str, pad_to_square: bool | None = None) -> "ImageProcessor":
        """Reads preprocessor_config.json; pad_to_square None -> do_pad there, or image_aspect_ratio == "pad" in
        config.json (original LLaVA)."""
        path = str(path)
        p = read_json(os.path.join(path, "preprocessor_config.json"), None)
        if p is None:
            raise FileNotFoundError(f"{path}/preprocessor_config.json does not exist")
        siglip = "siglip" in str(p.get("image_processor_type", "")).lower()
        size = _hw(p.get("size", {"height": 224, "width": 224} if siglip else {"shortest_edge": 224}), square=siglip)
        crop = p.get("crop_size", 224)
        crop = _hw(crop, square=True)[1] if crop is not None else None
        if pad_to_square is None:
            mc = read_json(os.path.join(path, "config.json"), {})
            pad_to_square = bool(p.get("do_pad", False)) or mc.get("image_aspect_ratio") == "pad"
        return cls(size, crop, p.get("do_center_crop", not siglip),
                   p.get("image_mean", (0.5,) * 3 if siglip else OPENAI_CLIP_MEAN),
                   p.get("image_std", (0.5,) * 3 if siglip else OPENAI_CLIP_STD),
                   p.get("resample", 3), p.get("rescale_factor", 1 / 255),
                   p.get("do_normalize", True), pad_to_square)

    def _one(self, img) -> np.ndarray:
        from PIL import Image
        img = to_rgb(img)
        if self.pad_to_square and img.width != img.height:   # LLaVA expand2square
            s = max(img.width, img.height)
            bg = Image.new("RGB", (s, s), tuple(int(x * 255) for x in self.image_mean))
            bg.paste(img, ((s - img.width) // 2, (s - img.height) // 2))
            img = bg
        kind, v = self.size
        if kind == "shortest":   # long side int()-truncated
            w, h = img.size
            short, long = min(w, h), max(w, h)
            new = (v, int(v * long / short))
            h2, w2 = (new[1], new[0]) if w <= h else (new[0], new[1])
        else:
            h2, w2 = v
        img = img.resize((w2, h2), resample=self.resample, reducing_gap=None)
        x = np.asarray(img)                                                 # (H, W, 3) uint8
        if self.do_center_crop and self.crop_size is not None:
            ch, cw = self.crop_size
            H, W = x.shape[:2]
            if H < ch or W < cw:   # zero-pad like transformers' center_crop
                ph, pw = max(ch - H, 0), max(cw - W, 0)
                x = np.pad(x, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
                H, W = x.shape[:2]
            top, left = int((H - ch) / 2.0), int((W - cw) / 2.0)
            x = x[top:top + ch, left:left + cw]
        x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = (x - np.array(self.image_mean, dtype=np.float32)) / np.array(self.image_std, dtype=np.float32)
        return x.transpose(2, 0, 1)

    def __call__(self, images) -> torch.Tensor:
        """list of PIL images -> (B, 3, H, W) float32."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        return torch.from_numpy(np.stack([self._one(im) for im in images]))
