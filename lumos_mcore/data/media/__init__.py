"""Raw encoded media: shards, decoding (DALI / PyAV), codec routing, buckets and the dataset.

Heavy optional dependencies (nvidia.dali, av, PIL) are imported where they are used, so this
package imports without them; ``MediaDecoder`` falls back to PyAV when DALI is absent.
"""

from lumos_mcore.data.media.buckets import Bucket, BucketSpec, clip_span, clip_start, crop_roi
from lumos_mcore.data.media.dali_decode import (
    DALI_CPU_VIDEO_CODECS,
    DALI_GPU_VIDEO_CODECS,
    DaliDecoder,
    DecodeRequest,
    dali_available,
)
from lumos_mcore.data.media.dataset import MEDIA_BAD_REASONS, MediaDataset
from lumos_mcore.data.media.decode import MediaDecoder, decode_pyav
from lumos_mcore.data.media.probe import MediaInfo, ProbeError, probe_media
from lumos_mcore.data.media.pyav_decode import DecodeError
from lumos_mcore.data.media.shards import MediaIndex, MediaShardWriter, build_media_index
from lumos_mcore.data.media.stall import StallTimer

__all__ = [
    "DALI_CPU_VIDEO_CODECS",
    "DALI_GPU_VIDEO_CODECS",
    "MEDIA_BAD_REASONS",
    "Bucket",
    "BucketSpec",
    "DaliDecoder",
    "DecodeError",
    "DecodeRequest",
    "MediaDataset",
    "MediaDecoder",
    "MediaIndex",
    "MediaInfo",
    "MediaShardWriter",
    "ProbeError",
    "StallTimer",
    "build_media_index",
    "clip_span",
    "clip_start",
    "crop_roi",
    "dali_available",
    "decode_pyav",
    "probe_media",
]
