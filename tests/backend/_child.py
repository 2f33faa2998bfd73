"""Child process for the cross-process tests: runs an EmbeddedBackend + worker on a state dir.

usage: _child.py STATE_DIR LEASE_SECONDS MODE
  MODE=serve  : serve work until killed or until stdin closes
  MODE=churn  : also schedule small fan-outs in a loop (crash test workload)
"""

import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flows  # noqa: E402
from harness import Harness  # noqa: E402


def main() -> None:
    state_dir, lease, mode = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    h = Harness(state_dir, lease_seconds=lease)
    h.start(with_worker=False)
    h.start_worker(max_activities=10)
    print("ready", flush=True)
    if mode == "churn":
        def churn() -> None:
            while True:
                h.client.schedule_new_orchestration(flows.fan_out, input=20)
        threading.Thread(target=churn, daemon=True).start()
    sys.stdin.read()
    h.stop()


if __name__ == "__main__":
    main()
