"""Evaluation of a frozen encoder: weighted kNN and its training-time monitor (`knn`), the
linear classification protocol (`linear`), retrieval pictures (`pictures`), and the frozen,
inference-mode backbone both evaluate (`frozen`)."""
