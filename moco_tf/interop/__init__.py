"""moco_tf's weights written for the outside world: TF-Hub SavedModel exports (`hub`), KerasHub
presets (`keras_hub`), ONNX (`onnx`), official PyTorch checkpoints and conversions from them
(`torch`). Reading weights from any of these is `moco_tf.weights`'."""
