"""Train eDICE on `store` with Ray Train; the model lands in `model`.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- python jobs/train.py --config my-job.yaml

See docs/cluster.md and jobs/example-pipeline.yaml (one config drives every job).
"""

import sys

import _common

if __name__ == "__main__":
    sys.exit(_common.main("train", __doc__.splitlines()[0]))
