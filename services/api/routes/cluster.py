"""``GET /cluster``: the broadcaster's state and nodes, asked through the cluster client."""

from __future__ import annotations

from fastapi import APIRouter

from pmgd_node.shell.keys import Keys
from services.cluster.client import status

from ..schemas import ClusterStatus
from .deps import JobsDep, SettingsDep

router = APIRouter(tags=["cluster"])


def cluster_status(control: str, keys: Keys | None = None) -> dict:
    """The broadcaster at ``control`` as the API shows it: reachable or not, its state, job,
    drop counts and nodes (shard, seconds since the last heartbeat, drops)."""
    if not control:
        return {"broadcaster": "", "reachable": False, "state": "none", "nodes": {}}
    try:
        st = status(control, timeout_s=2.0, keys=keys)
    except (TimeoutError, RuntimeError) as err:
        return {"broadcaster": control, "reachable": False, "state": "unreachable", "error": str(err), "nodes": {}}
    return {"broadcaster": control, "reachable": True, "state": st["state"], "job": st.get("job"),
            "pause_reason": st.get("pause_reason", ""), "dropped": st.get("dropped", {}),
            "nodes": {k: {"shard": v["shard"], "last_heartbeat_s": v["last_seen_s"], "dropped": v["dropped"]}
                      for k, v in st["nodes"].items()}}


@router.get("/cluster", response_model=ClusterStatus, response_model_exclude_unset=True)
def cluster(settings: SettingsDep, jobs: JobsDep) -> dict:
    return cluster_status(settings.broadcaster, jobs.keys)
