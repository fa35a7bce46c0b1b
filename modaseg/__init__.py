"""modaseg: clothing segmentation on ModaNet, from COCO polygons to a distributed SMP U-Net.

Pipeline, one module per stage:
    synth (stand-in data) -> shard (prepare) -> data (load) -> model / losses -> train
    -> metrics -> evaluate / predict
"""

import os

__version__ = "0.1.0"

# Offline by default: nothing may hang on a hub download or an update check. A user's own setting wins.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
