import os

import torch

# Keep the suite fast and deterministic on small CPU machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))
