"""Data and training: MNIST-family loading, batches on the device, one trial's fit."""
