"""Build the track store: bigWigs listed in `manifest` -> Zarr store at `store`.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- python jobs/ingest.py --config my-job.yaml

See docs/cluster.md and jobs/example-pipeline.yaml (one config drives every job).
"""

import sys

import _common

if __name__ == "__main__":
    sys.exit(_common.main("ingest", __doc__.splitlines()[0]))
