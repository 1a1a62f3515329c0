"""moco_tf and the outside world: TF-Hub SavedModel exports (`hub`), official PyTorch
checkpoints (`torch`), and loading a backbone from whatever a user has (`pretrained`)."""
