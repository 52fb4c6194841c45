"""What the best model is for: export, Kaggle submission, reading a digit from a photo."""
