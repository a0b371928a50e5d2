"""Reference image tensors from Pillow + torchvision (XrayGLM's BlipImageEvalProcessor(224)).

Makes a few deterministic PNG and JPEG test images of different sizes and modes (RGB, L, RGBA, P,
16-bit grayscale, JPEG RGB and L), saves them under tests/fixtures/images/, and writes for each the
preprocessed 3x224x224 float32 tensor (raw little-endian, gzip) from

    Image.open(p).convert('RGB') -> transforms.Resize((224,224), BICUBIC) -> ToTensor()
    -> Normalize((0.48145466,0.4578275,0.40821073),(0.26862954,0.26130258,0.27577711))

Run:  $(bash scripts/fixtures_venv.sh) scripts/make_image_fixtures.py
"""
import gzip, json, os

import numpy as np
import PIL
from PIL import Image
import torch, torchvision
from torchvision import transforms
from torchvision.transforms.functional import InterpolationMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "images")

PROC = transforms.Compose([
    transforms.Resize((224, 224), interpolation=InterpolationMode.BICUBIC),
    transforms.ToTensor(),
    transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
])


def field(h, w, seed, channels):
    """Smooth shapes plus mild noise: compresses well and exercises the filter."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = []
    for c in range(channels):
        cx, cy, r = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h, rng.uniform(0.15, 0.4) * min(h, w)
        v = 40 + 150 * (x / w) * (c % 2) + 150 * (y / h) * ((c + 1) % 2)
        v += 60 * ((x - cx) ** 2 + (y - cy) ** 2 < r ** 2)
        v += 25 * np.sin(x / (5 + 3 * c)) * np.cos(y / 7.0)
        v += rng.normal(0, 6, size=(h, w))
        chans.append(v)
    return np.stack(chans, -1)


def main():
    os.makedirs(OUT, exist_ok=True)
    specs = [
        ("rgb_300x200.png", lambda: Image.fromarray(np.clip(field(200, 300, 1, 3), 0, 255).astype(np.uint8), "RGB")),
        ("gray_97x131.png", lambda: Image.fromarray(np.clip(field(131, 97, 2, 1)[..., 0], 0, 255).astype(np.uint8), "L")),
        ("rgba_360x270.png", lambda: Image.fromarray(np.clip(field(270, 360, 3, 4), 0, 255).astype(np.uint8), "RGBA")),
        ("palette_150x150.png", lambda: Image.fromarray(np.clip(field(150, 150, 4, 3), 0, 255).astype(np.uint8), "RGB")
            .quantize(colors=64)),
        ("gray16_400x350.png", lambda: Image.fromarray(np.clip(field(350, 400, 5, 1)[..., 0] * 1.6 - 60, 0, 65535)
            .astype(np.uint16))),
        ("rgb_333x250.jpg", lambda: Image.fromarray(np.clip(field(250, 333, 6, 3), 0, 255).astype(np.uint8), "RGB")),
        ("gray_512x512.jpg", lambda: Image.fromarray(np.clip(field(512, 512, 7, 1)[..., 0], 0, 255).astype(np.uint8), "L")),
        ("rgb_224x224.png", lambda: Image.fromarray(np.clip(field(224, 224, 8, 3), 0, 255).astype(np.uint8), "RGB")),
    ]
    manifest = {"pillow": PIL.__version__, "torchvision": torchvision.__version__, "torch": torch.__version__,
                "images": []}
    for name, make in specs:
        path = os.path.join(OUT, name)
        im = make()
        if name.endswith(".jpg"):
            im.save(path, quality=90)
        else:
            im.save(path)
        opened = Image.open(path)
        mode = opened.mode
        rgb = opened.convert("RGB")
        x = PROC(rgb).numpy().astype("<f4")
        resized = np.asarray(rgb.resize((224, 224), Image.BICUBIC))
        with gzip.open(path + ".f32.gz", "wb", compresslevel=9) as f:
            f.write(x.tobytes())
        manifest["images"].append({"file": name, "mode": mode, "size": list(opened.size),
                                   "uint8_resized_sum": int(resized.astype(np.int64).sum())})
        print(name, mode, opened.size, os.path.getsize(path), os.path.getsize(path + ".f32.gz"))
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
