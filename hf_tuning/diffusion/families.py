"""Block family of diffusion transformers (diffusers DiT and PixArt), registered when ``hf_tuning`` is imported.

diffusers' DiT keeps a copy of the timestep/label embedder inside every block
(``transformer_blocks.N.norm1.emb``), so each copy is staged with its block.
"""

from __future__ import annotations

from hf_tuning.families import BlockFamily, register_block_family

DIFFUSERS_DIT = register_block_family(
    BlockFamily(
        name="diffusers_dit",
        container="transformer_blocks",
        block_class=r"BasicTransformerBlock$",
        description="diffusers DiTTransformer2DModel / PixArt: `transformer_blocks.N`",
    )
)
