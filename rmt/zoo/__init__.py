"""The model zoo: ``zoo.yaml``'s entries, a verified weights cache, and getting files into it.

```python
from rmt import zoo

zoo.get_entry("rmt_s").published_top1           # 84.1
zoo.download("swin_t")                           # from the Hugging Face hub (or RMT_ZOO_MIRROR)
zoo.download("rmt_b", source_file="RMT_B.pth")   # a file fetched by hand from Baidu pan
zoo.weights_path("rmt_b")                        # the verified cached file, or None
model = zoo.create_model("rmt_b", pretrained=True)
```

See docs/zoo.md for the schema, the cache layout, mirrors and offline use.
"""

from rmt.zoo.cache import CachedFile, WeightsCache, cache_dir
from rmt.zoo.fetch import Fetched, cache_report, download, how_to_get, pretrained_checkpoint, source_url, weights_path
from rmt.zoo.models import create_model, fold_for_inference
from rmt.zoo.registry import ZooEntry, get_entry, list_entries, load_zoo, zoo_file
from rmt.zoo.transfer import TransferOptions
from rmt.zoo.verify import CheckedFile, check_weights_file

__all__ = [
    "CachedFile",
    "CheckedFile",
    "Fetched",
    "TransferOptions",
    "WeightsCache",
    "ZooEntry",
    "cache_dir",
    "cache_report",
    "check_weights_file",
    "create_model",
    "fold_for_inference",
    "download",
    "get_entry",
    "how_to_get",
    "list_entries",
    "load_zoo",
    "pretrained_checkpoint",
    "source_url",
    "weights_path",
    "zoo_file",
]
