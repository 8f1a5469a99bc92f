"""The whole job: (simulate ->) ingest -> train -> impute and export (-> evaluate).

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- python jobs/pipeline.py --config my-job.yaml

See docs/cluster.md and jobs/example-pipeline.yaml.
"""

import sys

import _common

if __name__ == "__main__":
    sys.exit(_common.main("pipeline", __doc__.splitlines()[0]))
