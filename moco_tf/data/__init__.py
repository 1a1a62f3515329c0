"""Data: image sources checked when made (`sources`), their tf.data pipelines for pretraining
and evaluation (`pipelines`), and the MoCo v1/v2 augmentations they apply (`augment`)."""
