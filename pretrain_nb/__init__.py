"""Literate, runnable notebooks that teach pre-training methods and test the papers' claims at toy scale.

Modules:

- `pretrain_nb.bench`: Training tokens per second and peak memory of the shared GPT at about 0.2M, 1M and 6M parameters, and images per second of the ViT, against a plain nanoGPT-style implementation of the same configuration on the same machine, with model FLOPs utilization on a GPU.
- `pretrain_nb.continual`: A small GPT pre-trained on Shakespeare, then continued on Python code: how to re-warm the learning rate, schedules that never need re-warming, the temporary drop at the switch and how to soften it, how much old data to replay, and why a quality curriculum needs the right schedule.
- `pretrain_nb.contrastive`: Learn features by pulling two augmented views of the same image together and pushing other images away. This notebook builds SimCLR from its parts (augmentations, encoder, projection head, InfoNCE), then tests two papers that change it: Decoupled Contrastive Learning, and the study of which layer's features to keep.
- `pretrain_nb.data`: Real data that needs no network: Shakespeare's works, the Python standard library, Fashion-MNIST and the scikit-learn digits, as Hugging Face `datasets` objects, with splits that never move, a byte-level BPE and a character tokenizer, and packing into fixed-length blocks.
- `pretrain_nb.evaluation`: The measuring instruments every family notebook uses: a linear probe, a k-NN probe and an attentive probe on frozen features, fine-tuning with a fraction of the labels, perplexity, and mean ± std over seeds.
- `pretrain_nb.layernorm`: Post-LN, Pre-LN, Mix-LN and Peri-LN in one deep, narrow GPT; the diagnostics that tell them apart (gradient norm, residual variance and usefulness of each layer); and removing every LayerNorm from a trained model by fine-tuning.
- `pretrain_nb.mim`: Hide most of an image's patches and train a transformer to paint them back. This notebook builds the masked autoencoder from its parts, sweeps the mask ratio, adds MR-MAE's feature mimicking, and measures what the features are worth with a linear and an attentive probe.
- `pretrain_nb.mim_pretext`: Two pretext tasks that never predict a pixel: guess where a patch belongs, or pick the missing patch out of a line-up. Both are pre-trained on Fashion-MNIST, then fine-tuned with 1% to 100% of the labels against the same ViT trained from scratch.
- `pretrain_nb.models`: One readable transformer that every notebook shares: attention through `scaled_dot_product_attention`, norm placement and positional encoding as parameters, a GPT, an encoder with an MLM head and a ViT, and a FLOP count for comparing methods at matched compute.
- `pretrain_nb.repetition`: A fixed budget of unique text, trained on for 1 to 32 epochs at the same compute; dropout and weight decay as the repeats pile up; and, when compute is unlimited but data is not, ensembles, their distillation into one model, and the loss asymptotes that decide between them.
- `pretrain_nb.training`: AdamW, learning-rate schedules as plain functions, gradient accumulation to a global batch, clipping, periodic evaluation, a tidy history, and checkpoints that resume to the *bitwise* same result, on a CPU, one GPU or many, through Accelerate."""

__version__ = "0.1.0"
