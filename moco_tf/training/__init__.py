"""Pretraining: the run itself (`pretrain`), its checkpoints and run lock (`checkpoint`,
`runlock`), Keras callbacks (`callbacks`), tf.distribute strategies (`distribute`), and the
PyTorch-style optimizer and learning-rate schedules (`optimizers`, `schedules`).
Run one from Python: `moco_tf.pretrain(moco_tf.PretrainConfig(...))` (the function lives in
`moco_tf.training.pretrain`; not re-exported here, where that name is the module).
"""
