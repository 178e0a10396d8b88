"""Ray Jobs entrypoint for `rayseg segment` (same arguments, or --config with the same names).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/segment.py --config jobs/configs/segment.yaml --output s3://bucket/masks/run1
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("segment"))
