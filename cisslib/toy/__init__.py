"""The embedded default's tiny CLIP: contrastive pretraining on the toy world."""
