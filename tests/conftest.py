import os
import sys

import torch

# the chapters live at the top level; tests import them as plain modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))
