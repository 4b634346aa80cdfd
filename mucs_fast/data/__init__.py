"""Training sets: the formats they arrive in, and the streamed `Source` the engine reads.

Floors (imports only point down):

    pack                     write a packed folder from any of the formats below
    stream                   open_source / streamable: which Source a tensor or a path is
    npy · safetensors_source · shards     file-backed Sources
    source · prefetch        the Source API (ranges, positions, digests), reading ahead
    captions · emoji         captioned image folders (metadata.jsonl), as diffusers' scripts
                             read them; Noto emoji as one
    files · digits · reference_folder     formats read whole: tensor files, image folders,
                             sklearn's digits, the reference's dataset folder
    checks                   one validation of images, labels and ids; uint8 → model range
"""

from .captions import (
    METADATA,
    CaptionedFolder,
    distinct_captions,
    read_captioned_folder,
    read_prompts,
)
from .checks import check_chw, check_ids, check_labels, to_model_range
from .digits import load_digits
from .files import (
    IMAGE_EXTENSIONS,
    TENSOR_EXTENSIONS,
    as_images,
    folder_ids,
    load_image_folder,
    load_images,
    load_labels,
    load_tensor_file,
    split_key,
)
from .npy import NpySource
from .pack import pack
from .prefetch import prefetch
from .safetensors_source import SafetensorsSource
from .shards import INDEX, ShardSource
from .source import ConcatSource, Source, TensorSource, source_digest
from .stream import open_source, streamable

__all__ = [
    "IMAGE_EXTENSIONS",
    "METADATA",
    "CaptionedFolder",
    "ConcatSource",
    "INDEX",
    "TENSOR_EXTENSIONS",
    "NpySource",
    "SafetensorsSource",
    "ShardSource",
    "Source",
    "TensorSource",
    "as_images",
    "check_chw",
    "check_ids",
    "check_labels",
    "distinct_captions",
    "folder_ids",
    "load_digits",
    "load_image_folder",
    "load_images",
    "load_labels",
    "load_tensor_file",
    "open_source",
    "pack",
    "prefetch",
    "read_captioned_folder",
    "read_prompts",
    "source_digest",
    "split_key",
    "streamable",
    "to_model_range",
]
