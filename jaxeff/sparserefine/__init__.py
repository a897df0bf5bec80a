"""SparseRefine (ECCV'24, mit-han-lab/sparserefine): entropy-selected sparse high-resolution refinement on top of any
dense segmentation model's low-resolution logits. See README.md in this package."""

from jaxeff.sparserefine.data import (
    MEAN,
    STD,
    load_prediction,
    logits_from_prediction,
    normalize_image,
    upsample_nearest,
)
from jaxeff.sparserefine.refiner import (
    ENSEMBLERS,
    LOSSES,
    SELECTORS,
    TAU,
    EntropyEnsembler,
    GatedEnsembler,
    LearnableSelector,
    RefinerConfig,
    SparseRefiner,
    dice_loss,
    entropy,
    entropy_select,
    epoch_cosine_schedule,
    feature_channels,
    featurize,
    make_train_step,
    official_optimizer,
    paste,
    refiner_loss,
)
from jaxeff.sparserefine.sparse import (
    DOWNSAMPLE_MODES,
    CapacityError,
    Level,
    Pyramid,
    bucket_capacities,
    build_pyramid,
    check_capacity,
    coarse_mask,
    level_capacities,
    level_from_mask,
    level_masks,
    pyramid_counts,
)
from jaxeff.sparserefine.unet import OFFICIAL_UNET, TINY_UNET, SparseUNet, UNetConfig, unet_flops

__all__ = ["DOWNSAMPLE_MODES", "ENSEMBLERS", "LOSSES", "MEAN", "OFFICIAL_UNET", "SELECTORS", "STD", "TAU",
           "TINY_UNET", "CapacityError", "EntropyEnsembler", "GatedEnsembler", "LearnableSelector", "Level",
           "Pyramid", "RefinerConfig", "SparseRefiner", "SparseUNet", "UNetConfig", "bucket_capacities",
           "build_pyramid", "check_capacity", "coarse_mask", "dice_loss", "entropy", "entropy_select",
           "epoch_cosine_schedule", "feature_channels", "featurize", "level_capacities", "level_from_mask",
           "level_masks", "load_prediction", "logits_from_prediction", "make_train_step", "normalize_image",
           "official_optimizer", "paste", "pyramid_counts", "refiner_loss", "unet_flops", "upsample_nearest"]
