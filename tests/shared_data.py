"""Where the project's shared datasets live: `../shared` beside the checkout, as CI lays it out,
or `$GREENROUTE_SHARED_DIR` for a checkout elsewhere."""

import os
from pathlib import Path

SHARED = Path(os.environ.get("GREENROUTE_SHARED_DIR")
              or Path(__file__).resolve().parents[2] / "shared")
SHARED_TASKS = SHARED / "data/tasks"
SHARED_MMLU = SHARED / "data/outcomes/routellm_mmlu.jsonl"
