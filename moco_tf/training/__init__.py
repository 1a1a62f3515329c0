"""Pretraining: the run itself (`pretrain`), its checkpoints and run lock (`checkpoint`,
`runlock`), Keras callbacks (`callbacks`), tf.distribute strategies (`distribute`), and the
PyTorch-style optimizer and learning-rate schedules (`optimizers`, `schedules`)."""
