"""Literate, runnable notebooks that teach pre-training methods and test the papers' claims at toy scale.

Modules:

- `pretrain_nb.contrastive`: Learn features by pulling two augmented views of the same image together and pushing other images away. This notebook builds SimCLR from its parts (augmentations, encoder, projection head, InfoNCE), then tests two papers that change it: Decoupled Contrastive Learning, and the study of which layer's features to keep.
- `pretrain_nb.models`: One readable transformer shared by every family: attention through `scaled_dot_product_attention`, norm placement and positional encoding as parameters; a GPT, an encoder with an MLM head, and a ViT that can be shown a subset of its patches (random masking, 2-D sine-cosine positions); the run settings of a transformer; and a FLOP count for comparing methods at matched compute. Source: `nbs/02_models.ipynb`."""

__version__ = "0.1.0"
