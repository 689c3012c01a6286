"""vqsearch on a Ray cluster: a bank's rows split over shard actors spread across the nodes.

Imported only when asked for (`VQSEARCH_RAY_ADDRESS`, or `import vqsearch.ray`): Ray comes
with the `ray` extra (`pip install "vqsearch[server,ray]"`). `Cluster.connect` joins a
cluster and places the shards of the banks the server makes with `?shards=N` (`RayShards`);
each shard actor (`BankShard`) loads its rows from the bank's directory, which every node
sees, and restarts on a surviving node when its own dies. `tokenize_on_ray` runs
`vqsearch tokenize --ray` on Ray Data. `serve_on_ray` serves the HTTP API from Ray Serve
replicas (`VQSEARCH_RAY_REPLICAS`), one writer behind them; `application` is the same for a
Serve config (a KubeRay RayService).
"""

from ._cluster import Cluster, RayShards
from ._serve import application, serve_on_ray
from ._shard import BankShard
from ._tokenize import tokenize_on_ray

__all__ = ["BankShard", "Cluster", "RayShards", "application", "serve_on_ray", "tokenize_on_ray"]
