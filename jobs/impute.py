"""Genome-wide imputation with `model` on `store`, then export: bigWigs in `run`/bigwig/.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- python jobs/impute.py --config my-job.yaml

See docs/cluster.md and jobs/example-impute.yaml.
"""

import sys

import _common

if __name__ == "__main__":
    sys.exit(_common.main("impute", __doc__.splitlines()[0]))
