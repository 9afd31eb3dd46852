"""Running the model on Ray (``--engine ray``), by concern: ``cluster`` (joining, auth tokens),
``placement`` (replicas and decode tasks on the cluster), ``stages`` (what runs on Ray workers, and the
rows between them) and ``engine`` (``RayEngine``, behind the driver every run uses).

Only ``--engine ray`` imports this package; it imports neither torch nor transformers at the top, so
decode tasks stay light.
"""

from __future__ import annotations

from .cluster import RayEngineError
from .engine import RayEngine, Reorder
from .placement import Placement, RayOptions, plan_placement

__all__ = ["Placement", "RayEngine", "RayEngineError", "RayOptions", "Reorder", "plan_placement"]
