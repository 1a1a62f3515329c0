"""What the tests use that is not a test: helpers, a reference PyTorch MoCo, drivers run as processes."""
