"""Block families of image backbones: timm and transformers ViT, Swin and ConvNeXt.

Registered when ``hf_tuning`` is imported. The hierarchical families come before ``timm_vit``: a Swin
stage also holds a ``blocks`` stack, and the first family that matches a model wins.
"""

from __future__ import annotations

from hf_tuning.families import BlockFamily, register_block_family

TIMM_SWIN = register_block_family(
    BlockFamily(
        name="timm_swin",
        container="layers",
        block_class=r"SwinTransformer(V2)?Stage$",
        stage_blocks="blocks",
        downsample_with_previous_stage=True,
        description="timm Swin / SwinV2: `layers.S.blocks.B`; `layers.S.downsample` opens stage S",
    )
)
TIMM_CONVNEXT = register_block_family(
    BlockFamily(
        name="timm_convnext",
        container="stages",
        block_class=r"ConvNeXtStage$",
        stage_blocks="blocks",
        downsample_with_previous_stage=True,
        stem_in_every_stage=True,
        description="timm ConvNeXt: `stages.S.blocks.B`; the stem is trained in every stage (the paper)",
    )
)
HF_SWIN = register_block_family(
    BlockFamily(
        name="hf_swin",
        container=r"encoder\.layers",
        block_class=r"Swin(v2)?Stage$",
        stage_blocks="blocks",
        description="transformers Swin / Swinv2: `encoder.layers.S.blocks.B`; the downsample closes stage S",
    )
)
HF_CONVNEXT = register_block_family(
    BlockFamily(
        name="hf_convnext",
        container=r"encoder\.stages",
        block_class=r"ConvNext(V2)?Stage$",
        stage_blocks="layers",
        downsample_with_previous_stage=True,
        stem_in_every_stage=True,
        description="transformers ConvNeXt / ConvNeXtV2: `encoder.stages.S.layers.B`",
    )
)
HF_VIT = register_block_family(
    BlockFamily(
        name="hf_vit",
        container="layers",
        block_class=r"(?<!Decoder)Layer$",
        description="transformers ViT, DeiT, DINOv2 and other `vit.encoder.layers.N` encoders",
    )
)
TIMM_VIT = register_block_family(
    BlockFamily(
        name="timm_vit",
        container="blocks",
        block_class=r"Block$",
        description="timm ViT, DeiT, EVA and other isotropic `blocks.N` models",
    )
)
