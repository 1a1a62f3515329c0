"""Reading encoder weights from whatever a user has (a moco_tf model_dir or checkpoint, a TF-Hub
export of moco_tf, a PyTorch checkpoint): below training, which starts from them (--init_from),
and below the evaluation and transfer command lines, which load them (--pretrained)."""
