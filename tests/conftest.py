import os

import torch

# Keep the suite fast and deterministic on small CPU machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_small_cnn():
    """A small CNN trained for a few seconds on scikit-learn digits, with its loaders (session-cached)."""
    from hwquant.data import make_loaders
    from hwquant.models import create_model
    from hwquant.train import TrainConfig, fit

    loaders = make_loaders("digits", batch_size=64, eval_batch_size=128, calib_size=256, seed=0)
    torch.manual_seed(0)
    model = create_model("small_cnn", in_channels=1, num_classes=10)
    fit(model, loaders.train, TrainConfig(epochs=12, lr=0.1), progress=False)
    model.eval()
    return model, loaders
