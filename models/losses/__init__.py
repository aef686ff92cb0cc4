"""Training objectives shared by families: the adversarial game, StyleGAN2's regularisers, the vision-aided loss."""
