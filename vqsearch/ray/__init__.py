"""vqsearch on a Ray cluster: a bank's rows split over shard actors spread across the nodes.

Imported only when asked for (`VQSEARCH_RAY_ADDRESS`, or `import vqsearch.ray`): Ray comes
with the `ray` extra (`pip install "vqsearch[server,ray]"`). `Cluster.connect` joins a
cluster and places the shards of the banks the server makes with `?shards=N` (`RayShards`);
each shard actor (`BankShard`) loads its rows from the bank's directory, which every node
sees, and restarts on a surviving node when its own dies. `tokenize_on_ray` runs
`vqsearch tokenize --ray` on Ray Data.
"""

from ._cluster import Cluster, RayShards
from ._shard import BankShard
from ._tokenize import tokenize_on_ray

__all__ = ["BankShard", "Cluster", "RayShards", "tokenize_on_ray"]
