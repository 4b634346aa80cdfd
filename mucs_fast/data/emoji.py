"""Google's Noto emoji (the npm package `emoji-datasource-google`, Apache-2.0 images) as a
captioned folder: 3,786 PNGs at 64×64 (1,911 emoji and their skin-tone variations), each
captioned from emoji.json's name and category ("grinning face, a smileys & emotion emoji").

Nothing is downloaded here: the package is fetched once by the user (INSTALL), and
`emoji_folder` writes its images, composited on white, with a metadata.jsonl into a folder that
`read_captioned_folder` reads.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..cache import default_dir as default_cache_dir

INSTALL = (
    "npm pack emoji-datasource-google && mkdir -p {dir} && "
    "tar xzf emoji-datasource-google-*.tgz -C {dir}"
)
TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}


def default_dir() -> Path:
    """Where the package is looked for: $MUCS_FAST_EMOJI, else <cache>/emoji-datasource-google."""
    env = os.environ.get("MUCS_FAST_EMOJI")
    return Path(env) if env else Path(default_cache_dir()) / "emoji-datasource-google"


def _package(root: Path) -> Path:
    for p in (root, root / "package"):
        if (p / "emoji.json").is_file() and (p / "img" / "google" / "64").is_dir():
            return p
    raise FileNotFoundError(
        f"emoji images not found in {root} (emoji.json, img/google/64/); fetch them once: "
        + INSTALL.format(dir=root)
    )


def _caption(name: str, category: str, tones=()) -> str:
    tone = ", ".join(TONES.get(t, t.lower()) for t in tones)
    return f"{name.lower()}{', ' + tone if tone else ''}, a {category.lower()} emoji"


def emoji_items(root=None) -> list[tuple[Path, str]]:
    """(PNG file, caption) of every Google image of the package, in emoji.json order."""
    pkg = _package(Path(root) if root is not None else default_dir())
    with open(pkg / "emoji.json", encoding="utf-8") as f:
        entries = json.load(f)
    img = pkg / "img" / "google" / "64"
    out = []
    for e in entries:
        name = e.get("name") or e.get("short_name") or ""
        if e.get("has_img_google") and (img / e["image"]).is_file():
            out.append((img / e["image"], _caption(name, e.get("category", ""))))
        for key, v in (e.get("skin_variations") or {}).items():
            if v.get("has_img_google") and (img / v["image"]).is_file():
                out.append((img / v["image"], _caption(name, e["category"], key.split("-"))))
    if not out:
        raise ValueError(f"{pkg}: emoji.json lists no Google images found in {img}")
    return out


def emoji_folder(out, root=None, limit: int | None = None) -> Path:
    """A captioned folder of the emoji at `out` (written once: RGB PNGs on white, metadata.jsonl
    last, via a temporary folder)."""
    from PIL import Image

    out = Path(out)
    if (out / "metadata.jsonl").is_file():
        return out
    items = emoji_items(root)[:limit]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lines = []
    for i, (f, caption) in enumerate(items):
        with Image.open(f) as im:
            rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        name = f"{i:05d}.png"
        Image.alpha_composite(white, rgba).convert("RGB").save(tmp / name)
        lines.append(json.dumps({"file_name": name, "text": caption, "source": f.name}))
    (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    os.replace(tmp, out)
    return out
