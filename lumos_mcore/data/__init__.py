from __future__ import annotations

from typing import Any


def build_dataset(cfg: Any) -> Any:
    """The ``SampleSource`` for a data section: ``FeatureDataset`` for a ``DataConfig``
    (precomputed features), ``MediaDataset`` for a ``MediaDataConfig`` (raw images / videos,
    batches to be encoded with ``lumos_mcore.encoders.FrozenEncoders``)."""
    from lumos_mcore.config.media import MediaDataConfig

    if isinstance(cfg, MediaDataConfig):
        from lumos_mcore.data.media.dataset import MediaDataset

        return MediaDataset(cfg)
    from lumos_mcore.data.features import FeatureDataset

    return FeatureDataset(cfg)
